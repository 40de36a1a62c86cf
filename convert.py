"""Turn a ratings file into the tensors that ncf.py trains and evaluates on.

    python convert.py [--path RATINGS] [--output DIR] [--seed 1] [--valid_negative 100]
                      [--min_ratings 20] [--user_col C --item_col C --time_col C | --first_columns]

Input RATINGS (default /data/ml-20m/ratings.csv, output DIR default /data, as in the original):
MovieLens u.data, ratings.dat or ratings.csv, or any CSV with a header whose user, item and
timestamp columns are named by --user_col, --item_col, --time_col, or are its first three
(--first_columns) (see load.py).

Protocol: drop users with fewer than --min_ratings ratings; renumber users and items to dense
0-based ids in order of first appearance; sort by timestamp, stable (ties keep file order); drop
repeated (user, item) pairs keeping the earliest; each user's latest interaction is its test
positive, the rest are training positives; for each user draw --valid_negative test negatives
uniformly over all items, with replacement, redrawing any that is one of the user's training
positives.

Output in DIR (int64 tensors, loadable with torch.load(..., weights_only=True)):
    train_ratings.pt   [N, 2] user, item; in time order
    test_ratings.pt    [U, 2] user, item; one row per user, sorted by user
    test_negatives.pt  [U, valid_negative] items
    user_ids.pt        [U] original user id of each dense user id
    item_ids.pt        [I] original item id of each dense item id
    metadata.json      source, reader, settings, counts and the tensors' fingerprint; written
                       last, so a directory without it holds no finished conversion
    .converting        present only while a conversion writes (or after one was killed); ncf.py
                       and recommend.py refuse the directory while it is there
"""
import contextlib
import json
import os
import sys

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import cli
from dataloading import CONVERTING, METADATA, tensors_fingerprint
from fileio import atomic_output, make_writable_dir
from load import DataError, load_ratings

PROG = "convert.py"
FORMAT_VERSION = 1
TENSORS = ("train_ratings", "test_ratings", "test_negatives", "user_ids", "item_ids")
# Test negatives are drawn this many at a time. Part of the seeded result: changing it changes
# which negatives a seed gives.
DRAWS_PER_BLOCK = 2**20


class FlagError(DataError):
    """A flag value that the data cannot be converted with; the message starts with the flag."""


def convert(frame, seed, valid_negative, min_ratings, progress=False):
    """Apply the preprocessing protocol to a frame of user_id, item_id, timestamp (file order).

    Returns a dict with the int64 tensors named in TENSORS and the counts ratings_read,
    users_dropped, duplicates_dropped, users, items, train, test. Raises DataError when no user
    is left, FlagError when the test negatives cannot fit in this machine's memory.
    """
    disable = None if progress else True
    steps = tqdm(total=4, desc="convert", unit="step", disable=disable, leave=False)

    steps.set_postfix_str("users")
    user, item, timestamp, user_ids, users_dropped = _keep_active_users(frame, min_ratings)
    _check_negatives_fit(len(user_ids), valid_negative)
    steps.update()

    steps.set_postfix_str("items")
    item, item_ids = _first_appearance_ids(item)
    nb_items = len(item_ids)
    steps.update()

    steps.set_postfix_str("time sort")
    order = _stable_order(timestamp)
    del timestamp
    user, item = user[order], item[order]
    del order
    steps.update()

    steps.set_postfix_str("split")
    pairs, is_train, test_rows, duplicates = _split(user, item, len(user_ids), nb_items)
    train = np.empty((int(is_train.sum()), 2), dtype=np.int64)
    train[:, 0] = user[is_train]
    train[:, 1] = item[is_train]
    test = np.empty((len(user_ids), 2), dtype=np.int64)
    test[:, 0] = np.arange(len(user_ids))
    test[:, 1] = item[test_rows]
    del user, item, is_train
    steps.update()
    steps.close()

    negatives = _test_negatives(pairs, test, nb_items, valid_negative, seed, disable)
    return {
        "train_ratings": torch.from_numpy(train),
        "test_ratings": torch.from_numpy(test),
        "test_negatives": torch.from_numpy(negatives),
        "user_ids": torch.from_numpy(np.asarray(user_ids, dtype=np.int64)),
        "item_ids": torch.from_numpy(np.asarray(item_ids, dtype=np.int64)),
        "ratings_read": len(frame),
        "users_dropped": users_dropped,
        "duplicates_dropped": duplicates,
        "users": len(user_ids),
        "items": nb_items,
        "train": len(train),
        "test": len(test),
    }


