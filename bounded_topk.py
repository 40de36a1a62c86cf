"""Exact top-k of a trained NeuMF without scoring every item.

`ItemBounds` bounds every item's logit from a cluster of similar items at the cost of about two
scored pairs per cluster, and `bounded_top_items` scores only the items whose bound reaches the
k-th best of a first few (about 1.6 % of 26,744 items for a top-10 with a NeuMF trained one epoch
at the ml-20m shape), with the same answer as scoring.top_items over every item. The scores come
from a scoring.FactoredScorer; the bounds need an MLP hidden layer (bounds_pay).
"""
import torch

from scoring import tf32_active, top_items

# bounded_top_items: items scored first per item of the top k; the share of items kept above
# which scoring every item is faster. At the ml-20m shape a scattered pair cost 1.7x a pair of a
# whole float32 row, so float32 breaks even near half the items, the bf16 shortlist (3-4x faster
# than float32) near a sixth: a quarter lies between.
PROBE_PER_K = 4
MAX_KEPT_SHARE = 0.25
BOUNDED_MIN_ITEMS = 4096
# Items a cluster of ItemBounds holds on average, and at most how many clusters. Paired runs of a
# top-10 on the ml-20m-shaped model (2-core CPU), ms a user: 16 items a cluster 4.8-6.5, 32
# 2.7-2.9, 64 1.8-2.0, 128 2.1-2.2 (fewer clusters cost less to bound but keep more items).
ITEMS_PER_CLUSTER = 64
MAX_CLUSTERS = 2048
# Lloyd rounds, and the items they fit the centres on; every item is then assigned once. Any
# clustering gives sound bounds: a better one only prunes more.
CLUSTER_ROUNDS = 10
CLUSTER_SAMPLE = 2 ** 16
# Users whose bounds are computed together, so their intervals stay near a 2 MiB L2 cache: at the
# ml-20m shape 8 users ran 1.15x faster than 16 and as fast as 2 or 4.
BOUND_USERS = 8


def bounds_pay(scorer):
    """Whether bounded_top_items can beat scoring every item for this scorer: the bounds need an
    MLP hidden layer, and below BOUNDED_MIN_ITEMS items scoring them all is cheap enough (paired
    runs, top-10: ml-latest-small's 9,724 items 3.3x faster bounded, 1,000 generated ones 1.3x
    slower)."""
    return scorer.first_layer is not None and scorer.nb_items >= BOUNDED_MIN_ITEMS


