"""bench/recommend_bench.py at a tiny shape: what it prints with and without native bf16."""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import recommend_bench  # noqa: E402

TINY = ["--users", "30", "--items", "60", "--factors", "4", "--layers", "16", "8", "4",
        "--sample_users", "12", "--chunk_pairs", "128"]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_top_k_is_compared_with_fp32_only_where_bf16_is_native(monkeypatch, capsys, native):
    monkeypatch.setattr(recommend_bench.ncf, "cpu_has_native_bf16", lambda: native)
    recommend_bench.main(TINY)
    printed = capsys.readouterr().out
    compared = re.search(r"top-10 of 12 users .* bf16 shortlist \+ fp32 rescoring .*"
                         r"top-10 differs for (\d+) of 12 users", printed)
    if native:
        # 60 items fit in the shortlist of 100: bf16 only picks it, float32 orders it.
        assert compared and compared.group(1) == "0"
    else:
        assert compared is None and "this CPU has no native bf16" in printed
