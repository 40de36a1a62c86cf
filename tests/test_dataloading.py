import math

import pytest
import torch

import dataloading
from dataloading import (batches, create_test_data, epoch_samples, hit_rate_and_ndcg,
                         positive_ranks, share_bounds)


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


def test_epoch_labels_and_negatives_per_positive():
    train_users = torch.tensor([0, 0, 1, 2, 2, 2], dtype=torch.int32)
    train_items = torch.tensor([1, 2, 0, 3, 4, 5], dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    users, items, labels = epoch_samples(train_users, train_items, 50, 4, 1, 0, generator)
    assert len(users) == 30 and labels.sum().item() == 6
    positives = sorted(zip(users[labels].tolist(), items[labels].tolist()))
    assert positives == sorted(zip(train_users.tolist(), train_items.tolist()))
    # each training positive's user appears once as a positive and 4 times as a negative
    assert torch.bincount(users.long()).tolist() == [10, 5, 15]
    assert items.dtype == torch.int32 and items.max().item() < 50


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_shares_are_disjoint_and_cover_the_epoch(world_size):
    train_users = torch.arange(37, dtype=torch.int32) % 5
    train_items = torch.arange(37, dtype=torch.int32)
    full = epoch_samples(train_users, train_items, 1000, 3, 1, 0, torch.Generator().manual_seed(7))
    shares = [epoch_samples(train_users, train_items, 1000, 3, world_size, rank,
                            torch.Generator().manual_seed(7)) for rank in range(world_size)]
    sizes = [len(share[0]) for share in shares]
    assert sum(sizes) == 148 and max(sizes) - min(sizes) <= 1

    def rows(parts):
        return sorted(zip(parts[0].tolist(), parts[1].tolist(), parts[2].tolist()))

    merged = [row for share in shares for row in rows(share)]
    assert sorted(merged) == rows(full)


def test_share_bounds_cover_without_overlap():
    for world_size in range(1, 6):
        bounds = [share_bounds(23, world_size, rank) for rank in range(world_size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 23
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_batches_drop_the_partial_last_batch():
    data = torch.arange(10)
    sizes = [len(batch[0]) for batch in batches(data, data, data > 4, 4)]
    assert sizes == [4, 4]
    assert list(batches(data, data, data, 11)) == []


def test_dataset_sizes_count_test_ids_too():
    train = torch.tensor([[0, 0], [1, 2]])
    test = torch.tensor([[0, 7], [1, 1]])
    negatives = torch.tensor([[3], [9]])
    assert dataloading.dataset_sizes(train, test, negatives) == (2, 10)


def test_load_dataset_errors_name_the_file(tmp_path):
    with pytest.raises(dataloading.DataError, match="train_ratings.pt: not found; convert"):
        dataloading.load_dataset(str(tmp_path))
    for name in dataloading.DATA_FILES:
        (tmp_path / name).write_bytes(b"not a tensor")
    with pytest.raises(dataloading.DataError, match="train_ratings.pt: cannot be read"):
        dataloading.load_dataset(str(tmp_path))
