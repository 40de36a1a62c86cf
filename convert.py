"""Turn a ratings file into the tensors that ncf.py trains and evaluates on.

    python convert.py [--path RATINGS] [--output DIR] [--seed 1] [--valid_negative 100]
                      [--min_ratings 20] [--min_rating R] [--min_item_ratings N] [--validation]
                      [--user_col C --item_col C --time_col C|none | --first_columns]
                      [--string_ids] [--time_format integer|number|iso8601]
                      [--test_path TEST [--test_negatives_path NEG] | --paper PREFIX]
                      [--format 2019|2023]

Input RATINGS (default /data/ml-20m/ratings.csv, output DIR default /data, as in the original):
MovieLens u.data, ratings.dat or ratings.csv, or any CSV with a header whose user, item and
timestamp columns are named by --user_col, --item_col, --time_col, or are its first three
(--first_columns) (see load.py). Ids are whole numbers unless --string_ids reads them as text;
timestamps are whole numbers unless --time_format says numbers or ISO-8601 date-times; with
--time_col none there is no time column and file order is time order.

Protocol: keep only ratings of --min_rating or more (when given), then drop items with fewer
than --min_item_ratings of the rows left (when given), then users with fewer than --min_ratings;
each filter runs once, in that order. Renumber users and items to dense 0-based ids in order of
first appearance; sort by timestamp, stable (ties keep file order); drop repeated (user, item)
pairs keeping the earliest; each user's latest interaction is its test positive (with
--validation, the one before it is its validation positive), the rest are training positives;
for each user draw --valid_negative test negatives (then as many validation negatives)
uniformly over all items, with replacement, redrawing any that is one of the user's training
positives.

A split of your own: --test_path TEST holds each user's test row (--path the training rows, both
read the same way), and --test_negatives_path NEG the negatives, else they are drawn as above;
--paper PREFIX reads the NCF paper's PREFIX.train.rating, PREFIX.test.rating and
PREFIX.test.negative. The split is used as it is: no filter, no validation.

Output in DIR (tensors loadable with torch.load(..., weights_only=True)), by default in the
2019 original's layout (int64):
    train_ratings.pt   [N, 2] user, item; in time order
    test_ratings.pt    [U, 2] user, item; one row per user, sorted by user
    test_negatives.pt  [U, valid_negative] items
    user_ids.pt        [U] original user id of each dense user id
    item_ids.pt        [I] original item id of each dense item id
    user_ids.json, item_ids.json   instead of the two above with --string_ids: JSON lists of str
    validation_ratings.pt, validation_negatives.pt   with --validation: as the test ones
With --format 2023, the 2023 original's layout in place of train_ratings.pt, test_ratings.pt,
test_negatives.pt and the validation files, for the 2023 original's ncf.py (ours reads both):
    feature_spec.yaml  features (user and item cardinalities, dtypes), test_samples_per_series
                       (valid_negative + 1), source_spec (train, test, with --validation
                       validation: the files below), channel_spec
    train_data_0.pt, train_data_1.pt   [N, 2] int64 user, item; [N, 1] float32 labels, all 1
    test_data_0.pt, test_data_1.pt     [U x (valid_negative + 1), 2] and [.., 1]: each user's
                       test positive (label 1), then its negatives (label 0), by user
    validation_data_0.pt, validation_data_1.pt   with --validation: as the test ones
In either layout:
    metadata.json      source, reader, id columns, settings, counts and the fingerprint of the
                       tensors as the 2019 layout holds them; written last, so a directory
                       without it holds no finished conversion
    .converting        present only while a conversion renames its files into place (or after
                       one was killed then); ncf.py and recommend.py refuse the directory while
                       it is there
Every file is written in full before any is renamed, so a conversion that fails while writing
(a full disk) leaves the earlier one in DIR as it was.
"""
import contextlib
import json
import math
import os
import sys

import numpy as np
import pandas as pd
import torch

import cli
from checkpoint import save_into
from dataloading import (CHANNELS, CONVERTING, FEATURE_SPEC, METADATA, SERIES_LENGTH,
                         tensors_fingerprint)
from feature_spec import yaml_text
from fileio import fsync_path, make_writable_dir, removed_if_failed, staged_output
from load import (NO_TIME, TIME_FORMATS, RatingsError, first_line, id_columns, load_negatives,
                  load_paper_ratings, load_ratings)
from progress import Progress

PROG = "convert.py"
MIN_RATINGS = 20
FORMAT_VERSION = 1
TENSORS = ("train_ratings", "test_ratings", "test_negatives", "user_ids", "item_ids")
VALIDATION_TENSORS = ("validation_ratings", "validation_negatives")
LAYOUTS = ("2019", "2023")
# The 2023 layout's tensors, named as the 2023 original's convert.py names them: per source_spec
# mapping, (user, item) in _data_0.pt and the labels in _data_1.pt.
def mapping_files(mapping):
    return f"{mapping}_data_0.pt", f"{mapping}_data_1.pt"


MAPPING_FILES = {mapping: mapping_files(mapping) for mapping in ("train", "test", "validation")}
# Every file a conversion may write, in either layout, so that one conversion's files never mix
# with another's.
OUTPUT_FILES = ([f"{name}.pt" for name in TENSORS + VALIDATION_TENSORS]
                + ["user_ids.json", "item_ids.json", FEATURE_SPEC]
                + [name for pair in MAPPING_FILES.values() for name in pair])
# Test negatives are drawn this many at a time. Part of the seeded result: changing it changes
# which negatives a seed gives.
DRAWS_PER_BLOCK = 2**20
# Rows handled at a time by the steps that go through every rating in pieces, so that their
# temporaries stay a few MB whatever the file's size.
PIECE_ROWS = 2**20


