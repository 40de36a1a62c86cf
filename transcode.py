"""Turn a dataset in CSV files, described by a feature spec, into the 2023 layout ncf.py reads:
the 2023 original's transcode.py, with its flags.

    python transcode.py --path DIR [--feature_spec_in feature_spec.yaml] --output OUT
                        [--feature_spec_out feature_spec.yaml]

DIR/feature_spec.yaml describes the CSV files as the 2023 original's data/csv_conversion
example does. channel_spec names the user, item and label features (the first of user_ch,
item_ch and label_ch); source_spec gives each mapping (train, test, and validation if wanted)
as csv chunks: files without a header, read one after the other, and the feature of each of
their columns; the chunks of a mapping hold the same rows, side by side. feature_spec gives the
user and item cardinalities (a count, or auto: max id + 1 over every mapping), and
metadata.test_samples_per_series the length of each user's test series. Ids are already dense,
from 0.

OUT gets, per mapping, MAPPING_data_0.pt (user, item: int64 [N, 2]) and MAPPING_data_1.pt
(labels: float32 [N, 1]), and the feature spec that describes them, as the 2023 original
writes them. Unlike it, this checks what ncf.py will check, each problem one line naming the
file and line: whole ids of 0 or more within their cardinality, labels 0 or 1, each test (and
validation) series one user's consecutive samples with one positive. It puts that positive
first and the series in user order, which ncf.py needs and the 2023 original does not mind, and
leaves out the training samples labelled 0 (given negatives), which ncf.py does not train on (it
draws its own), saying how many. Nothing is written unless all of it is, as with convert.py.
"""
import os
import re
import sys

import numpy as np
import pandas as pd
import torch

import cli
from convert import (feature_spec, mapping_files, one_line_errors, output_directory,
                     write_files)
from dataloading import SERIES_LENGTH, channel_features, declared_cardinality, declared_counts
from feature_spec import read_mapping_file, yaml_text
from progress import Progress

PROG = "transcode.py"
EVALUATED = ("test", "validation")
# Mapping names become file names: nothing that could leave OUT.
_MAPPING_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _parser():
    parser = cli.ArgumentParser(prog=PROG, description="Transcode CSV files described by a "
                                "feature spec into the tensors ncf.py reads.")
    parser.add_argument("--path", default="", help="directory of the input feature spec")
    parser.add_argument("--feature_spec_in", default="feature_spec.yaml",
                        help="the input feature spec: a name, or a path relative to --path")
    parser.add_argument("--output", default="/data", help="directory for the tensors")
    parser.add_argument("--feature_spec_out", default="feature_spec.yaml",
                        help="the output feature spec: a name, or a path relative to --output")
    return parser


class Column:
    """One feature's values over a mapping's rows, and where each row came from."""

    def __init__(self, values, files, starts):
        self.values, self.files, self.starts = values, files, starts

    def where(self, row):
        """`FILE: line N` of a row of the mapping."""
        index = int(np.searchsorted(self.starts, row, side="right")) - 1
        return f"{self.files[index]}: line {row - self.starts[index] + 1}"


def read_spec(path):
    """The input feature spec, with the sections transcoding needs."""
    if not os.path.isfile(path):
        raise cli.UserError(f"{path}: no such file; give the spec's directory with --path and "
                            f"its name with --feature_spec_in")
    spec = read_mapping_file(path, cli.UserError, "write it as the 2023 original's "
                                                   "data/csv_conversion/feature_spec.yaml")
    for section in ("feature_spec", "source_spec", "channel_spec"):
        if not isinstance(spec.get(section), dict):
            raise cli.UserError(f"{path}: has no {section} mapping; add it, as in the 2023 "
                                f"original's data/csv_conversion/feature_spec.yaml")
    if not isinstance(spec.get("metadata"), (dict, type(None))):
        raise cli.UserError(f"{path}: metadata is no mapping; write it as `metadata:` and "
                            f"indented `key: value` lines")
    spec["metadata"] = spec.get("metadata") or {}
    for mapping in ("train", "test"):
        if mapping not in spec["source_spec"]:
            raise cli.UserError(f"{path}: source_spec has no {mapping} mapping; ncf.py needs "
                                f"train and test")
    for mapping in spec["source_spec"]:
        if not isinstance(mapping, str) or not _MAPPING_NAME.fullmatch(mapping):
            raise cli.UserError(f"{path}: source_spec.{mapping} names files "
                                f"{mapping}_data_0.pt and ..._1.pt; name the mapping with "
                                f"letters, digits, _, . and - only")
    return spec


