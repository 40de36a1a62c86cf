import json
import math
import os
import re

import pytest
import torch

import baselines
import cli
import dataloading
import evaluation
import ncf
import progress
import train
from logger import log_records, read_log


EPOCH_LINE = re.compile(r"Epoch (\d+): HR@10 = [\d.]+, NDCG@10 = [\d.]+, train_time = [\d.]+, "
                        r"val_time = [\d.]+, train_loss = [\d.]+, validation_loss = [\d.]+")


def nvidia_training_data(path):
    """What the 2023 original's qa/generate_tables.py reads of a log (get_training_data): the
    last record's data, with batch_size from every PARAMETER record."""
    with open(path) as log:
        lines = log.readlines()
    data = json.loads(lines[-1][len("DLLL "):])["data"]
    for line in lines:
        record = json.loads(line[len("DLLL "):])
        if record.get("step", "") == "PARAMETER":
            data["batch_size"] = record["data"]["batch_size"]
    return data


def train_args(data, tmp_path, *extra):
    return ["--data", data, "--checkpoint_dir", str(tmp_path / "ck"),
            "--log_path", str(tmp_path / "log.json"), "-b", "2048", *extra]


def test_training_learns_and_model_pth_reproduces_best_hr(clustered_data, tmp_path, capsys):
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "4", "--threshold", "1.1"))
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    # The original's line, field for field, so that its parsers keep working; the losses after.
    assert [EPOCH_LINE.fullmatch(line).group(1) for line in epoch_lines] == ["0", "1", "2", "3"]
    # chance is 10/101; planted clusters are learnable
    assert summary["best_accuracy"] > 0.5
    state = torch.load(tmp_path / "ck" / "model.pth", weights_only=True)
    assert not any(key.startswith("module.") for key in state)
    tested = ncf.main(["--data", clustered_data, "--mode", "test", "--load_checkpoint_path",
                       str(tmp_path / "ck" / "model.pth"), "--log_path",
                       str(tmp_path / "test.json")])
    assert tested["hr"] == summary["best_accuracy"]
    assert tested["ndcg"] == summary["best_ndcg"]
    # both originals log test mode's throughput as best_eval_throughput
    test_summary = log_records(read_log(tmp_path / "test.json"), "summary")[-1]
    assert test_summary["best_eval_throughput"] == tested["eval_throughput"]

    records = read_log(tmp_path / "log.json")
    # NVIDIA's dllogger JSON stream: settings first, one record per epoch, the summary last.
    for record in records:
        content = {"LOG": {"step", "data"}, "METADATA": {"metric", "metadata"}}[record["type"]]
        assert set(record) == {"timestamp", "datetime", "elapsedtime", "type"} | content
        float(record["timestamp"]), float(record["elapsedtime"])
    steps = [record["step"] for record in records if record["type"] == "LOG"]
    assert steps[0] == "PARAMETER" and steps[-1] == []
    assert [step for step in steps if isinstance(step, list) and step] == [[0], [1], [2], [3]]
    epochs = log_records(records, "epoch")
    for key in ("epoch", "hr@10", "ndcg@10", "train_loss", "train_throughput",
                "eval_throughput", "train_epoch_time", "validation_epoch_time"):
        assert key in epochs[0]
    best = max(epochs, key=lambda r: r["hr@10"])
    final = log_records(records, "summary")[-1]
    assert final["best_accuracy"] == best["hr@10"]
    assert final["best_epoch"] == best["epoch"]
    # the 2023 summary's losses: the selected epoch's
    assert (final["train_loss"], final["validation_loss"]) == (best["train_loss"],
                                                               best["validation_loss"])
    assert nvidia_training_data(tmp_path / "log.json")["batch_size"] == 2048
    with open(tmp_path / "log.json") as log_file:
        assert all(line.startswith("DLLL {") for line in log_file)


def test_an_epoch_reports_its_steps_where_output_is_a_log(clustered_data, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a line at every step
    ncf.main(train_args(clustered_data, tmp_path, "-e", "1", "-b", "8192"))
    steps = 5 * len(torch.load(os.path.join(clustered_data, "train_ratings.pt"),
                               weights_only=True)) // 8192
    lines = [line.split(",")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch 0: ")]
    assert lines == [f"epoch 0: {step}/{steps} steps ({step / steps:.0%})"
                     for step in range(1, steps + 1)]


def test_threshold_stops_early(clustered_data, tmp_path, capsys):
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "10", "--threshold", "0.2"))
    assert summary["epochs_run"] < 10
    assert summary["time_to_target"] is not None
    assert "Hit threshold of 0.2" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("grads_accumulated,batch,expected_steps", [(1, 2048, 17), (3, 2048, 5),
                                                                    (2, 1000, 17)])
