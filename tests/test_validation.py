"""The validation split of `convert.py --validation`: read, checked, and used by ncf.py to select
the model while the test split only reports (issue 13, item 4)."""
import json
import math
import os
import re
import shutil

import pytest
import torch

import cli
import dataloading
import ncf
from logger import log_records, read_log
from neumf import NeuMF

# 4 users, 8 items, 3 negatives per user. The model of item_order_model scores item i as i,
# so a positive's rank is the number of higher ids among its candidates.
TRAIN = [[0, 6], [1, 7], [2, 7], [3, 6]]
TEST = [[0, 7], [1, 5], [2, 4], [3, 2]]
NEGATIVES = [[1, 2, 3], [6, 1, 2], [5, 6, 0], [3, 4, 5]]      # test ranks 0, 1, 2, 3
VALIDATION = [[0, 0], [1, 1], [2, 6], [3, 7]]
VALIDATION_NEGATIVES = [[1, 2, 3], [2, 3, 4], [0, 1, 2], [0, 1, 2]]  # ranks 3, 3, 0, 0


def write_split(directory, validation_flag=4, train=TRAIN, test=TEST, negatives=NEGATIVES,
                validation=VALIDATION, validation_negatives=VALIDATION_NEGATIVES):
    """A directory in the agreed format of `convert.py --validation`; validation_flag None
    writes no metadata.json (the original's form), False one without a validation split."""
    os.makedirs(directory, exist_ok=True)
    tensors = [torch.tensor(rows) for rows in (train, test, negatives, validation,
                                               validation_negatives)]
    names = dataloading.DATA_FILES + dataloading.VALIDATION_FILES
    for name, tensor in zip(names, tensors):
        torch.save(tensor, os.path.join(directory, name))
    if validation_flag is not None:
        metadata = {"users": 4, "items": 8, "train": len(train), "test": len(test),
                    "valid_negative": len(negatives[0]), "validation": validation_flag,
                    "fingerprint": dataloading.tensors_fingerprint(*tensors)}
        with open(os.path.join(directory, dataloading.METADATA), "w") as handle:
            json.dump(metadata, handle)
    return directory


def item_order_model(path):
    """A checkpoint of NeuMF(4, 8) whose logit for (user, item) is the item id."""
    model = NeuMF(4, 8, 1, [2, 2])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.mf_user_embed.weight.fill_(1.0)
        model.mf_item_embed.weight.copy_(torch.arange(8.0).view(8, 1))
        model.final.weight[0, 0] = 1.0  # the MF half of [MF, MLP]
    torch.save(model.state_dict(), path)
    return str(path)


def ndcg(ranks, k):
    return sum(1 / math.log2(rank + 2) for rank in ranks if rank < k) / len(ranks)


def expected_metrics(ranks, prefix=""):
    """-k 2 --report_topk 1 3, by hand from the ranks."""
    metrics = {}
    for k in (2, 1, 3):
        metrics[f"{prefix}hr@{k}"] = sum(rank < k for rank in ranks) / len(ranks)
        metrics[f"{prefix}ndcg@{k}"] = ndcg(ranks, k)
    metrics[f"{prefix}mrr"] = sum(1 / (rank + 1) for rank in ranks) / len(ranks)
    return metrics


# Full ranking: the test positive competes with every item but the user's training and
# validation positives; the validation positive with every item but the training ones.
EXPECTED = {**expected_metrics([0, 1, 2, 3]), **expected_metrics([3, 3, 0, 0], "val_"),
            **expected_metrics([0, 1, 1, 3], "full_"),
            **expected_metrics([6, 5, 0, 0], "val_full_")}


def evaluation_flags(directory, model, log, *extra):
    return ["--data", directory, "--mode", "test", "--load_checkpoint_path", model, "-k", "2",
            "--report_topk", "1", "3", "--full_ranking", "-f", "1", "--layers", "2", "2",
            "--log_path", str(log), *extra]


