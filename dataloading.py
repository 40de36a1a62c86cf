"""Tensors for training and evaluation, built from what convert.py wrote.

Everything here is tensor operations on the training device: the original does the same on
the GPU, and on a CPU a Python loop over ml-20m's 99 M samples per epoch would dominate.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

import cli

DATA_FILES = ("train_ratings.pt", "test_ratings.pt", "test_negatives.pt")
# Written by `convert.py --validation`: each user's second-latest interaction and its negatives.
VALIDATION_FILES = ("validation_ratings.pt", "validation_negatives.pt")
METADATA = "metadata.json"
# convert.py creates it before touching a directory and removes it after metadata.json is
# written: while it exists the directory may mix two conversions.
CONVERTING = ".converting"
# Samples a CPU processes at once, in training and evaluation. At the ml-20m shape (2-core
# Sapphire Rapids, freed memory reused: cli.reuse_freed_memory) 2**16 trained fastest in float32
# and bfloat16, 2**15 and 2**17 within noise, 2**14 and 2**18 slower, with a peak RSS of 2.2 GB
# against 3.9 GB at 2**18: activations that fit in cache beat fewer, larger products.
CPU_CHUNK = 2 ** 16


class DataError(cli.UserError):
    """Unusable input data; the message says which file and what to do."""


class Dataset(NamedTuple):
    train: torch.Tensor
    test: torch.Tensor
    negatives: torch.Tensor
    nb_users: int
    nb_items: int
    fingerprint: str
    metadata: Optional[dict]  # None: converted by the original convert.py
    # [U, 2] pairs and [U, C] negatives of the validation split; None without one
    validation: Optional[torch.Tensor] = None
    validation_negatives: Optional[torch.Tensor] = None


def load_tensor(data_dir, name, dims):
    """One dense int64 tensor of `dims` dimensions written by convert.py into data_dir."""
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; convert the ratings first with "
                        f"`python convert.py --path RATINGS --output {data_dir}`")
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise DataError(f"{path}: cannot be read ({type(error).__name__}); "
                        f"re-run convert.py to rewrite it") from None
    if (not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided
            or tensor.dim() != dims or tensor.dtype != torch.int64):
        raise DataError(f"{path}: expected a dense {dims}-D int64 tensor; re-run convert.py to "
                        f"rewrite it")
    return tensor


def open_dataset(data_dir):
    """The converted dataset in data_dir, refused (DataError) unless it is whole and consistent.

    A directory written by this project's convert.py has metadata.json, whose counts must match
    the tensors; one written by the original has only the three DATA_FILES and passes the same
    content checks. A conversion that did not finish is refused, whichever files it left.
    """
    if os.path.exists(os.path.join(data_dir, CONVERTING)):
        raise DataError(f"{os.path.join(data_dir, CONVERTING)}: a conversion into {data_dir} "
                        f"started and did not finish; re-run convert.py with --output {data_dir}")
    metadata = read_metadata(data_dir)
    train, test, negatives = (load_tensor(data_dir, name, 2) for name in DATA_FILES)
    check_shapes(data_dir, train, test, negatives)
    validation = load_validation(data_dir, metadata, negatives.shape[1])
    lowest, nb_users, nb_items = id_bounds(train, test, negatives, *validation)
    if lowest < 0:
        raise DataError(f"{data_dir}: holds the negative id {lowest}; ids are 0-based indices, "
                        f"re-run convert.py")
    check_one_row_per_user(os.path.join(data_dir, DATA_FILES[1]), test, "test")
    if validation:
        check_one_row_per_user(os.path.join(data_dir, VALIDATION_FILES[0]), validation[0],
                               "validation")
    if metadata is None:
        fingerprint = tensors_fingerprint(train, test, negatives, *validation)
    else:
        counts = {"train": len(train), "test": len(test), "valid_negative": negatives.shape[1],
                  "users": nb_users, "items": nb_items}
        # "validation": true says a split is there; a number is its count of users.
        if validation and not isinstance(metadata["validation"], bool):
            counts["validation"] = len(validation[0])
        check_counts(data_dir, metadata, counts)
        # Hashing ml-20m's tensors takes longer than loading them; convert.py hashed them as it
        # wrote them. A metadata.json older than the fingerprint has none: hash them now.
        fingerprint = metadata.get("fingerprint") or tensors_fingerprint(
            train, test, negatives, *validation)
    return Dataset(train, test, negatives, nb_users, nb_items, fingerprint, metadata,
                   *(validation or (None, None)))


def load_validation(data_dir, metadata, nb_test_negatives):
    """(validation pairs, validation negatives), or () when the directory has no validation split.

    The two files come together, and metadata.json (when there is one) says whether they
    belong to its conversion: a lone file, or files that metadata.json does not mention, are
    left from another conversion; metadata.json announcing a split without its files is cut short.
    """
    present = [os.path.isfile(os.path.join(data_dir, name)) for name in VALIDATION_FILES]
    declared = metadata is not None and metadata.get("validation") not in (None, False)
    if not any(present) and not declared:
        return ()
    if not all(present):
        missing = os.path.join(data_dir, VALIDATION_FILES[present.index(False)])
        witness = VALIDATION_FILES[present.index(True)] if any(present) else METADATA
        raise DataError(f"{missing}: not found, but {witness} says {data_dir} has a validation "
                        f"split; re-run `convert.py --validation` with --output {data_dir}")
    if metadata is not None and not declared:
        raise DataError(f"{os.path.join(data_dir, VALIDATION_FILES[0])}: left from another "
                        f"conversion ({METADATA} has no validation split); re-run convert.py "
                        f"with --output {data_dir}, with --validation to keep a split")
    pairs, negatives = (load_tensor(data_dir, name, 2) for name in VALIDATION_FILES)
    pairs_path, negatives_path = (os.path.join(data_dir, name) for name in VALIDATION_FILES)
    problems = [
        (pairs_path, pairs.shape[1] != 2, f"has {pairs.shape[1]} columns, not 2 (user, item)"),
        (pairs_path, len(pairs) == 0, "holds no validation pair"),
        (negatives_path, len(negatives) != len(pairs),
         f"has {len(negatives)} rows but {VALIDATION_FILES[0]} has {len(pairs)}"),
        (negatives_path, negatives.shape[1] != nb_test_negatives,
         f"has {negatives.shape[1]} columns but {DATA_FILES[2]} has {nb_test_negatives}"),
    ]
    for path, failed, problem in problems:
        if failed:
            raise DataError(f"{path}: {problem}; re-run `convert.py --validation`")
    return pairs, negatives


def check_one_row_per_user(path, pairs, kind):
    """convert.py writes one row per user, in user order; the negatives' rows follow that
    order, so rows out of order would pair each user with another's negatives."""
    users = pairs[:, 0]
    if (users[1:] > users[:-1]).all():
        return
    if len(torch.unique(users)) != len(users):
        raise DataError(f"{path}: a user has more than one {kind} row; each user has exactly "
                        f"one, re-run convert.py")
    raise DataError(f"{path}: the {kind} rows are not in user order, so they no longer line up "
                    f"with their negatives' rows; re-run convert.py")


