import pytest
import torch

import dataloading
import evaluation
import scoring
from neumf import NeuMF


def random_model(nb_users, nb_items, mf_dim, layers, dropout=0.0, seed=0):
    """A NeuMF with weights large enough that every ReLU sees both signs."""
    torch.manual_seed(seed)
    model = NeuMF(nb_users, nb_items, mf_dim, layers, dropout=dropout)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


def plain_scores(model, users):
    """Every item for each user through model.forward, pair by pair."""
    nb_items = model.nb_items
    with torch.no_grad():
        logits = model(users.repeat_interleave(nb_items), torch.arange(nb_items).repeat(len(users)))
    return logits.view(len(users), nb_items)


@pytest.mark.parametrize("layers", [[8, 6, 4], [16, 8], [8]])
@pytest.mark.parametrize("chunk_pairs", [1, 5, 13, 40, 2 ** 16])
def test_factored_scores_equal_the_plain_forward(layers, chunk_pairs):
    model = random_model(7, 13, 5, layers)
    users = torch.tensor([3, 0, 6, 3, 1])
    factored = scoring.score_all_items(model, users, chunk_pairs=chunk_pairs)
    expected = plain_scores(model, users)
    assert factored.shape == (5, 13)
    assert torch.allclose(factored, expected, atol=1e-5, rtol=1e-5)
    # The scores really depend on the user and the item, so the comparison can tell them apart.
    assert factored.std(dim=1).min() > 0.1 and (factored[1] - factored[2]).abs().max() > 0.1


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_factored_scores_equal_the_plain_forward_with_and_without_onednn(monkeypatch, onednn,
                                                                        dtype, tolerance):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    model = random_model(7, 300, 5, [16, 12, 8, 4])
    users = torch.tensor([3, 0, 6])
    factored = scoring.score_all_items(model.to(dtype), users, chunk_pairs=256)
    assert factored.dtype == dtype
    expected = plain_scores(model.float(), users)
    assert torch.allclose(factored.float(), expected, atol=tolerance, rtol=tolerance)
    # Under float16 autocast (evaluation of a float16 run) the products run in float16.
    with torch.autocast("cpu", dtype=torch.float16):
        candidates = scoring.FactoredScorer(model).candidates(users, torch.arange(300).repeat(3, 1))
    assert torch.allclose(candidates.float(), expected, atol=0.05, rtol=0.05)


def test_dropout_never_applies_even_in_train_mode():
    model = random_model(4, 9, 3, [8, 6], dropout=0.5)
    users = torch.arange(4)
    expected = plain_scores(model.eval(), users)
    model.train()
    assert torch.allclose(scoring.score_all_items(model, users), expected, atol=1e-5)


def test_int32_user_ids_are_accepted():
    model = random_model(5, 6, 2, [4, 2])
    users = torch.tensor([4, 2], dtype=torch.int32)
    assert torch.allclose(scoring.score_all_items(model, users),
                          plain_scores(model, users.long()), atol=1e-5)