@pytest.mark.parametrize("validation_flag", [4, True, None])
def test_dataset_carries_the_split_and_fingerprints_all_five(tmp_path, validation_flag):
    dataset = dataloading.open_dataset(write_split(str(tmp_path / "data"), validation_flag))
    assert dataset.validation.tolist() == VALIDATION
    assert dataset.validation_negatives.tolist() == VALIDATION_NEGATIVES
    assert (dataset.nb_users, dataset.nb_items) == (4, 8)
    assert dataset.fingerprint == dataloading.tensors_fingerprint(*(torch.tensor(rows) for rows in (
        TRAIN, TEST, NEGATIVES, VALIDATION, VALIDATION_NEGATIVES)))


def test_dataset_without_a_split_has_none(tmp_path):
    directory = write_split(str(tmp_path / "data"), False)
    for name in dataloading.VALIDATION_FILES:
        os.remove(os.path.join(directory, name))
    edit_metadata(directory, fingerprint=None)  # hashed at load, then
    dataset = dataloading.open_dataset(directory)
    assert dataset.validation is None and dataset.validation_negatives is None
    assert dataset.fingerprint == dataloading.tensors_fingerprint(
        torch.tensor(TRAIN), torch.tensor(TEST), torch.tensor(NEGATIVES))


def save(directory, name, rows):
    torch.save(rows if isinstance(rows, torch.Tensor) else torch.tensor(rows),
               os.path.join(directory, name))


def remove(directory, name):
    os.remove(os.path.join(directory, name))


def edit_metadata(directory, **changes):
    path = os.path.join(directory, dataloading.METADATA)
    with open(path) as handle:
        metadata = json.load(handle)
    metadata.update(changes)
    with open(path, "w") as handle:
        json.dump(metadata, handle)


# (id, metadata's "validation", change, what the error line names)
BAD_SPLITS = [
    ("pairs without negatives", 4, lambda d: remove(d, "validation_negatives.pt"),
     "validation_negatives.pt: not found, but validation_ratings.pt says"),
    ("negatives without pairs", 4, lambda d: remove(d, "validation_ratings.pt"),
     "validation_ratings.pt: not found, but validation_negatives.pt says"),
    ("lone file, original form", None, lambda d: remove(d, "validation_ratings.pt"),
     "validation_ratings.pt: not found, but validation_negatives.pt says"),
    ("metadata announces missing files", True,
     lambda d: (remove(d, "validation_ratings.pt"), remove(d, "validation_negatives.pt")),
     "validation_ratings.pt: not found, but metadata.json says"),
    ("files metadata does not announce", False, lambda d: None,
     "validation_ratings.pt: left from another conversion"),
    ("validation count of another conversion", 4, lambda d: edit_metadata(d, validation=3),
     "metadata.json: records validation = 3 but the tensors beside it have 4"),
    ("user with two validation rows", None,
     lambda d: save(d, "validation_ratings.pt", [[0, 0], [0, 1], [2, 6], [3, 7]]),
     "validation_ratings.pt: a user has more than one validation row"),
    ("fewer negative rows", 4,
     lambda d: save(d, "validation_negatives.pt", VALIDATION_NEGATIVES[:3]),
     "validation_negatives.pt: has 3 rows but validation_ratings.pt has 4"),
    ("negatives of another width", 4,
     lambda d: save(d, "validation_negatives.pt", [row[:2] for row in VALIDATION_NEGATIVES]),
     "validation_negatives.pt: has 2 columns but test_negatives.pt has 3"),
    ("three columns", None,
     lambda d: save(d, "validation_ratings.pt", [row + [5] for row in VALIDATION]),
     "validation_ratings.pt: has 3 columns, not 2"),
    ("empty", None,
     lambda d: (save(d, "validation_ratings.pt", torch.zeros(0, 2, dtype=torch.int64)),
                save(d, "validation_negatives.pt", torch.zeros(0, 3, dtype=torch.int64))),
     "validation_ratings.pt: holds no validation pair"),
    ("float", 4,
     lambda d: save(d, "validation_negatives.pt", torch.tensor(VALIDATION_NEGATIVES).float()),
     "validation_negatives.pt: expected a dense 2-D int64 tensor"),
    ("damaged", 4, lambda d: open(os.path.join(d, "validation_ratings.pt"), "w").write("PK"),
     "validation_ratings.pt: cannot be read"),
    ("negative validation item", None,
     lambda d: save(d, "validation_ratings.pt", [[0, 0], [1, -2], [2, 6], [3, 7]]),
     "holds the negative id -2"),
    ("validation item beyond the tables", 4,
     lambda d: save(d, "validation_ratings.pt", [[0, 0], [1, 1], [2, 6], [3, 9]]),
     "metadata.json: records items = 8 but the tensors beside it have 10"),
    ("validation negative beyond the tables", 4,
     lambda d: save(d, "validation_negatives.pt", [[1, 2, 3], [2, 3, 4], [0, 1, 2], [0, 1, 8]]),
     "metadata.json: records items = 8 but the tensors beside it have 9"),
    ("validation user beyond the tables", 4,
     lambda d: save(d, "validation_ratings.pt", [[0, 0], [1, 1], [2, 6], [4, 7]]),
     "metadata.json: records users = 4 but the tensors beside it have 5"),
]


