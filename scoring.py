"""Scoring every item for many users with a trained NeuMF.

Scoring all items one (user, item) pair at a time through `model(user, item)` repeats work:
the first MLP layer acts on [user_embed, item_embed], so W1 [u; i] + b1 = (W1_u u + b1) + W1_i i,
and the item half is the same for every user. `FactoredScorer` computes it once per item and the
user half once per user; a pair then needs an add and a ReLU before the remaining layers. The
MF branch feeds the final layer only through a dot product, so its contribution to every
(user, item) logit is one matrix product: (mf_u * w_mf) @ mf_i^T.

What is left per pair is the MLP after its first layer (256*128 + 128*64 multiply-adds at the
default --layers 256 256 128 64): that, not the first layer, bounds the speed.

A top-k needs few of the pairs: `ItemBounds` bounds every item's logit from a cluster of similar
items at the cost of about two pairs per cluster, and `bounded_top_items` scores only the items
whose bound reaches the k-th best of a first few (about 1.6 % of 26,744 items for a top-10 with
a NeuMF trained one epoch at the ml-20m shape), with the same answer.
"""
import torch

# bounded_top_items: items scored first per item of the top k; the share of items kept above
# which scoring every item is faster. At the ml-20m shape a scattered pair cost 1.7x a pair of a
# whole float32 row, so float32 breaks even near half the items, the bf16 shortlist (3-4x faster
# than float32) near a sixth: a quarter lies between.
PROBE_PER_K = 4
MAX_KEPT_SHARE = 0.25
BOUNDED_MIN_ITEMS = 4096


def default_chunk_pairs(device):
    """Pairs scored per pass, so a pass's activations (about 1.8 KiB a pair at the default
    --layers) stay bounded however many users and items there are.

    On the 2-core development CPU (ml-20m shape, quiet machine, best of 4) 2**14 pairs ran at
    172 GFLOP/s, 2**12 at 136, 2**16 at 100 and 2**18 to 2**20 at 73: activations that stay in
    cache beat fewer, larger products. On a GPU larger chunks cut kernel launches per pair;
    2**20 (about 2 GB of activations) there is a reasoned, unmeasured choice.
    """
    return 2 ** 20 if torch.device(device).type == "cuda" else 2 ** 14