class FlagError(RatingsError):
    """A flag value that the data cannot be converted with; the message starts with the flag."""


def convert(frame, seed, valid_negative, min_ratings, progress=False, min_rating=None,
            min_item_ratings=1, validation=False):
    """Apply the preprocessing protocol to a frame of user_id, item_id, timestamp (file order;
    and rating when min_rating is given).

    The frame is emptied: its columns are taken out of it, so that each one's memory goes as
    soon as the steps are done with it rather than when the caller lets go of the frame (pass
    frame.copy() to keep it).

    Returns a dict with the int64 tensors named in TENSORS (VALIDATION_TENSORS too with
    validation; an id map of text ids is a list of str) and the counts ratings_read,
    users_dropped, duplicates_dropped, users, items, train, test (and validation), plus
    rows_below_min_rating and items_dropped when those filters are asked for. Raises RatingsError
    when no user is left, FlagError when the test negatives cannot fit in this machine's memory
    or a filter leaves nothing.
    """
    steps = Progress(4, "convert", "step", enabled=progress)
    ratings_read = len(frame)
    columns = {name: frame.pop(name).to_numpy() for name in list(frame.columns)}
    columns, filtered = _filter_rows(columns, min_rating, min_item_ratings)
    user, item, timestamp, user_ids, users_dropped = _keep_active_users(columns, min_ratings)
    del columns
    _check_negatives_fit(len(user_ids), valid_negative)
    steps.update()

    item, item_ids = _first_appearance_ids(item)
    nb_items = len(item_ids)
    steps.update()

    order = _stable_order(timestamp)
    del timestamp
    user, item = user[order], item[order]
    del order
    steps.update()

    held_out = 2 if validation else 1
    pairs, is_train, held_out_rows, duplicates = _split(user, item, len(user_ids), nb_items,
                                                        held_out)
    if (held_out_rows < 0).any():
        user = int(np.flatnonzero((held_out_rows < 0).any(axis=0))[0])
        raise RatingsError(f"user {user_ids[user]} has fewer than 3 distinct items; --validation "
                           "holds out 2 of each user's items and trains on the rest: raise "
                           "--min_ratings to 3 or more, or remove that user's rows")
    if not is_train.any():
        raise RatingsError(f"no training pair is left: each of the {len(user_ids)} users kept has "
                           f"only {held_out} distinct item(s), all held out; raise --min_ratings "
                           f"above {held_out}, or add interactions")
    # [held_out, users, 2]: the test rows, then the validation rows
    rows = np.empty((held_out, len(user_ids), 2), dtype=np.int64)
    rows[:, :, 0] = np.arange(len(user_ids))
    rows[:, :, 1] = item[held_out_rows]
    del held_out_rows
    steps.update()
    steps.close()

    # The negatives before the training pairs, so that the pairs' keys are gone when the
    # training tensor is made: the largest of all, 16 bytes a rating.
    rng = _generator(seed)
    held_out_items = list(rows[:, :, 1])
    negatives = [_negatives(pairs, held_out_items, nb_items, valid_negative, rng, progress,
                            what) for what in ("test", "validation")[:held_out]]
    del pairs
    train = _rows_where(is_train, user, item)
    del user, item, is_train
    result = {
        "train_ratings": torch.from_numpy(train),
        "test_ratings": torch.from_numpy(rows[0]),
        "test_negatives": torch.from_numpy(negatives[0]),
        "user_ids": _id_map(user_ids),
        "item_ids": _id_map(item_ids),
        "ratings_read": ratings_read,
        **filtered,
        "users_dropped": users_dropped,
        "duplicates_dropped": duplicates,
        "users": len(user_ids),
        "items": nb_items,
        "train": len(train),
        "test": len(user_ids),
    }
    if validation:
        result["validation_ratings"] = torch.from_numpy(rows[1])
        result["validation_negatives"] = torch.from_numpy(negatives[1])
        result["validation"] = len(user_ids)
    return result


def _rows_where(kept, *columns):
    """int64 [kept.sum(), len(columns)]: the columns' values where kept holds, filled a piece
    at a time, with no full-length temporary beside the result."""
    rows = np.empty((int(kept.sum()), len(columns)), dtype=np.int64)
    filled = 0
    for begin, end in _pieces(len(kept)):
        taken = kept[begin:end]
        count = int(taken.sum())
        for position, values in enumerate(columns):
            rows[filled:filled + count, position] = values[begin:end][taken]
        filled += count
    return rows


def _pieces(length):
    """(begin, end) of consecutive pieces of PIECE_ROWS rows covering range(length)."""
    return ((begin, min(begin + PIECE_ROWS, length)) for begin in range(0, length, PIECE_ROWS))


