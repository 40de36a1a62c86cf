import math

import pytest
import torch

import dataloading
from dataloading import (Epoch, Positives, create_test_data, epoch_keys, share_bounds,
                         shuffled_positions)
from evaluation import hit_rate_and_ndcg, positive_ranks, ranking_metrics


def plain_rank(scores, items):
    """Rank of the positive (last column) by a plain loop, as the protocol describes it."""
    seen, candidates = set(), []
    for column, (score, item) in enumerate(zip(scores, items)):
        candidates.append((column, -1.0 if item in seen else score, item))
        seen.add(item)
    positive = items[-1]
    first = next(column for column, _, item in candidates if item == positive)
    positive_score = candidates[first][1]
    return sum(1 for column, score, _ in candidates
               if score > positive_score or (score == positive_score and column < first))


def test_test_data_marks_repeats_after_the_first():
    test_ratings = torch.tensor([[0, 5], [1, 9]])
    negatives = torch.tensor([[3, 5, 3, 7], [1, 2, 4, 8]])
    users, items, mask = create_test_data(test_ratings, negatives)
    assert users.tolist() == [0, 1]
    assert items.tolist() == [[3, 5, 3, 7, 5], [1, 2, 4, 8, 9]]
    assert mask.tolist() == [[False, False, True, False, True], [False] * 5]


@pytest.mark.parametrize("rows_a_block", [1, 3, 7, 2 ** 16])
def test_test_data_in_blocks_marks_each_rows_first_occurrences(monkeypatch, rows_a_block):
    monkeypatch.setattr(dataloading, "CANDIDATE_ROWS", rows_a_block)
    generator = torch.Generator().manual_seed(2)
    test_ratings = torch.stack((torch.arange(20), torch.randint(0, 6, (20,),
                                                                generator=generator)), 1)
    negatives = torch.randint(0, 6, (20, 9), generator=generator)
    users, items, mask = create_test_data(test_ratings, negatives, torch.int32)
    assert items.dtype == torch.int32 and users.tolist() == list(range(20))
    for row, negative_row, positive in zip(range(20), negatives.tolist(),
                                           test_ratings[:, 1].tolist()):
        assert items[row].tolist() == negative_row + [positive]
        row_items = negative_row + [positive]
        assert mask[row].tolist() == [item in row_items[:column]
                                      for column, item in enumerate(row_items)]


def test_positive_drawn_as_negative_is_ranked_once():
    test_ratings = torch.tensor([[0, 5]])
    negatives = torch.tensor([[3, 5, 3, 7]])
    _, items, mask = create_test_data(test_ratings, negatives)
    # item 5 (column 1) scores 0.6; its repeat in the positive's column is masked
    scores = torch.tensor([[0.9, 0.6, 0.95, 0.1, 0.99]])
    assert positive_ranks(scores, items, mask).tolist() == [1]


def test_ranks_equal_a_plain_recomputation():
    generator = torch.Generator().manual_seed(0)
    test_ratings = torch.stack((torch.arange(200), torch.randint(0, 12, (200,), generator=generator)), 1)
    negatives = torch.randint(0, 12, (200, 30), generator=generator)
    _, items, mask = create_test_data(test_ratings, negatives)
    # coarse scores make ties common, so the tie rule is exercised
    scores = torch.randint(0, 5, items.shape, generator=generator).float() / 4
    ranks = positive_ranks(scores, items, mask).tolist()
    assert ranks == [plain_rank(s, i) for s, i in zip(scores.tolist(), items.tolist())]


def test_hit_rate_and_ndcg_by_hand():
    hr, ndcg = hit_rate_and_ndcg(torch.tensor([0, 3, 9, 10, 50]), 10)
    assert hr == pytest.approx(3 / 5)
    assert ndcg == pytest.approx((1 + math.log(2) / math.log(5) + math.log(2) / math.log(11)) / 5)


