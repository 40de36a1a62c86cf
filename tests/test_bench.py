"""The one benchmark command, in its --quick size, end to end."""
import os
import subprocess
import sys

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