def convert_split(train_frame, test_frame, given_negatives, seed, valid_negative, where,
                  progress=False):
    """A split the user made: every training row, one test row per user, and the test negatives
    given (users, items, negatives as load.load_negatives returns them) or, when None, drawn as
    convert does.

    Users are numbered in order of first appearance in the training file; items likewise, over
    the training file, then the test file, then the negatives. Training rows are sorted by time
    (stable) and repeated pairs dropped, keeping the earliest. where: (test file, line of its
    first row, negatives file), for the refusals, which name the line.
    Returns what convert returns, without users_dropped.
    """
    test_path, first_line, negatives_path = where
    user, user_ids = _first_appearance_ids(train_frame["user_id"].to_numpy())
    test_users = pd.Index(user_ids).get_indexer(test_frame["user_id"].to_numpy())
    _refuse_first(test_users < 0, test_path, first_line, lambda row: (
        f"user {test_frame['user_id'].iloc[row]} has no training row; hold out an item of a "
        "training user, or remove that line"))
    repeated = pd.Series(test_users).duplicated().to_numpy()
    _refuse_first(repeated, test_path, first_line, lambda row: (
        f"a second test row for user {user_ids[test_users[row]]} (the first is line "
        f"{first_line + int(np.flatnonzero(test_users == test_users[row])[0])}); hold out one "
        "item per user: remove one of them"))
    untested = np.setdiff1d(np.arange(len(user_ids)), test_users)
    if len(untested):
        raise RatingsError(f"{test_path}: user {user_ids[untested[0]]} has training rows but no "
                           "test row; add its held-out item or remove its training rows")
    pieces = [train_frame["item_id"].to_numpy(), test_frame["item_id"].to_numpy()]
    if given_negatives is not None:
        pieces.append(given_negatives[2].reshape(-1))
    codes, item_ids = pd.factorize(np.concatenate(pieces))
    nb_items, train_items = len(item_ids), codes[:len(train_frame)]
    test = np.empty((len(user_ids), 2), dtype=np.int64)
    test[:, 0] = np.arange(len(user_ids))
    test[test_users, 1] = codes[len(train_frame):len(train_frame) + len(test_frame)]

    order = _stable_order(train_frame["timestamp"].to_numpy())
    user, train_items = user[order].astype(np.int64), train_items[order]
    keys = user * nb_items + train_items
    key_order = _stable_order(keys)
    pairs = keys[key_order]
    first = np.empty(len(pairs), dtype=bool)
    first[0] = True
    np.not_equal(pairs[1:], pairs[:-1], out=first[1:])
    kept = np.sort(key_order[first])
    pairs = pairs[first]
    train = np.stack([user[kept], train_items[kept]], axis=1).astype(np.int64)
    test_keys = test[test_users, 0] * nb_items + test[test_users, 1]
    trained = _among(pairs, test_keys)
    _refuse_first(trained, test_path, first_line, lambda row: (
        f"item {test_frame['item_id'].iloc[row]} is among user {test_frame['user_id'].iloc[row]}'s "
        "training rows; a held-out item must not be trained on: fix or remove that line"))
    # Given negatives are kept as they are, and said to be so; drawn ones follow the protocol
    # (never a training item, the test positive as often as chance has it).
    positives_among_negatives = {"negatives_trained": 0, "negatives_positive": 0}
    if given_negatives is None:
        negatives = _negatives(pairs, [test[:, 1]], nb_items, valid_negative, _generator(seed),
                               progress)
    else:
        negatives = _given_negatives(given_negatives, user_ids, item_ids, test, negatives_path,
                                     test_path)
        positives_among_negatives = {
            "negatives_trained": int(_among(pairs, test[:, :1] * nb_items + negatives).sum()),
            "negatives_positive": int((negatives == test[:, 1:]).sum())}
    return {
        "train_ratings": torch.from_numpy(train),
        "test_ratings": torch.from_numpy(test),
        "test_negatives": torch.from_numpy(negatives),
        "user_ids": _id_map(user_ids),
        "item_ids": _id_map(item_ids),
        "ratings_read": len(train_frame) + len(test_frame),
        "duplicates_dropped": len(train_frame) - len(train),
        "users": len(user_ids),
        "items": nb_items,
        "train": len(train),
        "test": len(test),
        **positives_among_negatives,
    }


def _given_negatives(given, user_ids, item_ids, test, path, test_path):
    """The negatives file's rows as dense items, in user order; each line's pair must be a test
    pair, and every test pair needs exactly one line."""
    users, items, negatives = given
    dense_users = pd.Index(user_ids).get_indexer(users)
    dense_items = pd.Index(item_ids).get_indexer(items)
    known = dense_users >= 0
    not_tested = ~known | (test[np.where(known, dense_users, 0), 1] != dense_items)
    _refuse_first(not_tested, path, 1, lambda row: (
        f"({users[row]},{items[row]}) is not a test pair of {test_path}; fix or remove that "
        "line"))
    repeated = pd.Series(dense_users).duplicated().to_numpy()
    _refuse_first(repeated, path, 1, lambda row: (
        f"a second line for the test pair ({users[row]},{items[row]}); remove one of them"))
    missing = np.setdiff1d(np.arange(len(user_ids)), dense_users)
    if len(missing):
        raise RatingsError(f"{path}: no line for user {user_ids[missing[0]]}'s test pair; give "
                           "every test pair its negatives")
    result = np.empty(negatives.shape, dtype=np.int64)
    result[dense_users] = pd.Index(item_ids).get_indexer(negatives.reshape(-1)).reshape(
        negatives.shape)
    return result


def _refuse_first(bad, path, first_line, problem):
    """Refuse the file at the first row where bad holds; problem(row) says what is wrong."""
    rows = np.flatnonzero(bad)
    if len(rows):
        raise RatingsError(f"{path}: line {first_line + int(rows[0])}: {problem(int(rows[0]))}")


def _among(sorted_keys, keys):
    """Bool, shaped as keys: whether each key is one of sorted_keys (sorted ascending)."""
    if len(sorted_keys) == 0:
        return np.zeros(np.shape(keys), dtype=bool)
    found = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[found] == keys


def _generator(seed):
    return np.random.default_rng(seed)


def _id_map(ids):
    """The original ids as an int64 tensor when they are integers, else as a list of str."""
    if ids.dtype == object:
        return [str(value) for value in ids]
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


