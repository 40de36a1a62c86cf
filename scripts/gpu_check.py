"""Check NCF on one NVIDIA GPU, then time it at the ml-20m shape and print one markdown table.

    bash scripts/gpu_check.sh [--out DIR]           # what a GPU machine runs
    python3 scripts/gpu_check.py --dry-run-cpu      # the same code path, tiny, on the CPU

Checks: the CUDA forward pass against the CPU one on the same weights and ids (fp32, tf32 and
fp16 autocast), AMP training steps through train.train_epoch (finite loss, weights updated), and
evaluation's tensors and ranks against the CPU's.
Timings, on tensors of ml-20m's shape generated on the GPU (no dataset, no network): training
with train.train_epoch and evaluation with evaluation.val_epoch in fp32, tf32 and amp, and the
forward pass with inference.benchmark at batch 1,024 and 1,048,576. Every measurement has a time
cap and the whole run a deadline, so it ends within 8 minutes however slow the card.
Writes gpu_check.md and gpu_check.json to --out (default: $OUT if set, else ./gpu_check_out),
rewritten after every measurement. Exit status 1 when a check fails. Needs torch and numpy.
"""
import argparse
import copy
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

# ncf.py and its modules live in the repository root, one level up.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cli  # noqa: E402
import dataloading  # noqa: E402
import evaluation  # noqa: E402
import train  # noqa: E402
from fileio import atomic_output, make_writable_dir  # noqa: E402
from inference import benchmark, device_name, synchronize  # noqa: E402
from neumf import NeuMF  # noqa: E402

SKIP_MESSAGE = "no CUDA device: skipping GPU checks"
MODES = ("fp32", "tf32", "amp")
TEST_NEGATIVES = 100
SEED = 1

# Training steps timed to estimate an epoch before committing to one.
PROBE_STEPS = 4
AMP_CHECK_STEPS = 3
EVAL_REPEATS = 5
MAX_INFERENCE_BATCHES = 200
# inference.benchmark draws every batch's ids up front: cap their memory.
MAX_INFERENCE_SAMPLES = 2 ** 25

# Limits on max |device - CPU| / max |CPU logit|. fp32 differs by summation order only
# (about 3e-7 seen); tf32 and fp16 round inputs to 10 mantissa bits (about 5e-4 seen for fp16).
FORWARD_LIMITS = {"fp32": 1e-5, "tf32": 1e-2, "amp": 1e-2}

# The original's published figures on one A100 40GB, ml-20m, batch 1,048,576. Its "fp32"
# training figure ran with TF32, PyTorch's default for matrix products on that card at the
# time, so it sits on the tf32 row.
PUBLISHED_A100 = {
    ("train", "tf32", 2 ** 20): 22.6e6,
    ("train", "amp", 2 ** 20): 34.1e6,
    ("inference", "tf32", 2 ** 20): 57.5e6,
    ("inference", "amp", 2 ** 20): 82.7e6,
}


@dataclass(frozen=True)
class Shape:
    name: str
    nb_users: int
    nb_items: int
    nb_positives: int
    batch_size: int
    valid_batch_size: int
    inference_batches: tuple
    check_ids: int
    check_batch_size: int
    factors: int
    layers: tuple


@dataclass(frozen=True)
class Limits:
    """Seconds: the deadline for all measurements (process start and set-up come on top), a
    margin kept before it, and what each single measurement may take at most."""
    total: float
    reserve: float
    train: float
    eval: float
    inference: float


ML20M = Shape("ml-20m", 138_493, 26_744, 19_861_770, 2 ** 20, 2 ** 20, (1024, 2 ** 20),
              65_536, 65_536, 64, (256, 256, 128, 64))
GPU_LIMITS = Limits(total=420, reserve=15, train=60, eval=15, inference=10)
# The dry run's caps are small enough that it also takes the shortened-epoch path.
TINY = Shape("tiny", 200, 100, 1000, 256, 1024, (64, 256), 512, 128, 8, (32, 16, 8))
DRY_RUN_LIMITS = Limits(total=120, reserve=5, train=0.5, eval=0.5, inference=0.1)


@dataclass
class Tensors:
    train_users: torch.Tensor
    train_items: torch.Tensor
    test_users: torch.Tensor
    test_items: torch.Tensor
    duplicate_mask: torch.Tensor