class ItemBounds:
    """Upper bounds on every item's logit for given users, for exact top-k without scoring every
    item (bounded_top_items).

    The items are clustered by their half of the first MLP layer's product (k-means). For a user
    u and a cluster whose items' halves lie in the box [lo, hi], every item's first hidden layer
    lies in [relu(lo + u), relu(hi + u)] (ReLU keeps order). An interval with centre m and radius
    r goes through a linear layer to centre W m + b and radius |W| r, then through the ReLU, so
    one pass per cluster bounds the MLP share of all its items, however far each is from the
    centre. The MF share is a dot product, computed exactly for every item.
    """

    def __init__(self, scorer, seed=0):
        if scorer.first_layer is None:
            raise ValueError("ItemBounds needs a model with an MLP hidden layer")
        if scorer.item_first.dtype != torch.float32:
            # A bfloat16 scorer rounds by far more than the slack, and builds its first layer
            # from the embeddings rather than from the item_first the boxes come from.
            raise ValueError(f"ItemBounds needs a float32 scorer, got {scorer.item_first.dtype}")
        self.scorer = scorer
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(seed)
            count = min(MAX_CLUSTERS, -(-scorer.nb_items // ITEMS_PER_CLUSTER))
            self.cluster = _cluster(scorer.item_first, count, generator)
            index = self.cluster[:, None].expand(-1, scorer.item_first.shape[1])
            boxes = scorer.item_first.new_empty(count, scorer.item_first.shape[1])
            self.low = boxes.fill_(float("inf")).scatter_reduce(0, index, scorer.item_first,
                                                                 "amin")
            self.high = boxes.clone().fill_(-float("inf")).scatter_reduce(
                0, index, scorer.item_first, "amax")
            self.layers = [(layer.weight, layer.weight.abs(), layer.bias)
                           for layer in scorer.rest]
            self.out_weight = scorer.mlp_weight
            self.out_weight_abs = scorer.mlp_weight.abs()
            self._size_sums()

    def _size_sums(self):
        """What slack() needs: |x| taken through each layer as |W| |x| + |b| is at least every
        partial sum that a logit's computation holds, and it is linear in |x|, so the first
        hidden layer's share splits into the item's half (at most item_magnitude) and the user's
        (first_gain . |user half|)."""
        scorer = self.scorer
        gain, constant = self.out_weight_abs, scorer.final_bias.abs()
        for weight, weight_abs, bias in reversed(self.layers):
            constant = constant + bias.abs() @ gain
            gain = gain @ weight_abs
        self.first_gain, self.constant = gain, constant
        self.item_magnitude = (scorer.item_first.abs() @ gain).max() if scorer.nb_items else 0.0
        self.mf_item_max = scorer.mf_items.abs().amax(0) if scorer.nb_items else 0.0
        # Each product's inner size (and the first layer's add, the final sums, the interval
        # arithmetic's steps) adds at most one unit roundoff of that magnitude to the error.
        self.sum_lengths = (sum(weight.shape[1] for weight, _, _ in self.layers)
                            + len(self.out_weight) + scorer.mf_items.shape[1] + 16)

    def slack(self, users):
        """[len(users), 1]: how far below its true value a bound, or above it a score, can come
        out in float32, both computed: twice the sum lengths times the unit roundoff times the
        largest sum behind any of the user's logits (Higham's gamma_n bound for dot products).
        Lowered float32 matmul precision (TF32, bfloat16 passes) raises the roundoff."""
        scorer = self.scorer
        with torch.inference_mode():
            users = users.to(scorer.mf_items.device, torch.int64)
            magnitude = (self.constant + self.item_magnitude
                         + scorer.user_first(users).abs() @ self.first_gain
                         + (scorer.mf_users[users] * scorer.mf_weight).abs() @ self.mf_item_max)
            return (2 * self.sum_lengths * _unit_roundoff(users.device) * magnitude)[:, None]

    def __call__(self, users):
        """[len(users), nb_items] float upper bounds of the logits scorer(users) holds."""
        scorer = self.scorer
        with torch.inference_mode():
            users = users.to(scorer.mf_items.device, torch.int64)
            bounds = scorer.mf_logits(users)
            user_first = scorer.user_first(users)
            for start in range(0, len(users), BOUND_USERS):
                block = user_first[start:start + BOUND_USERS]
                bounds[start:start + BOUND_USERS] += self._mlp_bounds(block).index_select(
                    1, self.cluster)
            return bounds

    def _mlp_bounds(self, user_first):
        """[len(user_first), clusters] upper bounds of the MLP share of the logits."""
        width = self.low.shape[1]
        low = (self.low + user_first[:, None, :]).relu_().view(-1, width)
        high = (self.high + user_first[:, None, :]).relu_().view(-1, width)
        for weight, weight_abs, bias in self.layers:
            centre, radius = (high + low) / 2, (high - low) / 2
            centre = torch.addmm(bias, centre, weight.T)
            radius = radius @ weight_abs.T
            low, high = (centre - radius).relu_(), (centre + radius).relu_()
        centre, radius = (high + low) / 2, (high - low) / 2
        return (centre @ self.out_weight + radius @ self.out_weight_abs).view(len(user_first), -1)


def _unit_roundoff(device):
    """Of float32 products as they run on `device` now: 2**-24; TF32's 2**-11 where it is in
    effect on a GPU (scoring.tf32_active: an environment override included, which
    torch.get_float32_matmul_precision does not see); TF32's or bfloat16's where
    torch.set_float32_matmul_precision lowered it."""
    if tf32_active(device):
        return 2.0 ** -11
    return {"highest": 2.0 ** -24, "high": 2.0 ** -11,
            "medium": 2.0 ** -8}[torch.get_float32_matmul_precision()]


def _cluster(points, count, generator):
    """Cluster of each point, [len(points)] int64: Lloyd's k-means from `count` distinct random
    points, fitted on at most CLUSTER_SAMPLE of them."""
    chosen = torch.randperm(len(points), generator=generator)
    sample = points[chosen[:CLUSTER_SAMPLE].to(points.device)]
    centres = sample[:count].clone()
    for _ in range(CLUSTER_ROUNDS):
        nearest = _nearest(sample, centres)
        sums = torch.zeros_like(centres).index_add_(0, nearest, sample)
        sizes = torch.bincount(nearest, minlength=count)
        # A centre that drew no point keeps its place (it would move to the origin).
        filled = sizes > 0
        centres[filled] = sums[filled] / sizes[filled, None]
    return _nearest(points, centres)


def _nearest(points, centres, step=4096):
    """Index of each point's nearest centre; |p - c|^2 = |p|^2 - 2 p.c + |c|^2, in row blocks so
    the distance matrix stays small however many points there are."""
    squared = (centres * centres).sum(1)
    return torch.cat([torch.addmm(squared, points[start:start + step], centres.T,
                                  alpha=-2).argmin(1)
                      for start in range(0, len(points), step)])


def bounded_top_items(scorer, bounds, users, excluded, k):
    """top_items(scorer(users), excluded, k), scoring only the items whose bound can reach a
    row's k-th best; None when the bounds keep more than MAX_KEPT_SHARE of the batch's items, as
    on a small or barely trained model: scoring them all is then faster.

    A first pass scores the PROBE_PER_K * k items of highest bound: an item whose bound is below
    the k-th best of those cannot be in the top k. bounds: an ItemBounds of scorer. The scores
    are scorer.pair_logits', equal to scorer(users)'s up to float rounding.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    with torch.inference_mode():
        users = users.to(scorer.mf_items.device, torch.int64)
        upper = bounds(users).masked_fill_(excluded, -float("inf"))
        probe = upper.topk(min(PROBE_PER_K * k, scorer.nb_items), dim=1).indices
        probed = scorer.candidates(users, probe).masked_fill_(excluded.gather(1, probe),
                                                              -float("inf"))
        # NaN ranks last in top_items, but topk takes it for the largest: it would push the
        # bar up to the (k-1)-th best number.
        probed.masked_fill_(probed.isnan(), -float("inf"))
        kth = probed.topk(min(k, probe.shape[1]), dim=1).values[:, -1:]
        # The bounds and the scores round differently. A k-th best that is not finite (-inf
        # where fewer than k items are left) keeps every item.
        bar = kth - bounds.slack(users)
        bar.masked_fill_(~bar.isfinite(), -float("inf"))
        kept = ((upper >= bar) | upper.isnan()) & ~excluded
        rows, items = kept.nonzero(as_tuple=True)
        if len(rows) > MAX_KEPT_SHARE * kept.numel():
            return None
        scores = torch.full_like(upper, -float("inf"))
        # A quarter chunk's gathered rows stay in a 2 MiB L2 cache: 1.1x faster than whole
        # chunks on the 2-core CPU.
        step = max(1, scorer.chunk_pairs // 4)
        for start in range(0, len(rows), step):
            pair_rows, pair_items = rows[start:start + step], items[start:start + step]
            scores[pair_rows, pair_items] = scorer.pair_logits(users, pair_rows, pair_items)
        return top_items(scores, ~kept, k)


def bounded_users_per_batch(nb_items):
    """Users per batch of bounded_top_items: its [users, items] matrices (bounds, mask, scores)
    hold about 2**21 entries. At the ml-20m shape (78 users) 40-160 users a batch ran alike, 9
    users 1.3x slower: the per-batch steps (probe, bar, gathers) then dominate."""
    return max(1, 2 ** 21 // nb_items)