def test_optimiser_steps_per_epoch(clustered_data, tmp_path, monkeypatch, grads_accumulated,
                                   batch, expected_steps):
    pairs = torch.load(os.path.join(clustered_data, "train_ratings.pt"), weights_only=True)
    samples = len(pairs) * 5
    assert (samples // batch) // grads_accumulated == expected_steps
    steps = []
    build = train.build_optimizer

    def counting_optimizer(args, model):
        optimizer = build(args, model)
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", counting_optimizer)
    args = train_args(clustered_data, tmp_path, "-e", "1", "--grads_accumulated",
                      str(grads_accumulated))
    args[args.index("-b") + 1] = str(batch)
    ncf.main(args)
    assert len(steps) == expected_steps


def test_oversize_batch_is_refused_before_training(clustered_data, tmp_path, capsys):
    earlier_log = "DLLL {\"earlier\": \"run\"}\n"
    (tmp_path / "log.json").write_text(earlier_log)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, "-e", "1", "-b", str(2 ** 20)))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    samples = 5 * len(torch.load(os.path.join(clustered_data, "train_ratings.pt"),
                                 weights_only=True))
    assert samples // 1024 < 50 <= samples // 512 and 2 ** 15 <= samples < 2 ** 16
    assert captured.err == (
        f"ncf.py: error: --batch_size 1048576 x --grads_accumulated 1 exceeds an epoch of "
        f"{samples:,} samples ({samples // 5:,} positives x (1 + 4 negatives)), so no full "
        f"batch would be trained; try -b 512: {samples // 512} optimiser steps an epoch (the "
        f"largest power of two giving at least 50; -b 32768 is the largest that trains at "
        f"all)\n")
    # refused before the model is built and printed
    assert "parameters" not in captured.out
    assert not (tmp_path / "ck" / "last.pth").exists()
    assert (tmp_path / "log.json").read_text() == earlier_log


@pytest.mark.parametrize("program", [ncf, baselines])
@pytest.mark.parametrize("flags, named", [
    (["-k", "101"], "-k/--topk 101"),
    (["-k", "1000000000"], "-k/--topk 1000000000"),
    (["--report_topk", "5", "101"], "--report_topk 101"),
])
def test_a_cut_off_every_user_would_hit_is_refused(clustered_data, tmp_path, capsys, program,
                                                   flags, named):
    argv = (train_args(clustered_data, tmp_path) if program is ncf else
            ["--data", clustered_data, "--method", "pop", "--log_path", str(tmp_path / "l.json")])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(program.main, argv + flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"{program.__name__}.py: error: {named}: each test positive is ranked among 101 "
        f"candidates (its 100 test negatives and itself), so every user would be a hit at "
        f"{named.split()[-1]}; pass a cut-off below 101\n")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "log.json").exists()
    # at 100 a positive can still miss: ranked behind all 100 negatives
    assert ncf.main(train_args(clustered_data, tmp_path, "-k", "100", "-e", "1"))


def test_first_epoch_replaces_an_older_runs_model_even_at_hr_0(clustered_data, tmp_path,
                                                                 monkeypatch, capsys):
    # An older run's weights, of another shape, left in the directory.
    (tmp_path / "ck").mkdir()
    torch.save({"stale": torch.zeros(3)}, tmp_path / "ck" / "model.pth")
    evaluate = evaluation.sampled_evaluation

    def scoring_nothing(*args):
        metrics, loss, candidates = evaluate(*args)
        return {key: 0.0 for key in metrics}, loss, candidates

    monkeypatch.setattr(evaluation, "sampled_evaluation", scoring_nothing)
    summary = ncf.main(train_args(clustered_data, tmp_path, "-e", "2", "--threshold", "1.1",
                                  "-f", "8", "--layers", "16", "8"))
    assert summary["best_accuracy"] == 0.0 and summary["best_epoch"] == 0
    assert "Best HR@10 = 0.0000 (NDCG@10 = 0.0000) at epoch 0" in capsys.readouterr().out
    state = torch.load(tmp_path / "ck" / "model.pth", weights_only=True)
    assert state["mf_user_embed.weight"].shape == (300, 8)


