"""Damaged and tampered checkpoints, full disks, crashed writers and shared checkpoint dirs."""
import copy
import errno
import fcntl
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import checkpoint
import cli
import fileio
import inference
import ncf
import recommend
from checkpoint import CheckpointError
from conftest import TINY_ITEMS as ITEMS, TINY_USERS as USERS
from neumf import NeuMF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["-f", "4", "--layers", "8", "4"]


def train_flags(data, checkpoint_dir, *extra):
    return ["--data", data, "--checkpoint_dir", str(checkpoint_dir), "--log_path",
            str(checkpoint_dir / "log.json"), "-b", "256", "-t", "1.1", *SHAPE, *extra]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A checkpoint dir after one epoch: (model.pth state_dict, last.pth state)."""
    directory = tmp_path_factory.mktemp("trained")
    ncf.main(train_flags(tiny_data, directory, "-e", "1"))
    return (torch.load(directory / "model.pth", weights_only=True),
            torch.load(directory / "last.pth", weights_only=True))


def one_error_line(capsys, prog, path):
    """The single stderr line of a refusal, after checking that it names `prog` and `path`."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: {path}: ")
    return lines[0]


def ncf_test(data, path):
    return ncf.main, ["--data", data, "--mode", "test", "--load_checkpoint_path", str(path),
                      "--log_path", str(path.parent / "test.json"), *SHAPE]


def recommend_users(data, path):
    return recommend.main, ["--data", data, "--checkpoint", str(path), "--users", "100"]


def inference_bench(data, path):
    return inference.main, ["--device", "cpu", "--load_checkpoint_path", str(path),
                            "--batch_sizes", "4", "--num_batches", "1", "--warmup_batches", "0",
                            "--log_path", str(path.parent / "inference.json")]


# tool: (data, checkpoint) -> (its main, the arguments that evaluate the checkpoint)
TOOLS = {"ncf.py": ncf_test, "recommend.py": recommend_users, "inference.py": inference_bench}


def renamed(state, old, new):
    return {(new if key == old else key): value for key, value in state.items()}


def replaced(state, key, value):
    return {**state, key: value}


def without(state, key):
    return {name: value for name, value in state.items() if name != key}


STATE_DICT_DAMAGE = [
    ("renamed layer", lambda s: renamed(s, "mf_user_embed.weight", "mf_user.weight"),
     "unknown entries mf_user.weight"),
    ("1-D embedding", lambda s: replaced(s, "mf_user_embed.weight",
                                         s["mf_user_embed.weight"].flatten()),
     "mf_user_embed.weight has shape [120], expected 2-D and not empty"),
    ("2-D bias", lambda s: replaced(s, "final.bias", s["final.bias"].view(1, 1)),
     "final.bias has shape [1, 1], expected 1-D"),
    ("empty layer", lambda s: replaced(s, "mlp.0.weight", torch.zeros(0, 8)),
     "mlp.0.weight has shape [0, 8], expected 2-D and not empty"),
    ("missing bias", lambda s: without(s, "mlp.0.bias"), "missing mlp.0.bias"),
    ("missing embedding", lambda s: without(s, "mlp_item_embed.weight"),
     "missing mlp_item_embed.weight"),
    ("gap in the layers", lambda s: renamed(renamed(s, "mlp.0.weight", "mlp.1.weight"),
                                            "mlp.0.bias", "mlp.1.bias"),
     "missing mlp.0.weight"),
    ("extra entry", lambda s: replaced(s, "junk", torch.zeros(1)), "unknown entries junk"),
    ("extra layer bias", lambda s: replaced(s, "mlp.1.bias", torch.zeros(2)),
     "unexpected mlp.1.bias"),
    ("layer of another width", lambda s: replaced(s, "mlp.0.weight", s["mlp.0.weight"][:, :3]),
     "mlp.0.weight has shape [4, 3], the other tensors need [4, 8]"),
    ("item tables disagree", lambda s: replaced(s, "mf_item_embed.weight",
                                                s["mf_item_embed.weight"][:19]),
     "mf_item_embed.weight has shape [19, 4], the other tensors need [20, 4]"),
    ("final layer of another width", lambda s: replaced(s, "final.weight", torch.zeros(1, 7)),
     "final.weight has shape [1, 7], the other tensors need [1, 8]"),
    ("integer weights", lambda s: replaced(s, "final.weight", s["final.weight"].int()),
     "final.weight holds int32 values, expected floating point"),
    ("a value that is no tensor", lambda s: replaced(s, "final.bias", [0.0]),
     "expected a state_dict of tensors"),
    ("a list", lambda s: list(s.values()), "expected a state_dict of tensors"),
]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage, expected", [(damage, expected) for _, damage, expected
                                              in STATE_DICT_DAMAGE],
                         ids=[name for name, _, _ in STATE_DICT_DAMAGE])