def _check_negatives_fit(users, valid_negative):
    """Refuse test negatives that cannot fit in memory before the slow steps, not during them."""
    needed = users * valid_negative * 8
    memory = cli.physical_memory()
    if needed > memory:
        raise FlagError(f"--valid_negative {valid_negative}: the test negatives need at least "
                        f"{_gigabytes(needed)} (users x negatives x 8 bytes = {users} x "
                        f"{valid_negative} x 8), more than this machine's {_gigabytes(memory)} of "
                        "memory; lower --valid_negative")


def _gigabytes(size):
    return f"{size / 1e9:,.1f} GB"


def _first_appearance_ids(values):
    """Dense 0-based ids in order of first appearance, and the original value of each id."""
    # a hash-table pass: linear, where np.unique would sort and lose the order of appearance
    codes, uniques = pd.factorize(values)
    return codes.astype(np.int32 if len(uniques) < 2**31 else np.int64), uniques


def _keep_active_users(frame, min_ratings):
    """Drop users with fewer than min_ratings rows; number the rest by first appearance."""
    user, user_ids = _first_appearance_ids(frame["user_id"].to_numpy())
    item = frame["item_id"].to_numpy()
    timestamp = frame["timestamp"].to_numpy()
    counts = np.bincount(user, minlength=len(user_ids))
    active = counts >= min_ratings
    if not active.any():
        raise DataError(f"no user has {min_ratings} ratings (the most any user has is "
                        f"{counts.max(initial=0)}); lower --min_ratings")
    users_dropped = int(len(user_ids) - active.sum())
    if users_dropped:
        # Dropping whole users keeps the relative order of the rest, so renumbering the kept
        # first-appearance ids is the same as factorizing again over the kept rows.
        kept_rows = active[user]
        renumber = (np.cumsum(active) - 1).astype(user.dtype)
        user = renumber[user[kept_rows]]
        item, timestamp = item[kept_rows], timestamp[kept_rows]
        user_ids = user_ids[active]
    return user, item, timestamp, user_ids, users_dropped


def _stable_order(values):
    """The permutation that sorts values, ties kept in input order.

    np.argsort(kind="stable") is a merge sort, several times slower on 20 M int64 than numpy's
    vectorised sort of values; appending each row's position to its value makes every key
    unique, so that sort comes out stable. When value range times length overflows int64, it
    falls back on the merge sort.
    """
    n = len(values)
    low = int(values.min())
    if (int(values.max()) - low + 1) * n > 2**63:
        return np.argsort(values, kind="stable")
    composite = values.astype(np.int64)
    composite -= low
    composite *= n
    composite += np.arange(n, dtype=np.int64)
    composite.sort()
    composite %= n
    return composite


def _split(user, item, nb_users, nb_items):
    """Deduplicate time-ordered (user, item) rows and pick each user's latest as its test row.

    Returns the sorted keys user * nb_items + item of all distinct pairs (test pairs included),
    a mask of the training rows, the row of each user's test positive (by user), and the number
    of duplicate rows dropped.
    """
    keys = user.astype(np.int64)
    keys *= nb_items
    keys += item
    order = _stable_order(keys)
    pairs = keys[order]
    del keys
    # in each run of equal keys the first comes earliest in time: it is the one kept
    first = np.empty(len(pairs), dtype=bool)
    first[0] = True
    np.not_equal(pairs[1:], pairs[:-1], out=first[1:])
    is_train = np.ones(len(pairs), dtype=bool)
    is_train[order[~first]] = False
    duplicates = len(pairs) - int(first.sum())
    pairs, kept_rows = pairs[first], order[first]
    del order, first
    # pairs are sorted by user, so each user's pairs form one run; its latest row is the test
    starts = np.searchsorted(pairs, np.arange(nb_users, dtype=np.int64) * nb_items)
    test_rows = np.maximum.reduceat(kept_rows, starts)
    is_train[test_rows] = False
    return pairs, is_train, test_rows, duplicates