def test_ranking_metrics_by_hand():
    metrics = ranking_metrics(torch.tensor([0, 1, 4, 19]), [1, 5])
    assert metrics == pytest.approx({
        "hr@1": 1 / 4, "ndcg@1": 1 / 4,
        "hr@5": 3 / 4, "ndcg@5": (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4,
        "mrr": (1 + 1 / 2 + 1 / 5 + 1 / 20) / 4})


def whole_epoch(train_users, train_items, nb_items, negatives, world_size=1, rank=0, seed=7,
                epoch=0):
    positives = Positives.from_pairs(train_users, train_items, int(train_users.max()) + 1)
    samples = Epoch(positives, nb_items, negatives, world_size, rank, epoch_keys(seed, epoch))
    return samples.samples(0, len(samples))


def test_positives_are_grouped_by_user_in_their_order():
    users = torch.tensor([2, 0, 2, 1, 0, 2], dtype=torch.int32)
    items = torch.tensor([7, 3, 5, 9, 1, 6], dtype=torch.int32)
    positives = Positives.from_pairs(users, items, nb_users=4)  # user 3 has no positive
    assert positives.offsets.tolist() == [0, 2, 3, 6, 6]
    assert positives.items.tolist() == [3, 1, 9, 7, 5, 6]
    assert positives.users().tolist() == [0, 0, 1, 2, 2, 2]
    assert positives.users().dtype == torch.int32 and len(positives) == 6
    assert positives.users_of(torch.tensor([5, 0, 2, 3, 1])).tolist() == [2, 0, 1, 2, 0]
    first = positives.prefix(3)
    assert first.users().tolist() == [0, 0, 1] and first.items.tolist() == [3, 1, 9]


@pytest.mark.parametrize("piece", [1, 7, 2000])
def test_grouping_by_user_in_pieces_is_a_stable_sort(monkeypatch, piece):
    monkeypatch.setattr(dataloading, "GROUP_PAIRS", piece)
    generator = torch.Generator().manual_seed(piece)
    users = torch.randint(0, 40, (1500,), generator=generator)
    items = torch.randint(0, 10 ** 6, (1500,), generator=generator, dtype=torch.int32)
    offsets, grouped = dataloading.group_by_user(users, items, 45)
    order = torch.argsort(users, stable=True)
    assert torch.equal(grouped, items[order]) and grouped.dtype == torch.int32
    assert torch.equal(offsets.diff(), torch.bincount(users, minlength=45))
    assert offsets[0] == 0 and len(offsets) == 46


def test_users_of_positions_equal_the_user_column_on_random_data():
    generator = torch.Generator().manual_seed(5)
    users = torch.randint(0, 50, (2000,), generator=generator, dtype=torch.int32)
    items = torch.arange(2000, dtype=torch.int32)
    positives = Positives.from_pairs(users, items, 60)
    column = users[torch.argsort(users, stable=True)]
    positions = torch.randint(0, 2000, (5000,), generator=generator)
    assert torch.equal(positives.users_of(positions), column[positions])
    assert torch.equal(positives.users(), column)
    # each user's items keep their order in the file
    for user in range(50):
        assert torch.equal(positives.items[positives.offsets[user]:positives.offsets[user + 1]],
                           items[users == user])


def test_epoch_labels_and_negatives_per_positive():
    train_users = torch.tensor([0, 0, 1, 2, 2, 2], dtype=torch.int32)
    train_items = torch.tensor([1, 2, 0, 3, 4, 5], dtype=torch.int32)
    users, items, labels = whole_epoch(train_users, train_items, 50, 4)
    assert len(users) == 30 and labels.sum().item() == 6
    positives = sorted(zip(users[labels].tolist(), items[labels].tolist()))
    assert positives == sorted(zip(train_users.tolist(), train_items.tolist()))
    # each training positive's user appears once as a positive and 4 times as a negative
    assert torch.bincount(users.long()).tolist() == [10, 5, 15]
    assert items.dtype == torch.int32 and 0 <= items.min() and items.max().item() < 50


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_shares_are_disjoint_and_cover_the_epoch(world_size):
    train_users = torch.arange(37, dtype=torch.int32) % 5
    train_items = torch.arange(37, dtype=torch.int32)
    full = whole_epoch(train_users, train_items, 1000, 3)
    shares = [whole_epoch(train_users, train_items, 1000, 3, world_size, rank)
              for rank in range(world_size)]
    sizes = [len(share[0]) for share in shares]
    assert sum(sizes) == 148 and max(sizes) - min(sizes) <= 1

    def rows(parts):
        return sorted(zip(parts[0].tolist(), parts[1].tolist(), parts[2].tolist()))

    merged = [row for share in shares for row in rows(share)]
    assert sorted(merged) == rows(full)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000, 1025, 2 ** 16 + 1])
