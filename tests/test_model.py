import math

import pytest
import torch
import torch.nn.functional as F

from neumf import GMF, MLP, NeuMF, _ReluDropout, parameter_count, relu_dropout


def reference_forward(model, user, item):
    """The original's forward written out with plain functional ops (eval mode)."""
    mf = model.mf_user_embed.weight[user] * model.mf_item_embed.weight[item]
    mlp = torch.cat((model.mlp_user_embed.weight[user], model.mlp_item_embed.weight[item]), 1)
    for layer in model.mlp:
        mlp = F.relu(mlp @ layer.weight.T + layer.bias)
    return torch.cat((mf, mlp), 1) @ model.final.weight.T + model.final.bias


def test_parameter_names_and_shapes_match_the_original():
    model = NeuMF(7, 5, 8, [16, 12, 6])
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == {
        "mf_user_embed.weight": (7, 8), "mf_item_embed.weight": (5, 8),
        "mlp_user_embed.weight": (7, 8), "mlp_item_embed.weight": (5, 8),
        "mlp.0.weight": (12, 16), "mlp.0.bias": (12,),
        "mlp.1.weight": (6, 12), "mlp.1.bias": (6,),
        "final.weight": (1, 14), "final.bias": (1,),
    }


def test_initialisation_follows_the_original():
    torch.manual_seed(0)
    model = NeuMF(4000, 3000, 64, [256, 256, 128, 64])
    for table in (model.mf_user_embed, model.mf_item_embed, model.mlp_user_embed,
                  model.mlp_item_embed):
        assert abs(table.weight.std().item() - 0.01) < 0.0005
        assert abs(table.weight.mean().item()) < 0.0005
    for layer in model.mlp:
        fan_out, fan_in = layer.weight.shape
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        assert layer.weight.abs().max().item() <= limit
        # uniform(-a, a) has standard deviation a / sqrt(3)
        assert abs(layer.weight.std().item() - limit / math.sqrt(3)) < 0.02 * limit
    lecun = math.sqrt(3.0 / model.final.weight.shape[1])
    assert model.final.weight.abs().max().item() <= lecun
    assert model.final.weight.abs().max().item() > 0.8 * lecun