def chunk_files(path, spec):
    """{mapping: [(chunk place, its files, its features)]}, the files joined to the spec's
    directory."""
    chunks = {}
    for mapping, listed in spec["source_spec"].items():
        where = f"source_spec.{mapping}"
        if not isinstance(listed, list) or not listed:
            raise cli.UserError(f"{path}: {where} lists no chunk; list its csv chunks")
        chunks[mapping] = []
        for index, chunk in enumerate(listed):
            at = f"{where}[{index}]"
            if not isinstance(chunk, dict) or chunk.get("type") != "csv":
                kind = chunk.get("type") if isinstance(chunk, dict) else chunk
                raise cli.UserError(f"{path}: {at} is of type {kind!r}, not csv; transcode.py "
                                    f"reads csv chunks (ncf.py reads torch_tensor ones as they "
                                    f"are)")
            files, features = chunk.get("files"), chunk.get("features")
            if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
                raise cli.UserError(f"{path}: {at}.files lists no file; list its CSV files")
            if not (isinstance(features, list) and features
                    and all(isinstance(feature, str) for feature in features)):
                raise cli.UserError(f"{path}: {at}.features lists no feature; name the feature "
                                    f"of each column of its files")
            chunks[mapping].append(
                (at, [os.path.join(os.path.dirname(path), file) for file in files], features))
    return chunks


def read_csv(file, features):
    """A headerless CSV file as text columns, one per feature."""
    if not os.path.isfile(file):
        raise cli.UserError(f"{file}: no such file; check the feature spec's files")
    try:
        frame = pd.read_csv(file, header=None, dtype=str, skipinitialspace=True,
                            keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise cli.UserError(f"{file}: file is empty; write its rows, or drop it from the "
                            f"feature spec") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise cli.UserError(f"{file}: cannot parse ({' '.join(str(error).split())}); write "
                            f"{len(features)} comma-separated fields a line, no header") from None
    except OSError as error:
        raise cli.UserError(f"{file}: cannot read ({error.strerror}); check its "
                            f"permissions") from None
    if len(frame.columns) != len(features):
        raise cli.UserError(f"{file}: line 1: {len(frame.columns)} fields, but its chunk lists "
                            f"{len(features)} features ({', '.join(features)}); make them agree")
    return frame


def read_mapping(path, mapping, chunks, names, bar):
    """The user, item and label Columns of a mapping: its chunks side by side."""
    columns = {}
    rows = None
    for at, files, features in chunks:
        frames = []
        for file in files:
            frames.append(read_csv(file, features))
            bar.update()
        starts = np.cumsum([0] + [len(frame) for frame in frames[:-1]])
        frame = pd.concat(frames, ignore_index=True)
        if rows is not None and len(frame) != rows[0]:
            raise cli.UserError(f"{path}: {at} has {len(frame)} rows but {rows[1]} has "
                                f"{rows[0]}; the chunks of source_spec.{mapping} hold the same "
                                f"rows, side by side")
        rows = rows or (len(frame), at)
        for position, feature in enumerate(features):
            if feature in columns:
                raise cli.UserError(f"{path}: {at}: feature {feature!r} is in another chunk of "
                                    f"source_spec.{mapping} too; give each feature one column")
            columns[feature] = Column(frame.iloc[:, position].to_numpy(), files, starts)
    for feature in names:
        if feature not in columns:
            raise cli.UserError(f"{path}: source_spec.{mapping} has no column of feature "
                                f"{feature!r}; add the chunk that holds it")
    user, item, label = (columns[feature] for feature in names)
    user.values, item.values = (_ids(column, what)
                                for column, what in ((user, "user id"), (item, "item id")))
    label.values = _labels(label)
    return user, item, label


def _ids(column, what):
    """Whole numbers of 0 or more, as int64; the first other value is refused by its line."""
    numbers = pd.to_numeric(pd.Series(column.values), errors="coerce")
    if numbers.dtype == np.int64 and (numbers.to_numpy() >= 0).all():
        return numbers.to_numpy()
    floats = numbers.to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(floats) | (floats != np.round(floats)) | (floats < 0)
                         | (floats >= 2.0 ** 63))
    if len(bad):
        row = int(bad[0])
        raise cli.UserError(f"{column.where(row)}: {what} {column.values[row]!r}; ids are whole "
                            f"numbers from 0 (already made dense): fix that line")
    return floats.astype(np.int64)