class Clock:
    def __init__(self, limits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.total

    def allow(self, section):
        """Seconds the next measurement may take: its cap, or less near the deadline."""
        return min(getattr(self.limits, section),
                   self.deadline - time.monotonic() - self.limits.reserve)


class Report:
    """Checks and timings so far; saved after each one, so a killed run still leaves a table."""

    def __init__(self, out_dir, environment, shape):
        self.out_dir = out_dir
        self.environment = environment
        self.shape = shape
        self.checks = []
        self.rows = []

    def check(self, name, passed, detail, **values):
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail, **values})
        print(f"check {name}: {'ok' if passed else 'FAILED'}: {detail}", flush=True)
        self.save()

    def row(self, row):
        self.rows.append(row)
        if "throughput" in row:
            print(f"{row['benchmark']} {row['mode']} batch {row['batch_size']:,}: "
                  f"{row['throughput'] / 1e6:.3g} M samples/s ({row['timed']})", flush=True)
        else:
            print(f"{row['benchmark']} {row['mode']} batch {row['batch_size']:,}: "
                  f"skipped ({row['skipped']})", flush=True)
        self.save()

    def passed(self):
        return all(check["passed"] for check in self.checks)

    def markdown(self):
        env = self.environment
        lines = [f"**{env['device_name']}** · torch {env['torch']} · CUDA {env['cuda']} · "
                 f"{env['date']} · {self.shape.name} shape ({self.shape.nb_users:,} users, "
                 f"{self.shape.nb_items:,} items, {self.shape.nb_positives:,} training "
                 f"positives, generated)", ""]
        lines += [f"- check {check['name']}: {'ok' if check['passed'] else 'FAILED'}: "
                  f"{check['detail']}" for check in self.checks]
        lines += ["", "| benchmark | precision | batch | ours, samples/s | original, 1x A100, "
                  "samples/s | ours / original | timed |", "|---|---|---:|---:|---:|---:|---|"]
        order = ("train", "eval", "inference")
        rows = sorted(self.rows, key=lambda row: (order.index(row["benchmark"]),
                                                  MODES.index(row["mode"]), row["batch_size"]))
        for row in rows:
            published = PUBLISHED_A100.get((row["benchmark"], row["mode"], row["batch_size"]))
            ours = row.get("throughput")
            lines.append("| " + " | ".join([
                row["benchmark"], row["mode"], f"{row['batch_size']:,}",
                f"{ours / 1e6:.3g} M" if ours else "—",
                f"{published / 1e6:.1f} M" if published else "—",
                f"{ours / published:.2f}" if ours and published else "—",
                row["timed"] if ours else f"skipped: {row['skipped']}"]) + " |")
        lines += ["", "train: samples/s = training positives x 5 / epoch time (ncf.py's "
                  "definition); eval: users x 101 candidates / evaluation time; inference: "
                  "forward passes of random ids. fp32 has TF32 off, tf32 on; amp is float16 "
                  "autocast. The original's A100 'fp32' training figure ran with TF32 (then "
                  "PyTorch's default), so it is listed on the tf32 row."]
        return "\n".join(lines) + "\n"

    def save(self):
        result = {"environment": self.environment, "shape": asdict(self.shape),
                  "checks": self.checks, "rows": self.rows, "all_checks_passed": self.passed(),
                  "published_a100": [{"benchmark": key[0], "mode": key[1], "batch_size": key[2],
                                      "throughput": value}
                                     for key, value in PUBLISHED_A100.items()]}
        # Rewritten after every measurement: a run killed mid-write keeps the previous files.
        with atomic_output(os.path.join(self.out_dir, "gpu_check.json")) as temporary, \
                open(temporary, "w") as handle:
            json.dump(result, handle, indent=1)
        with atomic_output(os.path.join(self.out_dir, "gpu_check.md")) as temporary, \
                open(temporary, "w") as handle:
            handle.write(self.markdown())