def test_unwritable_checkpoint_dir_fails_at_start(clustered_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, ["--data", clustered_data, "--checkpoint_dir", str(blocker / "ck"),
                           "--log_path", str(tmp_path / "log.json"), "-b", "2048"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"--checkpoint_dir {blocker / 'ck'}: cannot write there" in captured.err
    assert "Epoch" not in captured.out


def test_missing_data_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(str(tmp_path / "nothing"), tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ncf.py: error: ") and "train_ratings.pt: not found" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (["--layers", "255", "64"], "first even"),
    (["-b", "0"], "--batch_size must be in [1, "),
    (["--dropout", "1.5"], "--dropout must be in"),
    (["--mode", "test", "--resume"], "--resume continues training; to evaluate a run's best "
                                     "weights pass --mode test --load_checkpoint_path"),
])
def test_bad_flags_exit_2(clustered_data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_both_local_rank_spellings_are_accepted():
    assert ncf.parse_args(["--data", "d", "--local-rank=3"]).local_rank == 3
    assert ncf.parse_args(["--data", "d", "--local_rank", "2"]).local_rank == 2


def test_defaults_match_the_original():
    args = ncf.parse_args(["--data", "d"])
    assert (args.epochs, args.batch_size, args.valid_batch_size, args.factors) == (30, 2 ** 20, 2 ** 20, 64)
    assert args.layers == [256, 256, 128, 64]
    assert (args.negative_samples, args.learning_rate, args.topk, args.seed) == (4, 0.0045, 10, 1)
    assert (args.threshold, args.beta1, args.beta2, args.eps, args.dropout) == (1.0, 0.25, 0.5, 1e-8, 0.5)
    assert (args.checkpoint_dir, args.mode, args.grads_accumulated, args.opt_level) == (
        "/data/checkpoints/", "train", 1, "O2")
    assert args.log_path == "log.json" and args.load_checkpoint_path is None


def test_full_ranking_in_test_mode_equals_a_plain_ranking(clustered_data, tmp_path, capsys,
                                                           monkeypatch):
    from checkpoint import load_model
    ncf.main(train_args(clustered_data, tmp_path, "-e", "1"))
    model_path = str(tmp_path / "ck" / "model.pth")
    # its cost is said first: the sample (all 300 users here) took 2.1 s by this clock
    clock = iter([0.0, 2.1])
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: next(clock))
    capsys.readouterr()
    result = ncf.main(["--data", clustered_data, "--mode", "test", "--load_checkpoint_path",
                       model_path, "--full_ranking", "--log_path", str(tmp_path / "t.json")])
    monkeypatch.undo()
    assert ("note: --full_ranking scores all 200 items for every user: about 2 s on this cpu "
            "(timed on the first users)") in capsys.readouterr().out.splitlines()
    model = load_model(model_path).eval()
    train = torch.load(os.path.join(clustered_data, "train_ratings.pt"), weights_only=True)
    test = torch.load(os.path.join(clustered_data, "test_ratings.pt"), weights_only=True)
    hits, gains = 0, 0.0
    with torch.no_grad():
        for user, positive in test.tolist():
            trained = set(train[train[:, 0] == user, 1].tolist()) - {positive}
            candidates = [item for item in range(model.nb_items) if item not in trained]
            scores = model(torch.full((len(candidates),), user), torch.tensor(candidates)).view(-1)
            positive_score = scores[candidates.index(positive)]
            rank = int((scores > positive_score).sum())
            hits += rank < 10
            gains += 1 / math.log2(rank + 2) if rank < 10 else 0.0
    assert result["full_hr"] == pytest.approx(hits / len(test), abs=2 / len(test))
    assert result["full_ndcg"] == pytest.approx(gains / len(test), abs=0.01)
    assert result["full_hr"] < result["hr"]


@pytest.mark.parametrize("compiled, piece", [(False, train.CPU_PIECE),
                                              (True, dataloading.CPU_CHUNK)])
def test_cpu_pieces_are_small_where_the_tables_take_rows_in_place(compiled, piece):
    """Small pieces cost nothing table-sized only where rows_into_grad holds (not under
    --compile), and a GPU takes the batch whole."""
    args = ncf.parse_args(["--data", "unused"] + (["--compile"] if compiled else []))
    batch = [torch.arange(3 * piece + 5)] * 3
    for device, sizes in (("cpu", [piece] * 3 + [5]), ("cuda", [3 * piece + 5])):
        ctx = train.Context(torch.device(device), 0, 1, True)
        assert train.rows_into_grad(args, ctx) == (device == "cpu" and not compiled)
        pieces = train.chunks(batch, args, ctx)
        assert [len(user) for user, *_ in pieces] == sizes
        assert sum(weight for *_, weight in pieces) == pytest.approx(1.0)


def test_data_loading_returns_its_temporaries_before_freed_memory_is_kept(
        clustered_data, tmp_path, monkeypatch):
    """Loading five copies of ml-20m peaks 2 GB above what it keeps: memory the C allocator
    would otherwise hold for the rest of the run, in every process."""
    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append("reuse_freed_memory"))
    load_splits = dataloading.load_splits
    monkeypatch.setattr(dataloading, "load_splits",
                        lambda *given: calls.append("load_splits") or load_splits(*given))
    ncf.main(["--data", clustered_data, "-e", "1", "-b", "4096", "--checkpoint_dir",
              str(tmp_path / "ck"), "--log_path", str(tmp_path / "log.json")])
    assert calls == ["load_splits", "reuse_freed_memory"]


