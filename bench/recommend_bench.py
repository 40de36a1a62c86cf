"""Time scoring every item for every user: scoring.py's factored path against model(user, item).

    python bench/recommend_bench.py [--sample_users 500]
                                    [--data DIR --checkpoint model.pth]

Part 1, on a NeuMF with random weights at ml-20m's shape (138,493 users x 26,744 items, --factors
64, --layers 256 256 128 64): both paths score all items for the same sampled users in the same
run, in passes of the same number of pairs, taking turns in rounds of users so that load from
other processes falls on both alike (the plain forward was fastest at this pass size too: one
user's 26,744 pairs a call ran 1.4x faster than 2**20 pairs); the per-user times are
extrapolated to all users. The matrix products that remain after factoring (the layers after the
first) are timed on their own in the same rounds: their rate sets the floor for the whole job.
Where the CPU has native bf16, the top-k as recommend.py finds it (training items masked, about
ml-20m's 144 a user) is timed in the same rounds both ways, float32 over all items against the
bfloat16 shortlist rescored in float32, with the share of sampled users whose top-k differs, and
the bfloat16 scorer's products alone (one user's items a call) set its floor.

Part 2, with --data and --checkpoint (a converted dataset and its trained model.pth): the top-k
of --sample_users of its users timed in turns three ways, the exact bounded search that
recommend.py runs (bounded_topk.py: a trained model's bounds rule out most items, a random
model's none, hence not in part 1), float32 over every item and, where native, the bf16
shortlist, with the users whose top-k differs from float32's; the wall time of `recommend.py
--all_users` on it (--precision fp32, and bf16 where native), the share of users whose top-k
differs between the two, and HR@k / NDCG@k by the sampled protocol (100 test negatives, as
ncf.py) beside the full-ranking protocol (evaluation.full_ranking_ranks).
"""
import copy
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import bounded_topk  # noqa: E402
import cli  # noqa: E402
import dataloading  # noqa: E402
import evaluation  # noqa: E402
import recommender  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402
from checkpoint import check_matches, load_model  # noqa: E402
from neumf import NeuMF  # noqa: E402

TRAINING_ITEMS_PER_USER = 144  # ml-20m: 20M ratings over 138,493 users


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="recommend_bench.py",
                                description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=138_493)
    parser.add_argument("--items", type=int, default=26_744)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--layers", nargs="+", type=int, default=[256, 256, 128, 64])
    parser.add_argument("--sample_users", type=int, default=500,
                        help="users timed per path; the time is extrapolated to --users")
    parser.add_argument("--chunk_pairs", type=int, default=None,
                        help="pairs per pass, both paths (default: scoring.py's)")
    parser.add_argument("--data", help="converted dataset for part 2")
    parser.add_argument("--checkpoint", help="its trained model.pth, for part 2")
    parser.add_argument("-k", "--topk", type=int, default=10)
    args = parser.parse_args(argv)
    for flag in ("users", "items", "factors", "sample_users", "chunk_pairs", "topk"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}")
    if min(args.layers) < 1 or args.layers[0] % 2:
        parser.error(f"--layers {' '.join(map(str, args.layers))}: sizes must be at least 1 and "
                     f"the first even (it is split between the user and item embeddings)")
    if (args.data is None) != (args.checkpoint is None):
        parser.error("--data and --checkpoint go together")
    return args


def tail_flops_per_pair(layers):
    """Multiply-adds x 2 of the MLP layers after the first, plus the final MLP dot product."""
    return 2 * (sum(a * b for a, b in zip(layers[1:-1], layers[2:])) + layers[-1])