def set_precision(mode):
    tf32 = mode != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def environment(device):
    return {"device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def draw(cdf, count, generator):
    """`count` ids with probabilities proportional to the increments of `cdf`."""
    uniform = torch.rand(count, generator=generator, device=cdf.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, uniform * cdf[-1]).clamp_(max=len(cdf) - 1)


def generate_tensors(shape, device, seed=SEED):
    """What dataloading.load_splits returns for a converted dataset of `shape`, built on the device.

    Item popularity is Zipf-like and user activity lognormal, as in MovieLens, so embedding
    reads hit popular rows as often as in real training.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    ranks = torch.arange(shape.nb_items, device=device, dtype=torch.float64)
    item_cdf = torch.cumsum(1.0 / (ranks + 10.0), 0)
    activity = torch.empty(shape.nb_users, device=device, dtype=torch.float64)
    user_cdf = torch.cumsum(activity.log_normal_(0.0, 1.3, generator=generator), 0)
    train_users = draw(user_cdf, shape.nb_positives, generator)
    # Every user rates something, so nb_users is max id + 1 as dataloading.load_splits computes it.
    train_users[:shape.nb_users] = torch.arange(shape.nb_users, device=device)
    train_items = draw(item_cdf, shape.nb_positives, generator)
    test = torch.stack((torch.arange(shape.nb_users, device=device),
                        draw(item_cdf, shape.nb_users, generator)), dim=1)
    negatives = torch.randint(0, shape.nb_items, (shape.nb_users, TEST_NEGATIVES),
                              generator=generator, device=device)
    test_users, test_items, duplicate_mask = dataloading.create_test_data(test, negatives)
    ids = torch.int32
    return Tensors(train_users.to(ids), train_items.to(ids), test_users.to(ids),
                   test_items.to(ids), duplicate_mask)


def training_args(shape, batch_size=None):
    return train.Recipe(batch_size=batch_size or shape.batch_size,
                        valid_batch_size=shape.valid_batch_size, seed=SEED,
                        factors=shape.factors, layers=list(shape.layers))


def positives_for_steps(steps, args):
    """Fewest positives whose epoch holds `steps` full batches."""
    return -(-steps * args.batch_size // (1 + args.negative_samples))


def compare_forward(reference, model, users, items):
    """{mode: (max |model - reference|, that over max |reference|)} for the same ids.

    `reference` runs in fp32 on its device (the CPU); `model` on its own in each mode.
    """
    reference_device = next(reference.parameters()).device
    device = next(model.parameters()).device
    with torch.inference_mode():
        expected = reference(users.to(reference_device), items.to(reference_device)).float()
        scale = expected.abs().max().item()
        differences = {}
        for mode in MODES:
            set_precision(mode)
            with torch.autocast(device.type, dtype=torch.float16, enabled=mode == "amp"):
                got = model(users.to(device), items.to(device)).float().to(reference_device)
            difference = (got - expected).abs().max().item()
            differences[mode] = (difference, difference / scale)
    return differences


def order_one_embeddings(model):
    """Embeddings redrawn from N(0, 1) (training starts at 0.01): the activations are then of
    order 1, so a wrong kernel shows in the logits instead of hiding under the output bias."""
    with torch.no_grad():
        for table in (model.mf_user_embed, model.mf_item_embed, model.mlp_user_embed,
                      model.mlp_item_embed):
            table.weight.normal_()
    return model


def check_forward(report, shape, device):
    torch.manual_seed(SEED)
    reference = order_one_embeddings(
        NeuMF(shape.nb_users, shape.nb_items, shape.factors, shape.layers).eval())
    model = copy.deepcopy(reference).to(device)
    generator = torch.Generator().manual_seed(SEED)
    users = torch.randint(0, shape.nb_users, (shape.check_ids,), generator=generator)
    items = torch.randint(0, shape.nb_items, (shape.check_ids,), generator=generator)
    for mode, (absolute, relative) in compare_forward(reference, model, users, items).items():
        limit = FORWARD_LIMITS[mode]
        report.check(f"forward {mode}", relative <= limit,
                     f"max |{device.type} - cpu| = {absolute:.3g} over {shape.check_ids:,} ids "
                     f"({relative:.3g} of max |logit|, limit {limit:g})",
                     max_abs_difference=absolute, relative_difference=relative, limit=limit)


def check_amp_step(report, shape, data, device):
    set_precision("amp")
    ctx = train.Context(device, rank=0, world_size=1, is_main=False,
                      autocast_dtype=torch.float16)
    args = training_args(shape, batch_size=shape.check_batch_size)
    model, ddp_model = train.build_model(args, shape.nb_users, shape.nb_items, ctx)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer = train.build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type)
    positives = positives_for_steps(AMP_CHECK_STEPS, args)
    loss = train.train_epoch(ddp_model, optimizer, scaler, data.train_users[:positives],
                           data.train_items[:positives], shape.nb_items, 0, args, ctx)
    after = list(model.parameters())
    updated = all(not torch.equal(old, new) for old, new in zip(before, after))
    finite = all(bool(torch.isfinite(new).all()) for new in after)
    report.check("amp step", math.isfinite(loss) and updated and finite,
                 f"{AMP_CHECK_STEPS} steps of batch {args.batch_size:,} through "
                 f"train.train_epoch (float16 autocast, GradScaler, fused Adam): mean loss "
                 f"{loss:.4f}, every parameter updated: {updated}, all finite: {finite}, "
                 f"loss scale {scaler.get_scale():g}",
                 loss=loss, updated=updated, finite=finite)


def check_test_data(report, device):
    """create_test_data and positive_ranks give the CPU's results on rows full of repeats/ties."""
    generator = torch.Generator().manual_seed(SEED)
    nb_users, nb_items = 4096, 40
    negatives = torch.randint(0, nb_items, (nb_users, TEST_NEGATIVES), generator=generator)
    test = torch.stack((torch.arange(nb_users), torch.randint(0, nb_items, (nb_users,),
                                                               generator=generator)), dim=1)
    scores = torch.randint(0, 8, (nb_users, TEST_NEGATIVES + 1), generator=generator) / 8.0
    expected = dataloading.create_test_data(test, negatives)
    expected += (evaluation.positive_ranks(scores, expected[1], expected[2]),)
    got = dataloading.create_test_data(test.to(device), negatives.to(device))
    got += (evaluation.positive_ranks(scores.to(device), got[1], got[2]),)
    names = ("users", "items", "duplicate_mask", "ranks")
    differing = [name for name, want, have in zip(names, expected, got)
                 if not torch.equal(want, have.cpu())]
    report.check("test data", not differing,
                 f"create_test_data + positive_ranks on {nb_users:,} rows of {nb_items} items "
                 f"({int(expected[2].sum()):,} repeats, scores in 8 levels): "
                 + (f"{', '.join(differing)} differ from the CPU's" if differing
                    else "equal to the CPU's"))


def time_training(report, shape, data, mode, device, clock):
    """Train in `mode`: one warm-up and one timed epoch (fewer steps if an epoch is too slow).

    Returns the trained model and what evaluating it needs, or None when skipped.
    """
    args = training_args(shape)
    row = {"benchmark": "train", "mode": mode, "batch_size": args.batch_size}
    if clock.allow("train") <= 0:
        report.row({**row, "skipped": "time guard"})
        return None
    set_precision(mode)
    ctx = train.Context(device, rank=0, world_size=1, is_main=False,
                      autocast_dtype=torch.float16 if mode == "amp" else None)
    model, ddp_model = train.build_model(args, shape.nb_users, shape.nb_items, ctx)
    optimizer = train.build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.autocast_dtype is not None)
    epochs = itertools.count()
    samples_per_positive = 1 + args.negative_samples

    def epoch(positives):
        return timed(lambda: train.train_epoch(
            ddp_model, optimizer, scaler, data.train_users[:positives],
            data.train_items[:positives], shape.nb_items, next(epochs), args, ctx), device)

    probe = positives_for_steps(PROBE_STEPS, args)
    epoch(probe)  # kernels, cuBLAS handles and the allocator's pools are set up here
    probe_seconds, _ = epoch(probe)
    seconds_per_step = probe_seconds / PROBE_STEPS
    full_steps = train.steps_per_epoch(shape.nb_positives * samples_per_positive, args, ctx)
    allowed = clock.allow("train")
    if 2 * full_steps * seconds_per_step <= allowed:
        positives = shape.nb_positives
    else:
        steps = max(PROBE_STEPS, int(allowed / 2 / seconds_per_step))
        positives = min(shape.nb_positives, positives_for_steps(steps, args))
    epoch(positives)
    seconds, loss = epoch(positives)
    samples = positives * samples_per_positive
    steps = train.steps_per_epoch(samples, args, ctx)
    unit = ("1 epoch" if positives == shape.nb_positives else
            f"a shortened epoch ({steps} of {full_steps} steps; a whole one would pass the "
            f"{clock.limits.train:g} s cap)")
    report.row({**row, "samples": samples, "seconds": seconds, "throughput": samples / seconds,
                "steps": steps, "loss": loss, "whole_epoch": positives == shape.nb_positives,
                "timed": f"{unit}: {steps} steps in {seconds:.2f} s, after a warm-up one"})
    return model, args, ctx