class FactoredScorer:
    """Logits of all items for given users, equal to the eval-mode model(user, item) up to float
    rounding (dropout never applies here, whatever model.training says); model is a NeuMF, GMF
    or MLP (neumf.py).

    Built once from a model: build it after training; the item side is precomputed, so score
    many user batches with one scorer.
    """

    def __init__(self, model, chunk_pairs=None):
        if chunk_pairs is None:
            chunk_pairs = default_chunk_pairs(model.final.weight.device)
        if chunk_pairs < 1:
            raise ValueError(f"chunk_pairs must be at least 1, got {chunk_pairs}")
        self.chunk_pairs = chunk_pairs
        self.nb_users = model.nb_users
        self.nb_items = model.nb_items
        with torch.inference_mode():
            final_weight = model.final.weight[0]
            self.final_bias = model.final.bias[0]
            self.mf_weight = final_weight[:model.mf_dim]
            mlp_weight = final_weight[model.mf_dim:]
            # GMF and MLP lack one branch of NeuMF: a zero-width table in its place adds
            # exactly nothing to the logits, so one computation serves all three models.
            self.mf_users, self.mf_items, self.mlp_users, item_embed = (
                getattr(model, name).weight if hasattr(model, name)
                else final_weight.new_zeros(count, 0)
                for name, count in (("mf_user_embed", model.nb_users),
                                    ("mf_item_embed", model.nb_items),
                                    ("mlp_user_embed", model.nb_users),
                                    ("mlp_item_embed", model.nb_items)))
            half = item_embed.shape[1]
            if len(getattr(model, "mlp", ())) == 0:
                # No hidden layer: the MLP output is [u; i] itself, so the whole logit is linear
                # and each side's share of it is one number per user or item.
                self.first_layer = None
                self.user_linear_weight = mlp_weight[:half]
                self.item_linear = item_embed @ mlp_weight[half:]
            else:
                first = model.mlp[0]
                self.first_layer = first
                self.user_first_weight = first.weight[:, :half]
                self.item_first_weight = first.weight[:, half:].contiguous()
                self.item_embed = item_embed
                self.item_first = item_embed @ self.item_first_weight.T
                self.rest = list(model.mlp[1:])
                self.mlp_weight = mlp_weight

    def user_first(self, users):
        """[len(users), first hidden width]: the users' half of the first MLP layer, with its
        bias; users are dense ids on the scorer's device."""
        return torch.addmm(self.first_layer.bias, self.mlp_users[users], self.user_first_weight.T)

    def mf_logits(self, users):
        """[len(users), nb_items]: the MF branch's share of every item's logit, with the final
        bias; users are dense ids on the scorer's device."""
        return torch.addmm(self.final_bias.expand(1, self.nb_items),
                           self.mf_users[users] * self.mf_weight, self.mf_items.T)

    def __call__(self, users):
        """[len(users), nb_items] float logits; users is a 1-D tensor of dense user ids."""
        with torch.inference_mode():
            users = users.to(self.mf_items.device, torch.int64)
            # The MF branch and the final bias, for every pair at once.
            logits = self.mf_logits(users)
            if self.first_layer is None:
                logits += (self.mlp_users[users] @ self.user_linear_weight)[:, None]
                logits += self.item_linear
                return logits
            user_first = self.user_first(users)
            item_step = min(self.nb_items, self.chunk_pairs)
            if (user_first.dtype == torch.bfloat16
                    and _fuses_linear_relu(user_first, self.item_first_weight)):
                # A user's first hidden layer as its own product of the item embeddings, with
                # the user's half as the bias: bfloat16 products are fast enough on a CPU to
                # cost less than the add and ReLU passes over the precomputed item half. (In
                # float32 the product costs more than the passes.)
                for row, user_part in enumerate(user_first):
                    for item_start in range(0, self.nb_items, item_step):
                        items = self.item_embed[item_start:item_start + item_step]
                        hidden = _linear_relu(items, self.item_first_weight, user_part)
                        logits[row, item_start:item_start + item_step] += self._mlp_rest(hidden)
                return logits
            user_step = max(1, self.chunk_pairs // item_step)
            for user_start in range(0, len(users), user_step):
                user_part = user_first[user_start:user_start + user_step, None, :]
                for item_start in range(0, self.nb_items, item_step):
                    item_part = self.item_first[item_start:item_start + item_step]
                    block = logits[user_start:user_start + user_step,
                                   item_start:item_start + item_step]
                    block += self._mlp_tail(user_part, item_part).view(block.shape)
            return logits

    def candidates(self, users, items):
        """[R, C] float logits of items[r, c] for users[r]: sampled evaluation's candidates.

        The item side of the first MLP layer is gathered from the precomputed table, so a pair
        costs the layers after the first: less than half of model(user, item)'s products.
        """
        with torch.inference_mode():
            users = users.to(self.mf_items.device, torch.int64)
            items = items.to(self.mf_items.device, torch.int64)
            mf_users = self.mf_users[users] * self.mf_weight
            logits = torch.bmm(self.mf_items[items], mf_users[:, :, None]).squeeze(2)
            logits += self.final_bias
            if self.first_layer is None:
                logits += (self.mlp_users[users] @ self.user_linear_weight)[:, None]
                return logits + self.item_linear[items]
            user_first = self.user_first(users)
            logits += self._mlp_tail(user_first[:, None, :], self.item_first[items]).view(
                logits.shape)
            return logits

    def pair_logits(self, users, rows, items):
        """[len(rows)] float logits of item items[j] for user users[rows[j]]: scattered pairs,
        each user's first-layer half computed once however many of its pairs there are."""
        # index_select, not [] indexing: on a CPU it copies whole rows, 2.8x faster (4,096 rows).
        with torch.inference_mode():
            users = users.to(self.mf_items.device, torch.int64)
            mf_users = (self.mf_users[users] * self.mf_weight).index_select(0, rows)
            logits = (mf_users * self.mf_items.index_select(0, items)).sum(1) + self.final_bias
            if self.first_layer is None:
                return (logits + (self.mlp_users[users] @ self.user_linear_weight)[rows]
                        + self.item_linear[items])
            user_first = self.user_first(users)
            return logits + self._mlp_tail(user_first.index_select(0, rows),
                                           self.item_first.index_select(0, items))

    def _mlp_tail(self, user_part, item_part):
        """The MLP after its first layer's product, folded with the final layer's MLP weights."""
        if user_part.device.type == "cpu" and user_part.dtype == item_part.dtype == torch.float32:
            # One pass for both: add then relu_ took three times as long on a CPU.
            hidden = torch.ops.aten._add_relu(user_part, item_part)
        else:
            hidden = (user_part + item_part).relu_()
        return self._mlp_rest(hidden.view(-1, item_part.shape[-1]))

    def _mlp_rest(self, hidden):
        """The layers after the first, from its output, folded with the final MLP weights."""
        for layer in self.rest:
            hidden = _linear_relu(hidden, layer.weight, layer.bias)
        return hidden @ self.mlp_weight


def _fuses_linear_relu(hidden, weight):
    """Whether _linear_relu's one oneDNN op serves these operands: the op knows nothing of
    autocast (evaluation under float16) and wants one dtype throughout."""
    return (hidden.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu")
            and hidden.dtype == weight.dtype in (torch.float32, torch.bfloat16))


def _linear_relu(hidden, weight, bias):
    # oneDNN adds the bias and applies the ReLU as the product's epilogue; addmm + relu_ spend
    # two more passes over the activations, which cost as much as the product in bfloat16 on a
    # CPU with AMX.
    if _fuses_linear_relu(hidden, weight):
        return torch.ops.mkldnn._linear_pointwise(hidden, weight, bias, "relu", [], "")
    return torch.addmm(bias, hidden, weight.T).relu_()


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
            return (2 * self.sum_lengths * _unit_roundoff() * magnitude)[:, None]

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


def _unit_roundoff():
    """Of float32 products as torch runs them now: 2**-24, or TF32's and bfloat16's where
    torch.set_float32_matmul_precision lowered it."""
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


def score_all_items(model, users, chunk_pairs=None):
    """[len(users), nb_items] logits of every item for each user, without dropout."""
    return FactoredScorer(model, chunk_pairs)(users)


class TrainingItems:
    """Each user's training items, grouped by user, to mask them out of a user batch's scores."""

    def __init__(self, train_users, train_items, nb_users):
        train_users = train_users.to(torch.int64)
        order = torch.argsort(train_users, stable=True)
        self.items = train_items.to(torch.int64)[order]
        self.counts = torch.bincount(train_users, minlength=nb_users)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def mask(self, users, nb_items):
        """Bool [len(users), nb_items]: True where the row's user trained on the item."""
        users = users.to(torch.int64)
        counts = self.counts[users]
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
        # Position of each entry inside its user's group, then its index in self.items.
        row_offsets = torch.cumsum(counts, 0) - counts
        within = torch.arange(len(rows), device=users.device) - row_offsets[rows]
        mask = torch.zeros(len(users), nb_items, dtype=torch.bool, device=users.device)
        mask[rows, self.items[self.starts[users][rows] + within]] = True
        return mask


def top_items(scores, excluded, k):
    """(item indices, scores), [rows, min(k, items)] each, of each row's best items, best first,
    never an excluded one: where fewer are left, the last indices are -1.

    NaN ranks last, after -inf, as in evaluation.ranked_ahead; topk alone would put it first.
    """
    # float64 has room below every float32 score for -inf and NaN, keeping -inf for exclusion.
    keys = scores.double()
    lowest = torch.finfo(keys.dtype).min
    keys.masked_fill_(keys == -float("inf"), lowest / 2)
    keys.masked_fill_(keys.isnan(), lowest)
    keys.masked_fill_(excluded, -float("inf"))
    best = keys.topk(min(k, scores.shape[1]), dim=1)
    indices = best.indices.masked_fill(best.values == -float("inf"), -1)
    return indices, scores.gather(1, best.indices)


def users_per_batch(nb_items, chunk_pairs):
    """Users per batch so that a batch's score matrix holds about 16 chunks of pairs."""
    return max(1, 16 * chunk_pairs // nb_items)


def bounded_users_per_batch(nb_items):
    """Users per batch of bounded_top_items: its [users, items] matrices (bounds, mask, scores)
    hold about 2**21 entries. At the ml-20m shape (78 users) 40-160 users a batch ran alike, 9
    users 1.3x slower: the per-batch steps (probe, bar, gathers) then dominate."""
    return max(1, 2 ** 21 // nb_items)