def test_the_shuffle_is_a_permutation_of_the_share(size):
    for epoch in range(3):
        positions = shuffled_positions(torch.arange(size), size, epoch_keys(1, epoch))
        assert torch.equal(positions.sort().values, torch.arange(size))


def test_the_shuffle_spreads_positives_and_draws_fresh_each_epoch():
    size, positives = 100_000, 20_000
    orders = [shuffled_positions(torch.arange(size), size, epoch_keys(1, epoch))
              for epoch in range(2)]
    for order in orders:
        # per block of 1,000 samples about 200 positives (binomial sd 12.6), as a true shuffle
        per_block = (order < positives).view(100, 1000).sum(dim=1)
        assert (per_block - 200).abs().max().item() < 70
        # neighbours in the shuffled order are unrelated in the epoch
        assert abs(torch.corrcoef(torch.stack((order[:-1], order[1:])).double())[0, 1]) < 0.02
    assert (orders[0] == orders[1]).double().mean().item() < 0.001


def test_negatives_are_uniform_items():
    train_users = torch.zeros(1000, dtype=torch.int32)
    train_items = torch.zeros(1000, dtype=torch.int32)
    users, items, labels = whole_epoch(train_users, train_items, 50, 100)
    counts = torch.bincount(items[~labels].long(), minlength=50).double()
    expected = 100_000 / 50
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 100  # 49 degrees of freedom: above 100 has probability below 2e-5


def test_the_epoch_is_the_same_whatever_its_pieces(monkeypatch):
    train_users = torch.arange(301, dtype=torch.int32) % 17
    train_items = torch.arange(301, dtype=torch.int32)
    epochs = []
    for piece in (1, 7, 64, 10 ** 6):
        monkeypatch.setitem(dataloading.PIECE_SAMPLES, "cpu", piece)
        samples = Epoch(Positives.from_pairs(train_users, train_items, 17), 500, 4, 1, 0,
                        epoch_keys(3, 2))
        epochs.append([torch.cat(parts) for parts in zip(*samples.batches(25))])
    for other in epochs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(epochs[0], other))
    assert len(epochs[0][0]) == 1500  # 60 full batches of 25; 5 samples dropped


@pytest.mark.parametrize("device, pieces", [("cpu", [(0, 2 ** 21), (2 ** 21, 2 ** 22)]),
                                            ("cuda", [(0, 2 ** 22)])])
def test_a_gpu_builds_its_epoch_in_fewer_larger_pieces(monkeypatch, device, pieces):
    """On a GPU each piece waits on the host for the queue of training steps to drain."""
    class Items:
        def __init__(self):
            self.device = torch.device(device)

        def __len__(self):
            return 10 ** 6  # an epoch of 5 M samples: 4 full batches of 2**20

    built = []
    monkeypatch.setattr(Epoch, "samples", lambda self, start, stop: built.append(
        (start, stop)) or (torch.zeros(stop - start),) * 3)
    samples = Epoch(Positives(torch.zeros(2), Items()), 9, 4, 1, 0, epoch_keys(1, 0))
    assert sum(1 for _ in samples.batches(2 ** 20)) == 4
    assert built == pieces


