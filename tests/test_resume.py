"""--resume and checkpoint safety: the original saves weights only and loads any pickle."""
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import ncf
from checkpoint import CheckpointError, load_checkpoint
from logger import log_records, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(data, checkpoints, *extra):
    return ["--data", data, "--checkpoint_dir", str(checkpoints), "--log_path",
            str(checkpoints / "log.json"), "-b", "2048", "--threshold", "1.1", *extra]


def epoch_hrs(log_path):
    by_epoch = {}
    for record in log_records(read_log(log_path), "epoch"):
        by_epoch[record["epoch"]] = (record["hr@10"], record["ndcg@10"], record["train_loss"])
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


@pytest.fixture(scope="module")
def uninterrupted(clustered_data, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("whole")
    ncf.main(flags(clustered_data, checkpoints, "-e", "4"))
    return checkpoints


def test_resume_continues_exactly(clustered_data, uninterrupted, tmp_path, capsys):
    ncf.main(flags(clustered_data, tmp_path, "-e", "2"))
    capsys.readouterr()
    ncf.main(flags(clustered_data, tmp_path, "-e", "4", "--resume"))
    out = capsys.readouterr().out
    assert "Resuming from" in out and "2 epochs done" in out
    assert "warning: resuming with a changed setting: --epochs 2 -> 4" in out
    assert epoch_hrs(tmp_path / "log.json") == epoch_hrs(uninterrupted / "log.json")
    resumed = torch.load(tmp_path / "model.pth", weights_only=True)
    whole = torch.load(uninterrupted / "model.pth", weights_only=True)
    assert all(torch.equal(resumed[key], whole[key]) for key in whole)
    # The appended log's every settings record carries what the original's readers look up
    # there (qa/generate_tables.py reads batch_size of each).
    settings = log_records(read_log(tmp_path / "log.json"), "parameter")
    assert [record["resume"] for record in settings] == [False, True]
    assert all(record["batch_size"] == 2048 for record in settings)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(clustered_data, uninterrupted, tmp_path):
    command = [sys.executable, "ncf.py", *flags(clustered_data, tmp_path, "-e", "4")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # kill in the middle of epoch 1's training: after the first epoch line, before the second
    first_line = process.stdout.readline()
    while not first_line.startswith("Epoch 0") and process.poll() is None and time.time() < deadline:
        first_line = process.stdout.readline()
    time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert load_checkpoint(str(tmp_path / "last.pth"))["epoch"] in (1, 2)
    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert epoch_hrs(tmp_path / "log.json") == epoch_hrs(uninterrupted / "log.json")


def test_resume_refuses_a_changed_model(clustered_data, uninterrupted, tmp_path, capsys):
    for name in ("last.pth", "model.pth"):
        (tmp_path / name).write_bytes((uninterrupted / name).read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, flags(clustered_data, tmp_path, "-e", "5", "--resume", "--factors", "8"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot resume: factors (64 -> 8)" in err


def test_resume_refuses_another_cut_off(clustered_data, uninterrupted, tmp_path, capsys):
    # The saved best is an HR@10; compared with HR@1 of new epochs it would pick the wrong one.
    (tmp_path / "last.pth").write_bytes((uninterrupted / "last.pth").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, flags(clustered_data, tmp_path, "-e", "5", "--resume", "-k", "1"))
    assert exit_info.value.code == 2
    assert "cannot resume: topk (10 -> 1) differs from" in capsys.readouterr().err


@pytest.mark.parametrize("saved,has_bf16,now", [
    ("float16", True, "bfloat16"), ("float16", False, "float32"),
    # saved on an Ampere GPU in TF32: IEEE float32 products would not continue that run
    ("tf32", False, "float32"),
    ("bfloat16", False, "float32"), ("float32", True, "bfloat16"),
    ("bfloat16", True, None), ("float32", False, None),
])
def test_resume_refuses_another_precision(clustered_data, uninterrupted, tmp_path, capsys,
                                          monkeypatch, saved, has_bf16, now):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    state = torch.load(uninterrupted / "last.pth", weights_only=True)
    state["precision"] = saved
    # As a run in that precision saves it: a float16 run's loss scaler has a state.
    state["scaler"] = torch.amp.GradScaler("cpu", enabled=saved == "float16").state_dict()
    torch.save(state, tmp_path / "last.pth")
    if now is None:
        ncf.main(flags(clustered_data, tmp_path, "-e", "5", "--resume"))
        assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 5
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, flags(clustered_data, tmp_path, "-e", "5", "--resume"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"ncf.py: error: {tmp_path / 'last.pth'}: the saved run trained in "
                             f"{saved}, this one would train in {now} (on cpu); ")


def test_resume_without_a_saved_state_says_so(clustered_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.run(ncf.main, flags(clustered_data, tmp_path, "--resume"))
    assert "last.pth: no such checkpoint file" in capsys.readouterr().err


def test_checkpoint_of_another_dataset_is_refused(clustered_data, tmp_path, capsys):
    from neumf import NeuMF
    torch.save(NeuMF(610, 9724, 64, [256, 256, 128, 64]).state_dict(), tmp_path / "other.pth")
    with pytest.raises(SystemExit):
        cli.run(ncf.main, ["--data", clustered_data, "--mode", "test", "--load_checkpoint_path",
                           str(tmp_path / "other.pth"), "--log_path", str(tmp_path / "l.json")])
    assert "checkpoint has 610 users and 9724 items, data has 300 users and 200 items" in \
        capsys.readouterr().err


def test_module_prefix_of_a_multi_process_save_is_stripped(clustered_data, uninterrupted,
                                                           tmp_path):
    state = torch.load(uninterrupted / "model.pth", weights_only=True)
    torch.save({f"module.{key}": value for key, value in state.items()}, tmp_path / "ddp.pth")
    result = ncf.main(["--data", clustered_data, "--mode", "test", "--load_checkpoint_path",
                       str(tmp_path / "ddp.pth"), "--log_path", str(tmp_path / "l.json")])
    assert result["hr"] > 0.5


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused: it holds objects that would run code"):
        load_checkpoint(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump(RunsCode(), handle, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "evil.pkl"))
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_foreign_files_get_one_line_errors(uninterrupted, tmp_path):
    data = (uninterrupted / "model.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth: cannot be read, truncated or not a checkpoint"):
        load_checkpoint(str(tmp_path / "cut.pth"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: "):
        load_checkpoint(str(tmp_path / "notes.txt"))
