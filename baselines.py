"""Score simple recommenders on a dataset written by convert.py, with ncf.py's evaluation.

    python baselines.py --data DIR --method {pop,random,itemknn,bpr} [--topk 10]
                        [--report_topk K ...] [--full_ranking] [--seed 1] [--log_path F]
                        [--device cpu|cuda]
        itemknn: [--neighbours 100] [--shrinkage 10]
        bpr:     [--factors 128] [--epochs 30] [--learning_rate 0.005] [--regularisation 0.0005]
                 [--batch_size 4096]

Input DIR: train_ratings.pt, test_ratings.pt, test_negatives.pt (and metadata.json) as
convert.py writes them, checked as ncf.py checks them (dataloading.open_dataset).

Methods, all fitted on the training pairs only:
    pop      the item's number of training interactions; equal counts rank the lower item id
             first (with convert.py's ids: the item that appeared earlier in the ratings file)
    random   uniform scores from a generator seeded with --seed
    itemknn  cosine similarity between the items' binary columns of the user-item training
             matrix, co-occurrences / (sqrt(n_i n_j) + --shrinkage); each item keeps its
             --neighbours most similar items, and a user's score for item j is the sum of j's
             similarities to the user's training items (0 where none is a neighbour)
    bpr      matrix factorisation (user and item vectors, score = dot product) trained with the
             BPR loss, -log sigmoid(score(u, i) - score(u, j)) for a training positive i and a
             uniformly drawn item j that the user has not trained on, plus --regularisation
             times the squared norms of the vectors in the batch; Adam, seeded. A run whose
             loss or vectors stop being finite stops with an error (lower -l/--learning_rate)

Evaluation, the code ncf.py runs: the sampled protocol (each test positive against its user's
test negatives; repeats ranked once, a tie goes to the earlier column, so the positive, last,
loses it; NaN last) and with --full_ranking the full one (against every item the user has not
trained on; a tie goes to the lower item id). Items with no similarity to a user's items
(itemknn) all score 0 and tie.

Output: one line per metric on stdout, `NAME = VALUE`: hr@K and ndcg@K for --topk and each
--report_topk, mrr, their full_ counterparts with --full_ranking, and the seconds spent
fitting and evaluating. With --log_path, dllogger records (logger/): the run's settings
(PARAMETER) and a summary ([]) holding the same values.
"""
import math
import sys
import time
import warnings

import torch

import cli
import dataloading
import evaluation
import scoring
from logger import PARAMETER, JsonLogger
from progress import Progress

PROG = "baselines.py"
METHODS = ("pop", "random", "itemknn", "bpr")
MAX_COUNT = 2 ** 31 - 1
# flag: (the method it sets, its default)
METHOD_FLAGS = {"neighbours": ("itemknn", 100), "shrinkage": ("itemknn", 10.0),
                "factors": ("bpr", 128), "epochs": ("bpr", 30), "learning_rate": ("bpr", 0.005),
                "regularisation": ("bpr", 0.0005), "batch_size": ("bpr", 4096)}