@pytest.mark.parametrize("validation_flag, change, expected",
                         [case[1:] for case in BAD_SPLITS], ids=[case[0] for case in BAD_SPLITS])
def test_ncf_refuses_a_bad_split_in_one_line(tmp_path, capsys, validation_flag, change,
                                             expected):
    directory = write_split(str(tmp_path / "data"),
                            4 if validation_flag is False else validation_flag)
    dataloading.open_dataset(directory)  # usable before the change
    if validation_flag is False:
        edit_metadata(directory, validation=False)
    change(directory)
    with pytest.raises(SystemExit) as caught:
        cli.run(ncf.main, ["--data", directory, "--checkpoint_dir", str(tmp_path / "ck"),
                           "--log_path", str(tmp_path / "log.json")])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncf.py: error: "), lines
    assert expected in lines[0] and "convert.py" in lines[0]
    assert not (tmp_path / "log.json").exists()


def test_test_mode_reports_both_splits_exactly(tmp_path, capsys):
    directory = write_split(str(tmp_path / "data"))
    model = item_order_model(tmp_path / "model.pth")
    result = ncf.main(evaluation_flags(directory, model, tmp_path / "log.json"))
    assert result["metrics"] == pytest.approx(EXPECTED, abs=1e-12)
    assert (result["hr"], result["full_hr"]) == (0.5, 0.75)
    logged = log_records(read_log(tmp_path / "log.json"), "summary")[-1]
    assert {key: logged[key] for key in EXPECTED} == result["metrics"]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("HR@2 = 0.5000, NDCG@2 = 0.4077, HR@1 = 0.2500, NDCG@1 = 0.2500, "
                           "HR@3 = 0.7500, NDCG@3 = 0.5327, MRR = 0.5208, validation HR@2 = "
                           "0.5000, ")
    assert line.endswith(", full HR@2 = 0.7500, full NDCG@2 = 0.5655, full HR@1 = 0.2500, "
                         "full NDCG@1 = 0.2500, full HR@3 = 0.7500, full NDCG@3 = 0.5655, "
                         "full MRR = 0.5625, validation full HR@2 = 0.5000, validation full "
                         "NDCG@2 = 0.5000, validation full HR@1 = 0.5000, validation full "
                         "NDCG@1 = 0.5000, validation full HR@3 = 0.5000, validation full "
                         "NDCG@3 = 0.5000, validation full MRR = 0.5774")


def clustered_with_constant_validation(clustered_data, directory):
    """clustered_data with a validation split that every model ranks first: each user's
    negatives repeat its validation positive, and a repeat is ranked once. Validation HR is
    1.0 at every epoch, whatever the test HR does."""
    shutil.copytree(clustered_data, directory)
    test = torch.load(os.path.join(directory, "test_ratings.pt"), weights_only=True)
    negatives = torch.load(os.path.join(directory, "test_negatives.pt"), weights_only=True)
    train = torch.load(os.path.join(directory, "train_ratings.pt"), weights_only=True)
    first_items = torch.stack([train[train[:, 0] == user, 1][0] for user in test[:, 0].tolist()])
    save(directory, "validation_ratings.pt", torch.stack((test[:, 0], first_items), 1))
    save(directory, "validation_negatives.pt", first_items[:, None].expand_as(negatives).clone())
    return str(directory)


