"""bench/recommend_bench.py at a tiny shape: what it prints with and without native bf16."""
import os
import re
import sys
from types import SimpleNamespace

import pytest

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import recommend_bench  # noqa: E402

TINY = ["--users", "30", "--items", "60", "--factors", "4", "--layers", "16", "8", "4",
        "--sample_users", "12", "--chunk_pairs", "128"]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_top_k_is_compared_with_fp32_only_where_bf16_is_native(monkeypatch, capsys, native):
    monkeypatch.setattr(recommend_bench.train, "cpu_has_native_bf16", lambda: native)
    recommend_bench.main(TINY)
    printed = capsys.readouterr().out
    compared = re.search(r"top-10 of 12 users .* bf16 shortlist \+ fp32 rescoring .*"
                         r"top-10 differs for (\d+) of 12 users", printed)
    if native:
        # 60 items fit in the shortlist of 100: bf16 only picks it, float32 orders it.
        assert compared and compared.group(1) == "0"
    else:
        assert compared is None and "this CPU has no native bf16" in printed


@pytest.mark.parametrize("flags, problem", [
    (["--sample_users", "0"], "--sample_users must be at least 1, got 0"),
    (["--users", "0"], "--users must be at least 1, got 0"),
    (["--items", "-1"], "--items must be at least 1, got -1"),
    (["--factors", "0"], "--factors must be at least 1, got 0"),
    # 0 once fell back to scoring.py's default as if the flag were not given
    (["--chunk_pairs", "0"], "--chunk_pairs must be at least 1, got 0"),
    (["-k", "0"], "--topk must be at least 1, got 0"),
    (["--layers", "15", "8"], "--layers 15 8: sizes must be at least 1 and the first even (it "
                              "is split between the user and item embeddings)"),
    (["--layers", "16", "0"], "--layers 16 0: sizes must be at least 1 and the first even (it "
                              "is split between the user and item embeddings)"),
])
def test_nonsense_sizes_are_one_line_exit_2(capsys, flags, problem):
    with pytest.raises(SystemExit) as exited:
        cli.run(recommend_bench.main, TINY + flags)
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"recommend_bench.py: error: {problem}; see --help\n"


def test_one_sampled_user_is_enough(monkeypatch, capsys):
    monkeypatch.setattr(recommend_bench.train, "cpu_has_native_bf16", lambda: False)
    recommend_bench.main(TINY + ["--sample_users", "1"])
    assert "1 users x 60 items" in capsys.readouterr().out


def test_the_item_side_is_paid_once_not_per_user(monkeypatch, capsys):
    # A clock that moves 600 s between any two readings: every timed stretch lasts 600 s, so
    # the item side (once) is 600 s and each path 10 rounds x 600 s for 12 of the 30 users.
    readings = iter(range(0, 10 ** 9, 600))
    monkeypatch.setattr(recommend_bench, "time", SimpleNamespace(
        perf_counter=lambda: next(readings)))
    monkeypatch.setattr(recommend_bench.train, "cpu_has_native_bf16", lambda: False)
    recommend_bench.main(TINY)
    printed = capsys.readouterr().out
    assert ("12 users x 60 items:  factored 6000.0 s (and 600.0 s for the item side, once),  "
            "plain forward 6000.0 s\n") in printed
    # factored 600 + 6000 x 30 / 12 = 15,600 s; plain 6000 x 30 / 12 = 15,000 s
    assert ("extrapolated to all 30 users (1.8e+03 pairs):  factored 260.0 min,  plain 250.0 "
            "min,  speed-up 0.96x\n") in printed


@pytest.mark.parametrize("bounded", [True, False])
def test_part_two_times_the_bounded_search_against_every_item(monkeypatch, capsys, tmp_path,
                                                              tiny_data, bounded):
    import torch
    from neumf import NeuMF
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pth"
    torch.save(NeuMF(30, 20, 4, [16, 8, 4]).state_dict(), checkpoint)
    monkeypatch.setattr(recommend_bench.train, "cpu_has_native_bf16", lambda: False)
    if bounded:
        # One item a cluster: bounds equal to the logits, so the search rules items out (but
        # half of 20 items stay for a top-10: more than the share that hands over to all).
        monkeypatch.setattr(recommend_bench.bounded_topk, "BOUNDED_MIN_ITEMS", 1)
        monkeypatch.setattr(recommend_bench.bounded_topk, "ITEMS_PER_CLUSTER", 1)
        monkeypatch.setattr(recommend_bench.bounded_topk, "MAX_KEPT_SHARE", 1.0)
    recommend_bench.main(TINY + ["--data", tiny_data, "--checkpoint", str(checkpoint)])
    printed = capsys.readouterr().out
    if bounded:
        assert re.search(r"top-10 of 12 of its users, extrapolated to all 30: fp32 [\d.]+ min,  "
                         r"bounded [\d.]+ min  \(bounds built once in [\d.]+ s\)\n  bounded: "
                         r"x[\d.]+ of fp32 over every item; top-10 differs from it for 0 of 12 "
                         r"users\n", printed)
    else:
        assert ("bounded top-10 not timed: 20 items (fewer than 4096) or no MLP hidden layer\n"
                in printed)
    assert "recommend.py --all_users --precision fp32" in printed
