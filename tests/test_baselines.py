"""baselines.py: each method's ranks on a hand-made directory, the protocols against a plain
re-computation, and the one-line refusals."""
import math
import os

import pytest
import torch

import baselines
import cli
import dataloading
import progress
from conftest import write_clustered_dataset
from logger import log_records, read_log

# Training: user 0 has items 0, 1; user 1 has 0, 2, 3; user 2 has 0, 1. Counts: item 0: 3,
# item 1: 2, items 2 and 3: 1 (a tie), item 4: 0 (seen only as a test item and a negative).
# ItemKNN's CSR matrix; baselines.py silences the same warning when run as a program.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

TINY_TRAIN = [(0, 0), (0, 1), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1)]
TINY_TEST = [(0, 3), (1, 4), (2, 2)]
TINY_NEGATIVES = [[4, 4], [1, 1], [3, 4]]


def write_tiny(directory):
    os.makedirs(directory, exist_ok=True)
    for name, rows in (("train_ratings.pt", TINY_TRAIN), ("test_ratings.pt", TINY_TEST),
                       ("test_negatives.pt", TINY_NEGATIVES)):
        torch.save(torch.tensor(rows, dtype=torch.int64), os.path.join(directory, name))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def small_clustered(tmp_path_factory):
    return write_clustered_dataset(str(tmp_path_factory.mktemp("small")), nb_users=40,
                                   nb_items=30, clusters=3, per_user=6, negatives=12)


def run(data, *flags):
    return baselines.main(["--data", data, "--device", "cpu", *flags])


def expected_metrics(ranks, topks, prefix=""):
    metrics = {}
    for k in topks:
        metrics[f"{prefix}hr@{k}"] = sum(rank < k for rank in ranks) / len(ranks)
        metrics[f"{prefix}ndcg@{k}"] = sum(1 / math.log2(rank + 2) for rank in ranks
                                           if rank < k) / len(ranks)
    metrics[f"{prefix}mrr"] = sum(1 / (rank + 1) for rank in ranks) / len(ranks)
    return metrics


def metrics_of(results):
    return {name: value for name, value in results.items() if not name.endswith("_time")}


def test_popularity_ranks_by_count_then_lower_id(tiny):
    # Sampled: user 0's 3 beats 4; user 1's 4 is behind 1 (repeated, counted once); user 2's 2
    # ties 3 on count and wins on id, though 3 is in an earlier column.
    # Full: user 0's 3 loses the tie to 2; user 1's 4 is behind 1 (0, 2, 3 are its training
    # items); user 2's 2 beats 3 and 4 (0, 1 are its training items).
    results = run(tiny, "--method", "pop", "--full_ranking", "--topk", "1", "--report_topk", "2")
    expected = {**expected_metrics([0, 1, 0], [1, 2]),
                **expected_metrics([1, 1, 0], [1, 2], prefix="full_")}
    assert metrics_of(results) == pytest.approx(expected, abs=1e-12)
    assert expected["mrr"] == pytest.approx(5 / 6) and expected["full_mrr"] == pytest.approx(2 / 3)


def test_itemknn_scores_and_ranks_by_hand(tiny):
    # Shrinkage 1: sim(0, 1) = 2 / (sqrt(3 * 2) + 1), sim(0, 2) = sim(0, 3) = 1 / (sqrt(3) + 1),
    # sim(2, 3) = 1 / (1 + 1), every other pair 0. One neighbour each: 0 -> 1, 1 -> 0, 2 -> 3,
    # 3 -> 2; item 4 has no similar item.
    dataset = dataloading.open_dataset(tiny)
    scorer = baselines.ItemKNN(dataset.train, 3, 5, torch.device("cpu"), neighbours=1,
                               shrinkage=1.0)
    s01 = 2 / (math.sqrt(6) + 1)
    expected = torch.tensor([[s01, s01, 0, 0, 0], [0, s01, 0.5, 0.5, 0], [s01, s01, 0, 0, 0]])
    assert torch.allclose(scorer(torch.tensor([0, 1, 2])).double(), expected.double())
    # Sampled: user 0's 3 (score 0) ties 4 in an earlier column, which wins; user 2's 2 ties 3
    # and 4, both earlier. Full: a tie goes to the lower id, so user 2's 2 is first.
    sampled = baselines.sampled_ranks(scorer, dataset.test, dataset.negatives)
    full = baselines.full_ranks(scorer, dataset.train, dataset.test)
    assert sampled.tolist() == [1, 1, 2]
    assert full.tolist() == [1, 1, 0]
    results = run(tiny, "--method", "itemknn", "--neighbours", "1", "--shrinkage", "1",
                  "--full_ranking", "--topk", "2")
    assert metrics_of(results) == pytest.approx(
        {**expected_metrics([1, 1, 2], [2]), **expected_metrics([1, 1, 0], [2], "full_")},
        abs=1e-12)


