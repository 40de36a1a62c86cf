"""NeuMF: the model of Neural Collaborative Filtering (He et al., 2017), as NVIDIA's NCF example
builds it. Parameter names, shapes and initialisation match the original, so a `model.pth`
written by either loads into the other.

GMF and MLP are the paper's two halves of NeuMF trained alone, each with its own output layer.
Their parameters carry the names of NeuMF's branches, so a trained pair initialises a NeuMF
(`load_pretrained`), as the paper does for its best results.
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


class _RowsIntoGrad(torch.autograd.Function):
    """weight[ids], whose backward adds the rows' gradients straight into weight.grad.

    The stock embedding backward zeroes a gradient the size of the table, fills the rows in,
    and autograd adds it to weight.grad: two passes over every table for each piece of a CPU
    batch, 30 % of a step at five times ml-20m's users, and a table-sized buffer live in each
    piece. Autograd still receives a gradient, an empty sparse one, so that the hooks on the
    table's gradient (DDP's all-reduce) run as they would.
    """

    @staticmethod
    def forward(ctx, weight, ids):
        ctx.weight = weight
        ctx.save_for_backward(ids)
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids, grad_out)
        nothing = torch.sparse_coo_tensor(ids[None, :0], grad_out[:0], weight.shape,
                                          check_invariants=True)
        return nothing, None


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
    """ReLU, then inverted dropout with probability p when training.

    On a CPU as one op with a byte-unpacked mask (_ReluDropout), measured to pay there; on a GPU
    torch's own fused dropout kernel, as the unpacking would launch about 8 more elementwise
    kernels a layer. Both drop with the same Bernoulli(p) and scale by 1/(1-p); the random
    stream, and so the dropped elements for a seed, differs between the two.
    """
    if not training or p == 0:
        return F.relu(x)
    if p == 1:
        return torch.zeros_like(x)
    if x.device.type != "cpu":
        return F.dropout(F.relu(x), p, training=True)
    return _ReluDropout.apply(x, _scaled_keep_mask(x.shape, p, x.dtype, x.device), 1.0 / (1.0 - p))


def glorot_uniform_(weight):
    fan_out, fan_in = weight.shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -limit, limit)


def lecun_uniform_(weight):
    fan_in = weight.shape[1]
    limit = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(weight, -limit, limit)


def parameter_count(nb_users, nb_items, mf_dim, mlp_layer_sizes, kind="neumf"):
    """The number of parameters of the model `kind` (see MODELS) of these sizes, without
    building it: to size a model before allocating it."""
    mf = (nb_users + nb_items) * mf_dim + mf_dim
    mlp = (nb_users + nb_items) * (mlp_layer_sizes[0] // 2) + mlp_layer_sizes[-1] + sum(
        inputs * outputs + outputs
        for inputs, outputs in zip(mlp_layer_sizes, mlp_layer_sizes[1:]))
    return {"neumf": mf + mlp, "gmf": mf, "mlp": mlp}[kind] + 1


def _check_layer_sizes(mlp_layer_sizes, dropout):
    if not mlp_layer_sizes:
        raise ValueError("mlp_layer_sizes needs at least one size")
    if mlp_layer_sizes[0] % 2 != 0:
        raise ValueError(
            f"the first MLP layer size must be even (it is split between user and item "
            f"embeddings), got {mlp_layer_sizes[0]}"
        )
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")


def _add_mf_tables(model, nb_users, nb_items, mf_dim):
    model.mf_user_embed = nn.Embedding(nb_users, mf_dim)
    model.mf_item_embed = nn.Embedding(nb_items, mf_dim)


def _add_mlp_tower(model, nb_users, nb_items, mlp_layer_sizes):
    model.mlp_user_embed = nn.Embedding(nb_users, mlp_layer_sizes[0] // 2)
    model.mlp_item_embed = nn.Embedding(nb_items, mlp_layer_sizes[0] // 2)
    model.mlp = nn.ModuleList(
        nn.Linear(size_in, size_out)
        for size_in, size_out in zip(mlp_layer_sizes[:-1], mlp_layer_sizes[1:])
    )


def _initialise(model):
    """The original's initialisation, after every module is built and in its order: the
    default init of each module's constructor draws from the same generator first, so this
    order is what makes the weights bit-identical to the original's."""
    for name in ("mf_user_embed", "mf_item_embed", "mlp_user_embed", "mlp_item_embed"):
        if hasattr(model, name):
            nn.init.normal_(getattr(model, name).weight, 0.0, 0.01)
    for layer in getattr(model, "mlp", ()):
        glorot_uniform_(layer.weight)
    lecun_uniform_(model.final.weight)