def hand_model(user_signs, item_values):
    """Logit of (u, i) = user_signs[u] * item_values[i], exactly: only the MF branch is on."""
    model = NeuMF(len(user_signs), len(item_values), 1, [2]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.mf_user_embed.weight[:, 0] = torch.tensor(user_signs)
        model.mf_item_embed.weight[:, 0] = torch.tensor(item_values)
        model.final.weight[0, 0] = 1.0
    return model


def test_full_ranking_ranks_on_a_hand_made_case():
    values = [2.0, 5.0, 1.0, 5.0, 3.0, 0.0]  # items 1 and 3 tie
    model = hand_model([1.0, -1.0, 1.0, 1.0, -1.0], values)
    test_users = torch.tensor([0, 1, 2, 3, 4])
    test_items = torch.tensor([3, 0, 3, 1, 4])
    train = torch.tensor([
        [0, 1], [0, 0],  # user 0: the tied item 1 is a training item, so not a candidate
        [1, 5],          # user 1 (scores negated): item 5 (0.0) excluded, item 2 (-1.0) ahead
        [2, 4],          # user 2: item 1 ties at a lower id, so it counts ahead
        [3, 5],          # user 3: item 3 ties at a higher id, so it does not
        [4, 4], [4, 2],  # user 4: trained on its own test positive, which stays a candidate
    ])
    ranks = evaluation.full_ranking_ranks(model, test_users, test_items, train[:, 0], train[:, 1])
    assert ranks.dtype == torch.int64
    # user 4's scores are [-2, -5, -1, -5, -3, 0]: items 0 and 5 are ahead, item 2 is trained.
    assert ranks.tolist() == [0, 1, 1, 0, 2]
    hit_rate, ndcg = evaluation.hit_rate_and_ndcg(ranks, 1)
    assert hit_rate == pytest.approx(2 / 5) and ndcg == pytest.approx(2 / 5)


def brute_force_ranks(model, test_users, test_items, train):
    ranks = []
    scores = plain_scores(model, test_users)
    for row, (user, positive) in enumerate(zip(test_users.tolist(), test_items.tolist())):
        trained = {item for u, item in train.tolist() if u == user} - {positive}
        rank = 0
        for item in range(model.nb_items):
            if item == positive or item in trained:
                continue
            score, positive_score = scores[row, item], scores[row, positive]
            rank += bool(score > positive_score or (score == positive_score and item < positive))
        ranks.append(rank)
    return ranks


def test_full_ranking_matches_a_brute_force_count_and_shares_add_up():
    model = random_model(6, 30, 4, [8, 6, 4], seed=3)
    generator = torch.Generator().manual_seed(1)
    train = torch.stack((torch.randint(0, 6, (60,), generator=generator),
                         torch.randint(0, 30, (60,), generator=generator)), dim=1)
    test_users = torch.tensor([0, 1, 2, 3, 4, 5])
    test_items = torch.randint(0, 30, (6,), generator=generator)
    expected = brute_force_ranks(model, test_users, test_items, train)
    ranks = evaluation.full_ranking_ranks(model, test_users, test_items, train[:, 0], train[:, 1],
                                       chunk_pairs=7)
    assert ranks.tolist() == expected
    assert len(set(expected)) > 2  # the case is not degenerate
    first = evaluation.full_ranking_ranks(model, test_users, test_items, train[:, 0], train[:, 1],
                                       share=(0, 2))
    second = evaluation.full_ranking_ranks(model, test_users, test_items, train[:, 0],
                                        train[:, 1], share=(2, 6))
    assert first[2:].tolist() == [0] * 4 and second[:2].tolist() == [0, 0]
    assert (first + second).tolist() == expected


def test_full_ranking_refuses_ids_outside_the_model():
    model = random_model(3, 4, 2, [4])
    with pytest.raises(ValueError, match="test_items"):
        evaluation.full_ranking_ranks(model, torch.tensor([0]), torch.tensor([4]),
                                   torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="share"):
        evaluation.full_ranking_ranks(model, torch.tensor([0]), torch.tensor([1]),
                                   torch.tensor([0]), torch.tensor([1]), share=(0, 2))


def test_training_items_mask_marks_exactly_each_users_items():
    trained = scoring.TrainingItems(torch.tensor([2, 0, 2, 1, 2]), torch.tensor([4, 1, 0, 3, 4]),
                                    nb_users=4)
    mask = trained.mask(torch.tensor([2, 3, 0, 2]), nb_items=5)
    assert mask.int().tolist() == [[1, 0, 0, 0, 1], [0, 0, 0, 0, 0],
                                   [0, 1, 0, 0, 0], [1, 0, 0, 0, 1]]


def test_full_ranking_ranks_at_least_as_low_as_the_sampled_protocol(clustered_data):
    # The sampled candidates are a subset of the full ones (test negatives are never training
    # items), so no positive can rank better against all items than against its 100 negatives.
    train, test, negatives, nb_users, nb_items = dataloading.open_dataset(clustered_data)[:5]
    model = random_model(nb_users, nb_items, 4, [8, 4], seed=5)
    users, items, duplicates = dataloading.create_test_data(test, negatives)
    with torch.no_grad():
        scores = model(users[:, None].expand_as(items).reshape(-1), items.reshape(-1),
                       sigmoid=True).view(items.shape)
    sampled = evaluation.positive_ranks(scores, items, duplicates)
    full = evaluation.full_ranking_ranks(model, test[:, 0], test[:, 1], train[:, 0], train[:, 1])
    assert (full >= sampled).all()
    assert (full > sampled).float().mean() > 0.5
    assert full.max() < model.nb_items


def test_candidates_equal_the_plain_forward():
    torch.manual_seed(5)
    for layers in ([16, 8, 4], [8]):
        model = NeuMF(50, 40, 6, layers).eval()
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, 0.0, 0.5)
        users = torch.randint(0, 50, (7,), dtype=torch.int32)
        items = torch.randint(0, 40, (7, 11), dtype=torch.int32)
        logits = scoring.FactoredScorer(model).candidates(users, items)
        with torch.no_grad():
            plain = model(users[:, None].expand_as(items).reshape(-1), items.reshape(-1))
        assert logits.shape == (7, 11)
        torch.testing.assert_close(logits, plain.view(7, 11), rtol=1e-5, atol=1e-5)


NAN, INF = float("nan"), float("inf")


def test_full_ranking_ranks_nan_last():
    # Item logits for a +1 user: [nan, 1, inf, nan, -inf, 0.5]; a -1 user sees them negated.
    model = hand_model([1.0, 1.0, 1.0, -1.0, -1.0], [NAN, 1.0, INF, NAN, -INF, 0.5])
    test_users = torch.tensor([0, 1, 2, 3, 4])
    test_items = torch.tensor([1, 3, 0, 4, 2])
    train = torch.tensor([[1, 2]])  # user 1 trained on item 2 (+inf): not a candidate
    ranks = evaluation.full_ranking_ranks(model, test_users, test_items, train[:, 0], train[:, 1])
    # user 0: only +inf is ahead of 1.0, the NaNs are behind.
    # users 1 and 2: a NaN positive is behind every other candidate, the other NaN included.
    # user 3: its positive is +inf, nothing is ahead. user 4: its -inf trails -1, -0.5, +inf.
    assert ranks.tolist() == [1, 4, 5, 0, 3]


@pytest.mark.parametrize("k, items", [
    (5, [[4, 0, 2, 1, -1], [0, 2, 3, 1, -1]]),  # the fifth best of each row is excluded
    (2, [[4, 0], [0, 2]]),
    (9, [[4, 0, 2, 1, -1], [0, 2, 3, 1, -1]]),  # k beyond the row: every item once
])
def test_top_items_rank_nan_after_every_number_and_skip_excluded(k, items):
    all_scores = torch.tensor([[0.5, NAN, -INF, 2.0, 1.0], [INF, NAN, 0.1, -INF, 7.0]])
    excluded = torch.tensor([[False, False, False, True, False],
                             [False, False, False, False, True]])
    top, top_scores = scoring.top_items(all_scores, excluded, k)
    assert top.tolist() == items
    kept = top >= 0
    torch.testing.assert_close(top_scores[kept], all_scores.gather(1, top.clamp(min=0))[kept],
                               equal_nan=True)