def _labels(column):
    numbers = pd.to_numeric(pd.Series(column.values), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero((numbers != 0) & (numbers != 1))
    if len(bad):
        row = int(bad[0])
        raise cli.UserError(f"{column.where(row)}: label {column.values[row]!r}; a label is 1 "
                            f"(a positive) or 0 (a negative): fix that line")
    return numbers.astype(np.float32)


def positives_only(user, item, label):
    """The training rows labelled 1, and how many were labelled 0."""
    kept = label.values == 1
    return user.values[kept], item.values[kept], label.values[kept], int((~kept).sum())


def series_positive_first(path, user, item, label, length):
    """Each user's series of `length` consecutive rows with its positive moved first, the series
    in user order; refused, naming the line, where the rows are no such series."""
    users = user.values
    if len(users) % length:
        raise cli.UserError(f"{user.where(len(users) - 1)}: the mapping's {len(users)} rows are "
                            f"no whole number of series of {length} ({SERIES_LENGTH} in {path}); "
                            f"give every user {length} consecutive rows")
    users = users.reshape(-1, length)
    mixed = np.argwhere(users != users[:, :1])
    if len(mixed):
        series, offset = (int(value) for value in mixed[0])
        raise cli.UserError(f"{user.where(series * length + offset)}: user {users[series, offset]} "
                            f"within user {users[series, 0]}'s series of {length}; give every "
                            f"user {length} consecutive rows")
    positive = label.values.reshape(-1, length) == 1
    counts = positive.sum(axis=1)
    wrong = np.flatnonzero(counts != 1)
    if len(wrong):
        series = int(wrong[0])
        raise cli.UserError(f"{label.where(series * length)}: user {users[series, 0]}'s series "
                            f"of {length} from this line has {counts[series]} positives; give "
                            f"each series one (label 1), the rest negatives")
    order = np.argsort(users[:, 0], kind="stable")
    repeated = np.flatnonzero(users[order[1:], 0] == users[order[:-1], 0])
    if len(repeated):
        first, second = sorted(order[repeated[0]:repeated[0] + 2])
        raise cli.UserError(f"{user.where(second * length)}: a second series of user "
                            f"{users[second, 0]} (the first from {user.where(first * length)}); "
                            f"give each user one series")
    # within each series: the positive, then the negatives in their order
    within = np.argsort(~positive, axis=1, kind="stable")
    items = np.take_along_axis(item.values.reshape(-1, length), within, axis=1)[order]
    labels = np.take_along_axis(label.values.reshape(-1, length), within, axis=1)[order]
    return users[order].reshape(-1), items.reshape(-1), labels.reshape(-1)


def cardinalities(path, spec, names, columns):
    """(users, items) counts: the declared cardinality, or max id + 1 over every mapping."""
    found = [1 + max(int(mapping[index].values.max(initial=-1)) for mapping in columns.values())
             for index in (0, 1)]
    declared = [(feature, declared_cardinality(path, spec, feature)) for feature in names[:2]]
    return declared_counts(path, declared, found)


def transcode(args):
    """Read, check and write; returns the summary counts."""
    spec_path = os.path.join(args.path, args.feature_spec_in)
    spec = read_spec(spec_path)
    names = channel_features(spec_path, spec)
    chunks = chunk_files(spec_path, spec)
    length = spec["metadata"].get(SERIES_LENGTH)
    if type(length) is not int or length < 2:
        raise cli.UserError(f"{spec_path}: metadata.{SERIES_LENGTH} is {length!r}; give the "
                            f"length of each user's test series: its positive and negatives, at "
                            f"least 2")
    columns = {}
    with Progress(sum(len(files) for mapping in chunks.values() for _, files, _ in mapping),
                  "read", "file") as bar:
        for mapping, listed in chunks.items():
            columns[mapping] = read_mapping(spec_path, mapping, listed, names, bar)
    counts = cardinalities(spec_path, spec, names, columns)
    tensors, left_out = {}, 0
    for mapping, (user, item, label) in columns.items():
        if mapping == "train":
            users, items, labels, left_out = positives_only(user, item, label)
            if len(users) == 0:
                raise cli.UserError(f"{user.files[0]}: no training row is labelled 1; ncf.py "
                                    f"trains on positives")
        elif mapping in EVALUATED:
            users, items, labels = series_positive_first(spec_path, user, item, label, length)
        else:
            users, items, labels = user.values, item.values, label.values
        ids = torch.from_numpy(np.stack((users, items), axis=1).astype(np.int64, copy=False))
        tensors[mapping] = (ids, torch.from_numpy(labels.astype(np.float32, copy=False))
                            .reshape(-1, 1))
    new_spec = feature_spec(names, counts, spec["metadata"], list(tensors), spec["channel_spec"])
    files = [(name, tensor) for mapping, pair in tensors.items()
             for name, tensor in zip(mapping_files(mapping), pair)]
    files.append((args.feature_spec_out, yaml_text(new_spec).encode()))
    write_files(args.output, files)
    return {"users": counts[0], "items": counts[1], "left_out": left_out,
            **{mapping: len(pair[0]) for mapping, pair in tensors.items()}}


def main(argv=None):
    args = _parser().parse_args(argv)
    spec_out = os.path.normpath(args.feature_spec_out)
    if os.path.isabs(spec_out) or spec_out.startswith(os.pardir) or os.sep in spec_out:
        raise cli.UserError(f"--feature_spec_out {args.feature_spec_out}: name a file of "
                            f"--output itself, whose tensors it names relative to it")
    with one_line_errors(os.path.join(args.path, args.feature_spec_in), args.output):
        with output_directory(args.output):
            counts = transcode(args)
    if counts["left_out"]:
        print(f"{PROG}: note: left out {counts['left_out']} training samples labelled 0 (given "
              f"negatives): ncf.py trains on the positives and draws its own negatives",
              file=sys.stderr)
    mappings = ", ".join(f"{mapping} {count}" for mapping, count in counts.items()
                         if mapping not in ("users", "items", "left_out"))
    print(f"{PROG}: {counts['users']} users, {counts['items']} items; samples: {mappings} -> "
          f"{args.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
