"""What a user of NVIDIA's NCF meets first: its flags, log keys and printed lines, and the
one-line refusals for flags and runs that cannot give a meaningful result."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cli
import evaluation
import ncf
import train
from conftest import ROOT
from logger import PREFIX, log_records, read_log
from neumf import NeuMF


def train_args(data, tmp_path, *extra):
    return ["--data", data, "--checkpoint_dir", str(tmp_path / "ck"),
            "--log_path", str(tmp_path / "log.json"), "-b", "2048", *extra]


def one_error_line(captured):
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("ncf.py: error: ")
    return captured.err


def epoch_hrs(log_path):
    return [record["hr@10"] for record in log_records(read_log(log_path), "epoch")]


@pytest.fixture(scope="module")
def trained_model(clustered_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("trained")
    ncf.main(train_args(clustered_data, directory, "-e", "3"))
    return str(directory / "ck" / "model.pth")


def test_warm_start_begins_from_the_checkpoint(clustered_data, trained_model, tmp_path, capsys):
    ncf.main(train_args(clustered_data, tmp_path / "fresh", "-e", "1"))
    ncf.main(train_args(clustered_data, tmp_path / "warm", "-e", "1", "--load_checkpoint_path",
                        trained_model))
    out = capsys.readouterr().out
    assert f"Starting training from {trained_model}" in out
    tested = ncf.main(["--data", clustered_data, "--mode", "test", "--load_checkpoint_path",
                       trained_model, "--log_path", str(tmp_path / "t.json")])
    fresh_hr = epoch_hrs(tmp_path / "fresh" / "log.json")[0]
    warm_hr = epoch_hrs(tmp_path / "warm" / "log.json")[0]
    # One more epoch on top of three: far from the fresh run's first epoch, near the start's HR.
    assert warm_hr > fresh_hr + 0.1
    assert abs(warm_hr - tested["hr"]) < 0.15


def test_resume_uses_last_pth_and_says_the_warm_start_file_is_not_used(clustered_data, tmp_path,
                                                                        capsys):
    ncf.main(train_args(clustered_data, tmp_path, "-e", "1"))
    missing = str(tmp_path / "never-read.pth")
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "2", "--resume",
                                  "--load_checkpoint_path", missing))
    assert summary["epochs_run"] == 2
    out = capsys.readouterr().out
    assert (f"note: --resume continues {tmp_path / 'ck' / 'last.pth'}; --load_checkpoint_path "
            f"{missing} is not used") in out


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def wrong_shape(tmp_path, clustered_data):
    path = tmp_path / "small.pth"
    torch.save(NeuMF(300, 200, 8, [16, 8]).state_dict(), path)
    return path, "checkpoint has --factors 8, run asks for 64"


def other_dataset(tmp_path, clustered_data):
    path = tmp_path / "other.pth"
    torch.save(NeuMF(30, 200, 64, [256, 256, 128, 64]).state_dict(), path)
    return path, "checkpoint has 30 users and 200 items"


def crafted_pickle(tmp_path, clustered_data):
    path = tmp_path / "crafted.pth"
    torch.save({"mf_user_embed.weight": RunsCode(str(tmp_path / "code-ran"))}, path)
    return path, "refused: it holds objects that would run code"


def truncated(tmp_path, clustered_data):
    path = tmp_path / "cut.pth"
    torch.save(NeuMF(300, 200, 64, [256, 256, 128, 64]).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    return path, "cannot be read"


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("make_checkpoint", [wrong_shape, other_dataset, crafted_pickle,
                                             truncated])
def test_bad_starting_checkpoint_is_one_line(clustered_data, tmp_path, capsys, mode,
                                             make_checkpoint):
    path, problem = make_checkpoint(tmp_path, clustered_data)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, "--mode", mode,
                                     "--load_checkpoint_path", str(path)))
    assert exit_info.value.code == 2
    err = one_error_line(capsys.readouterr())
    assert f"{path}: " in err and problem in err
    assert not (tmp_path / "code-ran").exists()
    assert not (tmp_path / "log.json").exists()
    assert not (tmp_path / "ck" / "last.pth").exists()


def test_untrained_test_mode_is_a_chance_baseline_and_logged(clustered_data, tmp_path, capsys):
    result = ncf.main(["--data", clustered_data, "--mode", "test", "--topk", "5",
                       "--log_path", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert "note: no --load_checkpoint_path: evaluating the untrained model" in out
    assert "203073 parameters" in out and out.startswith("NeuMF(") is False
    # chance: 5 of 101 candidates; 300 users leave a standard error of about 0.013
    assert abs(result["hr"] - 5 / 101) < 0.05
    # An untrained logit is near 0: BCE near log 2 for every candidate.
    assert abs(result["validation_loss"] - math.log(2)) < 0.1
    records = read_log(tmp_path / "t.json")
    (record,) = log_records(records, "summary")
    assert record["hr@5"] == result["hr"] and record["ndcg@5"] == result["ndcg"]
    assert record["validation_loss"] == result["validation_loss"]
    assert record["eval_throughput"] > 0


def test_train_log_is_dllogger_with_the_original_keys(clustered_data, tmp_path, capsys):
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "2", "--threshold", "1.1"))
    out = capsys.readouterr().out
    with open(tmp_path / "log.json") as log_file:
        assert all(line.startswith(PREFIX + "{") for line in log_file)
    records = read_log(tmp_path / "log.json")
    for record in log_records(records, "epoch"):
        assert {"hr@10", "ndcg@10", "train_throughput", "eval_throughput",
                "validation_loss"} <= set(record)
    (final,) = log_records(records, "summary")
    assert {"best_accuracy", "best_train_throughput", "best_eval_throughput", "time_to_target",
            "time_to_best_model"} <= set(final)
    metrics = {record["metric"] for record in records if record["type"] == "METADATA"}
    assert {"hr@10", "validation_loss", "train_throughput", "time_to_target"} <= metrics
    saving = f"New best hr! Saving the model to: {tmp_path / 'ck' / 'model.pth'}"
    assert out.count(saving) >= 1 and "NeuMF(" in out and "203073 parameters" in out
    assert summary["best_accuracy"] == final["best_accuracy"]


def test_time_to_target_is_the_run_time_when_never_reached(clustered_data, tmp_path,
                                                           monkeypatch):
    started = ncf.time.time()
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "2", "--threshold", "1.1"))
    took = ncf.time.time() - started
    assert summary["target_reached"] is False and summary["train_time_to_target"] is None
    epochs = log_records(read_log(tmp_path / "log.json"), "epoch")
    epoch_seconds = sum(r["train_epoch_time"] + r["validation_epoch_time"] for r in epochs)
    # wall clock of the whole run: the epochs, the loading before them, nothing beyond main
    assert epoch_seconds < summary["time_to_target"] <= took
    assert summary["time_to_best_model"] <= summary["time_to_target"]
    assert summary["train_time_to_best_model"] < summary["time_to_best_model"]


def test_time_to_target_when_reached_is_wall_clock(clustered_data, tmp_path):
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "3", "--threshold", "0.0"))
    assert summary["epochs_run"] == 1 and summary["target_reached"] is True
    assert summary["time_to_target"] == summary["time_to_best_model"]
    assert summary["train_time_to_target"] < summary["time_to_target"]


def test_empty_checkpoint_dir_saves_nothing(clustered_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = train_args(clustered_data, tmp_path, "-e", "2")
    args[args.index("--checkpoint_dir") + 1] = ""
    summary = ncf.main(args)
    assert summary["epochs_run"] == 2
    out = capsys.readouterr().out
    assert "note: --checkpoint_dir '': model.pth and last.pth are not saved" in out
    assert "New best hr!" not in out
    assert sorted(os.listdir(tmp_path)) == ["log.json"]


def test_validation_loss_counts_each_candidate_once(tmp_path):
    torch.manual_seed(0)
    model = NeuMF(3, 6, 4, [8, 4]).eval()
    users = torch.tensor([0, 1, 2])
    # row 1 repeats a negative, row 2 holds its positive (5) among the negatives too
    items = torch.tensor([[1, 2, 3, 0], [4, 4, 2, 3], [5, 1, 0, 5]])
    import dataloading
    test_users, test_items, mask = dataloading.create_test_data(
        torch.stack((users, items[:, -1]), dim=1), items[:, :-1])
    args = ncf.parse_args(["--data", "unused", "--topk", "2"])
    ctx = train.Context(torch.device("cpu"), 0, 1, True)
    *_, loss = evaluation.val_epoch(model, test_users, test_items, mask, args, ctx)
    expected = []
    with torch.no_grad():
        for user, row in zip(users.tolist(), items.tolist()):
            positive = row[-1]
            for item in dict.fromkeys(row):
                logit = model(torch.tensor([user]), torch.tensor([item])).view(())
                expected.append(F.binary_cross_entropy_with_logits(
                    logit, torch.tensor(float(item == positive))).item())
    assert len(expected) == 10
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("flags,named", [
    (["-l", "nan"], "--learning_rate"),
    (["-l", "inf"], "--learning_rate"),
    (["--eps", "nan"], "--eps"),
    (["--threshold", "nan"], "--threshold"),
    (["--dropout", "nan"], "--dropout"),
    (["-b1", "nan"], "--beta1"),
    (["-b2", "inf"], "--beta2"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 63)], "--seed"),
    (["--local_rank", "-1"], "--local_rank"),
    (["--local_rank", "99"], "--local_rank 99"),
    (["--epochs", str(2 ** 40)], "--epochs"),
    (["--factors", str(2 ** 40)], "--factors"),
    (["--layers", str(2 ** 40), "8"], "--layers"),
    (["--negative_samples", "-1"], "--negative_samples"),
    (["--topk", "0"], "--topk"),
    (["-e", "x"], "--epochs: invalid int value"),
    (["-l", "fast"], "--learning_rate: invalid float value"),
    (["--factors", str(10 ** 9)], "--factors 1000000000"),
    (["--layers", "256", str(2 ** 30)], "--layers 256 1073741824"),
    (["--resume", "--checkpoint_dir", ""], "--checkpoint_dir ''"),
])
def test_bad_flags_are_one_line(clustered_data, tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, "-e", "1", *flags))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert named in one_error_line(captured)
    assert "Epoch " not in captured.out
    assert not (tmp_path / "ck" / "last.pth").exists()


def test_divergence_stops_with_one_line_and_keeps_last_good_state(clustered_data, tmp_path,
                                                                  monkeypatch, capsys):
    trained = train.train_epoch

    def diverging(ddp_model, *args):
        loss = trained(ddp_model, *args)
        epoch = args[4]
        if epoch == 1:
            with torch.no_grad():
                for parameter in ddp_model.parameters():
                    parameter.fill_(float("nan"))
            return float("nan")
        return loss

    monkeypatch.setattr(train, "train_epoch", diverging)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, "-e", "3"))
    assert exit_info.value.code == 2
    err = one_error_line(capsys.readouterr())
    last = tmp_path / "ck" / "last.pth"
    assert f"epoch 1: training diverged (loss nan); {last} still holds epoch 0" in err
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert epoch_hrs(tmp_path / "log.json") == [state["history"][0]["hr@10"]]


def test_full_disk_under_the_log_is_one_line(clustered_data, tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    log = tmp_path / "log.json"
    real_log = tmp_path / "real.json"
    real_log.write_text("")
    log.symlink_to(real_log)
    trained = train.train_epoch

    def disk_fills_at_epoch_1(*args):
        if args[5] == 1:
            log.unlink()
            log.symlink_to("/dev/full")
        return trained(*args)

    monkeypatch.setattr(train, "train_epoch", disk_fills_at_epoch_1)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, "-e", "3"))
    assert exit_info.value.code == 2
    err = one_error_line(capsys.readouterr())
    assert f"--log_path {log}: writing failed (No space left on device)" in err
    state = torch.load(tmp_path / "ck" / "last.pth", weights_only=True)
    assert state["epoch"] == 1
    assert torch.load(tmp_path / "ck" / "model.pth", weights_only=True).keys() == \
        state["model"].keys()


def test_closed_stdout_still_trains_and_saves(clustered_data, tmp_path):
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ncf.py"), *train_args(clustered_data, tmp_path,
                                                                   "-e", "2")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    err = process.stderr.read().decode()
    assert process.wait(timeout=600) == 0, err
    assert err == ""
    assert torch.load(tmp_path / "ck" / "last.pth", weights_only=True)["epoch"] == 2
    assert (tmp_path / "ck" / "model.pth").exists()
    assert len(log_records(read_log(tmp_path / "log.json"), "epoch")) == 2
