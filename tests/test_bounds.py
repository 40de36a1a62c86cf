"""Exact top-k from bounds on clusters of items (bounded_topk.py)."""
import pytest
import torch

import bounded_topk
import recommender
import scoring
from neumf import build

LAYERS = [[8, 6, 4], [16, 12, 8, 4], [6, 4]]


def random_model(kind, layers, nb_users=9, nb_items=300, seed=0):
    """Weights large enough that every ReLU sees both signs and the bounds are far from tight."""
    torch.manual_seed(seed)
    model = build(kind, nb_users, nb_items, 5, layers)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["neumf", "mlp"])
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("per_cluster", [1, 7, 64, 1000])
def test_every_items_logit_is_within_its_bound(monkeypatch, kind, layers, per_cluster):
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", per_cluster)
    scorer = scoring.FactoredScorer(random_model(kind, layers))
    users = torch.arange(9)
    bounds = bounded_topk.ItemBounds(scorer)(users)
    logits = scorer(users)
    assert bounds.shape == logits.shape == (9, 300)
    assert (bounds >= logits - 1e-4).all()
    if per_cluster == 1:
        # A cluster of one item is a box of width zero: the bound is that item's logit.
        assert torch.allclose(bounds, logits, atol=1e-4)
    else:
        assert (bounds - logits).max() > 0.1


def test_a_model_without_a_hidden_layer_gets_no_bounds():
    gmf = scoring.FactoredScorer(random_model("gmf", [8]))
    assert not bounded_topk.bounds_pay(gmf)
    with pytest.raises(ValueError, match="MLP hidden layer"):
        bounded_topk.ItemBounds(gmf)


def test_bounds_pay_from_bounded_min_items_up():
    small = scoring.FactoredScorer(random_model("neumf", [8, 4], nb_items=10))
    assert not bounded_topk.bounds_pay(small)
    large = scoring.FactoredScorer(random_model("neumf", [8, 4], nb_items=4096))
    assert bounded_topk.bounds_pay(large)


def test_clustering_separates_two_distant_groups_and_repeats_itself():
    generator = torch.Generator().manual_seed(5)
    points = torch.cat([torch.randn(60, 3, generator=generator),
                        torch.randn(2, 3, generator=generator) + 100])
    # Both first centres fall in the large group: the Lloyd rounds must move one of them.
    assert (torch.randperm(62, generator=torch.Generator().manual_seed(0))[:2] < 60).all()
    labels = bounded_topk._cluster(points, 2, torch.Generator().manual_seed(0))
    assert labels[:60].unique().numel() == labels[60:].unique().numel() == 1
    assert labels[0] != labels[60]
    again = bounded_topk._cluster(points, 2, torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)


def test_nearest_centre_in_row_blocks_matches_a_plain_distance():
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    centres = points[[3, 17, 40]]
    expected = torch.cdist(points, centres).argmin(1)
    assert torch.equal(bounded_topk._nearest(points, centres, step=7), expected)


@pytest.mark.parametrize("kind", ["neumf", "mlp", "gmf"])
def test_pair_logits_equal_the_whole_rows(kind):
    scorer = scoring.FactoredScorer(random_model(kind, [8, 6, 4]))
    users = torch.tensor([4, 0, 8])
    generator = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 3, (200,), generator=generator)
    items = torch.randint(0, 300, (200,), generator=generator)
    expected = scorer(users)[rows, items]
    assert torch.allclose(scorer.pair_logits(users, rows, items), expected, atol=1e-5)


def excluded_items(nb_users, nb_items, share, seed=0):
    return torch.rand(nb_users, nb_items, generator=torch.Generator().manual_seed(seed)) < share