def original_initial_state(nb_users, nb_items, mf_dim, layers):
    """The original's constructor written out step by step: its modules in its order (each
    constructor's default init draws from the global generator), then its own init."""
    reference = torch.nn.Module()
    reference.mf_user_embed = torch.nn.Embedding(nb_users, mf_dim)
    reference.mf_item_embed = torch.nn.Embedding(nb_items, mf_dim)
    reference.mlp_user_embed = torch.nn.Embedding(nb_users, layers[0] // 2)
    reference.mlp_item_embed = torch.nn.Embedding(nb_items, layers[0] // 2)
    reference.mlp = torch.nn.ModuleList()
    for index in range(1, len(layers)):
        reference.mlp.extend([torch.nn.Linear(layers[index - 1], layers[index])])
    reference.final = torch.nn.Linear(layers[-1] + mf_dim, 1)
    for table in (reference.mf_user_embed, reference.mf_item_embed, reference.mlp_user_embed,
                  reference.mlp_item_embed):
        table.weight.data.normal_(0.0, 0.01)
    for layer in reference.mlp:
        limit = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        layer.weight.data.uniform_(-limit, limit)
    limit = math.sqrt(3.0 / reference.final.in_features)
    reference.final.weight.data.uniform_(-limit, limit)
    return reference.state_dict()


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("layers", [[16, 8, 4], [2], [256, 256, 128, 64]])
def test_initial_weights_are_bit_identical_to_the_originals(seed, layers):
    torch.manual_seed(seed)
    ours = NeuMF(300, 200, 8, layers, dropout=0.5).state_dict()
    torch.manual_seed(seed)
    original = original_initial_state(300, 200, 8, layers)
    assert list(ours) == list(original)
    for name in ours:
        assert torch.equal(ours[name], original[name]), name


def test_forward_shape_sigmoid_and_reference():
    torch.manual_seed(0)
    model = NeuMF(10, 20, 4, [8, 6, 4], dropout=0.5).eval()
    user = torch.tensor([0, 3, 9, 3])
    item = torch.tensor([19, 0, 5, 5])
    logits = model(user, item)
    assert logits.shape == (4, 1)
    torch.testing.assert_close(logits, reference_forward(model, user, item))
    torch.testing.assert_close(model(user, item, sigmoid=True), torch.sigmoid(logits))
    int32_logits = model(user.int(), item.int())
    torch.testing.assert_close(int32_logits, logits)


def test_odd_first_layer_is_refused():
    with pytest.raises(ValueError, match="must be even"):
        NeuMF(3, 3, 4, [7, 4])


@pytest.mark.parametrize("shape,p", [((64, 32), 0.5), ((5, 3), 0.5), ((64, 32), 0.3)])
def test_relu_dropout_keeps_relu_outputs_scaled(shape, p):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    out = relu_dropout(x, p, training=True)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    assert not (kept & (x <= 0)).any()
    if x.numel() >= 2048:
        share = kept.sum().item() / (x > 0).sum().item()
        assert abs(share - (1 - p)) < 0.05
    torch.testing.assert_close(relu_dropout(x, p, training=False), F.relu(x))


def test_default_dropout_mask_is_fair_per_element():
    torch.manual_seed(2)
    x = torch.ones(4096, 64)
    kept = relu_dropout(x, 0.5, training=True) != 0
    # every bit position of the random bytes must be a fair coin, not just the total
    per_column = kept.float().mean(dim=0)
    assert per_column.min().item() > 0.45 and per_column.max().item() < 0.55
    assert abs(kept.float().mean().item() - 0.5) < 0.01


def test_the_byte_mask_runs_on_a_cpu_and_torch_dropout_on_other_devices(monkeypatch):
    used = []
    apply = _ReluDropout.apply
    monkeypatch.setattr(_ReluDropout, "apply", lambda *args: used.append(1) or apply(*args))
    # the meta device stands for a GPU here: shapes and dispatch, no data
    on_meta = relu_dropout(torch.empty(64, 32, device="meta"), 0.5, training=True)
    assert on_meta.shape == (64, 32) and on_meta.device.type == "meta" and used == []
    relu_dropout(torch.randn(64, 32), 0.5, training=True)
    assert used == [1]


def test_torch_dropout_path_has_the_same_distribution_and_scale(monkeypatch):
    """The GPU's path (torch's dropout after ReLU), run on a CPU tensor dressed as another
    device: Bernoulli(0.5) per element, kept values doubled, as the byte mask's."""
    torch.manual_seed(4)
    x = torch.rand(4096, 64) + 0.5
    monkeypatch.setattr(_ReluDropout, "apply", None)  # the CPU's path would fail
    monkeypatch.setattr(torch.Tensor, "device", property(lambda tensor: torch.device("meta")))
    out = relu_dropout(x, 0.5, training=True)
    monkeypatch.undo()
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * 2)
    assert abs(kept.float().mean().item() - 0.5) < 0.01


def test_fused_relu_dropout_gradient_equals_unfused():
    torch.manual_seed(3)
    x = torch.randn(32, 16, requires_grad=True)
    keep = torch.rand(32, 16) < 0.5
    grad_out = torch.randn(32, 16)
    fused = _ReluDropout.apply(x, keep.float() * 2.0, 2.0)
    fused.backward(grad_out)
    fused_grad = x.grad.clone()
    x.grad = None
    unfused = F.relu(x) * keep * 2.0
    unfused.backward(grad_out)
    torch.testing.assert_close(fused, unfused)
    torch.testing.assert_close(fused_grad, x.grad)


@pytest.mark.parametrize("build", [lambda: NeuMF(7, 5, 4, [8, 6]), lambda: GMF(7, 5, 4),
                                   lambda: MLP(7, 5, [8, 6])], ids=["neumf", "gmf", "mlp"])
def test_tables_taking_rows_in_place_get_the_stock_gradients(build):
    """Two backward passes (two pieces of a batch) with repeated ids: the same outputs and
    gradients, and autograd hands the tables only an empty sparse gradient."""
    torch.manual_seed(0)
    stock = build()
    in_place = build()
    in_place.load_state_dict(stock.state_dict())
    in_place.rows_into_grad = True
    handed = []
    for name, parameter in in_place.named_parameters():
        if name.endswith("_embed.weight"):
            parameter.register_hook(lambda grad: handed.append((grad.layout, grad._nnz())))
    for user, item in ([[0, 3, 3, 6], [1, 1, 4, 0]], [[3, 5, 0, 3], [4, 2, 1, 4]]):
        user, item = torch.tensor(user), torch.tensor(item)
        outputs = [model(user, item) for model in (stock, in_place)]
        assert torch.equal(outputs[0], outputs[1])
        for output in outputs:
            output.square().sum().backward()
    tables = [name for name, _ in stock.named_parameters() if name.endswith("_embed.weight")]
    assert handed == [(torch.sparse_coo, 0)] * 2 * len(tables)
    grads = dict(stock.named_parameters())
    for name, parameter in in_place.named_parameters():
        assert parameter.grad.layout == torch.strided, name
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert torch.equal(in_place(user, item), stock(user, item))


@pytest.mark.parametrize("nb_users, nb_items, mf_dim, layers",
                         [(30, 20, 4, [8, 4]), (7, 11, 3, [2]), (50, 9, 8, [16, 8, 4, 2])])
def test_parameter_count_equals_the_built_model(nb_users, nb_items, mf_dim, layers):
    model = NeuMF(nb_users, nb_items, mf_dim, layers)
    assert parameter_count(nb_users, nb_items, mf_dim, layers) == sum(
        parameter.numel() for parameter in model.parameters())