def test_itemknn_sums_similarities_over_all_neighbours(tiny):
    dataset = dataloading.open_dataset(tiny)
    scorer = baselines.ItemKNN(dataset.train, 3, 5, torch.device("cpu"), neighbours=100,
                               shrinkage=0.0)
    s01, s02, s23 = 2 / math.sqrt(6), 1 / math.sqrt(3), 1.0
    # User 1 (items 0, 2, 3): item 1 is similar to 0 only; 2 to 0 and 3; 4 to nothing.
    expected = [s02 + s02, s01, s02 + s23, s02 + s23, 0.0]
    assert scorer(torch.tensor([1]))[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_random_is_seeded(small_clustered):
    first = run(small_clustered, "--method", "random", "--seed", "3", "--full_ranking")
    again = run(small_clustered, "--method", "random", "--seed", "3", "--full_ranking")
    other = run(small_clustered, "--method", "random", "--seed", "4", "--full_ranking")
    assert metrics_of(first) == metrics_of(again)
    assert metrics_of(first) != metrics_of(other)


def test_bpr_learns_the_clusters(clustered_data):
    # Chance is about 10 of the ~75 distinct candidates a row has; most-popular is near it.
    results = run(clustered_data, "--method", "bpr", "--epochs", "20", "--seed", "2")
    popular = run(clustered_data, "--method", "pop")
    assert popular["hr@10"] < 0.2
    assert results["hr@10"] > 0.6


def plain_ranks(scores, train, test, negatives):
    """Sampled and full ranks by Python loops over users, the rules spelled out."""
    sampled, full = [], []
    for user, positive in test.tolist():
        row = scores[user].tolist()
        columns = negatives[user].tolist() + [positive]
        first_column = {}
        for column, item in enumerate(columns):
            first_column.setdefault(item, column)
        sampled.append(sum(
            1 for item, column in first_column.items() if item != positive and (
                row[item] > row[positive] or (row[item] == row[positive]
                                              and column < first_column[positive]))))
        trained = {item for who, item in train.tolist() if who == user}
        full.append(sum(
            1 for item in range(len(row)) if item != positive and item not in trained and (
                row[item] > row[positive] or (row[item] == row[positive] and item < positive))))
    return sampled, full


@pytest.mark.parametrize("method", ["pop", "itemknn", "bpr"])
def test_protocols_equal_a_plain_recomputation(small_clustered, method):
    dataset = dataloading.open_dataset(small_clustered)
    epochs = ["--epochs", "3"] if method == "bpr" else []
    args = baselines.parse_args(["--data", small_clustered, "--method", method, "--device", "cpu",
                                 *epochs])
    scorer = baselines.fit(args, dataset, torch.device("cpu"))
    scores = scorer(torch.arange(dataset.nb_users))
    sampled, full = plain_ranks(scores, dataset.train, dataset.test, dataset.negatives)
    assert baselines.sampled_ranks(scorer, dataset.test, dataset.negatives).tolist() == sampled
    assert baselines.full_ranks(scorer, dataset.train, dataset.test).tolist() == full
    results = run(small_clustered, "--method", method, *epochs, "--full_ranking",
                  "--report_topk", "1", "5")
    assert metrics_of(results) == pytest.approx(
        {**expected_metrics(sampled, [10, 1, 5]), **expected_metrics(full, [10, 1, 5], "full_")},
        abs=1e-12)


class TrainedFirst(baselines.Scorer):
    """Popularity, but every user's training items above every other item."""

    def __init__(self, dataset):
        super().__init__(dataset.nb_users, dataset.nb_items, torch.device("cpu"))
        self.popularity = baselines.Popularity(dataset.train, dataset.nb_users,
                                               dataset.nb_items, self.device)
        self.trained = torch.zeros(dataset.nb_users, dataset.nb_items, dtype=torch.bool)
        self.trained[dataset.train[:, 0], dataset.train[:, 1]] = True

    def __call__(self, users):
        return self.popularity(users) + 1e6 * self.trained[users]


def test_full_ranking_never_ranks_a_training_item(tiny):
    dataset = dataloading.open_dataset(tiny)
    ranks = baselines.full_ranks(TrainedFirst(dataset), dataset.train, dataset.test)
    assert ranks.tolist() == [1, 1, 0]


def test_bpr_reports_its_epochs_in_a_log(small_clustered, monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a line at every epoch
    run(small_clustered, "--method", "bpr", "--epochs", "3", "-b", "64")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bpr: ")]
    assert [line.split(",")[0] for line in lines] == [
        "bpr: 1/3 epochs (33%)", "bpr: 2/3 epochs (67%)", "bpr: 3/3 epochs (100%)"]


def test_log_holds_the_settings_and_the_printed_values(tiny, tmp_path, capsys):
    log = str(tmp_path / "log.json")
    results = run(tiny, "--method", "pop", "-k", "2", "--log_path", log)
    printed = dict(line.split(" = ") for line in capsys.readouterr().out.splitlines())
    assert printed["hr@2"] == f"{results['hr@2']:.4f}"
    records = read_log(log)
    assert log_records(records, "parameter")[0]["method"] == "pop"
    assert log_records(records, "summary") == [pytest.approx(results)]


HUGE = str(2 ** 31)
CASES = [
    (["--method", "pop"], "--data"),
    (["--data", "{data}"], "--method"),
    (["--data", "{data}", "--method", "knn"], "--method"),
    (["--data", "{data}", "--method", "pop", "--topk", "0"], "--topk must be in [1"),
    (["--data", "{data}", "--method", "pop", "--topk", HUGE], "--topk must be in [1"),
    (["--data", "{data}", "--method", "pop", "--topk", "ten"], "--topk"),
    (["--data", "{data}", "--method", "pop", "--report_topk", "5", "0"], "--report_topk"),
    (["--data", "{data}", "--method", "pop", "--report_topk"], "--report_topk"),
    (["--data", "{data}", "--method", "itemknn", "--neighbours", "0"], "--neighbours"),
    (["--data", "{data}", "--method", "itemknn", "--shrinkage", "-1"], "--shrinkage"),
    (["--data", "{data}", "--method", "itemknn", "--shrinkage", "nan"], "--shrinkage"),
    (["--data", "{data}", "--method", "bpr", "--factors", "0"], "--factors"),
    (["--data", "{data}", "--method", "bpr", "--epochs", "0"], "--epochs"),
    (["--data", "{data}", "--method", "bpr", "--batch_size", "0"], "--batch_size"),
    (["--data", "{data}", "--method", "bpr", "--learning_rate", "0"], "--learning_rate"),
    (["--data", "{data}", "--method", "bpr", "--learning_rate", "inf"], "--learning_rate"),
    (["--data", "{data}", "--method", "bpr", "--regularisation", "-0.1"], "--regularisation"),
    (["--data", "{data}", "--method", "bpr", "-l", "1e30", "-k", "2"],
     "--learning_rate 1e+30 --regularisation 0.0005: epoch 1: training diverged (loss nan); "
     "lower -l/--learning_rate"),
    (["--data", "{data}", "--method", "bpr", "--regularisation", "1e38", "-k", "2"],
     "--learning_rate 0.005 --regularisation 1e+38: epoch 0: training diverged (loss inf)"),
    (["--data", "{data}", "--method", "pop", "--neighbours", "5"],
     "--neighbours is a setting of --method itemknn, not pop; drop --neighbours"),
    (["--data", "{data}", "--method", "itemknn", "-f", "3"],
     "--factors is a setting of --method bpr, not itemknn; drop --factors"),
    (["--data", "{data}", "--method", "bpr", "--shrinkage", "10"],
     "--shrinkage is a setting of --method itemknn, not bpr"),
    (["--data", "{data}", "--method", "random", "--seed", "-1"], "--seed"),
    (["--data", "{data}", "--method", "random", "--seed", str(2 ** 63)], "--seed"),
    (["--data", "{tmp}/none", "--method", "pop"], "{tmp}/none/train_ratings.pt"),
    (["--data", "{converting}", "--method", "pop"], "{converting}/.converting"),
    (["--data", "{broken}", "--method", "pop"], "{broken}/test_negatives.pt"),
    (["--data", "{data}", "--method", "pop", "-k", "2", "--log_path",
      "{tmp}/a_file/log.json"],
     "--log_path {tmp}/a_file/log.json"),
]
if not torch.cuda.is_available():
    CASES.append((["--data", "{data}", "--method", "pop", "--device", "cuda"], "--device cuda"))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "a_file").write_text("not a directory\n")
    converting = write_tiny(str(tmp / "converting"))
    open(os.path.join(converting, dataloading.CONVERTING), "w").close()
    broken = write_tiny(str(tmp / "broken"))
    torch.save(torch.zeros(2, 2, dtype=torch.int64), os.path.join(broken, "test_negatives.pt"))
    return {"tmp": str(tmp), "data": tiny, "converting": converting, "broken": broken}


@pytest.mark.parametrize("argv, named", CASES, ids=[" ".join(case[0][2:]) or case[0][0]
                                                    for case in CASES])
def test_refusals_are_one_line(argv, named, bad_inputs, capsys):
    before = sorted(os.listdir(bad_inputs["tmp"]))
    with pytest.raises(SystemExit) as leaving:
        cli.run(baselines.main, [arg.format(**bad_inputs) for arg in argv])
    captured = capsys.readouterr()
    assert leaving.value.code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("baselines.py: error: ")
    assert named.format(**bad_inputs) in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(os.listdir(bad_inputs["tmp"])) == before
