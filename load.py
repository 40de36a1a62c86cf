"""Readers for MovieLens rating files and for any CSV with named user, item and time columns.

`load_ratings(path)` picks the reader from the file name, as the original does:
  u.data       ml-100k: tab-separated, no header: user, item, rating, timestamp
  ratings.dat  ml-1m, ml-10m: `::`-separated, no header: user, item, rating, timestamp
  ratings.csv  ml-20m, ml-25m, ml-32m, ml-latest, ml-latest-small: header
               userId,movieId,rating,timestamp
A CSV at any other name is read as MovieLens when its header has userId, movieId and timestamp.
Any other CSV with a header is read when its columns are named (user_col, item_col, time_col),
or, with first_columns, as user, item, timestamp in its first three columns (the 2023 original's
reader for other datasets). That last one is asked for, never guessed: a CSV whose third column
is a rating would otherwise be converted with ratings as times.

The result is a DataFrame with integer columns user_id, item_id, timestamp in file order. Ids
and timestamps are exact: a value is read as an int64 or the file is refused, naming the line.
The rating column is never converted: the implicit-feedback protocol does not use it.
"""
import csv
import decimal
import os
import re
import warnings

import numpy as np
import pandas as pd

MOVIELENS_CSV_COLUMNS = ("userId", "movieId", "timestamp")
COLUMNS = ("user_id", "item_id", "timestamp")
_WHAT = {"user_id": "user id", "item_id": "item id", "timestamp": "timestamp"}

# name -> (reader name, separator, positions of user, item, timestamp, fields per line). `::` is
# read as ':' with the empty fields in between skipped, because pandas' C engine only takes
# 1-character separators and the python engine is many times slower.
_HEADERLESS = {
    "u.data": ("movielens-tab", "\t", [0, 1, 3], 4),
    "ratings.dat": ("movielens-dat", ":", [0, 2, 6], 7),
}

_KNOWN_FORMATS = (
    "known formats: u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv or any CSV whose "
    "header has userId,movieId,timestamp (ml-20m, ml-25m, ml-32m, ml-latest); for another CSV "
    "name its columns with --user_col, --item_col and --time_col, or read its first three "
    "columns as user, item, timestamp with --first_columns"
)

INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_EXACT_RULE = (f"ids and timestamps must be whole numbers from {INT64_MIN} to {INT64_MAX}: fix "
               "or remove that line")
# What pandas reads as a number, minus what it reads only as a float (nan, inf); anything the C
# parser accepts as an integer matches too, so a file reads the same on either path.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_PLAIN_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)


class DataError(Exception):
    """A ratings file that cannot be used; the message is one line: file, problem, what to do."""


def load_ratings(path, user_col=None, item_col=None, time_col=None, first_columns=False):
    """Read a ratings file; return (DataFrame[user_id, item_id, timestamp], reader name).

    Naming any of user_col, item_col, time_col reads `path` as a CSV with a header; a column not
    named keeps its MovieLens name (userId, movieId, timestamp). first_columns reads it as a CSV
    with a header whose first three columns are user, item, timestamp, whatever their names.
    """
    path = os.fspath(path)
    _check_file(path)
    if first_columns:
        header = _header(path)
        if len(header) < 3:
            raise DataError(f"{path}: header {','.join(header)!r} has {len(header)} columns; "
                            "--first_columns reads user, item, timestamp from the first three")
        return _read_with_header(path, header, [0, 1, 2]), "csv-first-columns"
    if (user_col, item_col, time_col) != (None, None, None):
        wanted = (user_col or "userId", item_col or "movieId", time_col or "timestamp")
        return _read_named(path, wanted, "csv-columns"), "csv-columns"
    name = os.path.basename(path)
    if name in _HEADERLESS:
        reader, separator, positions, fields = _HEADERLESS[name]
        return _read_headerless(path, separator, positions, fields), reader
    if name == "ratings.csv" or set(MOVIELENS_CSV_COLUMNS) <= set(_header(path)):
        return _read_named(path, MOVIELENS_CSV_COLUMNS, "movielens-csv"), "movielens-csv"
    raise DataError(f"{path}: unknown ratings format; {_KNOWN_FORMATS}")


def _check_file(path):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file; check the path (prepare_dataset.sh downloads "
                        "MovieLens)")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give the ratings file inside it")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty; download or write it again")


def _header(path):
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            return next(csv.reader([f.readline()]), [])
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check its permissions") from None


def _read_headerless(path, separator, positions, fields):
    options = dict(sep=separator, header=None)
    frame = _read(path, options, _unused_as_category(fields, positions), fields)
    if len(frame.columns) != fields:
        # the C parser takes the field count from the first line and refuses longer lines
        # after it, so only the first line can have the wrong count here
        raise DataError(f"{path}: line 1: {_fields(len(frame.columns), options)} fields, "
                        f"expected {_fields(fields, options)}; fix or remove that line")
    return _integers(frame, path, 1, options, positions)


