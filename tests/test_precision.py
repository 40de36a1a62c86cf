"""Which precision --opt_level/--amp trains in, where it is recorded, and the float16 + loss
scaling path of CUDA's O2 run on the CPU."""
import math

import pytest
import torch

import cli
import dataloading
import evaluation
import ncf
import scoring
import train
from logger import read_log


def mock_cpu(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize("flags,device,amx,avx512_bf16,expected", [
    (["--opt_level", "O2"], "cpu", True, True, torch.bfloat16),
    (["--opt_level", "O2"], "cpu", True, False, torch.bfloat16),
    (["--opt_level", "O2"], "cpu", False, True, torch.bfloat16),
    (["--opt_level", "O2"], "cpu", False, False, None),
    (["--amp", "--opt_level", "O0"], "cpu", False, True, torch.bfloat16),
    (["--amp", "--opt_level", "O0"], "cpu", False, False, None),
    (["--opt_level", "O0"], "cpu", True, True, None),
    (["--opt_level", "O2"], "cuda", False, False, torch.float16),
    (["--opt_level", "O2"], "cuda", True, True, torch.float16),
    (["--opt_level", "O0"], "cuda", True, True, None),
])
def test_mixed_precision_picks_bf16_only_on_a_cpu_with_bf16_units(monkeypatch, flags, device,
                                                                  amx, avx512_bf16, expected):
    mock_cpu(monkeypatch, amx, avx512_bf16)
    args = ncf.parse_args(["--data", "x", *flags])
    assert ncf.mixed_precision_dtype(args, torch.device(device)) == expected


def watch_precision(monkeypatch):
    """{'train': dtypes of the first MLP layer's outputs, 'eval': autocast states while scoring}."""
    seen = {"train": set(), "eval": set()}
    build = train.build_model

    def watched_build(*args):
        model, ddp_model = build(*args)
        model.mlp[0].register_forward_hook(
            lambda module, inputs, output: seen["train"].add(output.dtype)
            if module.training else None)
        return model, ddp_model

    candidates = scoring.FactoredScorer.candidates

    def watched_candidates(self, *args):
        seen["eval"].add(torch.is_autocast_enabled("cpu"))
        return candidates(self, *args)

    monkeypatch.setattr(train, "build_model", watched_build)
    monkeypatch.setattr(scoring.FactoredScorer, "candidates", watched_candidates)
    return seen


@pytest.mark.parametrize("flags,has_bf16,precision,note", [
    (["--opt_level", "O2"], True, "bfloat16", "note: training under bfloat16 autocast"),
    (["--amp"], True, "bfloat16", "note: training under bfloat16 autocast"),
    (["--opt_level", "O2"], False, "float32", "training in float32 on this CPU"),
    (["--amp"], False, "float32", "training in float32 on this CPU"),
    (["--opt_level", "O0"], True, "float32", None),
    (["--opt_level", "O0"], False, "float32", None),
])
def test_run_trains_in_and_records_the_precision_chosen(clustered_data, tmp_path, capsys,
                                                        monkeypatch, flags, has_bf16, precision,
                                                        note):
    mock_cpu(monkeypatch, has_bf16, False)
    seen = watch_precision(monkeypatch)
    summary = ncf.main(["--data", clustered_data, "--checkpoint_dir", str(tmp_path),
                        "--log_path", str(tmp_path / "log.json"), "-b", "2048", "-e", "1",
                        *flags])
    assert summary["epochs_run"] == 1
    notes = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("note:") and "float" in line]
    assert len(notes) == (1 if note else 0) and all(note in line for line in notes)
    assert seen["train"] == {getattr(torch, precision)}
    assert seen["eval"] == {False}
    assert read_log(tmp_path / "log.json")[0]["data"]["precision"] == precision
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    assert last["precision"] == precision
    best = torch.load(tmp_path / "model.pth", weights_only=True)
    for state in (last["model"], best):
        assert {tensor.dtype for tensor in state.values()} == {torch.float32}


def test_float16_loss_scaling_skips_an_overflowing_step_and_still_learns(clustered_data):
    """CUDA's O2 path (float16 autocast, GradScaler, fused Adam) through train.train_epoch."""
    args = ncf.parse_args(["--data", clustered_data, "-b", "2048"])
    ctx = train.Context(torch.device("cpu"), 0, 1, False, torch.float16)
    splits = dataloading.load_splits(args.data, ctx.device)
    nb_items, positives = splits.nb_items, splits.positives
    test_data = (splits.test.users, splits.test.items, splits.test.duplicate_mask)
    model, ddp_model = train.build_model(args, splits.nb_users, nb_items, ctx)
    optimizer = train.build_optimizer(args, model)
    scaler = train.grad_scaler(ctx)
    assert scaler.is_enabled()
    initial_scale = scaler.get_scale()
    output_dtypes = set()
    model.mlp[0].register_forward_hook(lambda *hook_args: output_dtypes.add(hook_args[2].dtype))

    before = [parameter.detach().clone() for parameter in model.parameters()]
    overflow = model.final.bias.register_hook(lambda grad: grad * math.inf)
    one_step = 2048 // 5 + 1
    train.train_epoch(ddp_model, optimizer, scaler, positives.prefix(one_step), nb_items, 0,
                      args, ctx)
    overflow.remove()
    assert output_dtypes == {torch.float16}
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert all(state["step"].item() == 0 for state in optimizer.state.values())
    assert scaler.get_scale() == initial_scale * scaler.get_backoff_factor()

    untrained_hr, _, _ = evaluation.val_epoch(model, *test_data, args, ctx)
    losses = [train.train_epoch(ddp_model, optimizer, scaler, positives, nb_items, epoch, args,
                                ctx) for epoch in range(1, 5)]
    hr, _, _ = evaluation.val_epoch(model, *test_data, args, ctx)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(state["step"].item() > 0 for state in optimizer.state.values())
    # chance is 10/101; the planted clusters are learnt as in float32
    assert untrained_hr < 0.3 and hr > 0.5