def test_cpu_pieces_give_the_whole_batch_gradient(clustered_data, monkeypatch):
    """A batch split into pieces (CPU memory bound) updates the model as the whole batch does."""
    def one_step(piece):
        monkeypatch.setattr(train, "CPU_PIECE", piece)
        args = ncf.parse_args(["--data", clustered_data, "-b", "4096", "--dropout", "0"])
        ctx = train.Context(torch.device("cpu"), 0, 1, True)
        splits = dataloading.load_splits(args.data, ctx.device)
        model, ddp_model = train.build_model(args, splits.nb_users, splits.nb_items, ctx)
        optimizer = train.build_optimizer(args, model)
        gradients = {}
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        optimizer.register_step_pre_hook(lambda opt, *_: gradients.update(
            {names[id(p)]: p.grad.clone() for group in opt.param_groups for p in group["params"]}))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        positives = 4096 // 5 + 1  # one full batch: one optimiser step
        loss = train.train_epoch(ddp_model, optimizer, scaler, splits.positives.prefix(positives),
                                 splits.nb_items, 0, args, ctx)
        return loss, gradients

    whole_loss, whole = one_step(2 ** 18)
    pieces_loss, pieces = one_step(1000)
    assert pieces_loss == pytest.approx(whole_loss, rel=1e-5)
    assert len(whole) == 12  # 4 tables, 3 MLP layers and the final layer, weights and biases
    for name, gradient in whole.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(pieces[name], gradient, rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_compiled_training_learns_as_eager_and_resumes_either_way(clustered_data, tmp_path,
                                                                   monkeypatch, capsys):
    # Inductor's C++ kernels take a minute to build on this CPU; the AOT-autograd graphs that
    # --compile captures (model and loss, forward and backward) run here without them.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda module: real_compile(module, backend="aot_eager"))
    flags = ["--threshold", "1.1", "--opt_level", "O0"]
    eager = ncf.main(train_args(clustered_data, tmp_path / "eager", "-e", "2", *flags))
    compiled = ncf.main(train_args(clustered_data, tmp_path / "mixed", "-e", "1", "--compile",
                                   *flags))
    assert "torch._dynamo" not in capsys.readouterr().err
    resumed = ncf.main(train_args(clustered_data, tmp_path / "mixed", "-e", "2", "--resume",
                                  *flags))
    assert compiled["epochs_run"] == 1 and resumed["epochs_run"] == 2
    assert abs(resumed["best_accuracy"] - eager["best_accuracy"]) <= 0.02
    again = ncf.main(train_args(clustered_data, tmp_path / "mixed", "-e", "3", "--resume",
                                "--compile", *flags))
    assert again["epochs_run"] == 3 and again["best_accuracy"] >= resumed["best_accuracy"]


def test_compile_without_a_cpu_compiler_is_one_line(clustered_data, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_args(clustered_data, tmp_path, "-e", "1", "--compile"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "ncf.py: error: --compile: torch.compile builds CPU kernels with a C++ compiler and "
        "no-such-compiler is not on PATH; install one (g++) or set CXX, or drop --compile\n")