def test_validation_selects_the_model_and_the_test_split_only_reports(clustered_data,
                                                                      tmp_path, capsys):
    data = clustered_with_constant_validation(clustered_data, tmp_path / "data")
    checkpoints = tmp_path / "ck"
    summary = ncf.main(["--data", data, "--checkpoint_dir", str(checkpoints), "--log_path",
                        str(tmp_path / "log.json"), "-b", "2048", "-e", "3", "-f", "8",
                        "--layers", "16", "8", "--threshold", "1.1", "--opt_level", "O0"])
    epochs = log_records(read_log(tmp_path / "log.json"), "epoch")
    assert [record["val_hr@10"] for record in epochs] == [1.0, 1.0, 1.0]
    # the test HR improves, yet the first epoch stays selected: no later validation HR beats it
    assert max(record["hr@10"] for record in epochs) > epochs[0]["hr@10"]
    assert summary["best_epoch"] == 0 and summary["selected_by"] == "validation"
    assert (summary["best_accuracy"], summary["best_ndcg"]) == (epochs[0]["hr@10"],
                                                                epochs[0]["ndcg@10"])
    assert summary["best_val_hr@10"] == 1.0
    out = capsys.readouterr().out
    assert (f"Best validation HR@10 = 1.0000 at epoch 0, selected model's test HR@10 = "
            f"{epochs[0]['hr@10']:.4f}") in out
    assert len(re.findall("New best hr!", out)) == 1
    tested = ncf.main(["--data", data, "--mode", "test", "--load_checkpoint_path",
                       str(checkpoints / "model.pth"), "--log_path", str(tmp_path / "t.json"),
                       "-f", "8", "--layers", "16", "8"])
    assert (tested["hr"], tested["metrics"]["val_hr@10"]) == (epochs[0]["hr@10"], 1.0)


def test_threshold_applies_to_validation_hr(clustered_data, tmp_path, capsys):
    data = clustered_with_constant_validation(clustered_data, tmp_path / "data")
    summary = ncf.main(["--data", data, "--checkpoint_dir", str(tmp_path / "ck"),
                        "--log_path", str(tmp_path / "log.json"), "-b", "2048", "-e", "3",
                        "-f", "8", "--layers", "16", "8", "--threshold", "1.0"])
    assert summary["epochs_run"] == 1 and summary["target_reached"] is True
    assert summary["best_accuracy"] < 1.0
    out = capsys.readouterr().out
    assert "Hit threshold of 1.0 (validation HR@10 1.0000)" in out.splitlines()
    # the original's validation_loss is the test candidates' loss: named so beside validation
    epoch_line = next(line for line in out.splitlines() if line.startswith("Epoch 0:"))
    assert ", test_loss = " in epoch_line and "validation_loss" not in epoch_line
    assert ", validation HR@10 = 1.0000" in epoch_line


def test_resume_keeps_the_validation_selected_best(clustered_data, tmp_path):
    data = clustered_with_constant_validation(clustered_data, tmp_path / "data")
    flags = ["--data", data, "--checkpoint_dir", str(tmp_path / "ck"), "--log_path",
             str(tmp_path / "log.json"), "-b", "2048", "-f", "8", "--layers", "16", "8",
             "--threshold", "1.1", "--opt_level", "O0"]
    first = ncf.main(flags + ["-e", "1"])
    resumed = ncf.main(flags + ["-e", "2", "--resume"])
    assert resumed["epochs_run"] == 2 and resumed["best_epoch"] == 0
    assert resumed["best_accuracy"] == first["best_accuracy"]
    assert resumed["best_val_hr@10"] == 1.0 and resumed["selected_by"] == "validation"