def test_tampered_state_dict_is_one_line(tiny_data, trained, tmp_path, capsys, tool, damage,
                                         expected):
    path = tmp_path / "model.pth"
    torch.save(damage(dict(trained[0])), path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(*TOOLS[tool](tiny_data, path))
    assert exit_info.value.code == 2
    line = one_error_line(capsys, tool, path)
    assert f"not a NeuMF checkpoint ({expected}" in line
    assert line.endswith("use a checkpoint written by ncf.py")


@pytest.mark.parametrize("tool", TOOLS)
def test_untampered_state_dict_is_accepted_by_every_tool(tiny_data, trained, tmp_path, tool):
    path = tmp_path / "model.pth"
    torch.save(trained[0], path)
    main, argv = TOOLS[tool](tiny_data, path)
    main(argv)


@pytest.mark.parametrize("layers", [[8], [8, 4], [16, 8, 4, 2]])
def test_neumf_shapes_follow_the_parameter_order(layers):
    model = NeuMF(5, 7, 3, layers)
    assert checkpoint.neumf_shapes(model.state_dict(), "m.pth") == {
        name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def other_model_optimizer(factors, layers):
    """The Adam state of a NeuMF of another shape after one step."""
    model = NeuMF(USERS, ITEMS, factors, layers)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.tensor([0]), torch.tensor([0])).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def edit(change):
    def edited(state):
        state = copy.deepcopy(state)
        change(state)
        return state
    return edited


def set_entry(keys, value):
    def change(state):
        *parents, last = keys
        for key in parents:
            state = state[key]
        state[last] = value
    return edit(change)


def delete_entry(*keys):
    def change(state):
        *parents, last = keys
        for key in parents:
            state = state[key]
        del state[last]
    return edit(change)


LAST_PTH_DAMAGE = [
    ("a list", lambda s: [s], "holds a list of length 1, expected a dict"),
    ("no optimizer", delete_entry("optimizer"), "missing optimizer"),
    ("no rng", delete_entry("rng"), "missing rng"),
    ("negative epoch", set_entry(["epoch"], -1), "epoch is -1, expected a whole number, 0 or more"),
    ("epoch as text", set_entry(["epoch"], "1"), "epoch is '1', expected a whole number"),
    ("epoch as bool", set_entry(["epoch"], True), "epoch is True, expected a whole number"),
    ("epoch beyond history", set_entry(["epoch"], 5), "epoch is 5 but history holds 1 epochs"),
    ("best as list", set_entry(["best"], [0.5]), "best is a list of length 1, expected a dict"),
    ("best without hr", delete_entry("best", "hr"), "best is a dict of length 8"),
    ("best time as text", set_entry(["best", "time_to_best"], "soon"), "best is a dict"),
    ("best hr NaN", set_entry(["best", "hr"], float("nan")), "best is a dict"),
    ("best hr above 1", set_entry(["best", "hr"], 1.5), "best is a dict"),
    ("best ndcg below 0", set_entry(["best", "ndcg"], -0.1), "best is a dict"),
    ("history of None", set_entry(["history"], None), "history is None, expected a list"),
    ("history record without throughput", delete_entry("history", 0, "train_throughput"),
     "history is a list of length 1, expected a list of dicts"),
    ("args as list", set_entry(["args"], ["-e", "1"]), "args is a list of length 2"),
    ("args without --data", set_entry(["args"], {"epochs": 1}),
     "args is a dict of length 1, expected a dict of flags with the --data path"),
    ("history metric as text", set_entry(["history", 0, "hr@10"], "high"),
     "history is a list of length 1, expected a list of dicts of numbers"),
    ("data without nb_train", delete_entry("data", "nb_train"), "data is a dict of length 3"),
    ("negative nb_users", set_entry(["data", "nb_users"], -30), "data is a dict of length 4"),
    ("precision as a bool", set_entry(["precision"], False),
     "precision is False, expected one of float32, tf32, bfloat16, float16"),
    ("precision of another type", set_entry(["precision"], "float64"),
     "precision is 'float64', expected one of"),
    ("precision as a tensor", set_entry(["precision"], torch.zeros(2)),
     "precision is a float32 tensor of shape [2], expected one of"),
    ("scaler as list", set_entry(["scaler"], []), "scaler is a list of length 0"),
    ("mixed precision without a loss scale", set_entry(["precision"], "float16"),
     "scaler lacks the loss scale of a mixed-precision run"),
    ("rng of the wrong size", set_entry(["rng", "torch"], torch.zeros(5, dtype=torch.uint8)),
     "rng is a dict of length 2, expected {'torch': a uint8 tensor of"),
    ("rng of floats", set_entry(["rng", "torch"], torch.zeros(torch.get_rng_state().numel())),
     "rng is a dict of length 2"),
    ("rng as None", set_entry(["rng"], None), "rng is None"),
    # load_state_dict takes these over the flags: the run would go on with them, or fail later
    ("amsgrad as text", set_entry(["optimizer", "param_groups", 0, "amsgrad"], "x"),
     "optimizer's amsgrad is 'x', expected a number or a flag"),
    ("another learning rate", set_entry(["optimizer", "param_groups", 0, "lr"], 100.0),
     "optimizer's lr 100.0 is not the saved run's --learning_rate "),
    ("other betas", set_entry(["optimizer", "param_groups", 0, "betas"], (0.25, 0.999)),
     "optimizer's beta2 0.999 is not the saved run's --beta2 0.5"),
    # Of the right size and type, but no Mersenne Twister state: set_rng_state refuses it.
    ("rng of zeros", set_entry(["rng", "torch"], torch.zeros(torch.get_rng_state().numel(),
                                                            dtype=torch.uint8)),
     "rng is a dict of length 2"),
    ("cuda rng as text", set_entry(["rng", "cuda"], "seed"), "rng is a dict of length 2"),
    ("no cuda rng entry", delete_entry("rng", "cuda"), "rng is a dict of length 1"),
    ("optimizer as None", set_entry(["optimizer"], None), "optimizer is None"),
    ("optimizer of a model with fewer layers",
     set_entry(["optimizer"], other_model_optimizer(4, [8])),
     "optimizer's parameters are a list of length 6, the model has 8: an optimiser state of "
     "another model"),
    ("optimizer of a model with other factors",
     set_entry(["optimizer"], other_model_optimizer(6, [8, 4])),
     "optimizer's exp_avg of parameter 0 is a float32 tensor of shape [30, 6], the parameter "
     "is [30, 4]: an optimiser state of another model"),
    ("optimizer moment of another shape",
     set_entry(["optimizer", "state", 7, "exp_avg_sq"], torch.zeros(3)),
     "optimizer's exp_avg_sq of parameter 7 is a float32 tensor of shape [3]"),
    ("optimizer without a moment", delete_entry("optimizer", "state", 2, "exp_avg"),
     "optimizer's state 2 is not the Adam state of a model parameter"),
    ("optimizer state of a ninth parameter",
     set_entry(["optimizer", "state", 8], {"step": torch.tensor(1.0)}),
     "optimizer's state 8 is not the Adam state"),
    ("optimizer step as int", set_entry(["optimizer", "state", 0, "step"], 1),
     "optimizer's step of parameter 0 is 1"),
    ("negative optimizer step", set_entry(["optimizer", "state", 0, "step"], torch.tensor(-1.0)),
     "optimizer's step of parameter 0 is a float32 tensor of shape []"),
    ("two parameter groups", edit(lambda s: s["optimizer"]["param_groups"].append({})),
     "optimizer is not the state of one Adam parameter group"),
    ("learning rate as text", set_entry(["optimizer", "param_groups", 0, "lr"], "fast"),
     "optimizer lacks numeric lr, betas, eps or weight_decay"),
    ("one beta", set_entry(["optimizer", "param_groups", 0, "betas"], (0.9,)),
     "optimizer lacks numeric lr, betas, eps or weight_decay"),
]


@pytest.mark.parametrize("damage, expected", [(damage, expected) for _, damage, expected
                                              in LAST_PTH_DAMAGE],
                         ids=[name for name, _, _ in LAST_PTH_DAMAGE])
def test_tampered_last_pth_is_refused_before_use(tiny_data, trained, tmp_path, capsys, damage,
                                                 expected):
    torch.save(damage(trained[1]), tmp_path / "last.pth")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "2", "--resume"))
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "ncf.py", tmp_path / "last.pth")
    assert f": not a training state written by ncf.py ({expected}" in line
    assert line.endswith("; run without --resume to start afresh")