def bf16_widths(layers):
    """The layer widths of the bfloat16 scorer's products: its first layer multiplies the item
    embeddings (half of layers[0]) rather than adding a precomputed item half."""
    return [layers[0] // 2] + layers[1:]


def time_factored(scorer, users):
    step = scoring.users_per_batch(scorer.nb_items, scorer.chunk_pairs)
    start = time.perf_counter()
    for begin in range(0, len(users), step):
        scorer(users[begin:begin + step])
    return time.perf_counter() - start


def time_plain(model, users, chunk_pairs):
    """model(user, item) over all items of the users, chunk_pairs pairs (whole users) a call."""
    items = torch.arange(model.nb_items)
    step = max(1, chunk_pairs // model.nb_items)
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(users), step):
            batch = users[begin:begin + step]
            model(batch.repeat_interleave(model.nb_items), items.repeat(len(batch)))
    return time.perf_counter() - start


def time_top_items(scorer, shortlist_scorer, trained, users, topk, bounds=None):
    """(seconds, items) of recommend.py's top-k for the users, batched as recommend.py does."""
    step = recommender.batch_users(scorer, shortlist_scorer, bounds)
    found = []
    start = time.perf_counter()
    for begin in range(0, len(users), step):
        batch = users[begin:begin + step]
        excluded = trained.mask(batch, scorer.nb_items)
        found.append(recommender.best_items(scorer, shortlist_scorer, batch, excluded, topk,
                                            bounds)[0])
    return time.perf_counter() - start, torch.cat(found)


class ProductChain:
    """Products of the given layer widths, each with its bias and ReLU as scoring.py applies them,
    alone, on one chunk of random activations in `dtype`."""

    def __init__(self, widths, pairs, dtype=torch.float32):
        generator = torch.Generator().manual_seed(0)
        self.weights = [((torch.randn(b, a, generator=generator) / a ** 0.5).to(dtype),
                         torch.zeros(b, dtype=dtype))
                        for a, b in zip(widths, widths[1:])]
        self.hidden = torch.randn(pairs, widths[0], generator=generator).relu_().to(dtype)
        self.flop = 2 * pairs * sum(a * b for a, b in zip(widths, widths[1:]))
        self.run()

    def run(self):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.hidden
            for weight, bias in self.weights:
                out = scoring._linear_relu(out, weight, bias)
        return time.perf_counter() - start


def part_one(args, rounds=10):
    chunk_pairs = (scoring.default_chunk_pairs("cpu") if args.chunk_pairs is None
                   else args.chunk_pairs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"chunk of {chunk_pairs} pairs")
    torch.manual_seed(0)
    model = NeuMF(args.users, args.items, args.factors, args.layers).eval()
    users = torch.randperm(args.users)[:args.sample_users]
    pairs_all = args.users * args.items
    flop_all = pairs_all * tail_flops_per_pair(args.layers)

    check_users = users[:2]
    with torch.inference_mode():
        plain = model(check_users.repeat_interleave(args.items),
                      torch.arange(args.items).repeat(len(check_users))).view(len(check_users),
                                                                              -1)
    difference = (scoring.score_all_items(model, check_users, chunk_pairs) - plain).abs().max()
    print(f"largest |factored - plain| logit difference: {difference.item():.2e}")

    start = time.perf_counter()
    scorer = scoring.FactoredScorer(model, chunk_pairs)
    item_side = time.perf_counter() - start  # once for all users: not scaled with them
    factored = plain = tail_seconds = tail_flop = 0.0
    tail = ProductChain(args.layers[1:], chunk_pairs)
    for part in torch.tensor_split(users, rounds):
        factored += time_factored(scorer, part)
        plain += time_plain(model, part, chunk_pairs)
        for _ in range(3):
            tail_seconds += tail.run()
            tail_flop += tail.flop
    rate = tail_flop / tail_seconds
    scale = args.users / len(users)
    factored_all, plain_all = item_side + factored * scale, plain * scale
    print(f"{len(users)} users x {args.items} items:  factored {factored:.1f} s (and "
          f"{item_side:.1f} s for the item side, once),  plain forward {plain:.1f} s")
    print(f"extrapolated to all {args.users} users ({pairs_all:.3g} pairs):  factored "
          f"{factored_all / 60:.1f} min,  plain {plain_all / 60:.1f} min,  speed-up "
          f"{plain_all / factored_all:.2f}x")
    print(f"work left per pair after factoring: {tail_flops_per_pair(args.layers) / 1e3:.1f} kFLOP,"
          f" {flop_all:.3g} FLOP in all; factored path reached "
          f"{flop_all / factored_all / 1e9:.1f} GFLOP/s")
    print(f"those matrix products alone: {rate / 1e9:.1f} GFLOP/s -> floor "
          f"{flop_all / rate / 60:.1f} min for all users")
    if train.cpu_has_native_bf16():
        compare_bf16(args, model, scorer, users, rounds)
    else:
        print("bf16 shortlist not timed: this CPU has no native bf16 (AMX, AVX512_BF16)")


def compare_bf16(args, model, scorer, users, rounds):
    generator = torch.Generator().manual_seed(1)
    train_users = torch.arange(args.users).repeat_interleave(TRAINING_ITEMS_PER_USER)
    trained = scoring.TrainingItems(
        train_users, torch.randint(0, args.items, (len(train_users),), generator=generator),
        args.users)
    shortlist_scorer = scoring.FactoredScorer(copy.deepcopy(model).bfloat16(),
                                              recommender.BF16_CPU_CHUNK_PAIRS)
    # One user's items a call, as the bfloat16 scorer runs its products on a CPU.
    products = ProductChain(bf16_widths(args.layers), min(args.items,
                                                          recommender.BF16_CPU_CHUNK_PAIRS),
                            torch.bfloat16)
    seconds = {"fp32": 0.0, "bf16": 0.0}
    found = {"fp32": [], "bf16": []}
    product_seconds = product_flop = 0.0
    for part in torch.tensor_split(users, rounds):
        for name, shortlist in (("fp32", None), ("bf16", shortlist_scorer)):
            spent, items = time_top_items(scorer, shortlist, trained, part, args.topk)
            seconds[name] += spent
            found[name].append(items)
        for _ in range(3):
            product_seconds += products.run()
            product_flop += products.flop
    differing = (torch.cat(found["fp32"]) != torch.cat(found["bf16"])).any(dim=1)
    scale = args.users / len(users)
    fp32, bf16 = (seconds[name] * scale / 60 for name in ("fp32", "bf16"))
    print(f"top-{args.topk} of {len(users)} users as recommend.py --all_users, extrapolated to all "
          f"{args.users}:  fp32 {fp32:.1f} min,  bf16 shortlist + fp32 rescoring {bf16:.1f} min "
          f"({fp32 / bf16:.2f}x);  top-{args.topk} differs for {int(differing.sum())} of "
          f"{len(users)} users")
    rate = product_flop / product_seconds
    flop_all = args.users * args.items * products.flop / products.hidden.shape[0]
    print(f"bf16 products alone ({' -> '.join(map(str, bf16_widths(args.layers)))}, "
          f"{products.hidden.shape[0]} pairs a call): {rate / 1e9:.0f} GFLOP/s -> floor "
          f"{flop_all / rate / 60:.1f} min for all users; the bf16 top-{args.topk} reached "
          f"{flop_all / (bf16 * 60) / 1e9:.0f} GFLOP/s of them")


def compare_bounded(args, model, train_pairs, nb_users, rounds=10):
    """recommend.py's top-k on the trained model, timed in turns on --sample_users of its users:
    the bounded search (bounded_topk.bounded_top_items) against float32 over every item and, where
    bf16 is native, the bf16 shortlist; each extrapolated to all users."""
    scorer = scoring.FactoredScorer(model)
    if not bounded_topk.bounds_pay(scorer):
        print(f"bounded top-{args.topk} not timed: {model.nb_items} items (fewer than "
              f"{bounded_topk.BOUNDED_MIN_ITEMS}) or no MLP hidden layer")
        return
    start = time.perf_counter()
    bounds = bounded_topk.ItemBounds(scorer)
    built = time.perf_counter() - start
    shortlist_scorer = None
    if train.cpu_has_native_bf16():
        shortlist_scorer = scoring.FactoredScorer(copy.deepcopy(model).bfloat16(),
                                                  recommender.BF16_CPU_CHUNK_PAIRS)
    trained = scoring.TrainingItems(train_pairs[:, 0], train_pairs[:, 1], nb_users)
    users = torch.randperm(nb_users, generator=torch.Generator().manual_seed(2))[
        :args.sample_users]
    ways = {"fp32": (None, None), "bounded": (None, bounds)}
    if shortlist_scorer is not None:
        ways["bf16"] = (shortlist_scorer, None)
    seconds = dict.fromkeys(ways, 0.0)
    found = {name: [] for name in ways}
    for part in torch.tensor_split(users, rounds):
        for name, (shortlist, way_bounds) in ways.items():
            spent, items = time_top_items(scorer, shortlist, trained, part, args.topk,
                                          way_bounds)
            seconds[name] += spent
            found[name].append(items)
    exact = torch.cat(found["fp32"])
    scale = nb_users / len(users)
    minutes = {name: spent * scale / 60 for name, spent in seconds.items()}
    print(f"top-{args.topk} of {len(users)} of its users, extrapolated to all {nb_users}: "
          + ",  ".join(f"{name} {minutes[name]:.1f} min" for name in ways)
          + f"  (bounds built once in {built:.1f} s)")
    for name in ways:
        if name != "fp32":
            differing = (torch.cat(found[name]) != exact).any(dim=1)
            print(f"  {name}: x{minutes['fp32'] / minutes[name]:.2f} of fp32 over every item; "
                  f"top-{args.topk} differs from it for {int(differing.sum())} of "
                  f"{len(users)} users")


def run_recommend(args, output, precision):
    """(wall seconds, CPU seconds, the CSV as userId -> tuple of movieIds) of one
    recommend.py --all_users run."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, os.path.join(REPO, "recommend.py"), "--data", args.data,
         "--checkpoint", args.checkpoint, "--all_users", "--device", "cpu", "--precision",
         precision, "--output", output, "--topk", str(args.topk)],
        stderr=subprocess.PIPE, text=True)
    if finished.returncode:
        lines = finished.stderr.strip().splitlines()
        raise cli.UserError(lines[-1] if lines else
                            f"recommend.py failed (exit status {finished.returncode})")
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    lists = {}
    with open(output) as handle:
        next(handle)
        for line in handle:
            user, _, movie = line.split(",", 3)[:3]
            lists.setdefault(user, []).append(movie)
    return wall, cpu, {user: tuple(movies) for user, movies in lists.items()}


def part_two(args):
    train_pairs, test, negatives, nb_users, nb_items = dataloading.open_dataset(args.data)[:5]
    model = load_model(args.checkpoint).eval()
    check_matches(model.state_dict(), args.checkpoint, nb_users, nb_items)
    compare_bounded(args, model, train_pairs, nb_users)
    precisions = ["fp32", "bf16"] if train.cpu_has_native_bf16() else ["fp32"]
    found = {}
    with tempfile.TemporaryDirectory() as directory:
        for precision in precisions:
            wall, cpu, found[precision] = run_recommend(
                args, os.path.join(directory, f"{precision}.csv"), precision)
            rows = sum(len(movies) for movies in found[precision].values())
            print(f"recommend.py --all_users --precision {precision} on {args.data}: "
                  f"{len(found[precision])} users, {rows} rows, {wall:.1f} s wall, {cpu:.1f} s CPU "
                  f"(process start and loading included)")
    if "bf16" in found:
        differing = sum(found["bf16"].get(user) != movies for user, movies in found["fp32"].items())
        print(f"top-{args.topk} differs between bf16 and fp32 for {differing} of "
              f"{len(found['fp32'])} users")

    # ncf.py's own evaluation, so the sampled figures are the ones training reports; it scores
    # users x 101 candidates a chunk of rows at a time.
    users, items, duplicates = dataloading.create_test_data(test, negatives)
    eval_args = train.Recipe(topk=args.topk)
    context = train.Context(device=torch.device("cpu"), rank=0, world_size=1, is_main=True)
    sampled = evaluation.val_epoch(model, users, items, duplicates, eval_args, context)
    start = time.perf_counter()
    ranks = evaluation.full_ranking_ranks(model, test[:, 0], test[:, 1], train_pairs[:, 0],
                                          train_pairs[:, 1])
    seconds = time.perf_counter() - start
    full = evaluation.hit_rate_and_ndcg(ranks, args.topk)
    k = args.topk
    print(f"sampled ({negatives.shape[1]} negatives): HR@{k} = {sampled[0]:.4f}, "
          f"NDCG@{k} = {sampled[1]:.4f}")
    print(f"full ranking ({model.nb_items} items less the user's training items): "
          f"HR@{k} = {full[0]:.4f}, NDCG@{k} = {full[1]:.4f} ({seconds:.1f} s)")


def main(argv=None):
    args = parse_args(argv)
    cli.reuse_freed_memory()  # as recommend.py does
    part_one(args)
    if args.data:
        part_two(args)


if __name__ == "__main__":
    cli.run(main)