@pytest.mark.parametrize("kind", ["neumf", "mlp"])
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("k", [1, 10, 50])
def test_bounded_top_items_equal_scoring_every_item(monkeypatch, kind, layers, k):
    # Loose bounds keep most items: let them through, so the comparison covers the search.
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", 1.0)
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 16)
    scorer = scoring.FactoredScorer(random_model(kind, layers))
    users = torch.tensor([5, 2, 8, 0, 2])
    excluded = excluded_items(5, 300, 0.2)
    items, logits = bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer), users,
                                                   excluded, k)
    expected_items, expected_logits = scoring.top_items(scorer(users), excluded, k)
    assert torch.equal(items, expected_items)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_tight_bounds_score_few_items_and_give_the_same_answer(monkeypatch):
    # One item a cluster: each bound is its item's logit, so little more than the top k is
    # scored, well under MAX_KEPT_SHARE, without any patch of it.
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 1)
    scorer = scoring.FactoredScorer(random_model("neumf", [16, 8, 4], nb_items=400))
    users = torch.arange(9)
    excluded = excluded_items(9, 400, 0.1, seed=3)
    scored = []
    pair_logits = scorer.pair_logits
    monkeypatch.setattr(scorer, "pair_logits",
                        lambda *args: scored.append(len(args[1])) or pair_logits(*args))
    items, logits = bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer), users,
                                                   excluded, 5)
    assert sum(scored) < 9 * 20
    expected_items, expected_logits = scoring.top_items(scorer(users), excluded, 5)
    assert torch.equal(items, expected_items)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_bounds_that_keep_too_many_items_hand_over_to_scoring_them_all(monkeypatch):
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 1000)
    scorer = scoring.FactoredScorer(random_model("neumf", [8, 6, 4]))
    excluded = torch.zeros(3, 300, dtype=torch.bool)
    assert bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer), torch.arange(3),
                                          excluded, 10) is None


def test_users_with_fewer_items_left_than_k_get_all_of_them_then_minus_one(monkeypatch):
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 1)
    scorer = scoring.FactoredScorer(random_model("neumf", [8, 4], nb_items=60))
    excluded = torch.ones(2, 60, dtype=torch.bool)
    excluded[0, [3, 50, 7]] = False     # three items left for the first user, none for the other
    items, logits = bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer),
                                                   torch.tensor([1, 4]), excluded, 5)
    expected_items, expected_logits = scoring.top_items(scorer(torch.tensor([1, 4])), excluded, 5)
    assert torch.equal(items, expected_items)
    assert sorted(items[0, :3].tolist()) == [3, 7, 50] and items[0, 3:].tolist() == [-1, -1]
    assert items[1].tolist() == [-1] * 5
    assert torch.allclose(logits[0, :3], expected_logits[0, :3], atol=1e-5)


def test_recommender_answers_the_same_with_and_without_bounds(monkeypatch):
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 8)
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", 1.0)
    scorer = scoring.FactoredScorer(random_model("neumf", [16, 8, 4]))
    bounds = bounded_topk.ItemBounds(scorer)
    users = torch.arange(9)
    excluded = excluded_items(9, 300, 0.3, seed=4)
    bounded = []
    original = bounded_topk.bounded_top_items
    monkeypatch.setattr(bounded_topk, "bounded_top_items",
                        lambda *args: bounded.append(1) or original(*args))
    items, logits = recommender.best_items(scorer, None, users, excluded, 10, bounds)
    assert bounded == [1]
    expected_items, expected_logits = recommender.best_items(scorer, None, users, excluded, 10)
    assert torch.equal(items, expected_items)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_a_kth_best_of_infinity_keeps_every_item(monkeypatch):
    # Finite weights whose MF products overflow: items 0-2 score +inf for every user, so the
    # bar below the second best is inf - inf; it must keep items, not drop them all.
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 1)
    model = random_model("neumf", [8, 4], nb_items=50)
    with torch.no_grad():
        model.mf_user_embed.weight.fill_(0.0)
        model.mf_user_embed.weight[:, 0] = 10.0
        model.mf_item_embed.weight[:3, 0] = 1e38
        model.final.weight[0, 0] = 1.0
    scorer = scoring.FactoredScorer(model)
    users, excluded = torch.arange(4), torch.zeros(4, 50, dtype=torch.bool)
    expected_items = scoring.top_items(scorer(users), excluded, 2)[0]
    assert (scorer(users)[:, :3] == float("inf")).all()
    best = bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer), users,
                                          excluded, 2)
    if best is not None:
        assert torch.equal(best[0], expected_items)
    assert best is None or (best[0] >= 0).all()