def read_metadata(data_dir):
    """metadata.json as a dict, or None when there is none."""
    path = os.path.join(data_dir, METADATA)
    try:
        with open(path, "rb") as handle:
            metadata = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot be read ({type(error).__name__}); re-run convert.py "
                        f"to rewrite it") from None
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: not a JSON object; re-run convert.py to rewrite it")
    return metadata


def check_shapes(data_dir, train, test, negatives):
    """[N, 2] training pairs, [U, 2] test pairs, [U, C] test negatives, none of them empty."""
    train_path, test_path, negatives_path = (os.path.join(data_dir, name) for name in DATA_FILES)
    problems = [
        (train_path, train.shape[1] != 2, f"has {train.shape[1]} columns, not 2 (user, item)"),
        (test_path, test.shape[1] != 2, f"has {test.shape[1]} columns, not 2 (user, item)"),
        (train_path, len(train) == 0, "holds no training pair"),
        (test_path, len(test) == 0, "holds no test pair"),
        (negatives_path, len(negatives) != len(test),
         f"has {len(negatives)} rows but {DATA_FILES[1]} has {len(test)}"),
        (negatives_path, negatives.shape[1] == 0, "has no column of test negatives"),
    ]
    for path, failed, problem in problems:
        if failed:
            raise DataError(f"{path}: {problem}; re-run convert.py")


def check_counts(data_dir, metadata, actual):
    """The counts metadata.json records against those of the tensors beside it."""
    path = os.path.join(data_dir, METADATA)
    for key, value in actual.items():
        recorded = metadata.get(key)
        if recorded != value:
            raise DataError(f"{path}: records {key} = {json.dumps(recorded)} but the tensors "
                            f"beside it have {value}; the files come from different "
                            f"conversions, re-run convert.py with --output {data_dir}")


