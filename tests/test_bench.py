"""The one benchmark command, in its --quick size, end to end."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_run_quick_prints_the_table(tmp_path):
    run = subprocess.run([sys.executable, "bench/run.py", "--quick", "--workdir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = run.stdout[run.stdout.index("| benchmark | result |"):]
    for row in ("convert.py, wall time", "training, baseline", "training, ours",
                "evaluation, ours", "peak RSS, ours", "inference fp32, batch 1,024",
                "training, ours, share of the matrix-product limit"):
        assert f"| {row} |" in table
    import train
    assert ("| training, ours-bf16 |" in table) == train.cpu_has_native_bf16()
    assert "samples/s" in table and "quick shape" in run.stdout


@pytest.mark.slow
def test_stress_distributed_counts_its_runs(tmp_path):
    run = subprocess.run([sys.executable, "bench/stress_distributed.py", "--runs", "1",
                          "--epochs", "1", "--workdir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["run 1/1 train", "run 1/1 test"]
    assert all(": exit 0," in line for line in lines[:-1])
    assert lines[-1] == "2 runs, 0 failures"
    assert sorted(os.listdir(tmp_path / "ck")) == [".lock", "last.pth", "model.pth"]


def test_stress_failure_rows_show_the_last_stderr_lines_escaped_for_the_table():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from stress_distributed import stderr_tail
    assert stderr_tail("first\n\nterminate | called\n  Fatal  \nlast\n") == (
        "terminate \\| called / Fatal / last")


def test_matrix_products_per_sample_follow_the_layer_sizes():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from train_bench import linear_shapes, matmul_flops_per_sample
    # 256x256, 256x128, 128x64 and the final (64 + 64)x1, each forward, input and weight
    # gradient, 2 FLOPs a multiply-add
    assert matmul_flops_per_sample(linear_shapes()) == 6 * (65536 + 32768 + 8192 + 128) == 639744
    assert matmul_flops_per_sample(linear_shapes(8, [16, 4])) == 6 * (16 * 4 + 12 * 1)


@pytest.mark.parametrize("flags, problem", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["-b", "0"], "--batch_size must be at least 1, got 0"),
    (["--valid_batch_size", "-1"], "--valid_batch_size must be at least 1, got -1"),
    (["--users", "0"], "--users must be at least 1, got 0"),
    (["--items", "0"], "--items must be at least 1, got 0"),
    (["--users", "70000", "--positives", "60000"],
     "--positives 60000 must be at least --users 70000: every user has a training positive"),
])
def test_train_bench_refuses_nonsense_sizes_in_one_line(capsys, flags, problem):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_bench
    with pytest.raises(SystemExit) as exited:
        cli.run(train_bench.parse_args, ["--users", "2000", "--items", "1000", "--positives",
                                         "60000", "-b", "16384", *flags])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"train_bench.py: error: {problem}; see --help\n"


@pytest.mark.parametrize("status, stderr, reason", [
    (1, "Traceback (most recent call last):\n  ...\nMemoryError: out of memory\n",
     "MemoryError: out of memory"),
    (-9, "", "killed by signal 9"),
])
def test_a_failed_variant_is_one_line_with_its_reason(monkeypatch, capsys, status, stderr,
                                                      reason):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_bench

    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, status, "", stderr)

    monkeypatch.setattr(train_bench.subprocess, "run", failing)
    with pytest.raises(SystemExit) as exited:
        cli.run(train_bench.main, ["--quick", "--variants", "baseline"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"train_bench.py: error: the baseline run failed: {reason}\n"


def test_peak_memory_is_in_the_gb_of_the_convert_figure(monkeypatch):
    # ru_maxrss is in KiB; convert_bench.py reports 10^9 bytes, and run.py prints both as GB.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_bench
    monkeypatch.setattr(train_bench.resource, "getrusage",
                        lambda who: SimpleNamespace(ru_maxrss=1_000_000))
    assert train_bench.peak_rss_gb() == 1.024


@pytest.mark.slow
def test_a_stress_run_out_of_time_leaves_no_worker_behind(tmp_path):
    # Killing torchrun alone left its workers (in sessions of their own) running, holding the
    # checkpoint directory's lock against every later run.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from stress_distributed import free_port, run_bounded
    worker = tmp_path / "worker.py"
    worker.write_text("import os, pathlib, sys, time\n"
                      f"pathlib.Path({str(tmp_path)!r}, f'pid-{{os.getpid()}}').touch()\n"
                      "time.sleep(600)\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker)]
    started = []
    # Long enough for both workers to start, however busy the machine: a rerun with more time
    # if they had not.
    for timeout in (5, 30, 90):
        status, _ = run_bounded(command, dict(os.environ), timeout)
        started = sorted(tmp_path.glob("pid-*"))
        if len(started) == 2:
            break
        for path in started:
            path.unlink()
    assert status == "timeout" and len(started) == 2
    for path in started:
        pid = int(path.name.removeprefix("pid-"))
        try:
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        assert state in ("gone", "Z"), (pid, state)


def test_stress_refuses_a_run_that_would_try_nothing(capsys, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import stress_distributed
    for flags, problem in ((["--runs", "0"], "--runs must be at least 1, got 0"),
                           (["--epochs", "0"], "--epochs must be at least 1, got 0"),
                           (["--users", "-2"], "--users must be at least 1, got -2"),
                           (["--timeout", "0"], "--timeout must be above 0 seconds, got 0.0"),
                           (["--timeout", "nan"], "--timeout must be above 0 seconds, got nan")):
        with pytest.raises(SystemExit) as exited:
            cli.run(stress_distributed.main, ["--workdir", str(tmp_path / "w"), *flags])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"stress_distributed.py: error: {problem}; see --help\n"
    assert not list(tmp_path.iterdir())


def test_accuracy_converts_each_ratings_file_for_itself(tmp_path, monkeypatch):
    # Two files of one folder once shared the folder's cache: the second was measured on the
    # first one's data.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import accuracy
    converted = []

    def convert(command, **kwargs):
        path, output = command[command.index("--path") + 1], command[command.index("--output") + 1]
        converted.append(os.path.basename(path))
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "metadata.json"), "w") as metadata:
            metadata.write("{}")
        return subprocess.CompletedProcess(command, 0, None, "")

    monkeypatch.setattr(subprocess, "run", convert)
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text("all\n")
    (folder / "filtered.csv").write_text("some\n")

    def prepare(name):
        return accuracy.prepare(SimpleNamespace(ratings=str(folder / name), generate=None,
                                                workdir=str(tmp_path / "work")))

    first, second = prepare("ratings.csv"), prepare("filtered.csv")
    assert first != second and converted == ["ratings.csv", "filtered.csv"]
    assert prepare("ratings.csv") == first and len(converted) == 2  # still cached
    (folder / "ratings.csv").write_text("all, and more\n")  # changed since: converted again
    assert prepare("ratings.csv") == first and converted[2:] == ["ratings.csv"]


@pytest.mark.parametrize("script", ["accuracy", "models"])
def test_a_missing_ratings_file_is_one_line(tmp_path, capsys, script):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    program = __import__(script)
    missing = str(tmp_path / "ratings.csv")
    argv = (["--ratings", missing] if script == "accuracy" else ["--ml_latest_small", missing])
    with pytest.raises(SystemExit) as exited:
        cli.run(program.main, argv + ["--workdir", str(tmp_path / "work")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"{script}.py: error: {missing}: no such ratings file; put MovieLens there "
        f"(./prepare_dataset.sh ml-latest-small) or measure generated data (accuracy.py "
        f"--generate PRESET, models.py --datasets generated)\n")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("flags, problem", [
    (["--positives", "138492"], "--positives 138492 must be at least 138,493, the users of the "
                                "ml-20m shape: every user has a training positive"),
    (["--nproc", "1", "0"], "--nproc counts must be at least 1, got 0"),
])
def test_scaling_refuses_nonsense_sizes_in_one_line(capsys, tmp_path, flags, problem):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import scaling
    with pytest.raises(SystemExit) as exited:
        cli.run(scaling.main, ["--workdir", str(tmp_path / "w"), *flags])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"scaling.py: error: {problem}; see --help\n"
    assert not list(tmp_path.iterdir())


def test_scaling_writes_again_a_dataset_whose_write_was_killed_or_damaged(tmp_path, monkeypatch,
                                                                          capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import scaling
    import torch
    from train_bench import make_data
    monkeypatch.setattr(scaling, "make_data", lambda users, items, positives: make_data(
        3, 5, positives))
    data = tmp_path / "data-4"
    negatives = data / "test_negatives.pt"
    saved = torch.save

    def killed_after_negatives(obj, target):
        saved(obj, target)
        if obj.shape == (3, 100):
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_after_negatives)
    with pytest.raises(KeyboardInterrupt):
        scaling.write_dataset(str(data), 4)
    # Killed before the rename: a later run finds no negatives, not ones it would take as whole.
    assert not negatives.exists()
    monkeypatch.setattr(torch, "save", saved)
    scaling.write_dataset(str(data), 4)
    whole = negatives.read_bytes()
    negatives.write_bytes(whole[:len(whole) // 2])  # as a killed write of the past left it
    scaling.write_dataset(str(data), 4)
    scaling.write_dataset(str(data), 4)  # whole: kept
    assert capsys.readouterr().out == (
        f"writing the dataset again: {negatives} is missing\n"
        f"writing the dataset again: {negatives} cannot be read (RuntimeError)\n")
    assert torch.load(negatives, weights_only=True).shape == (3, 100)
    assert sorted(path.name for path in data.iterdir()) == [
        "test_negatives.pt", "test_ratings.pt", "train_ratings.pt"]


def ncf_run(command, **kwargs):
    """subprocess.run for a one-epoch ncf.py run: the log.json it writes, at its -k."""
    k = int(command[command.index("-k") + 1]) if "-k" in command else 10
    log_path = command[command.index("--log_path") + 1]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    records = [("PARAMETER", {"topk": k}),
               ([0], {"epoch": 0, f"full_hr@{k}": 0.5, f"full_ndcg@{k}": 0.25,
                      "train_epoch_time": 2.0, "validation_epoch_time": 1.0}),
               ([], {"best_accuracy": 0.75, "best_ndcg": 0.5, "best_epoch": 0,
                     "train_time_to_best_model": 2.0})]
    with open(log_path, "w") as log:
        for step, data in records:
            log.write("DLLL " + json.dumps({"type": "LOG", "step": step, "data": data}) + "\n")
    return subprocess.CompletedProcess(command, 0, None, "")


def test_accuracy_and_models_tables_are_at_the_runs_k(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import accuracy
    import models
    monkeypatch.setattr(subprocess, "run", ncf_run)
    monkeypatch.setattr(accuracy, "prepare", lambda args: (str(tmp_path / "a"), "data"))
    monkeypatch.setattr(models, "prepare", lambda args, prog="models.py": (str(tmp_path / "m"),
                                                                           "data"))
    accuracy.main(["--generate", "small", "--seeds", "1", "--", "-k", "5"])
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "| seed | best HR@5 | NDCG@5 | epoch | seconds per epoch |", "|---|---|---|---|---|",
        "| 1 | 0.7500 | 0.5000 | 0 | 3.0 |", "| mean | 0.7500 | 0.5000 | | |"]
    _, text = models.main(["--datasets", "generated", "--seeds", "1", "-e", "1", "--", "-k", "5"])
    assert text.splitlines() == [
        "| data | model | HR@5 | NDCG@5 | full HR@5 | full NDCG@5 | best epoch | train s to best "
        "| train s, all epochs |", "|---|---|---|---|---|---|---|---|---|",
        "| generated | GMF | 0.7500 | 0.5000 | 0.5000 | 0.2500 | 0 | 2 | 2 |",
        "| generated | MLP | 0.7500 | 0.5000 | 0.5000 | 0.2500 | 0 | 2 | 2 |",
        "| generated | NeuMF, scratch | 0.7500 | 0.5000 | 0.5000 | 0.2500 | 0 | 2 | 2 |",
        "| generated | NeuMF, pretrained, Adam | 0.7500 | 0.5000 | 0.5000 | 0.2500 | 0 | 2 | "
        "2 (+4 GMF and MLP) |",
        "| generated | NeuMF, pretrained, SGD | 0.7500 | 0.5000 | 0.5000 | 0.2500 | 0 | 2 | "
        "2 (+4 GMF and MLP) |"]


@pytest.mark.parametrize("script", ["accuracy", "models"])
def test_a_failed_ncf_run_is_one_line_naming_it(tmp_path, monkeypatch, capsys, script):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import accuracy
    import models
    error = "ncf.py: error: --epochs must be in [1, 2147483647], got 0; see --help"

    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 2, None, f"{error}\n")

    monkeypatch.setattr(subprocess, "run", failing)
    monkeypatch.setattr(accuracy, "prepare", lambda args: (str(tmp_path), "data"))
    monkeypatch.setattr(models, "prepare", lambda args: (str(tmp_path), "data"))
    with pytest.raises(SystemExit) as exited:
        if script == "accuracy":
            cli.run(accuracy.main, ["--generate", "small", "--seeds", "7", "--", "-e", "0"])
        else:
            cli.run(models.main, ["--datasets", "generated", "--seeds", "7", "--", "-e", "0"])
    assert exited.value.code == 2
    run = "of seed 7" if script == "accuracy" else f"in {tmp_path / 'seed7' / 'gmf'}"
    assert capsys.readouterr().err == f"{script}.py: error: the ncf.py run {run} failed: {error}\n"


@pytest.mark.parametrize("preset, verdict", [
    ("ml-20m", "within the targets 35 s, 2.5 GB"),
    ("small", "no verdict: the targets 35 s, 2.5 GB are for --preset ml-20m"),
])
def test_convert_bench_judges_only_the_shape_its_targets_are_for(monkeypatch, capsys, preset,
                                                                   verdict):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import convert_bench
    monkeypatch.setattr(convert_bench, "bench_input", lambda workdir, preset: "ratings.csv")
    # peak RSS in KiB after convert.py's own line
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 0, "convert.py: read 5 ratings\n2000000\n", ""))
    readings = iter([100.0, 130.0])
    monkeypatch.setattr(convert_bench, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    convert_bench.main(["--preset", preset])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"convert.py: 30.0 s wall, 2.05 GB peak RSS ({verdict})")


@pytest.mark.parametrize("status, stderr, reason", [
    (2, "convert.py: error: ratings.csv: no such file\n",
     "convert.py: error: ratings.csv: no such file"),
    (137, "", "exit status 137"),  # the probe's report of a convert.py killed by SIGKILL
])
def test_convert_bench_failure_is_one_line_and_exit_status_2(monkeypatch, capsys, status,
                                                               stderr, reason):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import convert_bench
    monkeypatch.setattr(convert_bench, "bench_input", lambda workdir, preset: "ratings.csv")
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, status, "", stderr))
    with pytest.raises(SystemExit) as exited:
        cli.run(convert_bench.main, ["--preset", "small"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"convert_bench.py: error: convert.py failed: {reason}\n"


class HealthChecks:
    """http.client.HTTPConnection for wait_for_health, on a fake clock that only sleeping moves:
    each try gets the next of `answers` (a status, or an OSError to raise)."""

    def __init__(self, answers):
        self.answers = iter(answers)
        self.now, self.sleeps, self.tries, self.closed = 0.0, [], 0, 0

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def connection(self, host, port, timeout):
        checks = self

        class Connection:
            def request(self, method, path):
                assert len(checks.sleeps) == checks.tries, "a try without a pause before it"
                checks.tries += 1
                answer = next(checks.answers)
                if isinstance(answer, OSError):
                    raise answer
                self.status = answer

            def getresponse(self):
                return SimpleNamespace(status=self.status)

            def close(self):
                checks.closed += 1

        return Connection()


@pytest.mark.parametrize("answers, problem", [
    ([ConnectionRefusedError(111, "Connection refused"), 503, 200], None),
    ([ConnectionRefusedError(111, "Connection refused")] + [503] * 4,
     "serve.py did not answer /health with status 200 in 2 s (last try: status 503)"),
])
def test_waiting_for_serve_py_pauses_closes_and_gives_up_in_time(monkeypatch, capsys, answers,
                                                                 problem):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import serve_bench
    checks = HealthChecks(answers)
    monkeypatch.setattr(serve_bench, "STARTUP_SECONDS", 2)
    monkeypatch.setattr(serve_bench, "time", SimpleNamespace(monotonic=lambda: checks.now,
                                                             sleep=checks.sleep))
    monkeypatch.setattr(serve_bench.http.client, "HTTPConnection", checks.connection)
    running = SimpleNamespace(poll=lambda: None)
    if problem is None:
        serve_bench.wait_for_health(running, 8000)
    else:
        with pytest.raises(cli.UserError) as refused:
            serve_bench.wait_for_health(running, 8000)
        assert str(refused.value) == problem
    assert checks.tries == checks.closed == len(answers)
    assert checks.sleeps == [0.5] * (len(answers) - 1)


def test_serve_py_ending_before_it_answers_is_one_line_and_exit_status_2(capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import serve_bench
    ended = SimpleNamespace(poll=lambda: 1, returncode=1)
    with pytest.raises(SystemExit) as exited:
        cli.run(lambda argv: serve_bench.wait_for_health(ended, 8000))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "test_bench.py: error: serve.py exited with status 1\n"
