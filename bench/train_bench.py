"""Training and evaluation throughput and peak memory at the ml-20m shape, ours (float32 and
bfloat16 autocast) vs a faithful baseline of the original, each in its own process so peak RSS
belongs to one of them.

    python bench/train_bench.py                 # 138,493 users, 26,744 items, 11 M positives
    python bench/train_bench.py --quick         # a small shape, seconds (smoke test)

The baseline is the original's recipe as written for a GPU, run on the CPU: int64 epoch
tensors with float labels shuffled into full copies, the whole batch through the model at
once, ReLU then `F.dropout`, and evaluation over all users in batches of --valid_batch_size.
Ours is `train.train_epoch` / `evaluation.val_epoch` on the same data and the same model sizes.
Training is timed over a few optimiser steps (an epoch of 55 M samples takes many minutes on a
laptop CPU): the baseline's --steps steps after a warm-up step; ours a train_epoch of
--steps + 1 batches, building its samples included. samples/s = batch size x steps / time.

Each variant also times, in its own process, the matrix products a training sample needs (every
Linear's forward, input-gradient and weight-gradient products, in its precision): the samples/s
the machine would reach if training did nothing else, and the share of it training reaches.
ours-bf16 is what --opt_level O2 trains in on a CPU with bf16 units; it is skipped elsewhere.
ours-compiled and ours-bf16-compiled (asked for with --variants) train with --compile; their
first step includes the compilation.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import dataloading  # noqa: E402
import evaluation  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from child_process import run_child  # noqa: E402
from neumf import NeuMF  # noqa: E402

MF_DIM, LAYERS = 64, [256, 256, 128, 64]
# The autocast dtype each variant trains in; None is float32.
VARIANT_DTYPES = {"baseline": None, "ours": None, "ours-bf16": torch.bfloat16,
                  "ours-compiled": None, "ours-bf16-compiled": torch.bfloat16}
# Run unless --variants names others: compiling adds 10-25 s to a default run's few minutes.
DEFAULT_VARIANTS = ["baseline", "ours", "ours-bf16"]


def make_data(nb_users, nb_items, nb_positives, seed=0):
    """Training positives with Zipf-like item popularity, and a test set of 100 negatives."""
    generator = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, nb_items + 1, dtype=torch.float64) ** 0.8
    items = torch.multinomial(popularity / popularity.sum(), nb_positives, replacement=True,
                              generator=generator)
    users = torch.randint(0, nb_users, (nb_positives,), generator=generator)
    users[:nb_users] = torch.arange(nb_users)
    test = torch.stack((torch.arange(nb_users), torch.randint(0, nb_items, (nb_users,),
                                                               generator=generator)), 1)
    negatives = torch.randint(0, nb_items, (nb_users, 100), generator=generator)
    return torch.stack((users, items), 1), test, negatives


class OriginalNeuMF(NeuMF):
    """The original's forward: ReLU and dropout as separate functional ops."""

    def forward(self, user, item, sigmoid=False):
        mf = self.mf_user_embed(user) * self.mf_item_embed(item)
        mlp = torch.cat((self.mlp_user_embed(user), self.mlp_item_embed(item)), dim=1)
        for layer in self.mlp:
            mlp = F.relu(layer(mlp))
            if self.dropout != 0:
                mlp = F.dropout(mlp, p=self.dropout, training=self.training)
        logits = self.final(torch.cat((mf, mlp), dim=1))
        return torch.sigmoid(logits) if sigmoid else logits


def baseline_epoch_tensors(train, nb_items, negative_samples):
    train_users, train_items = train[:, 0], train[:, 1]
    negative_users = train_users.repeat(negative_samples)
    negative_items = torch.empty_like(negative_users).random_(0, nb_items)
    users = torch.cat((train_users, negative_users))
    items = torch.cat((train_items, negative_items))
    labels = torch.cat((torch.ones(len(train_users)), torch.zeros(len(negative_users))))
    order = torch.randperm(len(users))
    return users[order], items[order], labels[order]