def _filter_rows(columns, min_rating, min_item_ratings):
    """Of the columns (name: array), the rows rated min_rating or more, then of those the rows
    of items with at least min_item_ratings of them; the counts of what each dropped."""
    filtered = {}
    if min_rating is not None:
        rating = columns.pop("rating")
        kept = rating >= min_rating
        if not kept.any():
            raise FlagError(f"--min_rating {min_rating}: no rating is that high (the highest is "
                            f"{rating.max():g}); lower --min_rating")
        filtered["rows_below_min_rating"] = int(len(kept) - kept.sum())
        columns = {name: values[kept] for name, values in columns.items()}
    if min_item_ratings > 1:
        codes, items = pd.factorize(columns["item_id"])
        counts = np.bincount(codes)
        if counts.max() < min_item_ratings:
            raise FlagError(f"--min_item_ratings {min_item_ratings}: no item has that many "
                            f"ratings (the most any item has is {counts.max()}); lower "
                            "--min_item_ratings")
        filtered["items_dropped"] = int((counts < min_item_ratings).sum())
        kept = counts[codes] >= min_item_ratings
        columns = {name: values[kept] for name, values in columns.items()}
    return columns, filtered


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
    code_type = np.int32 if len(values) < 2**31 else np.int64
    if values.dtype.kind == "i":
        low, high = int(values.min()), int(values.max())
        # the table costs at most 4 bytes a row, or 64 MB
        if high - low < max(len(values), 2**24):
            return _first_appearance_ids_by_table(values, low, high, code_type)
    # a hash-table pass: linear, where np.unique would sort and lose the order of appearance
    codes, uniques = pd.factorize(values)
    return codes.astype(code_type), uniques


def _first_appearance_ids_by_table(values, low, high, code_type):
    """_first_appearance_ids of whole numbers in [low, high], a piece at a time, with a table
    from value to id of the values met in earlier pieces: no full-length temporary beside the
    ids, where pd.factorize of all of them makes one of 8 bytes a row. Within a piece
    pd.factorize numbers the values by first appearance, and those new to the table come after
    every earlier piece's."""
    ids = np.full(high - low + 1, -1, dtype=code_type)
    codes = np.empty(len(values), dtype=code_type)
    uniques = []
    seen = 0
    for begin, end in _pieces(len(values)):
        piece_codes, piece_values = pd.factorize(values[begin:end])
        slots = piece_values.astype(np.int64) - low
        known = ids[slots]
        new = known < 0
        known[new] = np.arange(seen, seen + int(new.sum()), dtype=code_type)
        ids[slots[new]] = known[new]
        uniques.append(piece_values[new])
        seen += int(new.sum())
        codes[begin:end] = known[piece_codes]
    return codes, np.concatenate(uniques)