def _test_negatives(pairs, test, nb_items, valid_negative, seed, disable):
    """Per user, valid_negative items uniform in [0, nb_items) that are not training positives.

    Draws are made a block of users at a time, and in each block only the rejected ones are drawn
    again, round after round; blocks keep the temporaries small and the searches within the
    block's own pairs. The test positive is not a training positive, so it may be drawn; that
    also means every user has an item left to draw, so the rounds end.
    """
    nb_users = len(test)
    user_starts = np.searchsorted(pairs, np.arange(nb_users + 1, dtype=np.int64) * nb_items)
    # numpy takes no negative seed, the flag does; below 2**64 this maps seeds one to one
    rng = np.random.default_rng(seed % 2**64)
    negatives = np.empty((nb_users, valid_negative), dtype=np.int64)
    test_items = test[:, 1]
    block = max(1, DRAWS_PER_BLOCK // valid_negative)
    bar = tqdm(total=nb_users, desc="test negatives", unit="user", disable=disable, leave=False)
    for first in range(0, nb_users, block):
        last = min(first + block, nb_users)
        known = pairs[user_starts[first]:user_starts[last]]
        drawn = negatives[first:last].reshape(-1)
        drawn[:] = rng.integers(0, nb_items, size=drawn.size, dtype=np.int64)
        pending = np.arange(drawn.size)
        while pending.size:
            users = first + pending // valid_negative
            candidates = drawn[pending]
            keys = users * nb_items + candidates
            found = np.minimum(np.searchsorted(known, keys), len(known) - 1)
            rejected = (known[found] == keys) & (candidates != test_items[users])
            pending = pending[rejected]
            drawn[pending] = rng.integers(0, nb_items, size=pending.size, dtype=np.int64)
        bar.update(last - first)
    bar.close()
    return negatives


def _parser():
    parser = cli.ArgumentParser(prog=PROG, description="Preprocess a ratings file for ncf.py.")
    parser.add_argument("--path", default="/data/ml-20m/ratings.csv",
                        help="ratings file (u.data, ratings.dat, ratings.csv or a CSV read with "
                        "the column flags or --first_columns)")
    parser.add_argument("--output", default="/data", help="directory for the .pt files")
    parser.add_argument("-s", "--seed", type=int, default=1, help="seed of the test negatives")
    parser.add_argument("--valid_negative", type=int, default=100,
                        help="test negatives per user")
    parser.add_argument("--min_ratings", type=int, default=20,
                        help="drop users with fewer ratings")
    parser.add_argument("--user_col", help="user column of a CSV with a header (default userId)")
    parser.add_argument("--item_col", help="item column of a CSV with a header (default movieId)")
    parser.add_argument("--time_col",
                        help="timestamp column of a CSV with a header (default timestamp)")
    parser.add_argument("--first_columns", action="store_true",
                        help="read a CSV with a header, whatever its column names, as user, "
                        "item, timestamp in its first three columns (the 2023 original's reader "
                        "for other datasets)")
    return parser


def _fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _prepare_output(directory):
    """Fail before the slow work when DIR cannot be created or written."""
    try:
        make_writable_dir(directory)
    except OSError as e:
        raise DataError(f"{directory}: cannot write the output ({e.strerror or e}); choose a "
                        "writable --output") from None


class _KeepWriteError:
    """A file handle for torch.save that keeps the OSError of a failed write.

    torch.save reports one as a RuntimeError without errno ("unexpected pos" on a full disk);
    write_outputs re-raises the OSError so the user reads its reason.
    """

    def __init__(self, handle):
        self.handle = handle
        self.error = None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.handle.flush()


def _save_tensor(tensor, path):
    # A handle, not the temporary name: torch.save names the zip archive after the file's
    # stem, which holds the pid, and the files of two runs would differ.
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        writer = _KeepWriteError(handle)
        try:
            torch.save(tensor, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def write_outputs(directory, tensors, metadata, disable=True):
    """Write each tensor as NAME.pt, then metadata.json, so that no reader sees a partial result.

    The CONVERTING marker is created first and removed last: while it is there, readers refuse
    the directory, which may hold an earlier conversion's files beside this one's. Each file is
    written under a temporary name and renamed, so none is ever partial. On an error the files
    this call renamed into place are removed, and the marker too when the directory is back to
    a finished state (nothing renamed yet) or holds nothing of any conversion; a kill leaves
    the marker. metadata.json also gets the tensors' fingerprint, which ncf.py saves with its
    checkpoints to refuse resuming on other data.
    """
    marker = os.path.join(directory, CONVERTING)
    unfinished_before = os.path.exists(marker)
    open(marker, "wb").close()
    written = []
    try:
        for name in tqdm(TENSORS, desc="write", unit="file", disable=disable, leave=False):
            path = os.path.join(directory, f"{name}.pt")
            _save_tensor(tensors[name], path)
            written.append(path)
        fingerprint = tensors_fingerprint(
            *(tensors[name] for name in ("train_ratings", "test_ratings", "test_negatives")))
        path = os.path.join(directory, METADATA)
        with atomic_output(path) as temporary, open(temporary, "wb") as f:
            f.write(json.dumps({**metadata, "fingerprint": fingerprint}, indent=1).encode()
                    + b"\n")
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        names = [f"{name}.pt" for name in TENSORS] + [METADATA]
        unchanged = not written and not unfinished_before
        if unchanged or not any(os.path.exists(os.path.join(directory, name)) for name in names):
            with contextlib.suppress(OSError):
                os.remove(marker)
        raise
    os.remove(marker)


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.valid_negative < 1:
        _fail(f"--valid_negative must be at least 1, not {args.valid_negative}")
    if args.min_ratings < 1:
        _fail(f"--min_ratings must be at least 1, not {args.min_ratings}")
    columns = (args.user_col, args.item_col, args.time_col)
    if args.first_columns and columns != (None, None, None):
        _fail("--first_columns reads the first three columns; drop it or drop --user_col, "
              "--item_col, --time_col")
    progress = sys.stderr.isatty()
    try:
        # one user is the fewest a conversion can keep: no need to read the file to refuse
        _check_negatives_fit(1, args.valid_negative)
        _prepare_output(args.output)
        if progress:
            print(f"{PROG}: reading {args.path}", file=sys.stderr)
        frame, reader = load_ratings(args.path, *columns, first_columns=args.first_columns)
        try:
            result = convert(frame, args.seed, args.valid_negative, args.min_ratings, progress)
        except FlagError:
            raise
        except DataError as e:
            raise DataError(f"{args.path}: {e}") from None
        del frame
        metadata = {
            "format_version": FORMAT_VERSION,
            "source": os.path.abspath(args.path),
            "reader": reader,
            "seed": args.seed,
            "valid_negative": args.valid_negative,
            "min_ratings": args.min_ratings,
            **{key: result[key] for key in ("ratings_read", "users_dropped",
                                            "duplicates_dropped", "users", "items", "train",
                                            "test")},
        }
        write_outputs(args.output, result, metadata, disable=not progress)
    except DataError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{args.output}: cannot write the output ({e.strerror or e}); check free space and "
              "permissions")
    except MemoryError:
        _fail(f"{args.path}: out of memory while converting it; free some memory, use a machine "
              "with more, or lower --valid_negative")
    print(f"{PROG}: read {result['ratings_read']} ratings; kept {result['users']} users "
          f"({result['users_dropped']} dropped), {result['items']} items; "
          f"{result['duplicates_dropped']} duplicates dropped; train {result['train']}, "
          f"test {result['test']}, test negatives {result['test']}x{args.valid_negative} "
          f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