# Score-matrix entries per user batch, as scoring.users_per_batch counts them (16 chunks).
CHUNK_PAIRS = 2 ** 16
# Entries of the dense blocks itemknn multiplies at once: [users, items] of one chunk of
# items and its [items, items] similarities; 2**24 float32 entries each, 64 MiB.
KNN_BLOCK = 2 ** 24


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory written by convert.py")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("-k", "--topk", type=int, default=10)
    parser.add_argument("--report_topk", type=int, nargs="+", default=[], metavar="K",
                        help="further cut-offs for HR and NDCG")
    parser.add_argument("--full_ranking", action="store_true",
                        help="also rank each test positive against every item its user has "
                             "not trained on")
    parser.add_argument("-s", "--seed", type=int, default=1, help="random and bpr")
    parser.add_argument("--log_path", help="dllogger JSON records (default: none)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    for flags, kind in ((("--neighbours",), int), (("--shrinkage",), float),
                        (("-f", "--factors"), int), (("-e", "--epochs"), int),
                        (("-l", "--learning_rate"), float), (("--regularisation",), float),
                        (("-b", "--batch_size"), int)):
        name = flags[-1].removeprefix("--")
        method, default = METHOD_FLAGS[name]
        parser.add_argument(*flags, type=kind, default=default, help=f"{method}'s")
    args = parser.parse_args(argv)
    for name in parser.given(argv, METHOD_FLAGS):
        method = METHOD_FLAGS[name][0]
        if args.method != method:
            parser.error(f"--{name} is a setting of --method {method}, not {args.method}; "
                         f"drop --{name}")
    counts = {"--topk": [args.topk], "--report_topk": args.report_topk,
              "--neighbours": [args.neighbours], "--factors": [args.factors],
              "--epochs": [args.epochs], "--batch_size": [args.batch_size]}
    for flag, values in counts.items():
        for value in values:
            if not 1 <= value <= MAX_COUNT:
                parser.error(f"{flag} must be in [1, {MAX_COUNT}], got {value}")
    cli.check_seed(parser, args.seed)
    for flag, value, lowest in (("--shrinkage", args.shrinkage, 0.0),
                                ("--regularisation", args.regularisation, 0.0),
                                ("--learning_rate", args.learning_rate, None)):
        if not math.isfinite(value) or (value <= 0 if lowest is None else value < lowest):
            bound = "positive" if lowest is None else "at least 0"
            parser.error(f"{flag} must be a finite number, {bound}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    return args


class Scorer:
    """Scores of every item for a batch of users, with what evaluation.full_ranking_ranks reads."""

    def __init__(self, nb_users, nb_items, device):
        self.nb_users = nb_users
        self.nb_items = nb_items
        self.device = device
        self.chunk_pairs = CHUNK_PAIRS


class Popularity(Scorer):
    def __init__(self, train, nb_users, nb_items, device):
        super().__init__(nb_users, nb_items, device)
        counts = torch.bincount(train[:, 1], minlength=nb_items).double()
        # count * nb_items + (nb_items - 1 - id): a higher count wins, then a lower id, and no
        # two items tie; exact in float64 while the product stays below 2**53.
        self.scores = (counts * nb_items + torch.arange(nb_items - 1, -1, -1)).to(device)

    def __call__(self, users):
        return self.scores.expand(len(users), -1)


class Random(Scorer):
    def __init__(self, nb_users, nb_items, device, seed):
        super().__init__(nb_users, nb_items, device)
        self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(self, users):
        return torch.rand(len(users), self.nb_items, generator=self.generator,
                          device=self.device)


class ItemKNN(Scorer):
    """Scores through a sparse [item, neighbour] similarity matrix with `neighbours` per row.

    The similarities are computed one chunk of items at a time: a dense [users, chunk] block
    of the binary training matrix times its sparse transpose gives the chunk's co-occurrences
    with all items, [items, chunk], of which only each item's best neighbours are kept. Memory
    beyond the dataset: about 44 bytes per distinct training pair (its key, ids and sparse
    entry), a few KNN_BLOCK-sized float32 blocks and about 40 bytes per kept neighbour, never
    the dense items x items matrix (2.9 GB at ml-20m). Work: nnz(train) x nb_items
    multiply-adds, which at ml-20m is for a GPU, not a CPU.
    """

    def __init__(self, train, nb_users, nb_items, device, neighbours, shrinkage):
        super().__init__(nb_users, nb_items, device)
        pairs = torch.unique(train[:, 1] * nb_users + train[:, 0]).to(device)  # item-major
        items, users = pairs // nb_users, pairs % nb_users
        counts = torch.bincount(items, minlength=nb_items).float()
        item_starts = torch.cumsum(counts.long(), 0) - counts.long()
        by_item = torch.sparse_coo_tensor(torch.stack((items, users)),
                                          torch.ones(len(pairs), device=device),
                                          (nb_items, nb_users), is_coalesced=True, check_invariants=True)
        norms = counts.sqrt()
        neighbours = min(neighbours, nb_items - 1)
        chunk = max(1, KNN_BLOCK // max(nb_users, nb_items))
        rows, columns, values = [], [], []
        for start in range(0, nb_items, chunk):
            stop = min(start + chunk, nb_items)
            first, last = int(item_starts[start]), int(item_starts[stop - 1] + counts[stop - 1])
            block = torch.zeros(nb_users, stop - start, device=device)
            block[users[first:last], items[first:last] - start] = 1.0
            co_occurrences = (by_item @ block).T  # [chunk, items]
            similarity = co_occurrences / (norms[start:stop, None] * norms + shrinkage)
            own = torch.arange(start, stop, device=device)
            similarity[own - start, own] = 0.0
            best = similarity.nan_to_num_(0.0).topk(neighbours, dim=1)
            rows.append(own.repeat_interleave(neighbours))
            columns.append(best.indices.reshape(-1))
            values.append(best.values.reshape(-1))
        # [item, neighbour]: user_rows @ this.T sums each item's similarities to the user's items
        self.similarities = torch.sparse_coo_tensor(
            torch.stack((torch.cat(rows), torch.cat(columns))), torch.cat(values),
            (nb_items, nb_items), check_invariants=True).coalesce().to_sparse_csr()
        self.trained = scoring.TrainingItems(train[:, 0].to(device), train[:, 1].to(device),
                                             nb_users)

    def __call__(self, users):
        user_rows = self.trained.mask(users.to(self.device), self.nb_items).float()
        # CSR times dense ran 2.3x faster than COO on ml-latest-small (CPU).
        return (self.similarities @ user_rows.T).T


class BPR(Scorer):
    def __init__(self, train, nb_users, nb_items, device, args):
        super().__init__(nb_users, nb_items, device)
        generator = torch.Generator().manual_seed(args.seed)
        self.user_vectors = (torch.randn(nb_users, args.factors, generator=generator) * 0.1
                             ).to(device).requires_grad_()
        self.item_vectors = (torch.randn(nb_items, args.factors, generator=generator) * 0.1
                             ).to(device).requires_grad_()
        train = train.to(device)
        users, positives = train[:, 0], train[:, 1]
        trained_keys = torch.unique(users * nb_items + positives)
        sampler = torch.Generator(device).manual_seed(args.seed)
        optimizer = torch.optim.Adam((self.user_vectors, self.item_vectors),
                                     lr=args.learning_rate)
        # BPR's epochs ran 736 s on ml-100k with nothing to read in a log meanwhile.
        shown = Progress(args.epochs, "bpr", "epoch", stream=sys.stdout)
        for epoch in range(args.epochs):
            # Summed on the device: reading each batch's loss would wait for the GPU every step.
            epoch_loss = torch.zeros((), device=device)
            order = torch.randperm(len(train), generator=sampler, device=device)
            negatives = self.draw_negatives(users[order], trained_keys, sampler)
            for start in range(0, len(order), args.batch_size):
                batch = order[start:start + args.batch_size]
                batch_negatives = negatives[start:start + args.batch_size]
                user, positive = self.user_vectors[users[batch]], self.item_vectors[positives[batch]]
                negative = self.item_vectors[batch_negatives]
                margin = (user * (positive - negative)).sum(dim=1)
                penalty = user.square().sum() + positive.square().sum() + negative.square().sum()
                loss = (-torch.nn.functional.logsigmoid(margin).sum()
                        + args.regularisation * penalty) / len(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += loss.detach()
            self.check_finite(epoch, float(epoch_loss) / math.ceil(len(order) / args.batch_size),
                              args)
            shown.update()
        shown.close()
        self.user_vectors = self.user_vectors.detach()
        self.item_vectors = self.item_vectors.detach()

    def check_finite(self, epoch, loss, args):
        """Stop a run whose loss or vectors are no longer finite: NaN scores would be ranked
        last and reported as a model that learnt nothing."""
        if not (math.isfinite(loss) and bool(torch.isfinite(self.user_vectors).all())
                and bool(torch.isfinite(self.item_vectors).all())):
            raise cli.UserError(f"--learning_rate {args.learning_rate} --regularisation "
                                f"{args.regularisation}: epoch {epoch}: training diverged "
                                f"(loss {loss}); lower -l/--learning_rate (or --regularisation)")

    def draw_negatives(self, users, trained_keys, generator):
        """A uniform item per user, redrawn until it is none of the user's training items."""
        negatives = torch.randint(0, self.nb_items, users.shape, generator=generator,
                                  device=self.device)
        redraw = self.trained(users * self.nb_items + negatives, trained_keys)
        while redraw.any():
            again = redraw.nonzero().view(-1)
            negatives[again] = torch.randint(0, self.nb_items, again.shape,
                                             generator=generator, device=self.device)
            redraw[again] = self.trained(users[again] * self.nb_items + negatives[again],
                                         trained_keys)
        return negatives

    @staticmethod
    def trained(keys, trained_keys):
        """Bool: which user * nb_items + item keys are in the sorted trained_keys (torch.isin
        took 1.7 s per call on ml-latest-small, this a binary search per key)."""
        found = torch.searchsorted(trained_keys, keys).clamp_(max=len(trained_keys) - 1)
        return trained_keys[found] == keys

    def __call__(self, users):
        return self.user_vectors[users.to(self.device)] @ self.item_vectors.T


def fit(args, dataset, device):
    train, nb_users, nb_items = dataset.train, dataset.nb_users, dataset.nb_items
    if args.method == "pop":
        return Popularity(train, nb_users, nb_items, device)
    if args.method == "random":
        return Random(nb_users, nb_items, device, args.seed)
    if args.method == "itemknn":
        return ItemKNN(train, nb_users, nb_items, device, args.neighbours, args.shrinkage)
    return BPR(train, nb_users, nb_items, device, args)


def sampled_ranks(scorer, test, negatives):
    """0-based rank of each test positive among its user's candidates, as ncf.py ranks them."""
    users, items, duplicate_mask = (tensor.to(scorer.device) for tensor in
                                    dataloading.create_test_data(test, negatives))
    ranks = torch.zeros(len(users), dtype=torch.int64, device=scorer.device)
    step = scoring.users_per_batch(scorer.nb_items, scorer.chunk_pairs)
    with torch.inference_mode():
        for start in range(0, len(users), step):
            stop = min(start + step, len(users))
            scores = scorer(users[start:stop]).gather(1, items[start:stop])
            ranks[start:stop] = evaluation.positive_ranks(scores, items[start:stop],
                                                           duplicate_mask[start:stop])
    return ranks


def full_ranks(scorer, train, test):
    with torch.inference_mode():
        return evaluation.full_ranking_ranks(scorer, test[:, 0], test[:, 1], train[:, 0],
                                          train[:, 1])


def evaluate(args, dataset, device):
    """The metrics and timings, in the order they are printed."""
    topks = list(dict.fromkeys([args.topk, *args.report_topk]))
    started = time.perf_counter()
    scorer = fit(args, dataset, device)
    results = {"fit_time": time.perf_counter() - started}
    started = time.perf_counter()
    ranks = sampled_ranks(scorer, dataset.test, dataset.negatives)
    results.update(evaluation.ranking_metrics(ranks.cpu(), topks))
    results["sampled_time"] = time.perf_counter() - started
    if args.full_ranking:
        started = time.perf_counter()
        ranks = full_ranks(scorer, dataset.train, dataset.test)
        metrics = evaluation.ranking_metrics(ranks.cpu(), topks)
        results.update({f"full_{name}": value for name, value in metrics.items()})
        results["full_time"] = time.perf_counter() - started
    return results


def open_logger(args, dataset, device):
    """The log with the run's settings, or None without --log_path; opened once the data has
    loaded, so a mistyped --data leaves an existing log be."""
    if not args.log_path:
        return None
    try:
        logger = JsonLogger(args.log_path)
        logger.log(PARAMETER, {**vars(args), "device": str(device),
                               "nb_users": dataset.nb_users, "nb_items": dataset.nb_items,
                               "data_fingerprint": dataset.fingerprint})
    except OSError as error:
        raise cli.UserError(f"--log_path {args.log_path}: cannot write there "
                            f"({error.strerror}); pass --log_path with a writable file") from None
    return logger


def main(argv=None):
    """Returns the metrics and timings it prints."""
    args = parse_args(argv)
    try:
        dataset = dataloading.open_dataset(args.data)
        # After loading, whose temporaries then go back to the system (ncf.py does the same).
        cli.reuse_freed_memory()
        evaluation.check_cutoffs(args, dataset.negatives.shape[1] + 1)
        device = torch.device(args.device)
        logger = open_logger(args, dataset, device)
        results = evaluate(args, dataset, device)
        try:
            for name, value in results.items():
                unit = " s" if name.endswith("_time") else ""
                print(f"{name} = {value:.4f}{unit}")
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`| head -1`); the log still gets the whole summary.
            cli.discard_stdout()
        if logger is not None:
            with logger.write_failures_reported("it holds the settings, not the results"):
                logger.log((), results)
        return results
    except torch.cuda.OutOfMemoryError:
        raise cli.UserError("out of GPU memory; use --device cpu, or for itemknn fewer "
                            "--neighbours") from None
    except RuntimeError as error:
        if not cli.is_cpu_out_of_memory(error):
            raise
        raise cli.UserError("out of memory; for itemknn pass fewer --neighbours, for bpr a "
                            "smaller --batch_size") from None


if __name__ == "__main__":
    # torch warns on every CSR tensor that the layout is in beta; ItemKNN builds one per run.
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    cli.run(main)
