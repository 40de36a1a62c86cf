"""Scoring every item for many users with a trained NeuMF.

Scoring all items one (user, item) pair at a time through `model(user, item)` repeats work:
the first MLP layer acts on [user_embed, item_embed], so W1 [u; i] + b1 = (W1_u u + b1) + W1_i i,
and the item half is the same for every user. `FactoredScorer` computes it once per item and the
user half once per user; a pair then needs an add and a ReLU before the remaining layers. The
MF branch feeds the final layer only through a dot product, so its contribution to every
(user, item) logit is one matrix product: (mf_u * w_mf) @ mf_i^T.

What is left per pair is the MLP after its first layer (256*128 + 128*64 multiply-adds at the
default --layers 256 256 128 64): that, not the first layer, bounds the speed. A top-k needs
few of the pairs: bounded_topk.py finds it exactly from bounds on clusters of items.
"""
import os

import torch

import dataloading


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


def score_all_items(model, users, chunk_pairs=None):
    """[len(users), nb_items] logits of every item for each user, without dropout."""
    return FactoredScorer(model, chunk_pairs)(users)


class TrainingItems:
    """Each user's training items, grouped by user, to mask them out of a user batch's scores."""

    def __init__(self, train_users, train_items, nb_users):
        offsets, self.items = dataloading.group_by_user(train_users, train_items, nb_users)
        self.counts = offsets.diff()
        self.starts = offsets[:-1]

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


def tf32_active(device):
    """Whether float32 matrix products on `device` run in TF32 (a 10-bit mantissa): on a GPU
    of compute capability 8.0 or more (Ampere and later) where torch allows it, or where
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (NGC images set it) makes cuBLAS use it whatever torch
    says; NVIDIA_TF32_OVERRIDE=0 turns it off in NVIDIA's libraries."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return False
    return (torch.backends.cuda.matmul.allow_tf32
            or os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1")