def test_share_bounds_cover_without_overlap():
    for world_size in range(1, 6):
        bounds = [share_bounds(23, world_size, rank) for rank in range(world_size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 23
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_batches_drop_the_partial_last_batch():
    pairs = torch.arange(2, dtype=torch.int32)
    samples = Epoch(Positives.from_pairs(pairs, pairs, 2), 9, 4, 1, 0, epoch_keys(1, 0))
    assert [len(batch[0]) for batch in samples.batches(4)] == [4, 4]
    assert list(samples.batches(11)) == []


def test_id_bounds_count_test_ids_too():
    train = torch.tensor([[0, 0], [1, 2]])
    test = torch.tensor([[0, 7], [1, 1]])
    negatives = torch.tensor([[3], [9]])
    assert dataloading.id_bounds(train, test, negatives) == (0, 2, 10)


def test_open_dataset_errors_name_the_file(tmp_path):
    with pytest.raises(dataloading.DataError, match="train_ratings.pt: not found; convert"):
        dataloading.open_dataset(str(tmp_path))
    for name in dataloading.DATA_FILES:
        (tmp_path / name).write_bytes(b"not a tensor")
    with pytest.raises(dataloading.DataError, match="train_ratings.pt: cannot be read"):
        dataloading.open_dataset(str(tmp_path))


NAN, INF = float("nan"), float("inf")


def keyed_rank(scores, items):
    """Rank of the positive by a plain loop over sort keys: NaN below every number, and a NaN
    positive behind every other distinct item."""
    first = items.index(items[-1])
    positive = scores[first]
    others = [(column, score) for column, (score, item) in enumerate(zip(scores, items))
              if column != first and item not in items[:column]]
    if math.isnan(positive):
        return len(others)
    return sum(1 for column, score in others
               if not math.isnan(score) and (score > positive or
                                             (score == positive and column < first)))


@pytest.mark.parametrize("row_items, row_scores, rank", [
    ([1, 2, 3, 4], [NAN, 0.5, NAN, 0.2], 1),       # NaN negatives rank behind a number
    ([1, 2, 3, 4], [0.1, NAN, -INF, NAN], 3),      # a NaN positive is behind everything
    ([1, 2, 3, 4], [NAN, NAN, NAN, NAN], 3),       # ... NaN ties included
    ([1, 2, 3, 4], [-INF, NAN, 0.3, -INF], 2),     # -inf ties with -inf, beats NaN
    ([1, 2, 3, 4], [INF, 1e30, NAN, INF], 1),      # +inf ties with +inf at an earlier column
    ([1, 2, 3, 4], [0.7, 0.7, 0.1, 0.7], 2),       # plain ties go to the earlier columns
    ([4, 7, 4, 7], [NAN, 0.5, 0.9, NAN], 0),       # repeats never count, a high one included
    ([4, 9, 4, 7], [NAN, NAN, 0.1, NAN], 2),       # a NaN positive is behind distinct items
    ([7, 9, 4, 7], [NAN, 0.2, 0.1, 0.9], 2),       # the positive is ranked at its first column
])
def test_nan_ranks_last(row_items, row_scores, rank):
    test_ratings = torch.tensor([[0, row_items[-1]]])
    _, items, mask = create_test_data(test_ratings, torch.tensor([row_items[:-1]]))
    assert positive_ranks(torch.tensor([row_scores]), items, mask).tolist() == [rank]
    assert keyed_rank(row_scores, row_items) == rank


def test_ranks_with_nan_and_inf_equal_a_plain_recomputation():
    generator = torch.Generator().manual_seed(1)
    test_ratings = torch.stack((torch.arange(300), torch.randint(0, 8, (300,),
                                                                 generator=generator)), 1)
    negatives = torch.randint(0, 8, (300, 12), generator=generator)
    _, items, mask = create_test_data(test_ratings, negatives)
    values = torch.tensor([NAN, -INF, INF, 0.0, 0.5, 1.0])
    scores = values[torch.randint(0, len(values), items.shape, generator=generator)]
    ranks = positive_ranks(scores, items, mask).tolist()
    assert ranks == [keyed_rank(s, i) for s, i in zip(scores.tolist(), items.tolist())]
    assert len(set(ranks)) > 5  # the draw is not degenerate


def test_an_all_nan_model_scores_zero_in_test_mode(clustered_data, tmp_path, capsys):
    import ncf
    from neumf import NeuMF
    checkpoint = tmp_path / "nan.pth"
    shape = NeuMF(300, 200, 8, [16, 8]).state_dict()
    # Finite weights (NaN ones are refused on loading) whose every logit is inf - inf = NaN.
    huge = {name: torch.full_like(tensor, 3e38) for name, tensor in shape.items()}
    huge["final.weight"][0, 1::2] = -3e38
    torch.save(huge, checkpoint)
    result = ncf.main(["--data", clustered_data, "--mode", "test", "--load_checkpoint_path",
                       str(checkpoint), "-f", "8", "--layers", "16", "8", "--full_ranking",
                       "--log_path", str(tmp_path / "log.json")])
    assert (result["hr"], result["ndcg"], result["full_hr"], result["full_ndcg"]) == (0, 0, 0, 0)
    assert "HR@10 = 0.0000, NDCG@10 = 0.0000" in capsys.readouterr().out
