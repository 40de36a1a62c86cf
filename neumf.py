"""NeuMF: the model of Neural Collaborative Filtering (He et al., 2017), as NVIDIA's NCF example
builds it. Parameter names, shapes and initialisation match the original, so a `model.pth`
written by either loads into the other.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ReluDropout(torch.autograd.Function):
    """ReLU followed by inverted dropout as one op: relu(x * m), m = 0 or 1/(1-p) per element.

    Unfused, the pair stores a float dropout mask beside the ReLU output and makes several
    elementwise passes each way; on a CPU that cost about as much as the matrix products. Here
    backward needs only the output (which the next Linear layer keeps anyway): where it is
    positive the element passed both the ReLU and the dropout.
    """

    @staticmethod
    def forward(ctx, x, scaled_keep, scale):
        out = x.mul(scaled_keep).relu_()
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        grad_in = torch.ops.aten.threshold_backward(grad_out, out, 0)
        return grad_in.mul_(ctx.scale), None, None


def _scaled_keep_mask(shape, p, dtype, device):
    """Per element 0 with probability p, else 1/(1-p): inverted dropout's mask.

    For the default p = 0.5 it is built from random bytes: every bit of a uniform random byte is
    an independent fair coin, so unpacking bytes gives exactly Bernoulli(0.5) per element while
    drawing an eighth as many random numbers as `bernoulli_` (on a CPU the mask draw alone was a
    quarter of a training step).
    """
    numel = math.prod(shape)
    if p == 0.5 and numel % 8 == 0:
        random_bytes = torch.randint(0, 256, (numel // 8, 1), dtype=torch.uint8, device=device)
        # arange on the device, not a constant copied there: a host-to-GPU copy would sync.
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        bits = torch.bitwise_right_shift(random_bytes, shifts).bitwise_and_(1)
        return bits.mul_(2).view(shape).to(dtype)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p).mul_(1.0 / (1.0 - p))


def relu_dropout(x, p, training):
    if not training or p == 0:
        return F.relu(x)
    if p == 1:
        return torch.zeros_like(x)
    return _ReluDropout.apply(x, _scaled_keep_mask(x.shape, p, x.dtype, x.device), 1.0 / (1.0 - p))


def glorot_uniform_(weight):
    fan_out, fan_in = weight.shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -limit, limit)


def lecun_uniform_(weight):
    fan_in = weight.shape[1]
    limit = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(weight, -limit, limit)


def parameter_count(nb_users, nb_items, mf_dim, mlp_layer_sizes):
    """The number of parameters of NeuMF(nb_users, nb_items, mf_dim, mlp_layer_sizes), without
    building it: to size a model before allocating it."""
    embeddings = (nb_users + nb_items) * (mf_dim + mlp_layer_sizes[0] // 2)
    mlp = sum(inputs * outputs + outputs
              for inputs, outputs in zip(mlp_layer_sizes, mlp_layer_sizes[1:]))
    return embeddings + mlp + mf_dim + mlp_layer_sizes[-1] + 1


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0):
        super().__init__()
        mlp_layer_sizes = list(mlp_layer_sizes)
        if not mlp_layer_sizes:
            raise ValueError("mlp_layer_sizes needs at least one size")
        if mlp_layer_sizes[0] % 2 != 0:
            raise ValueError(
                f"the first MLP layer size must be even (it is split between user and item "
                f"embeddings), got {mlp_layer_sizes[0]}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.nb_users = nb_users
        self.nb_items = nb_items
        self.mf_dim = mf_dim
        self.mlp_layer_sizes = mlp_layer_sizes
        self.dropout = dropout

        self.mf_user_embed = nn.Embedding(nb_users, mf_dim)
        self.mf_item_embed = nn.Embedding(nb_items, mf_dim)
        self.mlp_user_embed = nn.Embedding(nb_users, mlp_layer_sizes[0] // 2)
        self.mlp_item_embed = nn.Embedding(nb_items, mlp_layer_sizes[0] // 2)
        self.mlp = nn.ModuleList(
            nn.Linear(size_in, size_out)
            for size_in, size_out in zip(mlp_layer_sizes[:-1], mlp_layer_sizes[1:])
        )
        self.final = nn.Linear(mlp_layer_sizes[-1] + mf_dim, 1)

        for embedding in (self.mf_user_embed, self.mf_item_embed,
                          self.mlp_user_embed, self.mlp_item_embed):
            nn.init.normal_(embedding.weight, 0.0, 0.01)
        for layer in self.mlp:
            glorot_uniform_(layer.weight)
        lecun_uniform_(self.final.weight)

    def forward(self, user, item, sigmoid=False):
        mf = self.mf_user_embed(user) * self.mf_item_embed(item)
        mlp = torch.cat((self.mlp_user_embed(user), self.mlp_item_embed(item)), dim=1)
        for layer in self.mlp:
            mlp = relu_dropout(layer(mlp), self.dropout, self.training)
        logits = self.final(torch.cat((mf, mlp), dim=1))
        return torch.sigmoid(logits) if sigmoid else logits