def _keep_active_users(columns, min_ratings):
    """Drop users with fewer than min_ratings rows; number the rest by first appearance."""
    user, user_ids = _first_appearance_ids(columns.pop("user_id"))
    item = columns.pop("item_id")
    timestamp = columns.pop("timestamp")
    counts = np.bincount(user, minlength=len(user_ids))
    active = counts >= min_ratings
    if not active.any():
        raise RatingsError(f"no user has {min_ratings} ratings (the most any user has is "
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
    if values.dtype.kind == "f":
        # the composite key needs whole numbers: 1.2 and 1.7 would tie
        return np.argsort(values, kind="stable")
    low = int(values.min())
    if (int(values.max()) - low + 1) * n > 2**63:
        return np.argsort(values, kind="stable")
    composite = np.empty(n, dtype=np.int64)
    # a piece at a time: no full-length temporary (the positions) beside it
    for begin, end in _pieces(n):
        piece = composite[begin:end]
        piece[:] = values[begin:end]
        piece -= low
        piece *= n
        piece += np.arange(begin, end, dtype=np.int64)
    composite.sort()
    composite %= n
    return composite


def _split(user, item, nb_users, nb_items, held_out=1):
    """Deduplicate time-ordered (user, item) rows and hold out each user's `held_out` latest: the
    latest is its test row, the one before (held_out 2) its validation row.

    Returns the sorted keys user * nb_items + item of all distinct pairs (held-out pairs
    included), a mask of the training rows, the rows held out [held_out, nb_users] (latest
    first; -1 where a user has too few distinct pairs), and the number of duplicate rows dropped.
    """
    is_train = np.ones(len(user), dtype=bool)
    pairs, kept_rows = _distinct_pairs(user, item, nb_users, nb_items, is_train)
    duplicates = len(user) - len(pairs)
    # pairs are sorted by user, so each user's pairs form one run; its latest row is the test
    starts = np.searchsorted(pairs, np.arange(nb_users, dtype=np.int64) * nb_items)
    held_out_rows = np.empty((held_out, nb_users), dtype=np.int64)
    held_out_rows[0] = np.maximum.reduceat(kept_rows, starts)
    if held_out > 1:
        sizes = np.diff(np.append(starts, len(pairs)))
        latest = np.repeat(held_out_rows[0].astype(kept_rows.dtype), sizes)
        # the latest left once the test row is set aside; a user's only row gives -1
        rest = np.where(kept_rows == latest, -1, kept_rows)
        del latest
        held_out_rows[1] = np.maximum.reduceat(rest, starts)
        # a user with two distinct pairs would train on none
        held_out_rows[:, sizes < 3] = -1
    is_train[held_out_rows[held_out_rows >= 0]] = False
    return pairs, is_train, held_out_rows, duplicates


def _distinct_pairs(user, item, nb_users, nb_items, is_train):
    """The sorted distinct keys user * nb_items + item of time-ordered rows, and for each the
    row of its earliest occurrence (an index into user and item); is_train is cleared at every
    later occurrence.

    The keys are sorted stably as _stable_order sorts: as key * rows + row, each one unique,
    built a piece at a time; where that overflows int64, by merge sort. The distinct keys are
    then written over the sorted ones from the start of the same array, a piece at a time: 8
    bytes a row for the keys and 4 for the kept rows, where sorting keys and positions apart,
    then copying the distinct ones out of both, held up to 34.
    """
    n = len(user)
    order = None
    if nb_users * nb_items * n <= 2**63:
        pairs = np.empty(n, dtype=np.int64)
        for begin, end in _pieces(n):
            piece = pairs[begin:end]
            piece[:] = user[begin:end]
            piece *= nb_items
            piece += item[begin:end]
            piece *= n
            piece += np.arange(begin, end, dtype=np.int64)
        pairs.sort()
    else:
        keys = user.astype(np.int64)
        keys *= nb_items
        keys += item
        order = np.argsort(keys, kind="stable")
        pairs = keys[order]
        del keys
    kept_rows = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    kept = 0
    previous = -1
    for begin, end in _pieces(n):
        if order is None:
            keys = pairs[begin:end] // n
            rows = pairs[begin:end] - keys * n
        else:
            keys, rows = pairs[begin:end].copy(), order[begin:end]
        # in each run of equal keys the first comes earliest in time: it is the one kept
        first = np.empty(len(keys), dtype=bool)
        first[0] = keys[0] != previous
        np.not_equal(keys[1:], keys[:-1], out=first[1:])
        previous = keys[-1]
        is_train[rows[~first]] = False
        count = int(first.sum())
        # at or before this piece's start: over keys already read
        pairs[kept:kept + count] = keys[first]
        kept_rows[kept:kept + count] = rows[first]
        kept += count
    return pairs[:kept], kept_rows[:kept]


def _negatives(pairs, held_out_items, nb_items, valid_negative, rng, progress, what="test"):
    """Per user, valid_negative items uniform in [0, nb_items) that are not training positives.

    pairs: the sorted keys of every user's distinct pairs, held-out ones included;
    held_out_items: arrays of each user's held-out item (test, then validation), which are not
    training positives.
    Draws are made a block of users at a time, and in each block only the rejected ones are drawn
    again, round after round; blocks keep the temporaries small and the searches within the
    block's own pairs. The held-out positives may be drawn; that also means every user has an
    item left to draw, so the rounds end.
    """
    nb_users = len(held_out_items[0])
    user_starts = np.searchsorted(pairs, np.arange(nb_users + 1, dtype=np.int64) * nb_items)
    negatives = np.empty((nb_users, valid_negative), dtype=np.int64)
    block = max(1, DRAWS_PER_BLOCK // valid_negative)
    bar = Progress(nb_users, f"{what} negatives", "user", enabled=progress)
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
            rejected = _among(known, keys)
            for items in held_out_items:
                rejected &= candidates != items[users]
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
                        help="test negatives per user (and validation negatives)")
    parser.add_argument("--min_ratings", type=int,
                        help=f"drop users with fewer ratings (default {MIN_RATINGS}), after the "
                        "--min_rating and --min_item_ratings filters")
    parser.add_argument("--min_rating", type=float, metavar="R",
                        help="keep only interactions rated R or more (the rating column is read "
                        "only then); applied first")
    parser.add_argument("--rating_col", default="rating",
                        help="rating column of a CSV with a header, for --min_rating")
    parser.add_argument("--min_item_ratings", type=int, metavar="N",
                        help="drop items with fewer than N ratings, after --min_rating and "
                        "before --min_ratings, once (a kept user may leave an item below N)")
    parser.add_argument("--validation", action="store_true",
                        help="also hold out each user's second-latest interaction "
                        "(validation_ratings.pt, validation_negatives.pt); users need 3 "
                        "distinct items")
    parser.add_argument("--user_col", help="user column of a CSV with a header (default userId)")
    parser.add_argument("--item_col", help="item column of a CSV with a header (default movieId)")
    parser.add_argument("--time_col",
                        help="timestamp column of a CSV with a header (default timestamp); "
                        f"'{NO_TIME}': there is none, file order is time order (the last row "
                        "of a user is its test item)")
    parser.add_argument("--string_ids", action="store_true",
                        help="read user and item ids as text (UUIDs, codes); the id maps are "
                        "then user_ids.json and item_ids.json")
    parser.add_argument("--time_format", choices=TIME_FORMATS, default="integer",
                        help="timestamps are whole numbers (default, exact), any numbers, or "
                        "ISO-8601 date-times (without an offset: UTC)")
    parser.add_argument("--test_path", metavar="TEST",
                        help="your own split: --path is the training file, TEST (same format) "
                        "holds one held-out row per user; test negatives are drawn unless "
                        "--test_negatives_path gives them")
    parser.add_argument("--test_negatives_path", metavar="NEG",
                        help="test negatives for --test_path, one line per test pair: "
                        "(user,item) then its negatives, tab-separated")
    parser.add_argument("--paper", metavar="PREFIX",
                        help="the NCF paper's split: PREFIX.train.rating, PREFIX.test.rating, "
                        "PREFIX.test.negative (hexiangnan/neural_collaborative_filtering)")
    parser.add_argument("--format", choices=LAYOUTS, default=LAYOUTS[0],
                        help="layout of the output: 2019, the 2019 original's train_ratings.pt, "
                        "test_ratings.pt, test_negatives.pt; 2023, the 2023 original's "
                        "feature_spec.yaml and its train_data_*.pt, test_data_*.pt (each "
                        "user's test positive, then its negatives); both read by ncf.py")
    parser.add_argument("--first_columns", action="store_true",
                        help="read a CSV with a header, whatever its column names, as user, "
                        "item, timestamp in its first three columns (the 2023 original's reader "
                        "for other datasets)")
    return parser


@contextlib.contextmanager
def output_directory(directory):
    """Fail before the slow work when DIR cannot be created or written; a DIR created here is
    removed again when the conversion fails before writing into it."""
    try:
        created = make_writable_dir(directory)
    except OSError as e:
        raise RatingsError(f"{directory}: cannot write the output ({e.strerror or e}); choose a "
                           "writable --output") from None
    with removed_if_failed(created):
        yield


def stage_file(directory, name, content):
    """Write content (bytes, or a tensor to save) in full under a temporary name beside
    directory/name, flushed to disk, and return that name; on an error none of it is left."""
    with staged_output(os.path.join(directory, name)) as temporary, \
            open(temporary, "wb") as handle:
        if isinstance(content, bytes):
            handle.write(content)
        else:
            save_into(content, handle)
    return temporary


def write_outputs(directory, tensors, metadata, layout="2019", progress=False):
    """Write the tensors in `layout` (LAYOUTS), the id maps (NAME.pt, or NAME.json for text
    ids), then metadata.json, so that no reader sees a partial result and a failed conversion
    leaves the earlier one usable.

    Every file is first written in full under a temporary name; only once all of them are does
    _replace_outputs rename them into place. An error before then removes the temporaries and
    leaves the directory as it was (a full disk costs no earlier conversion). metadata.json also
    gets the fingerprint of the tensors as the 2019 layout holds them (the same for either
    layout), which ncf.py saves with its checkpoints to refuse resuming on other data.
    """
    if layout == "2023":
        files = layout_2023(tensors)
        metadata = {**metadata, "layout": layout}
    else:
        files = [(f"{name}.pt", tensors[name]) for name in TENSORS[:3] + VALIDATION_TENSORS
                 if name in tensors]
    for name in ("user_ids", "item_ids"):
        # text ids: plain JSON, which any tool reads and torch.load never runs
        files.append((f"{name}.json", json.dumps(tensors[name]).encode() + b"\n")
                     if isinstance(tensors[name], list) else (f"{name}.pt", tensors[name]))
    fingerprint = tensors_fingerprint(
        *(tensors[name] for name in ("train_ratings", "test_ratings", "test_negatives")
          + VALIDATION_TENSORS if name in tensors))
    files.append((METADATA, json.dumps({**metadata, "fingerprint": fingerprint},
                                       indent=1).encode() + b"\n"))
    write_files(directory, files, progress)


def write_files(directory, files, progress=True):
    """Each (name, content) of `files` staged in full under a temporary name, then all
    renamed into place (replace_outputs); an error before then removes the temporaries."""
    staged = {}
    try:
        with Progress(len(files), "write", "file", enabled=progress) as bar:
            for name, content in files:
                staged[name] = stage_file(directory, name, content)
                bar.update()
    except BaseException:
        for temporary in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        raise
    replace_outputs(directory, staged)


def layout_2023(tensors):
    """(file name, content) of the 2023 layout of the tensors that convert returns, as the 2023
    original's convert.py writes it: per mapping, (user, item) int64 [N, 2] and float32 labels
    [N, 1]; for the test (and validation) mapping each user's positive, then its negatives; and
    feature_spec.yaml describing them."""
    train = tensors["train_ratings"]
    files = [(MAPPING_FILES["train"][0], train),
             (MAPPING_FILES["train"][1], torch.ones(len(train), 1))]
    mappings = ["train"] + [mapping for mapping in ("test", "validation")
                            if f"{mapping}_ratings" in tensors]
    length = tensors["test_negatives"].shape[1] + 1
    for mapping in mappings[1:]:
        pairs, negatives = tensors[f"{mapping}_ratings"], tensors[f"{mapping}_negatives"]
        items = torch.cat((pairs[:, 1:], negatives), dim=1).reshape(-1)
        labels = torch.zeros(len(pairs), length)
        labels[:, 0] = 1
        files += [(MAPPING_FILES[mapping][0],
                   torch.stack((pairs[:, 0].repeat_interleave(length), items), dim=1)),
                  (MAPPING_FILES[mapping][1], labels.reshape(-1, 1))]
    spec = feature_spec(("user", "item", "label"), (tensors["users"], tensors["items"]),
                        {SERIES_LENGTH: length}, mappings)
    return files + [(FEATURE_SPEC, yaml_text(spec).encode())]


def feature_spec(names, cardinalities, metadata, mappings, channel_spec=None):
    """A 2023 feature spec, in the order of the 2023 original's template: names, the user, item
    and label features; cardinalities, the users' and items'; mappings, the names of the
    source_spec mappings, each saved as mapping_files names them; channel_spec, by default one
    channel per feature."""
    user, item, label = names

    def chunk(features, file):
        return {"type": "torch_tensor", "features": features, "files": [file]}

    return {
        "feature_spec": {user: {"dtype": "torch.int64", "cardinality": cardinalities[0]},
                         item: {"dtype": "torch.int64", "cardinality": cardinalities[1]},
                         label: {"dtype": "torch.float32"}},
        "metadata": metadata,
        "source_spec": {mapping: [chunk([user, item], mapping_files(mapping)[0]),
                                  chunk([label], mapping_files(mapping)[1])]
                        for mapping in mappings},
        "channel_spec": channel_spec or dict(zip(CHANNELS, ([user], [item], [label]))),
    }


def replace_outputs(directory, staged):
    """Rename the staged files (name: temporary) into place, metadata.json (if staged) last,
    and remove what an earlier conversion wrote that this one does not.

    The CONVERTING marker is there only meanwhile, when the directory may hold this
    conversion's files beside an earlier one's: readers refuse it, and a kill leaves it. On an
    error the files renamed are removed, and the marker too when the directory was left as it
    was or holds nothing of any conversion.
    """
    marker = os.path.join(directory, CONVERTING)
    unfinished_before = os.path.exists(marker)
    changed = []
    try:
        open(marker, "wb").close()
        # on the disk before any rename, or a power loss could leave a mix without it
        fsync_path(directory)
        for name in OUTPUT_FILES + [METADATA]:
            # an earlier conversion's validation split, id map of the other kind or layout; its
            # metadata.json where transcode.py writes none
            path = os.path.join(directory, name)
            if name not in staged and os.path.exists(path):
                os.remove(path)
                changed.append(name)
        for name, temporary in staged.items():
            os.replace(temporary, os.path.join(directory, name))
            changed.append(name)
        fsync_path(directory)
    except BaseException:
        for name, temporary in staged.items():
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name) if name in changed else temporary)
        if (not changed and not unfinished_before) or not any(
                os.path.exists(os.path.join(directory, name))
                for name in OUTPUT_FILES + [METADATA]):
            with contextlib.suppress(OSError):
                os.remove(marker)
        raise
    os.remove(marker)