def _lookup(model, table, ids):
    if model.rows_into_grad and torch.is_grad_enabled() and table.weight.requires_grad:
        return _RowsIntoGrad.apply(table.weight, ids)
    return table(ids)


def _mf_forward(model, user, item):
    return _lookup(model, model.mf_user_embed, user) * _lookup(model, model.mf_item_embed, item)


def _mlp_forward(model, user, item):
    mlp = torch.cat((_lookup(model, model.mlp_user_embed, user),
                     _lookup(model, model.mlp_item_embed, item)), dim=1)
    for layer in model.mlp:
        mlp = relu_dropout(layer(mlp), model.dropout, model.training)
    return mlp


class _Recommender(nn.Module):
    # Training sets it where pieces of a batch each run a backward pass (a CPU): the tables'
    # gradients then take the rows in place (_RowsIntoGrad).
    rows_into_grad = False


class NeuMF(_Recommender):
    kind = "neumf"

    def __init__(self, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0):
        super().__init__()
        mlp_layer_sizes = list(mlp_layer_sizes)
        _check_layer_sizes(mlp_layer_sizes, dropout)
        self.nb_users = nb_users
        self.nb_items = nb_items
        self.mf_dim = mf_dim
        self.mlp_layer_sizes = mlp_layer_sizes
        self.dropout = dropout
        _add_mf_tables(self, nb_users, nb_items, mf_dim)
        _add_mlp_tower(self, nb_users, nb_items, mlp_layer_sizes)
        self.final = nn.Linear(mlp_layer_sizes[-1] + mf_dim, 1)
        _initialise(self)

    def forward(self, user, item, sigmoid=False):
        mf = _mf_forward(self, user, item)
        logits = self.final(torch.cat((mf, _mlp_forward(self, user, item)), dim=1))
        return torch.sigmoid(logits) if sigmoid else logits


class GMF(_Recommender):
    """Generalised matrix factorisation: NeuMF's MF branch with an output layer of its own."""
    kind = "gmf"
    # No MLP branch: what the factored scorer and the tools read off a model.
    mlp_layer_sizes = []

    def __init__(self, nb_users, nb_items, mf_dim):
        super().__init__()
        self.nb_users = nb_users
        self.nb_items = nb_items
        self.mf_dim = mf_dim
        _add_mf_tables(self, nb_users, nb_items, mf_dim)
        self.final = nn.Linear(mf_dim, 1)
        _initialise(self)

    def forward(self, user, item, sigmoid=False):
        logits = self.final(_mf_forward(self, user, item))
        return torch.sigmoid(logits) if sigmoid else logits


class MLP(_Recommender):
    """NeuMF's MLP branch with an output layer of its own."""
    kind = "mlp"
    mf_dim = 0

    def __init__(self, nb_users, nb_items, mlp_layer_sizes, dropout=0.0):
        super().__init__()
        mlp_layer_sizes = list(mlp_layer_sizes)
        _check_layer_sizes(mlp_layer_sizes, dropout)
        self.nb_users = nb_users
        self.nb_items = nb_items
        self.mlp_layer_sizes = mlp_layer_sizes
        self.dropout = dropout
        _add_mlp_tower(self, nb_users, nb_items, mlp_layer_sizes)
        self.final = nn.Linear(mlp_layer_sizes[-1], 1)
        _initialise(self)

    def forward(self, user, item, sigmoid=False):
        logits = self.final(_mlp_forward(self, user, item))
        return torch.sigmoid(logits) if sigmoid else logits


MODELS = ("neumf", "gmf", "mlp")


def build(kind, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0):
    """The model `kind` (one of MODELS); the sizes it has no use for are ignored."""
    if kind == "gmf":
        return GMF(nb_users, nb_items, mf_dim)
    if kind == "mlp":
        return MLP(nb_users, nb_items, mlp_layer_sizes, dropout)
    if kind == "neumf":
        return NeuMF(nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout)
    raise ValueError(f"unknown model kind {kind!r}, expected one of {', '.join(MODELS)}")


def load_pretrained(neumf, gmf, mlp, alpha):
    """Set `neumf`'s weights from a trained GMF and MLP of its sizes, as the paper does.

    Embeddings and hidden layers are theirs as they are; the final layer is their two output
    layers side by side, weighted alpha and 1 - alpha, so until training moves it NeuMF's logit
    is alpha * gmf's + (1 - alpha) * mlp's.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    state = {name: value for model in (gmf, mlp) for name, value in model.state_dict().items()
             if not name.startswith("final.")}
    state["final.weight"] = torch.cat((alpha * gmf.final.weight,
                                       (1 - alpha) * mlp.final.weight), dim=1)
    state["final.bias"] = alpha * gmf.final.bias + (1 - alpha) * mlp.final.bias
    neumf.load_state_dict(state)
