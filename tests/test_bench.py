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
                "evaluation, ours", "peak RSS, ours", "inference fp32, batch 1,024"):
        assert f"| {row} |" in table
    assert "samples/s" in table and "quick shape" in run.stdout