@pytest.mark.parametrize("k", [3, 60])
def test_an_item_scored_nan_ranks_last_as_when_scoring_every_item(monkeypatch, k):
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 4)
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", 1.0)
    model = random_model("neumf", [8, 4], nb_items=60)
    with torch.no_grad():
        model.mf_item_embed.weight[5] = float("nan")
    scorer = scoring.FactoredScorer(model)
    users, excluded = torch.arange(4), torch.zeros(4, 60, dtype=torch.bool)
    items, _ = bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer), users,
                                              excluded, k)
    expected_items, _ = scoring.top_items(scorer(users), excluded, k)
    assert torch.equal(items, expected_items)
    assert (items[:, -1] == 5).all() == (k == 60)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_large_sums_behind_a_small_kth_best_keep_the_top_k(monkeypatch, k):
    # Wide layers with large weights make sums of about 1e4 whose float32 rounding (about 1e-3)
    # exceeds any fixed slack near a k-th best logit of 0: the slack must scale with the sums.
    monkeypatch.setattr(bounded_topk, "ITEMS_PER_CLUSTER", 1)
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", 1.0)
    model = random_model("neumf", [512, 512, 512, 512], nb_users=3, nb_items=300)
    users = torch.arange(3)
    with torch.no_grad():
        logits = scoring.FactoredScorer(model)(torch.tensor([0]))
        model.final.bias -= logits.topk(k).values[0, -1]
    scorer = scoring.FactoredScorer(model)
    bounds = bounded_topk.ItemBounds(scorer)
    assert bounds.slack(users).min() > 1e-3
    excluded = torch.zeros(3, 300, dtype=torch.bool)
    items, logits = bounded_topk.bounded_top_items(scorer, bounds, users, excluded, k)
    expected_items, expected_logits = scoring.top_items(scorer(users), excluded, k)
    assert (items >= 0).all()
    assert torch.allclose(logits, expected_logits, atol=1e-2)
    assert torch.equal(items[0].sort().values, expected_items[0].sort().values)


def test_the_slack_grows_with_lowered_float32_matmul_precision(monkeypatch):
    bounds = bounded_topk.ItemBounds(scoring.FactoredScorer(random_model("neumf", [8, 6, 4])))
    users = torch.arange(3)
    full = bounds.slack(users)
    assert full.shape == (3, 1) and (full > 0).all()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert torch.allclose(bounds.slack(users), full * 2 ** 16)


def test_the_slack_reads_tf32_that_an_environment_override_turns_on(monkeypatch):
    """NGC images set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1: cuBLAS runs TF32 while torch still
    reports 'highest' precision, and a slack sized for IEEE float32 could drop a top-k item."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert torch.get_float32_matmul_precision() == "highest"
        assert bounded_topk._unit_roundoff(torch.device("cuda", 0)) == 2.0 ** -11
        monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0")
        assert bounded_topk._unit_roundoff(torch.device("cuda", 0)) == 2.0 ** -24
        assert bounded_topk._unit_roundoff(torch.device("cpu")) == 2.0 ** -24
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_bounds_refuse_a_bfloat16_scorer_and_a_k_below_one():
    model = random_model("neumf", [8, 6, 4])
    with pytest.raises(ValueError, match="float32 scorer, got torch.bfloat16"):
        bounded_topk.ItemBounds(scoring.FactoredScorer(model.to(torch.bfloat16)))
    scorer = scoring.FactoredScorer(model.float())
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        bounded_topk.bounded_top_items(scorer, bounded_topk.ItemBounds(scorer), torch.arange(2),
                                       torch.zeros(2, 300, dtype=torch.bool), 0)