def _read_named(path, wanted, reader):
    header = _header(path)
    missing = [column for column in wanted if column not in header]
    if missing:
        hint = ("name the right columns with --user_col, --item_col, --time_col"
                if reader == "csv-columns" else
                "a MovieLens ratings.csv starts with userId,movieId,rating,timestamp; for other "
                "columns use --user_col, --item_col, --time_col")
        raise DataError(f"{path}: header {','.join(header)!r} lacks {', '.join(missing)}; {hint}")
    return _read_with_header(path, header, [header.index(column) for column in wanted])


def _read_with_header(path, header, positions):
    frame = _read(path, {}, _unused_as_category(len(header), positions))
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas turns the extra leading fields of a first line longer than the header into an
        # index, shifting every column
        raise DataError(f"{path}: line 2: more fields than the header's {len(header)}; fix or "
                        "remove that line")
    return _integers(frame, path, 2, {}, positions)


def _unused_as_category(fields, positions):
    """dtype for read_csv: the fields not converted become categories.

    They are read at all, rather than left out with usecols, so that the C parser checks every
    line's field count; usecols turns that check off. A category costs a byte per row.
    """
    return {field: "category" for field in range(fields) if field not in positions}


def _read(path, options, dtype, fields=None):
    # Blank lines are kept (as missing values) so that row i of the frame is line i + first_line
    # of the file, and an error can point at the right line.
    try:
        with warnings.catch_warnings():
            # a column read as int in some blocks and not in others is scanned again exactly
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            frame = pd.read_csv(path, engine="c", skip_blank_lines=False, dtype=dtype, **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty; download or write it again") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())
        counts = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", problem)
        if counts:
            expected, line, saw = map(int, counts.groups())
            if fields is not None and expected != fields:
                # pandas expects the first line's count: there, not here, is the wrong one
                expected, line, saw = fields, 1, expected
            raise DataError(f"{path}: line {line}: {_fields(saw, options)} fields, expected "
                            f"{_fields(expected, options)}; fix or remove that line") from None
        raise DataError(f"{path}: cannot parse ({problem}); check that the file is complete and "
                        f"in a known format ({_KNOWN_FORMATS})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
    if frame.empty:
        raise DataError(f"{path}: no ratings in the file; download or write it again")
    return frame


def _fields(count, options):
    """A field count as the file's reader sees it: `::` files are read as ':' (_HEADERLESS)."""
    return (count + 1) // 2 if options.get("sep") == ":" else count


def _integers(frame, path, first_line, options, positions):
    """Columns user_id, item_id, timestamp from frame's fields at positions, exactly, as int64.

    A field pandas read as int64 is exact: the C parser gives int64 only when every value is an
    integer literal that fits. Anything else (float, uint64, text) may hold rounded or wrapped
    values, so that field is read again as text and each value parsed exactly, and the first that
    is not an int64 refuses the file.
    """
    frame = frame.iloc[:, positions]
    frame.columns = COLUMNS
    for column, position in zip(COLUMNS, positions):
        if frame[column].dtype != np.int64:
            text = _read(path, dict(options, usecols=[position], na_filter=False),
                         {position: str})
            frame[column] = _exact_integers(text.iloc[:, 0].to_numpy(), column, path, first_line)
    # ids fit int32 in every MovieLens release; half the memory for the steps that follow
    for column in ("user_id", "item_id"):
        values = frame[column]
        if values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max:
            frame[column] = values.astype(np.int32)
    return frame


def _exact_integers(fields, column, path, first_line):
    values = np.empty(len(fields), dtype=np.int64)
    for row, field in enumerate(fields):
        text = field.strip(" \t")
        value = _exact_integer(text)
        if isinstance(value, str):
            problem = (f"missing {_WHAT[column]}" if not text else
                       f"{_WHAT[column]} {_shown(text)} {value}")
            raise DataError(f"{path}: line {row + first_line}: {problem}; {_EXACT_RULE}")
        values[row] = value
    return values


def _exact_integer(text):
    """The integer that text writes, if it is one that fits int64; else why not."""
    if _PLAIN_INTEGER.fullmatch(text):
        value = int(text)
    elif _DECIMAL.fullmatch(text):
        number = decimal.Decimal(text)
        # the range first: turning 1e999999999 into an int would take forever
        if not INT64_MIN <= number <= INT64_MAX:
            return "does not fit in 64 bits"
        if number != number.to_integral_value():
            return "is not an integer"
        value = int(number)
    else:
        return "is not an integer"
    if not INT64_MIN <= value <= INT64_MAX:
        return "does not fit in 64 bits"
    return value


def _shown(text):
    return repr(text if len(text) <= 40 else text[:40] + "...")
