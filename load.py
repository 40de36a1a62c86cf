"""Readers for MovieLens rating files and for any CSV with named user, item and time columns.

`load_ratings(path)` picks the reader from the file name, as the original does:
  u.data       ml-100k: tab-separated, no header: user, item, rating, timestamp
  ratings.dat  ml-1m, ml-10m: `::`-separated, no header: user, item, rating, timestamp
  ratings.csv  ml-20m, ml-25m, ml-32m, ml-latest, ml-latest-small: header
               userId,movieId,rating,timestamp
A CSV at any other name is read as MovieLens when its header has userId, movieId and timestamp.
Any other CSV with a header is read when its columns are named (user_col, item_col, time_col).

The result is a DataFrame with integer columns user_id, item_id, timestamp in file order. The
rating column is never read: the implicit-feedback protocol does not use it.
"""
import csv
import os

import numpy as np
import pandas as pd

MOVIELENS_CSV_COLUMNS = ("userId", "movieId", "timestamp")
COLUMNS = ("user_id", "item_id", "timestamp")
_WHAT = {"user_id": "user id", "item_id": "item id", "timestamp": "timestamp"}

# name -> (reader name, separator, positions of user, item, timestamp). `::` is read as ':' with
# the empty fields in between skipped, because pandas' C engine only takes 1-character separators
# and the python engine is many times slower.
_HEADERLESS = {
    "u.data": ("movielens-tab", "\t", [0, 1, 3]),
    "ratings.dat": ("movielens-dat", ":", [0, 2, 6]),
}

_KNOWN_FORMATS = (
    "known formats: u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv or any CSV whose "
    "header has userId,movieId,timestamp (ml-20m, ml-25m, ml-32m, ml-latest); for another CSV "
    "name its columns with --user_col, --item_col and --time_col"
)


class DataError(Exception):
    """A ratings file that cannot be used; the message is one line: file, problem, what to do."""


def load_ratings(path, user_col=None, item_col=None, time_col=None):
    """Read a ratings file; return (DataFrame[user_id, item_id, timestamp], reader name).

    Naming any of user_col, item_col, time_col reads `path` as a CSV with a header; a column not
    named keeps its MovieLens name (userId, movieId, timestamp).
    """
    path = os.fspath(path)
    _check_file(path)
    if (user_col, item_col, time_col) != (None, None, None):
        wanted = (user_col or "userId", item_col or "movieId", time_col or "timestamp")
        return _read_with_header(path, wanted, "csv-columns"), "csv-columns"
    name = os.path.basename(path)
    if name in _HEADERLESS:
        reader, separator, positions = _HEADERLESS[name]
        return _read_headerless(path, separator, positions), reader
    if name == "ratings.csv" or set(MOVIELENS_CSV_COLUMNS) <= set(_header(path)):
        return _read_with_header(path, MOVIELENS_CSV_COLUMNS, "movielens-csv"), "movielens-csv"
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


def _read_headerless(path, separator, positions):
    frame = _read(path, dict(sep=separator, header=None, usecols=positions))
    # usecols hands columns back in file order, which is user, item, timestamp for both formats
    frame.columns = COLUMNS
    return _integers(frame, path, first_line=1)


def _read_with_header(path, wanted, reader):
    header = _header(path)
    missing = [column for column in wanted if column not in header]
    if missing:
        hint = ("name the right columns with --user_col, --item_col, --time_col"
                if reader == "csv-columns" else
                "a MovieLens ratings.csv starts with userId,movieId,rating,timestamp; for other "
                "columns use --user_col, --item_col, --time_col")
        raise DataError(f"{path}: header {','.join(header)!r} lacks {', '.join(missing)}; {hint}")
    frame = _read(path, dict(usecols=list(wanted)))
    frame = frame[list(wanted)]
    frame.columns = COLUMNS
    return _integers(frame, path, first_line=2)


def _read(path, options):
    # Blank lines are kept (as missing values) so that row i of the frame is line i + first_line
    # of the file, and an error can point at the right line.
    try:
        frame = pd.read_csv(path, engine="c", skip_blank_lines=False, **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty; download or write it again") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())
        raise DataError(f"{path}: cannot parse ({problem}); check that the file is complete and "
                        f"in a known format ({_KNOWN_FORMATS})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
    if frame.empty:
        raise DataError(f"{path}: no ratings in the file; download or write it again")
    return frame


def _integers(frame, path, first_line):
    for column in COLUMNS:
        values = frame[column]
        if pd.api.types.is_integer_dtype(values.dtype):
            continue
        numbers = pd.to_numeric(values, errors="coerce")
        bad = (numbers.isna() | (numbers % 1 != 0)).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raw = values.iloc[row]
            problem = (f"missing {_WHAT[column]}" if pd.isna(raw)
                       else f"{_WHAT[column]} {str(raw)!r} is not an integer")
            raise DataError(f"{path}: line {row + first_line}: {problem}; ids and timestamps must "
                            "be whole numbers: fix or remove that line")
        frame[column] = numbers.astype(np.int64)
    # ids fit int32 in every MovieLens release; half the memory for the steps that follow
    for column in ("user_id", "item_id"):
        values = frame[column]
        if values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max:
            frame[column] = values.astype(np.int32)
    return frame
