"""Tensors for training and evaluation, built from what convert.py wrote.

A data directory has one of two layouts: the 2019 original's (train_ratings.pt, test_ratings.pt,
test_negatives.pt) or the 2023 original's (feature_spec.yaml naming its tensors: user, item and
label columns, each user's test positive followed by its negatives). Both become the same
Dataset.

Everything here is tensor operations on the training device: the original does the same on
the GPU, and on a CPU a Python loop over ml-20m's 99 M samples per epoch would dominate.
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

import cli
from feature_spec import read_mapping_file

DATA_FILES = ("train_ratings.pt", "test_ratings.pt", "test_negatives.pt")
# Written by `convert.py --validation`: each user's second-latest interaction and its negatives.
VALIDATION_FILES = ("validation_ratings.pt", "validation_negatives.pt")
METADATA = "metadata.json"
# convert.py creates it before touching a directory and removes it after metadata.json is
# written: while it exists the directory may mix two conversions.
CONVERTING = ".converting"
# The 2023 layout: its feature spec's default name, its channels (named as in the 2023
# original's neumf_constants.py: user, item, label) and the metadata key that gives the length
# of each user's test series.
FEATURE_SPEC = "feature_spec.yaml"
CHANNELS = ("user_ch", "item_ch", "label_ch")
SERIES_LENGTH = "test_samples_per_series"
# Samples a CPU processes at once in evaluation, and in training under --compile (train.chunks).
# At the ml-20m shape (2-core Sapphire Rapids, freed memory reused: cli.reuse_freed_memory),
# with every piece paying for the tables' full gradients, 2**16 trained fastest in float32 and
# bfloat16, 2**15 and 2**17 within noise, 2**14 and 2**18 slower, with a peak RSS of 2.2 GB
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


def torch_load(path):
    """torch.load of a data file onto the CPU, running no code; raises what torch raises.

    The 2023 original's convert.py saves its tensors from the GPU, hence map_location. A plain
    pickle (pickle.dump, not torch.save) makes torch warn about its protocol before it fails:
    two lines of torch's above the one line the caller has to say.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_tensor_file(path, if_missing, writer):
    """The object a tensor file holds, refused in one line when it is missing (`if_missing`
    says what to do) or cannot be read (re-run `writer`)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; {if_missing}")
    try:
        return torch_load(path)
    except Exception as error:  # torch raises several types for damaged files
        raise DataError(f"{path}: cannot be read ({type(error).__name__}); re-run {writer} to "
                        f"rewrite it") from None


def load_tensor(data_dir, name, dims):
    """One dense int64 tensor of `dims` dimensions written by convert.py into data_dir."""
    path = os.path.join(data_dir, name)
    tensor = read_tensor_file(path, f"convert the ratings first with `python convert.py --path "
                                    f"RATINGS --output {data_dir}`", "convert.py")
    if (not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided
            or tensor.dim() != dims or tensor.dtype != torch.int64):
        raise DataError(f"{path}: expected a dense {dims}-D int64 tensor; re-run convert.py to "
                        f"rewrite it")
    return tensor


def open_dataset(data_dir, feature_spec_file=FEATURE_SPEC):
    """The converted dataset in data_dir, refused (DataError) unless it is whole and consistent.

    The 2023 layout is read where data_dir has feature_spec_file (a name, or a path relative to
    data_dir, as the 2023 original's --feature_spec_file takes it), the 2019 layout otherwise. A
    directory written by this project's convert.py has metadata.json, whose counts must match
    the tensors; one written by an original has none and passes the same content checks. A
    conversion that did not finish is refused, whichever files it left.
    """
    if os.path.exists(os.path.join(data_dir, CONVERTING)):
        raise DataError(f"{os.path.join(data_dir, CONVERTING)}: a conversion into {data_dir} "
                        f"started and did not finish; re-run convert.py with --output {data_dir}")
    metadata = read_metadata(data_dir)
    spec_path = os.path.join(data_dir, feature_spec_file)
    cardinalities = None
    if feature_spec_file != FEATURE_SPEC or os.path.lexists(spec_path):
        if os.path.lexists(os.path.join(data_dir, DATA_FILES[0])):
            # The original 2023 convert.py leaves another's train_ratings.pt where it was.
            raise DataError(f"{data_dir}: holds both layouts, {feature_spec_file} and "
                            f"{DATA_FILES[0]}, perhaps of different conversions; remove one "
                            f"layout's files, or re-run convert.py with --output {data_dir}")
        train, test, negatives, validation, cardinalities = read_2023_layout(spec_path,
                                                                             metadata)
    elif not os.path.lexists(os.path.join(data_dir, DATA_FILES[0])):
        raise DataError(f"{os.path.join(data_dir, DATA_FILES[0])}: not found; convert the "
                        f"ratings first with `python convert.py --path RATINGS --output "
                        f"{data_dir}` (the 2023 layout's {FEATURE_SPEC} is not there either)")
    else:
        train, test, negatives, validation = read_2019_layout(data_dir, metadata)
    lowest, nb_users, nb_items = id_bounds(train, test, negatives, *validation)
    if lowest < 0:
        raise DataError(f"{data_dir}: holds the negative id {lowest}; ids are 0-based indices, "
                        f"re-run convert.py")
    if cardinalities is not None:
        nb_users, nb_items = declared_counts(spec_path, cardinalities, (nb_users, nb_items))
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


def read_2019_layout(data_dir, metadata):
    """(train, test, negatives, validation) from DATA_FILES and VALIDATION_FILES, checked;
    validation is () without a split, else (pairs, negatives)."""
    train, test, negatives = (load_tensor(data_dir, name, 2) for name in DATA_FILES)
    check_shapes(data_dir, train, test, negatives)
    validation = load_validation(data_dir, metadata, negatives.shape[1])
    check_one_row_per_user(os.path.join(data_dir, DATA_FILES[1]), test, "test")
    if validation:
        check_one_row_per_user(os.path.join(data_dir, VALIDATION_FILES[0]), validation[0],
                               "validation")
    return train, test, negatives, validation


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


def read_2023_layout(spec_path, metadata):
    """(train, test, negatives, validation, cardinalities) of the 2023 layout that spec_path
    describes, the tensors as the 2019 layout holds them: test series sorted by user and split
    into [U, 2] pairs and [U, C] negatives. validation: () or (pairs, negatives), from the
    source_spec mapping "validation" that `convert.py --validation --format 2023` adds (the
    2023 original reads train and test only). cardinalities: for users, then items, the
    (feature, count) the spec declares, count None where it says auto or nothing.
    """
    spec = read_feature_spec(spec_path)
    names = channel_features(spec_path, spec)
    length = spec["metadata"].get(SERIES_LENGTH)
    if type(length) is not int or length < 2:
        raise DataError(f"{spec_path}: metadata.{SERIES_LENGTH} is {_shown(length)}; give the "
                        f"length of each user's test series, its positive then its negatives "
                        f"(at least 2)")
    train = training_pairs(read_mapping(spec_path, spec, "train", names))
    test, negatives = test_series(spec_path, read_mapping(spec_path, spec, "test", names),
                                  length)
    has_split = "validation" in spec["source_spec"]
    if metadata is not None and has_split != (metadata.get("validation") not in (None, False)):
        holder, other = (spec_path, METADATA) if has_split else (METADATA, spec_path)
        raise DataError(f"{spec_path}: it and {METADATA} disagree: {holder} has a validation "
                        f"split, {other} none; re-run convert.py --format 2023")
    validation = ()
    if has_split:
        validation = test_series(spec_path,
                                 read_mapping(spec_path, spec, "validation", names), length)
    cardinalities = tuple((feature, declared_cardinality(spec_path, spec, feature))
                          for feature in names[:2])
    return train, test, negatives, validation, cardinalities


# Said after every problem of a feature spec's own text.
SPEC_ADVICE = "write it as `convert.py --format 2023` or transcode.py does"


def read_feature_spec(path):
    """The feature spec at path as a dict holding the four sections of the 2023 layout."""
    if not os.path.lexists(path):
        raise DataError(f"{path}: not found; convert the ratings with `python convert.py "
                        f"--format 2023 --output DIR`, or name the spec with --feature_spec_file")
    spec = read_mapping_file(path, DataError, SPEC_ADVICE)
    for section in ("feature_spec", "source_spec", "channel_spec", "metadata"):
        if not isinstance(spec.get(section), dict):
            raise DataError(f"{path}: has no {section} mapping; {SPEC_ADVICE}")
    return spec


def channel_features(path, spec):
    """The user, item and label features: the first of each channel, as the 2023 original
    takes them."""
    names = []
    for channel in CHANNELS:
        features = spec["channel_spec"].get(channel)
        if not isinstance(features, list) or not features or not isinstance(features[0], str):
            raise DataError(f"{path}: channel_spec.{channel} lists no feature; list the "
                            f"{channel[:-3]} feature under it, as `{channel}: [{channel[:-3]}]`")
        names.append(features[0])
    return names


def declared_cardinality(path, spec, feature):
    """feature_spec.FEATURE.cardinality: a count, or None for auto or none given."""
    entry = spec["feature_spec"].get(feature)
    count = entry.get("cardinality") if isinstance(entry, dict) else None
    if count is None or count == "auto":
        return None
    if type(count) is not int or count < 1:
        raise DataError(f"{path}: feature_spec.{feature}.cardinality is {_shown(count)}; give "
                        f"the number of ids (max id + 1), or auto")
    return count


def declared_counts(path, cardinalities, found):
    """(nb_users, nb_items): each feature's declared cardinality, which may exceed the ids
    found (the 2023 original sizes its tables and draws its negatives by it), else the count
    found."""
    counts = []
    for (feature, declared), count in zip(cardinalities, found):
        if declared is not None and declared < count:
            raise DataError(f"{path}: feature_spec.{feature}.cardinality is {declared} but the "
                            f"data holds {feature} id {count - 1}; raise it to {count} or more, "
                            f"or set it to auto")
        counts.append(count if declared is None else declared)
    return tuple(counts)


def read_mapping(path, spec, mapping, names):
    """(pairs, files, labels) of source_spec[mapping]: [N, 2] int64 user, item; the files
    holding the user, item and label features (`names`); the [N] labels."""
    chunks = spec["source_spec"].get(mapping)
    where = f"source_spec.{mapping}"
    if not isinstance(chunks, list) or not chunks:
        raise DataError(f"{path}: {where} lists no chunk; {SPEC_ADVICE}")
    columns = {}
    for index, chunk in enumerate(chunks):
        at = f"{where}[{index}]"
        if not isinstance(chunk, dict):
            raise DataError(f"{path}: {at} is not a mapping of type, features, files; "
                            f"{SPEC_ADVICE}")
        if chunk.get("type") != "torch_tensor":
            raise DataError(f"{path}: {at}.type is {_shown(chunk.get('type'))}; ncf.py reads "
                            f"torch_tensor chunks (as the 2023 original): turn csv chunks into "
                            f"tensors with transcode.py")
        files, features = chunk.get("files"), chunk.get("features")
        if not (isinstance(files, list) and len(files) == 1 and isinstance(files[0], str)):
            raise DataError(f"{path}: {at}.files must name one file, as the 2023 original "
                            f"reads a chunk; save each chunk as one tensor")
        if not (isinstance(features, list) and features
                and all(isinstance(feature, str) for feature in features)):
            raise DataError(f"{path}: {at}.features must list the feature of each column of "
                            f"{files[0]}; {SPEC_ADVICE}")
        file = os.path.join(os.path.dirname(path), files[0])
        tensor = load_chunk(file, features)
        for position, feature in enumerate(features):
            if feature in columns:
                raise DataError(f"{path}: {at}: feature {feature!r} is also a column of "
                                f"{columns[feature][1]}; give each feature one column")
            columns[feature] = (tensor, position, file)
    for feature, channel in zip(names, CHANNELS):
        if feature not in columns:
            raise DataError(f"{path}: {where} has no column of feature {feature!r} "
                            f"(channel_spec.{channel}); add the chunk that holds it")
    selected = [columns[feature] for feature in names]
    rows, first_file = len(selected[0][0]), selected[0][2]
    for tensor, _, file in selected[1:]:
        if len(tensor) != rows:
            raise DataError(f"{file}: has {len(tensor)} rows but {first_file} has {rows}; the "
                            f"chunks of {where} hold one row per sample, re-run convert.py or "
                            f"transcode.py")
    for (tensor, _, file), feature, what in zip(selected, names, ("user id", "item id", "label")):
        if tensor.dtype.is_complex or (what != "label" and (tensor.dtype.is_floating_point
                                                            or tensor.dtype == torch.bool)):
            raise DataError(f"{file}: the {what}s ({feature}) are {tensor.dtype}; save them as "
                            f"torch.int64{' or torch.float32' * (what == 'label')}")
    (users, user_at, _), (items, item_at, _), (labels, label_at, _) = selected
    if users is items and (user_at, item_at) == (0, 1) and users.shape[1] == 2:
        # the chunk as convert.py and the 2023 original write it: ml-20m's 318 MB, not copied
        pairs = users.to(torch.int64)
    else:
        pairs = torch.stack((users[:, user_at], items[:, item_at]), dim=1).to(torch.int64)
    return pairs, [file for _, _, file in selected], labels[:, label_at]


def load_chunk(file, features):
    """The dense 2-D tensor of one chunk, a column per feature."""
    tensor = read_tensor_file(file, "re-run convert.py --format 2023 or transcode.py to write it",
                              "convert.py or transcode.py")
    if (not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided
            or tensor.dim() != 2 or tensor.shape[1] != len(features)):
        raise DataError(f"{file}: expected a dense 2-D tensor of {len(features)} column(s) "
                        f"({', '.join(features)}); re-run convert.py or transcode.py")
    return tensor


def check_labels(file, labels):
    if bool(((labels == 0) | (labels == 1)).all()):
        return
    row = int(torch.nonzero((labels != 0) & (labels != 1))[0])
    raise DataError(f"{file}: row {row}: label {labels[row].item()}; a label is 1 (a "
                    f"positive) or 0 (a negative)")


def training_pairs(mapping):
    """[N, 2] user, item of the training mapping (read_mapping), all of whose samples must be
    positives."""
    pairs, (users_file, _, labels_file), labels = mapping
    if len(pairs) == 0:
        raise DataError(f"{users_file}: holds no training pair; re-run convert.py")
    if not bool((labels == 1).all()):
        check_labels(labels_file, labels)
        raise DataError(f"{labels_file}: {int((labels == 0).sum())} of its {len(labels)} "
                        f"training samples are labelled 0 (given negatives), which ncf.py does "
                        f"not train on (it draws its own); transcode.py leaves them out, or "
                        f"remove them")
    return pairs


def test_series(path, mapping, length):
    """([U, 2] pairs, [U, length - 1] negatives) of an evaluation mapping (read_mapping): each
    user's series of `length` consecutive samples, its positive (label 1) first, then its
    negatives."""
    pairs, (users_file, _, labels_file), labels = mapping
    users, items = pairs[:, 0], pairs[:, 1]
    if len(users) == 0:
        raise DataError(f"{users_file}: holds no test sample; re-run convert.py")
    if len(users) % length:
        raise DataError(f"{users_file}: its {len(users)} rows are no whole number of series of "
                        f"{length} ({SERIES_LENGTH} in {path}), so the series are of unequal "
                        f"length; give every user {length} consecutive samples")
    users = users.reshape(-1, length)
    mixed = torch.nonzero((users != users[:, :1]).any(dim=1))
    if len(mixed):
        first = int(mixed[0]) * length
        other = users[int(mixed[0])][users[int(mixed[0])] != users[int(mixed[0]), 0]][0]
        raise DataError(f"{users_file}: rows {first} to {first + length - 1} are one series but "
                        f"hold users {int(users[int(mixed[0]), 0])} and {int(other)}: the "
                        f"series are of unequal length or interleaved; give every user "
                        f"{length} consecutive samples")
    labels = labels.reshape(-1, length)
    if not (bool((labels[:, 0] == 1).all()) and bool((labels[:, 1:] == 0).all())):
        refuse_series_labels(labels_file, users, labels)
    # The 2023 original ranks a series whatever its place, so only ours needs them in order.
    series_users, items = users[:, 0], items.reshape(-1, length)
    if not bool((series_users[1:] > series_users[:-1]).all()):
        series_users, order = torch.sort(series_users, stable=True)
        repeated = torch.nonzero(series_users[1:] == series_users[:-1])
        if len(repeated):
            user = int(series_users[int(repeated[0])])
            first, second = (int(row) * length
                             for row in torch.nonzero(users[:, 0] == user)[:2].view(-1))
            raise DataError(f"{users_file}: user {user} has two series (rows {first} and "
                            f"{second} on); each user has one, re-run convert.py")
        items = items[order]
    return torch.stack((series_users, items[:, 0]), dim=1), items[:, 1:].contiguous()


def refuse_series_labels(file, users, labels):
    """DataError for the first series [U, length] that is not one positive, then negatives."""
    check_labels(file, labels.reshape(-1))
    positive = labels == 1
    counts = positive.sum(dim=1)
    series = int(torch.nonzero((counts != 1) | ~positive[:, 0])[0])
    length = labels.shape[1]
    rows = f"rows {series * length} to {(series + 1) * length - 1}"
    user = int(users[series, 0])
    if counts[series] == 0:
        problem = f"user {user}'s series ({rows}) has no positive (label 1)"
    elif counts[series] > 1:
        problem = f"user {user}'s series ({rows}) has {int(counts[series])} positives"
    else:
        position = int(torch.nonzero(positive[series])[0])
        problem = (f"row {series * length + position}: user {user}'s positive is not first in "
                   f"its series ({rows})")
    raise DataError(f"{file}: {problem}; a series is the user's one positive, then its "
                    f"negatives (transcode.py puts the positive first)")


def _shown(value):
    """A value read from YAML as the file spells it, for a message."""
    return "missing" if value is None else repr(value) if isinstance(value, str) else str(value)


@dataclass
class Candidates:
    """One evaluation split as create_test_data makes it: users [U], items [U, C] (each row's
    positive last) and the bool mask of repeats [U, C]."""
    users: torch.Tensor
    items: torch.Tensor
    duplicate_mask: torch.Tensor


# Pairs group_by_user sorts at a time: its temporaries stay near 0.1 GB at any size.
GROUP_PAIRS = 2 ** 22


def group_by_user(users, items, nb_users):
    """(offsets, grouped): user u's items are grouped[offsets[u]:offsets[u + 1]], in the order
    they come in `items`; offsets int64 [nb_users + 1] (more where `users` holds larger ids).

    A counting sort, a piece of GROUP_PAIRS at a time: one stable argsort of all the users held
    three int64 copies of them at once (2.4 GB at five times ml-20m's users).
    """
    counts = torch.bincount(users, minlength=nb_users)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64, device=items.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    grouped = torch.empty_like(items)
    filled = offsets[:-1].clone()
    for start in range(0, len(users), GROUP_PAIRS):
        piece = users[start:start + GROUP_PAIRS].long()
        order = torch.argsort(piece, stable=True)
        piece = piece[order]
        piece_counts = torch.bincount(piece, minlength=len(counts))
        # Each pair's place among its user's pairs of this piece, after the earlier pieces'.
        within = (torch.arange(len(piece), device=piece.device)
                  - (torch.cumsum(piece_counts, 0) - piece_counts)[piece])
        grouped[filled[piece] + within] = items[start:start + GROUP_PAIRS][order]
        filled += piece_counts
    return offsets, grouped


@dataclass
class Positives:
    """The training positives grouped by user: user u's items are items[offsets[u]:offsets[u+1]].

    Users are kept as offsets, 8 bytes a user, rather than as a column of 4 bytes a positive:
    0.4 GB less in every process at five times ml-20m's users. Every rank needs the user of
    every positive, since an epoch's negatives cycle over all of them.
    """
    offsets: torch.Tensor  # int64 [nb_users + 1], on the items' device
    items: torch.Tensor  # [N]

    @classmethod
    def from_pairs(cls, users, items, nb_users):
        """From a user and an item per positive (a converted train_ratings.pt is in time order,
        as the original writes it)."""
        return cls(*group_by_user(users, items, nb_users))

    def __len__(self):
        return len(self.items)

    def users_of(self, positions):
        """The user of the positive at each of `positions` (int64), in the items' dtype."""
        return (torch.searchsorted(self.offsets, positions, right=True) - 1).to(self.items.dtype)

    def users(self):
        """The user of every positive: the column full ranking masks training items with."""
        users = torch.arange(len(self.offsets) - 1, dtype=self.items.dtype,
                             device=self.items.device)
        return torch.repeat_interleave(users, self.offsets.diff())

    def prefix(self, count):
        """The first `count` positives."""
        return Positives(self.offsets.clamp(max=count), self.items[:count])


@dataclass
class Splits:
    """A converted dataset on the training device, ids in the smallest dtype that holds them."""
    nb_users: int
    nb_items: int
    positives: Positives
    test: Candidates
    validation: Optional[Candidates]
    fingerprint: str
    metadata: Optional[dict]  # None: converted by the original convert.py


def smallest_id_dtype(*counts):
    """int32 for ids below these counts where every count is below 2**31, else int64: int32
    ids halve the memory of an epoch's samples and of the training items, and embeddings
    accept them directly."""
    return torch.int32 if max(counts) < 2 ** 31 else torch.int64


def load_splits(data_dir, device, feature_spec_file=FEATURE_SPEC):
    """open_dataset(data_dir, feature_spec_file) as Splits on `device`."""
    dataset = open_dataset(data_dir, feature_spec_file)
    id_dtype = smallest_id_dtype(dataset.nb_users, dataset.nb_items)

    def candidates(pairs, negatives):
        users, items, duplicate_mask = (tensor.to(device) for tensor in
                                        create_test_data(pairs, negatives, id_dtype))
        return Candidates(users.to(id_dtype), items, duplicate_mask)

    validation = None
    if dataset.validation is not None:
        validation = candidates(dataset.validation, dataset.validation_negatives)
    test = candidates(dataset.test, dataset.negatives)
    train_users, train_items = (dataset.train[:, column].to(device, id_dtype) for column in (0, 1))
    # The int64 pairs are dropped before grouping, which sorts: loading's peak stays below
    # training's at five times ml-20m.
    nb_users, nb_items, fingerprint, metadata = (dataset.nb_users, dataset.nb_items,
                                                 dataset.fingerprint, dataset.metadata)
    del dataset
    positives = Positives.from_pairs(train_users, train_items, nb_users)
    return Splits(nb_users, nb_items, positives, test, validation, fingerprint, metadata)


# Rows create_test_data sorts at a time: with 100 negatives the sort's values and order take
# 80 MB instead of three times the candidates (1.7 GB at five copies of ml-20m).
CANDIDATE_ROWS = 2 ** 16


def create_test_data(test_ratings, test_negatives, dtype=None):
    """Candidates for evaluation: per user its negatives followed by its test positive.

    Returns users [U], items [U, C] (in `dtype`, by default the negatives') and a bool mask
    [U, C] of repeats: every occurrence of an item after its first in the row, so an item (the
    positive included) is ranked once.
    """
    users = test_ratings[:, 0]
    shape = (len(test_negatives), test_negatives.shape[1] + 1)
    items = torch.empty(shape, dtype=dtype or test_negatives.dtype, device=test_negatives.device)
    duplicate_mask = torch.empty(shape, dtype=torch.bool, device=test_negatives.device)
    for start in range(0, len(items), CANDIDATE_ROWS):
        rows = slice(start, start + CANDIDATE_ROWS)
        block = items[rows]
        block[:, :-1] = test_negatives[rows]
        block[:, -1] = test_ratings[rows, 1]
        sorted_items, order = torch.sort(block, dim=1, stable=True)
        repeat_sorted = torch.zeros_like(block, dtype=torch.bool)
        repeat_sorted[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
        duplicate_mask[rows].scatter_(1, order, repeat_sorted)
    return users, items, duplicate_mask


def share_bounds(total, world_size, rank):
    """[begin, end) of rank's contiguous share when `total` rows are cut into world_size parts."""
    return total * rank // world_size, total * (rank + 1) // world_size


# Keyed integer mixing on int64 tensors, kept within 62 bits: products wrap modulo 2**64 and the
# mask reduces them modulo 2**62, so every value stays non-negative and right shifts are logical.
_MASK62 = (1 << 62) - 1
# Rounds of the shuffle's permutation; each mixes low bits into high (an odd multiplier) and
# high into low (a right xorshift by half the width), and both steps are bijections.
_SHUFFLE_ROUNDS = 4
# Samples built at once, by device type: enough to amortise the per-piece work, small next to
# an epoch (99 M samples at ml-20m). A GPU's are larger: a piece's shuffle checks its cycle walk
# on the host, which drains the GPU's queue of training steps. A check every 32 batches of 2**20
# instead of every 2 made an H200's epoch 13 % faster (1.57 to 1.36 s in float16) for 0.3 GiB
# more peak memory.
PIECE_SAMPLES = {"cpu": 2 ** 21, "cuda": 2 ** 25}


def epoch_keys(seed, epoch):
    """The keys an epoch's shuffle and negatives are computed from: seeded by (seed, epoch)
    alone, so every rank computes the same epoch whatever its share, and a resumed run needs
    no saved data-generator state."""
    words = np.random.SeedSequence([seed, epoch]).generate_state(2 * _SHUFFLE_ROUNDS + 1,
                                                                 dtype=np.uint64)
    words = [int(word) & _MASK62 for word in words]
    return {"rounds": [(words[2 * index] | 1, words[2 * index + 1])
                       for index in range(_SHUFFLE_ROUNDS)],
            "negatives": words[-1]}


def shuffled_positions(positions, size, keys):
    """Where the keyed pseudo-random permutation of range(size) sends `positions` (int64).

    The permutation is of the smallest power of two holding `size`; a value at or above `size`
    is sent on along its cycle until it comes back below (cycle walking), which makes it a
    permutation of range(size) that any piece of it can be computed alone.
    """
    bits = max(1, (size - 1).bit_length())
    mask, shift = (1 << bits) - 1, max(1, bits // 2)
    # int32 where the width fits: wrapping modulo 2**32 is still modulo 2**bits after the
    # mask, and half the bytes to stream through is most of the speed.
    dtype = torch.int32 if bits <= 31 else torch.int64

    def permute(values):
        for multiplier, addend in keys["rounds"]:
            values.mul_(multiplier & mask).add_(addend & mask).bitwise_and_(mask)
            values.bitwise_xor_(values >> shift)
        return values

    values = permute(positions.to(dtype, copy=True))
    outside = values >= size
    while bool(outside.any()):  # one host check per piece: fewer than two walks on average
        values[outside] = permute(values[outside])
        outside = values >= size
    return values.long()


def negative_items(indices, nb_items, keys):
    """The item of each negative sample, a keyed hash of its index in the epoch: uniform over
    [0, nb_items) up to a bias of nb_items / 2**62, the same whichever piece or process
    computes it."""
    mixed = (indices ^ keys["negatives"]).bitwise_and_(_MASK62)
    for multiplier, shift in ((0x2545F4914F6CDD1D, 31), (0x1B873593A4E5C2D9, 29)):
        mixed = ((mixed ^ (mixed >> shift)) * multiplier).bitwise_and_(_MASK62)
    mixed ^= mixed >> 32
    return mixed % nb_items


class Epoch:
    """One epoch's training samples for this rank, built piece by piece as training asks for
    them: memory grows with the positives, not with the samples.

    As in the original, the epoch is the training positives (`positives`, grouped by user)
    followed by `negative_samples` negatives per positive, cut into world_size contiguous shares;
    each rank shuffles its own.
    Negatives are approximate, as in the original: uniform items, no check against the user's
    positives; negative i of the epoch repeats positive i % nb_positives's user. The shuffle
    (shuffled_positions) and the negatives' items (negative_items) are computed from
    epoch_keys alone, so any piece can be built without the others: the same seed gives the
    same epoch whatever the pieces, and the same samples (each share shuffled its own way, as
    in the original) whatever the number of processes.
    """

    def __init__(self, positives, nb_items, negative_samples, world_size, rank, keys):
        self.positives, self.nb_items, self.keys = positives, nb_items, keys
        self.nb_positives = len(positives)
        self.begin, self.end = share_bounds(self.nb_positives * (1 + negative_samples),
                                            world_size, rank)

    def __len__(self):
        return self.end - self.begin

    def samples(self, start, stop):
        """(users, items, labels) at positions [start, stop) of this rank's shuffled share."""
        train_items = self.positives.items
        positions = torch.arange(start, stop, device=train_items.device)
        indices = shuffled_positions(positions, len(self), self.keys).add_(self.begin)
        positive = indices < self.nb_positives
        of_positive = indices % self.nb_positives
        items = torch.where(positive, train_items[of_positive],
                            negative_items(indices, self.nb_items, self.keys)
                            .to(train_items.dtype))
        return self.positives.users_of(of_positive), items, positive

    def batches(self, batch_size):
        """Full batches only, in order: the last, partial batch is dropped as in the original.
        Built a piece of at least PIECE_SAMPLES (for this device) samples at a time."""
        full = len(self) // batch_size * batch_size
        wanted = PIECE_SAMPLES.get(self.positives.items.device.type, PIECE_SAMPLES["cpu"])
        piece = max(1, wanted // batch_size) * batch_size
        for piece_start in range(0, full, piece):
            users, items, labels = self.samples(piece_start, min(piece_start + piece, full))
            for start in range(0, len(users), batch_size):
                end = start + batch_size
                yield users[start:end], items[start:end], labels[start:end]