@contextlib.contextmanager
def one_line_errors(source, output, memory_hint=""):
    """What a conversion can meet (bad data, a full or read-only disk, too little memory) as the
    one-line error and exit status 2."""
    try:
        yield
    except OSError as e:
        raise cli.UserError(f"{output}: cannot write the output ({e.strerror or e}); check free "
                            f"space and permissions") from None
    except MemoryError:
        raise cli.UserError(f"{source}: out of memory while converting it; free some memory, use "
                            f"a machine with more{memory_hint}") from None


def main(argv=None):
    args = _arguments(argv)
    cli.return_freed_memory()
    columns = (args.user_col, args.item_col, args.time_col)
    split = args.test_path or args.paper
    if split:
        return _convert_given_split(args, columns)
    min_ratings = MIN_RATINGS if args.min_ratings is None else args.min_ratings
    with one_line_errors(args.path, args.output, ", or lower --valid_negative"):
        # one user is the fewest a conversion can keep: no need to read the file to refuse
        _check_negatives_fit(1, args.valid_negative)
        with output_directory(args.output):
            with Progress(1, f"read {args.path}", "file") as bar:
                frame, reader = load_ratings(
                    args.path, *columns, first_columns=args.first_columns,
                    rating_col=args.rating_col if args.min_rating is not None else None,
                    string_ids=args.string_ids, time_format=args.time_format)
                bar.update()
            try:
                result = convert(frame, args.seed, args.valid_negative, min_ratings, True,
                                 args.min_rating, args.min_item_ratings or 1, args.validation)
            except FlagError:
                raise
            except RatingsError as e:
                raise RatingsError(f"{args.path}: {e}") from None
            del frame
            metadata = {
                "format_version": FORMAT_VERSION,
                "source": os.path.abspath(args.path),
                "reader": reader,
                **_id_columns(args.path, reader, args),
                "seed": args.seed,
                "valid_negative": args.valid_negative,
                "min_ratings": min_ratings,
                **_new_settings(args),
                **{key: result[key] for key in ("ratings_read", "rows_below_min_rating",
                                                "items_dropped", "users_dropped",
                                                "duplicates_dropped", "users", "items", "train",
                                                "test", "validation") if key in result},
            }
            write_outputs(args.output, result, metadata, args.format, progress=True)
    _report(f"{PROG}: read {result['ratings_read']} ratings; kept {result['users']} users "
            f"({result['users_dropped']} dropped), {result['items']} items; "
            f"{result['duplicates_dropped']} duplicates dropped; train {result['train']}, "
            f"test {result['test']}, test negatives {result['test']}x{args.valid_negative}"
            + (f", validation {result['validation']}" if args.validation else "")
            + f" -> {args.output}")
    return 0