def time_evaluation(report, data, mode, trained, device, clock):
    model, args, ctx = trained
    row = {"benchmark": "eval", "mode": mode, "batch_size": args.valid_batch_size}
    if clock.allow("eval") <= 0:
        report.row({**row, "skipped": "time guard"})
        return

    def evaluate():
        return evaluation.val_epoch(model, data.test_users, data.test_items, data.duplicate_mask,
                             args, ctx)

    warm_seconds, _ = timed(evaluate, device)
    repeats = max(1, min(EVAL_REPEATS, int(clock.allow("eval") / warm_seconds)))
    seconds = 0.0
    for _ in range(repeats):
        elapsed, (hr, ndcg, _) = timed(evaluate, device)
        seconds += elapsed
    samples = data.test_items.numel() * repeats
    report.row({**row, "samples": samples, "seconds": seconds, "throughput": samples / seconds,
                f"hr@{args.topk}": hr, f"ndcg@{args.topk}": ndcg,
                "timed": f"{repeats} x {len(data.test_users):,} users x "
                         f"{data.test_items.shape[1]} candidates, {seconds:.2f} s"})


def time_inference(report, shape, device, clock):
    torch.manual_seed(SEED)
    model = NeuMF(shape.nb_users, shape.nb_items, shape.factors, shape.layers).to(device)
    for mode in MODES:
        set_precision(mode)
        precision = "amp" if mode == "amp" else "fp32"
        for batch_size in shape.inference_batches:
            row = {"benchmark": "inference", "mode": mode, "batch_size": batch_size}
            allowed = clock.allow("inference")
            if allowed <= 0:
                report.row({**row, "skipped": "time guard"})
                continue
            probe = benchmark(model, batch_size, 2, precision, device, warmup_batches=1)
            seconds_per_batch = batch_size / probe["throughput"]
            batches = int(min(allowed / seconds_per_batch, MAX_INFERENCE_BATCHES,
                              MAX_INFERENCE_SAMPLES // batch_size))
            result = benchmark(model, batch_size, max(3, batches), precision, device)
            report.row({**row, "samples": batch_size * result["num_batches"],
                        "throughput": result["throughput"], "dtype": result["dtype"],
                        "latency_mean_ms": result["latency_mean_ms"],
                        "latency_p99_ms": result["latency_p99_ms"],
                        "timed": f"{result['num_batches']} forward passes, "
                                 f"{result['latency_mean_ms']:.3f} ms each"})


def contained(report, name, function, *args):
    """Run one section; an exception fails it as a check and the run goes on to the next.

    The GPU machine is lent for minutes at a time: one broken section must not cost the
    measurements of the others.
    """
    try:
        return function(*args)
    except Exception as error:  # any failure is the result being reported
        report.check(f"{name} ran", False, f"{type(error).__name__}: {error}")
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Check and time NCF on one NVIDIA GPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="directory for gpu_check.md and gpu_check.json "
                             "(default: $OUT if set, else ./gpu_check_out)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run every step on the CPU at a tiny shape (tests the script)")
    return parser.parse_args(argv)


def prepare_out(path):
    try:
        make_writable_dir(path)
    except OSError as error:
        print(f"gpu_check.py: error: --out {path}: cannot write there ({error.strerror}); "
              f"pass --out with a writable directory", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run_cpu:
        device, shape, limits = torch.device("cpu"), TINY, DRY_RUN_LIMITS
    elif torch.cuda.is_available():
        device, shape, limits = torch.device("cuda", 0), ML20M, GPU_LIMITS
        torch.cuda.set_device(device)
    else:
        print(SKIP_MESSAGE)
        return 0
    prepare_out(args.out)
    clock = Clock(limits)
    report = Report(args.out, environment(device), shape)
    print(f"{report.environment['device_name']}, torch {report.environment['torch']}, "
          f"CUDA {report.environment['cuda']}; writing to {args.out}", flush=True)
    seconds, data = timed(lambda: generate_tensors(shape, device), device)
    print(f"generated {shape.name}-shaped tensors on {device} in {seconds:.1f} s", flush=True)

    contained(report, "forward", check_forward, report, shape, device)
    contained(report, "amp step", check_amp_step, report, shape, data, device)
    contained(report, "test data", check_test_data, report, device)
    for mode in MODES:
        trained = contained(report, f"train {mode}", time_training, report, shape, data, mode,
                            device, clock)
        if trained is not None:
            contained(report, f"eval {mode}", time_evaluation, report, data, mode, trained,
                      device, clock)
        del trained
        if device.type == "cuda":
            torch.cuda.empty_cache()
    contained(report, "inference", time_inference, report, shape, device, clock)

    print()
    print(report.markdown(), flush=True)
    if not report.passed():
        print("gpu_check.py: some checks FAILED (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