def test_tampered_model_inside_last_pth_is_refused(tiny_data, trained, tmp_path, capsys):
    state = copy.deepcopy(trained[1])
    state["model"]["mf_user_embed.weight"] = state["model"]["mf_user_embed.weight"].flatten()
    torch.save(state, tmp_path / "last.pth")
    with pytest.raises(SystemExit):
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "2", "--resume"))
    assert "not a NeuMF checkpoint (mf_user_embed.weight has shape [120]" in \
        one_error_line(capsys, "ncf.py", tmp_path / "last.pth")


def test_untampered_last_pth_passes(trained):
    weights = checkpoint.check_training_state(trained[1], "last.pth")
    assert weights.keys() == trained[1]["model"].keys()
    assert all(torch.equal(weights[key], trained[1]["model"][key]) for key in weights)


@pytest.mark.parametrize("tool", TOOLS)
def test_a_flipped_bit_in_a_weight_is_refused_in_one_line(tiny_data, trained, tmp_path, capsys,
                                                          tool):
    path = tmp_path / "model.pth"
    checkpoint.atomic_save(trained[0], path)
    content = bytearray(path.read_bytes())
    weights = trained[0]["final.weight"].numpy().tobytes()
    assert content.count(weights) == 1
    content[content.index(weights)] ^= 1
    path.write_bytes(content)
    # torch.load reads it without a word: one weight is now another.
    assert not torch.equal(torch.load(path, weights_only=True)["final.weight"],
                           trained[0]["final.weight"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(*TOOLS[tool](tiny_data, path))
    assert exit_info.value.code == 2
    line = one_error_line(capsys, tool, path)
    assert line.startswith(f"{tool}: error: {path}: damaged: its entry archive/data/")
    assert line.endswith(" no longer matches the checksum it was saved with; pass a complete "
                         "file written by ncf.py")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_in_one_line(tiny_data, trained, tmp_path, capsys, tool,
                                                    value):
    state = copy.deepcopy(trained[0])
    state["mlp.0.weight"][3, 2] = value
    path = tmp_path / "model.pth"
    torch.save(state, path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(*TOOLS[tool](tiny_data, path))
    assert exit_info.value.code == 2
    assert one_error_line(capsys, tool, path) == (
        f"{tool}: error: {path}: mlp.0.weight holds NaN or infinite weights; use a checkpoint "
        f"written by ncf.py")


def sparse_weight(state):
    return {**state, "mf_user_embed.weight": state["mf_user_embed.weight"].to_sparse()}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("write, expected", [
    (lambda path, trained: torch.save(sparse_weight(trained[0]), path),
     "mf_user_embed.weight is a sparse_coo tensor; ncf.py saves dense tensors only, pass a "
     "checkpoint written by ncf.py"),
    (lambda path, trained: torch.save({**trained[1], "model": sparse_weight(trained[1]["model"])},
                                      path),
     "model.mf_user_embed.weight is a sparse_coo tensor; ncf.py saves dense tensors only, pass "
     "a checkpoint written by ncf.py"),
    # random bytes: no pickle at all, so no objects that would run code
    (lambda path, trained: path.write_bytes(bytes(range(7, 256)) * 20),
     "not a PyTorch checkpoint, or a damaged one; pass a complete file written by ncf.py"),
    (lambda path, trained: path.write_bytes(torch.Generator().manual_seed(3).get_state()
                                            .numpy().tobytes()[:4000]),
     "not a PyTorch checkpoint, or a damaged one; pass a complete file written by ncf.py"),
])
def test_what_is_no_checkpoint_of_dense_weights_is_named_in_one_line(tiny_data, trained,
                                                                       tmp_path, capsys, tool,
                                                                       write, expected):
    path = tmp_path / "model.pth"
    write(path, trained)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(*TOOLS[tool](tiny_data, path))
    assert exit_info.value.code == 2
    assert one_error_line(capsys, tool, path) == f"{tool}: error: {path}: {expected}"


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle(kind, path, marker):
    payload = {"model": RunsCode(marker)}
    if kind == "torch.save":
        torch.save(payload, path)
    elif kind == "legacy torch.save":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(kind.removeprefix("pickle protocol "))))


PICKLES = ["torch.save", "legacy torch.save", "pickle protocol 0", "pickle protocol 2",
           "pickle protocol 5"]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("kind", PICKLES)
def test_code_running_pickle_is_refused_in_one_line(tiny_data, tmp_path, capsys, tool, kind):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    write_pickle(kind, path, marker)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        cli.run(*TOOLS[tool](tiny_data, path))
    assert exit_info.value.code == 2
    assert "refused: it holds objects that would run code" in one_error_line(capsys, tool, path)
    assert not marker.exists()
    assert [str(warning.message) for warning in caught] == []


def test_code_running_pickle_refusal_is_the_only_stderr_line_of_the_cli(tiny_data, tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    write_pickle("pickle protocol 5", path, marker)
    result = subprocess.run([sys.executable, "inference.py", "--device", "cpu",
                             "--load_checkpoint_path", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"inference.py: error: {path}: refused: it holds objects that would run code when "
        f"loaded (only tensors and plain values are accepted); pass a state_dict saved by ncf.py"]
    assert not marker.exists()


def failing_save(error_number):
    def save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError(error_number, os.strerror(error_number))
    return save


def failing_fsync(error_number):
    def fsync(descriptor):
        raise OSError(error_number, os.strerror(error_number))
    return fsync


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
@pytest.mark.parametrize("patch", [(checkpoint.torch, "save", failing_save),
                                   (fileio.os, "fsync", failing_fsync)],
                         ids=["torch.save", "fsync"])
def test_failed_save_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, patch,
                                                              error_number):
    path = tmp_path / "last.pth"
    checkpoint.atomic_save({"epoch": 1}, path)
    before = path.read_bytes()
    module, name, make_failure = patch
    monkeypatch.setattr(module, name, make_failure(error_number))
    with pytest.raises(CheckpointError) as caught:
        checkpoint.atomic_save({"epoch": 2}, path)
    assert str(caught.value) == (f"{path}: cannot be saved ({os.strerror(error_number)}); the "
                                 f"previous file, if any, is unchanged; free space on that disk "
                                 f"or write elsewhere")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]


def test_a_write_the_kernel_refuses_inside_torch_save_is_one_line(tmp_path):
    # Not a mock: torch.save's zip writer meets the refused write itself and raises its own
    # RuntimeError. A file size limit refuses writes as a full disk does (EFBIG; Python ignores
    # SIGXFSZ), and only in the child.
    path = tmp_path / "last.pth"
    checkpoint.atomic_save({"epoch": 1}, path)
    before = path.read_bytes()
    script = ("import resource, sys, torch, checkpoint\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
              "try:\n"
              "    checkpoint.atomic_save({'epoch': torch.zeros(1 << 20)}, sys.argv[1])\n"
              "except checkpoint.CheckpointError as error:\n"
              "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (f"{path}: cannot be saved (File too large); the previous file, if "
                             f"any, is unchanged; free space on that disk or write elsewhere\n")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]


