"""--report_topk cut-offs and MRR beside -k's HR/NDCG, sampled and full ranking (issue 13,
item 5)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import dataloading
import evaluation
import ncf
from logger import log_records, read_log
from test_distributed import torchrun
from test_validation import (EXPECTED, evaluation_flags, expected_metrics, item_order_model, ndcg,
                             write_split)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(*flags):
    return ncf.parse_args(["--data", "d", *flags])


def test_reported_adds_cutoffs_and_mrr_only_when_asked():
    ranks = torch.tensor([0, 2, 5, 1])
    assert evaluation.reported(ranks, args_for("-k", "3")) == {
        "hr@3": 0.75, "ndcg@3": (1 + 1 / math.log2(4) + 1 / math.log2(3)) / 4}
    extended = evaluation.reported(ranks, args_for("-k", "3", "--report_topk", "1", "3", "6"), "full_")
    assert list(extended) == ["full_hr@3", "full_ndcg@3", "full_hr@1", "full_ndcg@1",
                              "full_hr@6", "full_ndcg@6", "full_mrr"]
    assert extended["full_hr@1"] == extended["full_ndcg@1"] == 0.25
    assert extended["full_hr@6"] == 1.0
    assert extended["full_ndcg@6"] == pytest.approx(
        (1 + 1 / math.log2(4) + 1 / math.log2(7) + 1 / math.log2(3)) / 4, abs=1e-15)
    assert extended["full_mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 2) / 4, abs=1e-15)


def test_metrics_text_names_split_metric_and_cutoff():
    assert evaluation.metrics_text({"hr@10": 0.5, "ndcg@10": 0.25, "mrr": 1 / 3, "val_hr@5": 1.0,
                             "full_ndcg@20": 0.125, "val_full_mrr": 0.0}) == (
        "HR@10 = 0.5000, NDCG@10 = 0.2500, MRR = 0.3333, validation HR@5 = 1.0000, "
        "full NDCG@20 = 0.1250, validation full MRR = 0.0000")


@pytest.mark.parametrize("values", [["0"], ["-1"], ["5", "0"], [str(2 ** 31)]])
def test_bad_cutoffs_are_refused_in_one_line(values, capsys):
    with pytest.raises(SystemExit) as caught:
        ncf.parse_args(["--data", "d", "--report_topk", *values])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncf.py: error: --report_topk cut-offs "
                                                   "must be in [1, 2147483647], got ")
    assert f"got {' '.join(values)}; " in lines[0]


def without_validation(directory):
    """The hand-made directory of test_validation as the original convert.py writes it."""
    for name in dataloading.VALIDATION_FILES + (dataloading.METADATA,):
        os.remove(os.path.join(directory, name))
    return directory


# Without the split, test_validation's validation positives are candidates in full ranking:
# user 2's positive has 5 and 6 ahead of it, user 3's 3, 4, 5 and 7.
TEST_ONLY = {**expected_metrics([0, 1, 2, 3]), **expected_metrics([0, 1, 2, 4], "full_")}


def test_test_mode_without_validation_split(tmp_path, capsys):
    directory = without_validation(write_split(str(tmp_path / "data")))
    model = item_order_model(tmp_path / "model.pth")
    result = ncf.main(evaluation_flags(directory, model, tmp_path / "log.json"))
    assert result["metrics"] == pytest.approx(TEST_ONLY, abs=1e-12)
    logged = log_records(read_log(tmp_path / "log.json"), "summary")[-1]
    assert {key: logged[key] for key in TEST_ONLY} == result["metrics"]
    assert not any(key.startswith("val_") for key in logged)


def test_default_output_has_only_the_original_metrics(tmp_path, capsys):
    directory = without_validation(write_split(str(tmp_path / "data")))
    model = item_order_model(tmp_path / "model.pth")
    # 4 candidates a user (3 test negatives): -k 3 is the largest cut-off a positive can miss
    result = ncf.main(["--data", directory, "--mode", "test", "--load_checkpoint_path", model,
                       "-k", "3", "-f", "1", "--layers", "2", "2", "--log_path",
                       str(tmp_path / "log.json")])
    assert result["metrics"] == pytest.approx({"hr@3": 0.75, "ndcg@3": ndcg([0, 1, 2, 3], 3)},
                                              abs=1e-12)
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"HR@3 = 0.7500, NDCG@3 = {ndcg([0, 1, 2, 3], 3):.4f}, val_time = ")
    logged = log_records(read_log(tmp_path / "log.json"), "summary")[-1]
    assert set(logged) == {"hr@3", "ndcg@3", "eval_throughput", "best_eval_throughput",
                           "validation_loss", "validation_epoch_time"}


def test_training_logs_every_cutoff_and_the_selected_epochs(clustered_data, tmp_path, capsys):
    summary = ncf.main(["--data", clustered_data, "--checkpoint_dir", str(tmp_path / "ck"),
                        "--log_path", str(tmp_path / "log.json"), "-b", "2048", "-e", "2",
                        "-f", "8", "--layers", "16", "8", "--threshold", "1.1",
                        "--report_topk", "1", "20", "--full_ranking"])
    epochs = log_records(read_log(tmp_path / "log.json"), "epoch")
    keys = ["hr@10", "ndcg@10", "hr@1", "ndcg@1", "hr@20", "ndcg@20", "mrr"]
    for record in epochs:
        assert [key for key in record if key in keys] == keys
        assert record["hr@1"] <= record["hr@10"] <= record["hr@20"]
        assert record["full_hr@1"] <= record["full_hr@10"] <= record["full_hr@20"]
        # a rank-0 hit gains 1 in all three; a miss at 20 adds at most 1/21 to MRR
        assert record["hr@1"] == record["ndcg@1"] <= record["mrr"]
        assert record["mrr"] <= record["hr@20"] + (1 - record["hr@20"]) / 21
    selected = epochs[summary["best_epoch"]]
    assert summary["best_accuracy"] == max(record["hr@10"] for record in epochs)
    for key in keys[2:] + ["full_hr@10", "full_mrr"]:
        assert summary[f"best_{key}"] == selected[key]
    assert "selected_by" not in summary
    out = capsys.readouterr().out
    assert f"Selected model (epoch {summary['best_epoch']}): HR@1 = {selected['hr@1']:.4f}" in out


@pytest.mark.slow
def test_two_processes_report_the_same_figures(tmp_path):
    directory = write_split(str(tmp_path / "data"))
    model = item_order_model(tmp_path / "model.pth")
    two = torchrun(*evaluation_flags(directory, model, tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr
    one = subprocess.run([sys.executable, "ncf.py",
                          *evaluation_flags(directory, model, tmp_path / "one.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    figures = [{key: value for key, value in
                log_records(read_log(tmp_path / f"{run}.json"), "summary")[-1].items()
                if key in EXPECTED} for run in ("one", "two")]
    assert figures[0] == figures[1] == pytest.approx(EXPECTED, abs=1e-12)
    assert one.stdout.splitlines()[-1].split(", val_time")[0] == \
        two.stdout.splitlines()[-1].split(", val_time")[0]
