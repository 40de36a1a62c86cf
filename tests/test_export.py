"""export.py: the exported graph equals model(user, item) when loaded by its own runtime alone."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import export
from test_recommend import ITEM_IDS, USER_IDS, model_for
from test_serve import ROOT, write_served_data


@pytest.fixture
def files(tmp_path):
    return {**write_served_data(tmp_path), "tmp": tmp_path}


def export_argv(files, output, *extra):
    return ["--load_checkpoint_path", files["checkpoint"], "--data", files["data"],
            "--output", str(output), *extra]


def run_export(files, output, *extra):
    export.main(export_argv(files, output, *extra))


def every_pair():
    """All 4 x 10 (user, item) pairs of the served data, as one batch."""
    users = torch.arange(len(USER_IDS)).repeat_interleave(len(ITEM_IDS))
    return users, torch.arange(len(ITEM_IDS)).repeat(len(USER_IDS))


def expected_logits(users, items):
    with torch.no_grad():
        return model_for(len(USER_IDS), len(ITEM_IDS))(users, items)


# torch 2.13 deprecates torch.jit for new work; loading its files is what is tested here.
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("probabilities", [False, True])
def test_torchscript_matches_the_model_through_plain_jit_load(files, probabilities):
    output = files["tmp"] / "ncf.pt"
    run_export(files, output, "--format", "torchscript",
               *(["--probabilities"] if probabilities else []))
    loaded = torch.jit.load(str(output))
    for users, items in (every_pair(), (torch.tensor([3]), torch.tensor([9]))):
        with torch.no_grad():
            result = loaded(users, items)
        logits = result[0] if probabilities else result
        assert logits.shape == (len(users), 1)
        torch.testing.assert_close(logits, expected_logits(users, items), rtol=0, atol=1e-5)
        if probabilities:
            torch.testing.assert_close(result[1], torch.sigmoid(logits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("probabilities", [False, True])
def test_onnx_matches_the_model_through_onnxruntime(files, probabilities):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    output = files["tmp"] / "ncf.onnx"
    run_export(files, output, "--format", "onnx",
               *(["--probabilities"] if probabilities else []))
    graph = onnx.load(str(output))
    assert [opset.version for opset in graph.opset_import if opset.domain in ("", "ai.onnx")] \
        == [export.OPSET]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    names = ["logits", "probabilities"] if probabilities else ["logits"]
    assert [(node.name, node.type, node.shape) for node in session.get_inputs()] == [
        ("user", "tensor(int64)", ["batch"]), ("item", "tensor(int64)", ["batch"])]
    assert [(node.name, node.shape) for node in session.get_outputs()] == [
        (name, ["batch", 1]) for name in names]
    for users, items in (every_pair(), (torch.tensor([3]), torch.tensor([9]))):
        result = session.run(None, {"user": users.numpy(), "item": items.numpy()})
        logits = torch.from_numpy(result[0])
        torch.testing.assert_close(logits, expected_logits(users, items), rtol=0, atol=1e-5)
        if probabilities:
            torch.testing.assert_close(torch.from_numpy(result[1]), torch.sigmoid(logits),
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift, written", [(5e-6, True), (1e-3, False)])
def test_the_written_graph_is_checked_against_the_model(files, monkeypatch, capsys, shift,
                                                        written):
    """A graph whose logits are off by `shift` is written only within the 1e-5 tolerance."""
    real_trace = torch.jit.trace

    def trace_shifted(module, example):
        shifted = copy.deepcopy(module)
        with torch.no_grad():
            shifted.model.final.bias += shift
        return real_trace(shifted, example)
    monkeypatch.setattr(torch.jit, "trace", trace_shifted)
    output = files["tmp"] / "ncf.pt"
    if written:
        run_export(files, output, "--format", "torchscript")
        assert output.is_file()
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.run(export.main, export_argv(files, output, "--format", "torchscript"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the exported logits differ from the model's" in error
    assert sorted(os.listdir(files["tmp"])) == ["data", "model.pth", "movies.csv"]


def junk(path):
    path.write_bytes(b"not a checkpoint")
    return str(path)


def without_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import then raises ImportError


@pytest.mark.parametrize("flags, setup, named", [
    ({"--load_checkpoint_path": lambda tmp: str(tmp / "none.pth")}, None,
     "none.pth: no such checkpoint file"),
    ({"--load_checkpoint_path": lambda tmp: junk(tmp / "junk.pth")}, None,
     "junk.pth: not a PyTorch checkpoint"),
    ({"--load_checkpoint_path": lambda tmp: save_model(tmp / "other.pth", 5, 10)}, None,
     "other.pth: checkpoint has 5 users and 10 items, data has 4 users and 10 items"),
    ({"--load_checkpoint_path": lambda tmp: save_model(tmp / "other.pth", 4, 11)}, None,
     "checkpoint has 4 users and 11 items"),
    ({"--data": lambda tmp: str(tmp / "nowhere")}, None, "nowhere"),
    ({"--data": lambda tmp: str(tmp)}, None, "train_ratings.pt: not found"),
    ({"--output": lambda tmp: str(tmp / "no" / "ncf.onnx")}, None, "directory"),
    ({"--format": lambda tmp: "savedmodel"}, None, "--format: invalid choice"),
    ({}, without_onnxruntime, "--format onnx: needs the Python package onnxruntime"),
])
def test_refusals_are_one_line_and_write_nothing(files, monkeypatch, capsys, flags, setup, named):
    tmp = files["tmp"]
    argv = {"--load_checkpoint_path": files["checkpoint"], "--data": files["data"],
            "--format": "onnx", "--output": str(tmp / "out" / "ncf.onnx")}
    (tmp / "out").mkdir()
    argv.update({flag: make(tmp) for flag, make in flags.items()})
    if setup:
        setup(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(export.main, [word for pair in argv.items() for word in pair])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("export.py: error: ") and named in error
    assert os.listdir(tmp / "out") == []


def save_model(path, nb_users, nb_items):
    torch.save(model_for(nb_users, nb_items).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("output, error", [
    (lambda files: files["tmp"] / "out",
     "--output {out}: is a directory; name the file to write, such as {out}/ncf.pt"),
    # A typo away from replacing the trained model with its export.
    (lambda files: files["checkpoint"],
     "--output {checkpoint}: is the checkpoint being exported, which the export would replace; "
     "name another file"),
    # "" would name the current directory's parent and fail only once the export is done
    (lambda files: "", "--output is empty; name the file to write, such as ncf.pt"),
], ids=["directory", "checkpoint", "empty"])
def test_a_directory_or_the_checkpoint_as_output_is_refused_before_any_work(files, capsys,
                                                                            output, error):
    out = files["tmp"] / "out"
    out.mkdir()
    checkpoint = Path(files["checkpoint"]).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(export.main, export_argv(files, output(files), "--format", "torchscript"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "export.py: error: " + error.format(
        out=out, checkpoint=files["checkpoint"]) + "\n"
    assert os.listdir(out) == []
    assert Path(files["checkpoint"]).read_bytes() == checkpoint


def test_a_reader_that_goes_away_is_no_error(files):
    """`export.py ... | true`: the file is written, so the exit status is 0 and stderr quiet."""
    output = files["tmp"] / "ncf.pt"
    with subprocess.Popen(
            [sys.executable, "export.py", "--load_checkpoint_path", files["checkpoint"],
             "--data", files["data"], "--format", "torchscript", "--output", str(output)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # long before the child has imported torch, let alone printed
        error = process.stderr.read()
        assert (process.wait(timeout=120), error) == (0, b"")
    assert output.is_file()


def test_the_torchscript_exporter_is_asked_for_only_where_the_keyword_exists():
    def before_2_5(model, args, f, export_params=True, opset_version=None, input_names=None,
                   output_names=None, dynamic_axes=None):
        pass

    def from_2_5(model, args, f, *, dynamo=True, opset_version=None, input_names=None,
                 output_names=None, dynamic_axes=None):
        pass

    assert export.torchscript_exporter(before_2_5) == {}
    assert export.torchscript_exporter(from_2_5) == {"dynamo": False}
    assert export.torchscript_exporter(torch.onnx.export) == {"dynamo": False}