def test_full_disk_during_training_is_one_line_and_keeps_last_epoch(tiny_data, tmp_path,
                                                                    monkeypatch, capsys):
    real_save = torch.save

    def save_until_epoch_two(obj, handle):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            failing_save(errno.ENOSPC)(obj, handle)
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_epoch_two)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "3"))
    assert exit_info.value.code == 2
    assert "cannot be saved (No space left on device)" in \
        one_error_line(capsys, "ncf.py", tmp_path / "last.pth")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    dead, alive = process.pid, os.getppid()
    leftovers = {name: f"leftover {name}" for name in (
        f".last.pth.{dead}.tmp", f".last.pth.{alive}.tmp", f".model.pth.{dead}.tmp",
        ".last.pth.notapid.tmp")}
    for name, text in leftovers.items():
        (tmp_path / name).write_text(text)
    checkpoint.atomic_save({"epoch": 1}, tmp_path / "last.pth")
    # A live writer's file and other files' temporaries stay.
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["last.pth", f".last.pth.{alive}.tmp", f".model.pth.{dead}.tmp", ".last.pth.notapid.tmp"])


def test_atomic_output_fsyncs_the_file_before_and_the_directory_after_the_rename(tmp_path,
                                                                                monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    path = tmp_path / "finished"
    with fileio.atomic_output(path) as temporary, open(temporary, "w") as handle:
        handle.write("done\n")
    assert events == [("fsync", str(tmp_path / f".finished.{os.getpid()}.tmp")),
                      ("replace", str(path)), ("fsync", str(tmp_path))]
    assert path.read_text() == "done\n"


def test_lock_is_exclusive_names_the_holder_and_is_released_on_close(tmp_path):
    held = fileio.lock_directory(str(tmp_path))
    with pytest.raises(fileio.DirectoryLocked) as caught:
        fileio.lock_directory(str(tmp_path))
    assert caught.value.holder == str(os.getpid())
    held.close()
    fileio.lock_directory(str(tmp_path)).close()


HOLD_LOCK = """
import sys
sys.path.insert(0, sys.argv[2])
from fileio import lock_directory
lock = lock_directory(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_training_on_a_locked_checkpoint_dir_is_refused(tiny_data, tmp_path, capsys):
    (tmp_path / "log.json").write_text("the first run's log\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), ROOT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as exit_info:
            cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "1"))
        assert exit_info.value.code == 2
        line = one_error_line(capsys, "ncf.py", f"--checkpoint_dir {tmp_path}")
        assert line.endswith(f"in use by another training (pid {holder.pid}); wait for it to "
                             f"end or pass another --checkpoint_dir")
        assert (tmp_path / "log.json").read_text() == "the first run's log\n"
    finally:
        holder.kill()  # a killed holder must leave no stale lock
        holder.wait()
    summary = ncf.main(train_flags(tiny_data, tmp_path, "-e", "1"))
    assert summary["epochs_run"] == 1


def test_a_lock_file_its_holder_removed_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    # A run that fails removes the lock file of the directory it created; another run that
    # opened that file just before would otherwise lock a file no one else can find.
    first = fileio.lock_directory(str(tmp_path))
    real_flock = fcntl.flock

    def flock_after_the_holder_left(handle, operation):
        if not first.closed:
            os.remove(tmp_path / fileio.LOCK_NAME)
            first.close()
        real_flock(handle, operation)

    monkeypatch.setattr(fileio.fcntl, "flock", flock_after_the_holder_left)
    second = fileio.lock_directory(str(tmp_path))
    try:
        with pytest.raises(fileio.DirectoryLocked):
            fileio.lock_directory(str(tmp_path))
    finally:
        second.close()


def test_a_directory_proved_unwritable_is_not_left_created(tmp_path, monkeypatch):
    def full_disk(path, mode="r"):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    # The probe file is the first thing written into the new directory.
    monkeypatch.setattr(fileio, "open", full_disk, raising=False)
    with pytest.raises(OSError):
        fileio.make_writable_dir(str(tmp_path / "new" / "ck"))
    assert os.listdir(tmp_path) == []


def refused_training(data, checkpoint_dir, tmp_path, *extra):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, ["--data", str(data), "--checkpoint_dir", str(checkpoint_dir),
                           "--log_path", str(tmp_path / "log.json"), "-b", "256", *SHAPE, *extra])
    assert exit_info.value.code == 2


def test_a_run_refused_before_training_leaves_no_directory_it_created(tiny_data, tmp_path,
                                                                       capsys):
    refused_training(tmp_path / "missing", tmp_path / "new" / "ck", tmp_path)
    assert "train_ratings.pt: not found" in capsys.readouterr().err
    # Refused once the data has loaded: a batch larger than an epoch.
    refused_training(tiny_data, tmp_path / "new" / "ck", tmp_path, "-b", "100000")
    assert "no full batch would be trained" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_full_disk_leaves_no_checkpoint_dir_it_created(tiny_data, full_disk, tmp_path, capsys):
    refused_training(tiny_data, full_disk / "new" / "ck", tmp_path)
    assert capsys.readouterr().err == (
        f"ncf.py: error: --checkpoint_dir {full_disk / 'new' / 'ck'}: cannot write there (No "
        f"space left on device); pass --checkpoint_dir with a writable directory\n")
    assert os.listdir(full_disk) == ["filler"]


def test_a_refused_run_leaves_directories_it_found(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    refused_training(tmp_path / "missing", existing, tmp_path)
    refused_training(tmp_path / "missing", existing / "ck", tmp_path)
    assert os.listdir(tmp_path) == ["existing"]
    assert os.listdir(existing) == [fileio.LOCK_NAME]


def test_a_run_that_failed_after_saving_keeps_the_directory_it_created(tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    real_save = torch.save

    def save_all_but_last_pth(obj, handle):
        if isinstance(obj, dict) and "epoch" in obj:
            failing_save(errno.ENOSPC)(obj, handle)
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint.torch, "save", save_all_but_last_pth)
    checkpoints = tmp_path / "new" / "ck"
    refused_training(tiny_data, checkpoints, tmp_path, "-e", "1")
    assert "cannot be saved (No space left on device)" in capsys.readouterr().err
    assert sorted(os.listdir(checkpoints)) == [fileio.LOCK_NAME, "model.pth"]