@pytest.fixture(autouse=True)
def tf32_flags_restored():
    """torch's process-wide TF32 switches as they were before the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("capability, allowed, environ, active", [
    ((8, 0), True, {}, True),
    ((9, 0), True, {}, True),
    ((8, 0), False, {}, False),
    ((7, 0), True, {}, False),  # V100: no TF32 units
    # The NGC images' override makes cuBLAS use TF32 whatever torch allows...
    ((8, 0), False, {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}, True),
    ((7, 5), False, {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}, False),
    # ...and NVIDIA's own switch turns it off in its libraries.
    ((8, 0), True, {"NVIDIA_TF32_OVERRIDE": "0"}, False),
])
def test_tf32_is_read_from_the_card_torch_and_the_environment(monkeypatch, capability, allowed,
                                                              environ, active):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    torch.backends.cuda.matmul.allow_tf32 = allowed
    for name in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert scoring.tf32_active(torch.device("cuda", 0)) is active
    assert scoring.tf32_active(torch.device("cpu")) is False


@pytest.mark.parametrize("flags, override, active, precision", [
    ([], None, True, "tf32"),
    (["--no_tf32"], None, False, "float32"),
    (["--no_tf32"], "0", False, "float32"),
    ([], "1", True, "tf32"),
])
def test_o0_on_an_ampere_gpu_is_tf32_unless_asked_and_logged_as_such(monkeypatch, flags, override,
                                                                     active, precision):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    if override is None:
        monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", raising=False)
    else:
        monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", override)
    args = ncf.parse_args(["--data", "x", "--opt_level", "O0", *flags])
    cuda = torch.device("cuda", 0)
    assert ncf.set_tf32(args, cuda) is active
    assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is (
        "--no_tf32" not in flags)
    assert train.Context(cuda, 0, 1, True, None, active).precision == precision
    # under float16 autocast the products are float16's, whatever TF32 says
    assert train.Context(cuda, 0, 1, True, torch.float16, active).precision == "float16"


def test_no_tf32_under_the_override_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    args = ncf.parse_args(["--data", "x", "--no_tf32"])
    with pytest.raises(cli.UserError, match="^--no_tf32: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in "):
        ncf.set_tf32(args, torch.device("cuda", 0))
    assert ncf.set_tf32(args, torch.device("cpu")) is False


@pytest.mark.parametrize("local_rank, visible, environ, index", [
    # one GPU visible per process (SLURM --gpus-per-task=1): its own
    (3, 1, {"CUDA_VISIBLE_DEVICES": "3"}, 0),
    (0, 1, {}, 0), (0, 8, {}, 0), (5, 8, {}, 5),
    # more processes than GPUs: two would share one, which NCCL refuses
    (2, 2, {}, None), (1, 1, {}, None),
])
def test_each_process_takes_its_own_gpu(monkeypatch, local_rank, visible, environ, index):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if index is None:
        with pytest.raises(cli.UserError, match=f"^local rank {local_rank} has no GPU "
                                                f"\\({visible} visible\\)"):
            ncf.cuda_index(local_rank, visible)
    else:
        assert ncf.cuda_index(local_rank, visible) == index


def test_evaluation_under_float16_training_ranks_float32_logits(clustered_data):
    """CUDA O2 trains under float16 autocast; evaluation scores float32 logits all the same
    (float16 tied negatives with positives: 1.1 % of users at the ml-20m shape)."""
    args = ncf.parse_args(["--data", clustered_data, "-b", "2048"])
    splits = dataloading.load_splits(clustered_data, torch.device("cpu"))
    model, _ = train.build_model(args, splits.nb_users, splits.nb_items,
                                 train.Context(torch.device("cpu"), 0, 1, True))
    test = splits.test
    results = []
    for dtype in (None, torch.float16):
        ctx = train.Context(torch.device("cpu"), 0, 1, True, dtype)
        results.append(evaluation.sampled_ranks(model, test.users, test.items,
                                                test.duplicate_mask, args, ctx))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    with torch.autocast("cpu", dtype=torch.float16):
        under_autocast = evaluation.sampled_ranks(model, test.users, test.items,
                                                  test.duplicate_mask, args, ctx)
    assert torch.equal(results[0][0], under_autocast[0])