def _id_columns(path, reader, args):
    """metadata.json's names of the columns the ids were read from, which recommend.py and
    serve.py give their own output columns."""
    return dict(zip(("user_column", "item_column"),
                    id_columns(path, reader, args.user_col, args.item_col)))


def _report(summary):
    """Print the summary of a conversion, complete by then: a reader that went away before
    reading it (`convert.py ... | true`) is no error."""
    try:
        print(summary)
        sys.stdout.flush()
    except BrokenPipeError:
        cli.discard_stdout()


# (flag, what it goes with): each is refused without it
_NEEDS = (("test_negatives_path", "test_path"), ("rating_col", "min_rating"))
# flags that make no sense with a split given by the user: it is taken as it is
_NOT_WITH_SPLIT = ("min_ratings", "min_rating", "min_item_ratings", "validation")
_PAPER_FORMAT = ("user_col", "item_col", "time_col", "first_columns", "string_ids",
                 "test_path", "test_negatives_path")


# Flags with a default that some conversions refuse when given.
_REFUSABLE_DEFAULTED = ("seed", "valid_negative", "rating_col")


def _arguments(argv):
    """The flags, checked."""
    parser = _parser()
    args = parser.parse_args(argv)
    cli.check_seed(parser, args.seed)
    _check_flags(args, parser.given(argv, _REFUSABLE_DEFAULTED))
    return args