def run_baseline(train, test, negatives, nb_users, nb_items, args):
    torch.manual_seed(1)
    model = OriginalNeuMF(nb_users, nb_items, MF_DIM, LAYERS, dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0045, betas=(0.25, 0.5), eps=1e-8,
                                 fused=True)
    users, items, labels = baseline_epoch_tensors(train, nb_items, 4)
    batch_users = torch.split(users, args.batch_size)
    batch_items = torch.split(items, args.batch_size)
    batch_labels = torch.split(labels, args.batch_size)

    def step(index):
        logits = model(batch_users[index], batch_items[index]).view(-1)
        F.binary_cross_entropy_with_logits(logits, batch_labels[index]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    start = time.perf_counter()
    step(0)
    first_step_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(1, args.steps + 1):
        step(index)
    train_rate = args.batch_size * args.steps / (time.perf_counter() - start)

    test_users, test_items, duplicate_mask = dataloading.create_test_data(test, negatives)
    flat_users = test_users[:, None].expand_as(test_items).reshape(-1)
    flat_items = test_items.reshape(-1)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        scores = torch.cat([model(u, i, sigmoid=True) for u, i in
                            zip(torch.split(flat_users, args.valid_batch_size),
                                torch.split(flat_items, args.valid_batch_size))])
        scores = scores.view(test_items.shape)
        scores[duplicate_mask] = -1
        torch.topk(scores, 10)
    eval_rate = test_items.numel() / (time.perf_counter() - start)
    return train_rate, eval_rate, first_step_seconds


def run_ours(pairs, test, negatives, nb_users, nb_items, args):
    cli.reuse_freed_memory()  # as ncf.py does; the baseline keeps the C library's default
    ctx = train.Context(torch.device("cpu"), 0, 1, False, VARIANT_DTYPES[args.child])
    run_args = train.Recipe(batch_size=args.batch_size, valid_batch_size=args.valid_batch_size,
                            compile=args.child.endswith("-compiled"))
    model, ddp_model = train.build_model(run_args, nb_users, nb_items, ctx)
    optimizer = train.build_optimizer(run_args, model)
    scaler = train.grad_scaler(ctx)

    def positives(count):
        """The first `count` positives in file (time) order: users spread as in a whole epoch."""
        return dataloading.Positives.from_pairs(pairs[:count, 0].int(), pairs[:count, 1].int(),
                                                nb_users)

    # Train over a prefix of the positives that holds exactly steps + 1 batches, so the
    # epoch's data pipeline is paid for in proportion, as in a full epoch.
    samples = args.batch_size * (args.steps + 1)
    prefix = -(-samples // 5)
    start = time.perf_counter()
    train.train_epoch(ddp_model, optimizer, scaler, positives(args.batch_size // 5 + 1),
                      nb_items, 0, run_args, ctx)
    # One step, and with --compile the compilation: what a compiled run pays once.
    first_step_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train.train_epoch(ddp_model, optimizer, scaler, positives(prefix), nb_items, 1, run_args, ctx)
    train_rate = prefix * 5 // args.batch_size * args.batch_size / (time.perf_counter() - start)
    test_users, test_items, duplicate_mask = dataloading.create_test_data(test, negatives)
    start = time.perf_counter()
    evaluation.val_epoch(model, test_users.int(), test_items.int(), duplicate_mask, run_args, ctx)
    eval_rate = test_items.numel() / (time.perf_counter() - start)
    return train_rate, eval_rate, first_step_seconds


def linear_shapes(mf_dim=MF_DIM, layers=LAYERS):
    """(fan_in, fan_out) of every Linear of NeuMF: the MLP's, then the final layer."""
    return list(zip(layers[:-1], layers[1:])) + [(layers[-1] + mf_dim, 1)]


def matmul_flops_per_sample(shapes):
    """Three products per Linear (forward, input gradient, weight gradient; the first layer's
    input gradient trains the embeddings), 2 FLOPs per multiply-add."""
    return sum(3 * 2 * fan_in * fan_out for fan_in, fan_out in shapes)


def matmul_seconds_per_sample(dtype, rows, shapes, repeats=3):
    """Best time per sample of the products matmul_flops_per_sample counts, on `rows` samples
    at once (the pieces train_epoch feeds the model on a CPU)."""
    generator = torch.Generator().manual_seed(0)
    operands = []
    for fan_in, fan_out in shapes:
        activation = torch.randn(rows, fan_in, generator=generator).to(dtype)
        gradient = torch.randn(rows, fan_out, generator=generator).to(dtype)
        weight = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
        operands.append((activation, gradient, weight))
    # Into buffers allocated once: fresh outputs would time the page faults of new memory (a
    # third of the products' time here), not the machine's products.
    outputs = [(torch.empty(rows, fan_out, dtype=dtype), torch.empty(rows, fan_in, dtype=dtype),
                torch.empty(fan_out, fan_in, dtype=dtype)) for fan_in, fan_out in shapes]

    def products():
        for (activation, gradient, weight), (forward, input_grad, weight_grad) in zip(operands,
                                                                                    outputs):
            torch.mm(activation, weight.T, out=forward)
            torch.mm(gradient, weight, out=input_grad)
            torch.mm(gradient.T, activation, out=weight_grad)

    products()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        products()
        best = min(best, time.perf_counter() - start)
    return best / rows


def peak_rss_gb():
    """This process's peak resident memory so far in GB (10^9 bytes), the unit of
    convert_bench.py's figure beside it in bench/run.py's table (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child(args):
    train, test, negatives = make_data(args.users, args.items, args.positives)
    runner = run_baseline if args.child == "baseline" else run_ours
    train_rate, eval_rate, first_step_seconds = runner(train, test, negatives, args.users,
                                                       args.items, args)
    peak_gb = peak_rss_gb()
    dtype = VARIANT_DTYPES[args.child] or torch.float32
    shapes = linear_shapes()
    seconds = matmul_seconds_per_sample(dtype, min(args.batch_size, dataloading.CPU_CHUNK), shapes)
    print(json.dumps({"variant": args.child, "first_step_seconds": first_step_seconds,
                      "train_samples_per_s": train_rate,
                      "eval_samples_per_s": eval_rate, "peak_rss_gb": peak_gb,
                      "precision": str(dtype).removeprefix("torch."),
                      "matmul_gflops": matmul_flops_per_sample(shapes) / seconds / 1e9,
                      "matmul_limit_samples_per_s": 1 / seconds,
                      "matmul_limit_share": train_rate * seconds}))


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="train_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=138_493)
    parser.add_argument("--items", type=int, default=26_744)
    parser.add_argument("--positives", type=int, default=11_000_000)
    parser.add_argument("-b", "--batch_size", type=int, default=2 ** 20)
    parser.add_argument("--valid_batch_size", type=int, default=2 ** 20)
    parser.add_argument("--steps", type=int, default=2, help="timed optimiser steps")
    parser.add_argument("--quick", action="store_true", help="a small shape for smoke tests")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=list(VARIANT_DTYPES),
                        help="*-compiled: train.py with --compile (the first step compiles)")
    parser.add_argument("--child", choices=list(VARIANT_DTYPES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.items, args.positives = 2_000, 1_000, 60_000
        args.batch_size, args.valid_batch_size, args.steps = 16_384, 65_536, 2
    for flag in ("users", "items", "positives", "batch_size", "valid_batch_size", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.positives < args.users:
        parser.error(f"--positives {args.positives} must be at least --users {args.users}: every "
                     f"user has a training positive")
    if args.positives * 5 < args.batch_size * (args.steps + 1):
        parser.error("--positives x 5 must hold --steps + 1 batches")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    variants = args.variants
    if not train.cpu_has_native_bf16():
        skipped = [variant for variant in variants if VARIANT_DTYPES[variant] == torch.bfloat16]
        if skipped:
            print(f"{', '.join(skipped)} skipped: this CPU has no bf16 units (AMX or "
                  f"AVX512_BF16), so --opt_level O2 trains in float32 here")
        variants = [variant for variant in variants if variant not in skipped]
    results = []
    for variant in variants:
        command = [sys.executable, os.path.abspath(__file__), "--child", variant,
                   "--users", str(args.users), "--items", str(args.items),
                   "--positives", str(args.positives), "-b", str(args.batch_size),
                   "--valid_batch_size", str(args.valid_batch_size), "--steps", str(args.steps)]
        finished = run_child(f"the {variant} run", command, stdout=subprocess.PIPE)
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    print(f"shape: {args.users:,} users, {args.items:,} items, {args.positives:,} positives; "
          f"batch {args.batch_size:,}, {args.steps} timed steps; {torch.get_num_threads()} "
          f"threads; {inference.cpu_model()}")
    print(f"matrix products per training sample: "
          f"{matmul_flops_per_sample(linear_shapes()) / 1e6:.3f} MFLOP")
    print("| variant | first step s | train samples/s | eval samples/s | peak RSS GB | "
          "matrix-product limit samples/s | share of the limit |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(f"| {result['variant']} | {result['first_step_seconds']:.1f} | "
              f"{result['train_samples_per_s']:,.0f} | "
              f"{result['eval_samples_per_s']:,.0f} | {result['peak_rss_gb']:.2f} | "
              f"{result['matmul_limit_samples_per_s']:,.0f} ({result['precision']}, "
              f"{result['matmul_gflops']:,.0f} GFLOP/s) | {result['matmul_limit_share']:.0%} |")
    by_variant = {result["variant"]: result for result in results}
    for new, old in (("ours", "baseline"), ("ours-bf16", "ours"), ("ours-compiled", "ours"),
                     ("ours-bf16-compiled", "ours-bf16")):
        if new in by_variant and old in by_variant:
            training, evaluating, memory = (
                by_variant[new][key] / by_variant[old][key]
                for key in ("train_samples_per_s", "eval_samples_per_s", "peak_rss_gb"))
            print(f"{new} / {old}: train x{training:.2f}, eval x{evaluating:.2f}, "
                  f"peak memory x{memory:.2f}")
    return results


if __name__ == "__main__":
    cli.run(main)