def id_bounds(train, test, negatives, *evaluated):
    """(smallest id anywhere, nb_users, nb_items): nb_* = max id + 1 as the original, over the
    test ids (and those of `evaluated`: validation pairs, then their negatives) as well.

    The original counts training ids only; an item seen only as some user's test positive (or
    drawn as a test negative) would then index past the embedding table. Where every test id
    also occurs in training, as in ml-20m, both counts agree.
    """
    # aminmax over dim 0 reads the rows once; train[:, 0].max() strides and is 3x slower
    pair_bounds = [torch.aminmax(pairs, dim=0) for pairs in (train, test, *evaluated[:1])]
    candidate_bounds = [torch.aminmax(candidates) for candidates in (negatives, *evaluated[1:])]
    lowest = int(min(*(low.min() for low, _ in pair_bounds),
                     *(low for low, _ in candidate_bounds)))
    nb_users = int(max(high[0] for _, high in pair_bounds)) + 1
    nb_items = int(max(*(high[1] for _, high in pair_bounds),
                       *(high for _, high in candidate_bounds))) + 1
    return lowest, nb_users, nb_items


def tensors_fingerprint(*tensors):
    """SHA-256 of the tensors' shapes and contents, in the order given: equal exactly for equal
    data. Called with train, test, negatives, then any further tensors of the directory."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().data)
    return digest.hexdigest()


@dataclass
class Candidates:
    """One evaluation split as create_test_data makes it: users [U], items [U, C] (each row's
    positive last) and the bool mask of repeats [U, C]."""
    users: torch.Tensor
    items: torch.Tensor
    duplicate_mask: torch.Tensor


@dataclass
class Splits:
    """A converted dataset on the training device, ids in the smallest dtype that holds them."""
    nb_users: int
    nb_items: int
    train_users: torch.Tensor
    train_items: torch.Tensor
    test: Candidates
    validation: Optional[Candidates]
    fingerprint: str
    metadata: Optional[dict]  # None: converted by the original convert.py


def load_splits(data_dir, device):
    """open_dataset(data_dir) as Splits on `device`."""
    dataset = open_dataset(data_dir)
    # int32 ids halve the memory of an epoch's samples; embeddings accept them directly.
    id_dtype = torch.int32 if max(dataset.nb_users, dataset.nb_items) < 2 ** 31 else torch.int64

    def candidates(pairs, negatives):
        users, items, duplicate_mask = (tensor.to(device)
                                        for tensor in create_test_data(pairs, negatives))
        return Candidates(users.to(id_dtype), items.to(id_dtype), duplicate_mask)

    validation = None
    if dataset.validation is not None:
        validation = candidates(dataset.validation, dataset.validation_negatives)
    train_users, train_items = (dataset.train[:, column].to(device, id_dtype) for column in (0, 1))
    return Splits(dataset.nb_users, dataset.nb_items, train_users, train_items,
                  candidates(dataset.test, dataset.negatives), validation, dataset.fingerprint,
                  dataset.metadata)


def create_test_data(test_ratings, test_negatives):
    """Candidates for evaluation: per user its negatives followed by its test positive.

    Returns users [U], items [U, C] and a bool mask [U, C] of repeats: every occurrence of an
    item after its first in the row, so an item (the positive included) is ranked once.
    """
    users = test_ratings[:, 0]
    items = torch.cat((test_negatives, test_ratings[:, 1:2]), dim=1)
    sorted_items, order = torch.sort(items, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(items, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    duplicate_mask = torch.empty_like(repeat_sorted).scatter_(1, order, repeat_sorted)
    return users, items, duplicate_mask


def share_bounds(total, world_size, rank):
    """[begin, end) of rank's contiguous share when `total` rows are cut into world_size parts."""
    return total * rank // world_size, total * (rank + 1) // world_size


def epoch_samples(train_users, train_items, nb_items, negative_samples, world_size, rank,
                  generator):
    """One epoch's shuffled (users, items, labels) for this rank.

    Negatives are approximate, as in the original: uniform items with no check against the
    user's positives. Every rank draws the same negatives from the same generator state, then
    keeps and shuffles its own contiguous share, so the shares are disjoint and cover the epoch.
    """
    device = train_users.device
    nb_positives = len(train_users)
    negative_items = torch.randint(0, nb_items, (nb_positives * negative_samples,),
                                   generator=generator, device=device, dtype=train_items.dtype)
    items = torch.cat((train_items, negative_items))
    del negative_items
    begin, end = share_bounds(len(items), world_size, rank)
    order = torch.randperm(end - begin, generator=generator, device=device).add_(begin)
    labels = order < nb_positives
    # Sample i's user is train_users[i % nb_positives]: the negatives repeat the positives'
    # users, so that array need not be built.
    users = train_users[order % nb_positives]
    return users, items[order], labels


def batches(users, items, labels, batch_size):
    """Full batches only: the last, partial batch is dropped as in the original."""
    for start in range(0, len(users) - batch_size + 1, batch_size):
        end = start + batch_size
        yield users[start:end], items[start:end], labels[start:end]