def _check_flags(args, given_defaulted):
    """Refuse, in one line, flag values and combinations that cannot be converted with;
    given_defaulted: those of _REFUSABLE_DEFAULTED the command line gives."""
    def flag(name):
        return "--" + name

    def is_given(name):
        if name in _REFUSABLE_DEFAULTED:
            return name in given_defaulted
        # `is not False`: --min_rating 0 is given, and 0 == False
        return getattr(args, name) is not None and getattr(args, name) is not False

    for name in ("user_col", "item_col", "time_col", "rating_col"):
        # "" would quietly stand for the default column
        if getattr(args, name) == "":
            raise cli.UserError(f"{flag(name)} is empty; name a column of the file's header, or "
                                f"drop {flag(name)}")
    if args.min_rating is not None and not math.isfinite(args.min_rating):
        raise cli.UserError(f"--min_rating must be a finite number, not {args.min_rating}; give "
                            f"the lowest rating to keep")
    for name, low in (("valid_negative", 1), ("min_ratings", 1), ("min_item_ratings", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise cli.UserError(f"{flag(name)} must be at least {low}, not {value}")
    if args.first_columns and (args.user_col, args.item_col, args.time_col) != (None,) * 3:
        raise cli.UserError("--first_columns reads the first three columns; drop it or drop "
                            "--user_col, --item_col, --time_col")
    for name, needed in _NEEDS:
        # an empty --test_path makes no split (see main); --min_rating 0 is a threshold given
        if is_given(name) and getattr(args, needed) in (None, ""):
            raise cli.UserError(f"{flag(name)} goes with {flag(needed)}; add it or drop "
                                f"{flag(name)}")
    if args.paper:
        given = [name for name in _PAPER_FORMAT if getattr(args, name)]
        if given:
            raise cli.UserError(f"{flag(given[0])}: --paper reads the paper's own format and "
                                f"split; drop {flag(given[0])}")
    if args.test_path or args.paper:
        given = [name for name in _NOT_WITH_SPLIT if is_given(name)]
        if given:
            raise cli.UserError(f"{flag(given[0])}: a split given with --test_path or --paper is "
                                f"used as it is; filter or split the files yourself, or drop "
                                f"{flag(given[0])}")
    negatives = f"{args.paper}.test.negative" if args.paper else args.test_negatives_path
    if negatives:
        given = [name for name in ("valid_negative", "seed") if is_given(name)]
        if given:
            raise cli.UserError(f"{flag(given[0])}: the test negatives come from {negatives}, "
                                f"not drawn; drop {flag(given[0])}")


def _new_settings(args):
    """The settings of issue 13 that differ from the original's recipe, for metadata.json (a
    conversion by the original recipe records none of them)."""
    settings = {"min_rating": args.min_rating, "min_item_ratings": args.min_item_ratings,
                "string_ids": args.string_ids or None,
                "time_format": None if args.time_format == "integer" else args.time_format,
                "time_col": args.time_col if args.time_col == NO_TIME else None}
    return {key: value for key, value in settings.items() if value is not None}


def _convert_given_split(args, columns):
    if args.paper:
        paths = [args.paper + suffix for suffix in (".train.rating", ".test.rating",
                                                    ".test.negative")]
    else:
        paths = [args.path, args.test_path, args.test_negatives_path]
    with one_line_errors(paths[0], args.output):
        _check_negatives_fit(1, args.valid_negative)
        with output_directory(args.output):
            if args.paper:
                (train, reader), (test, test_reader) = ((load_paper_ratings(path), "paper")
                                                        for path in paths[:2])
            else:
                train, reader = load_ratings(paths[0], *columns, first_columns=args.first_columns,
                                             string_ids=args.string_ids,
                                             time_format=args.time_format)
                test, test_reader = load_ratings(paths[1], *columns,
                                                 first_columns=args.first_columns,
                                                 string_ids=args.string_ids,
                                                 time_format=args.time_format)
            negatives = None if paths[2] is None else load_negatives(paths[2], args.string_ids)
            valid_negative = args.valid_negative if negatives is None else negatives[2].shape[1]
            _check_negatives_fit(len(test), valid_negative)
            result = convert_split(train, test, negatives, args.seed, valid_negative,
                                   (paths[1], first_line(test_reader), paths[2]), True)
            metadata = {
                "format_version": FORMAT_VERSION,
                "source": os.path.abspath(paths[0]),
                "test_source": os.path.abspath(paths[1]),
                "reader": reader,
                **_id_columns(paths[0], reader, args),
                **({"seed": args.seed} if negatives is None else
                   {"negatives_source": os.path.abspath(paths[2])}),
                "valid_negative": valid_negative,
                **_new_settings(args),
                **{key: result[key] for key in ("ratings_read", "duplicates_dropped", "users",
                                                "items", "train", "test")},
            }
            write_outputs(args.output, result, metadata, args.format, progress=True)
    _report(f"{PROG}: given split: {result['users']} users, {result['items']} items; "
            f"{result['duplicates_dropped']} duplicates dropped; train {result['train']}, "
            f"test {result['test']}, test negatives {result['test']}x{valid_negative} "
            f"-> {args.output}")
    if result["negatives_trained"] or result["negatives_positive"]:
        print(f"{PROG}: note: {paths[2]}: {result['negatives_trained']} of the given test "
              f"negatives are training items of their user and {result['negatives_positive']} "
              f"the user's test positive; kept as given (drawn ones are never training items)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
