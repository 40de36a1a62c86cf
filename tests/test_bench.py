"""The one benchmark command, in its --quick size, end to end."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

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
    import ncf
    assert ("| training, ours-bf16 |" in table) == ncf.cpu_has_native_bf16()
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
        train_bench.parse_args(["--users", "2000", "--items", "1000", "--positives", "60000",
                                "-b", "16384", *flags])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"train_bench.py: error: {problem}; see --help\n"


@pytest.mark.parametrize("status, stderr, reason", [
    (1, "Traceback (most recent call last):\n  ...\nMemoryError: out of memory\n",
     "MemoryError: out of memory"),
    (-9, "", "killed by signal 9"),
])
def test_a_failed_variant_is_one_line_with_its_reason(monkeypatch, status, stderr, reason):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_bench

    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, status, "", stderr)

    monkeypatch.setattr(train_bench.subprocess, "run", failing)
    with pytest.raises(SystemExit) as exited:
        train_bench.main(["--quick", "--variants", "baseline"])
    assert exited.value.code == f"train_bench.py: error: the baseline run failed: {reason}"


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
            stress_distributed.main(["--workdir", str(tmp_path / "w"), *flags])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"stress_distributed.py: error: {problem}; see --help\n"
    assert not list(tmp_path.iterdir())


def test_accuracy_converts_each_ratings_file_for_itself(tmp_path, monkeypatch):
    # Two files of one folder once shared the folder's cache: the second was measured on the
    # first one's data.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import accuracy
    converted = []

    def convert(command, check):
        path, output = command[command.index("--path") + 1], command[command.index("--output") + 1]
        converted.append(os.path.basename(path))
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "metadata.json"), "w") as metadata:
            metadata.write("{}")

    monkeypatch.setattr(accuracy.subprocess, "run", convert)
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
