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

The result is a DataFrame with columns user_id, item_id, timestamp in file order (and rating,
only when rating_col is asked for). By default ids and timestamps are exact: a value is read as an
int64 or the file is refused, naming the line. string_ids reads ids as text instead (UUIDs, codes,
"1.5"), kept verbatim apart from surrounding spaces; time_format "number" reads timestamps as
float64 and "iso8601" reads ISO-8601 date-times as int64 nanoseconds since 1970 (UTC; a time with
no offset is taken as UTC); time_col "none" reads no time column: file order is time order, and
timestamp is the row's position in the file.
"""
import csv
import decimal
import itertools
import os
import re
import stat
import warnings

import numpy as np
import pandas as pd

import cli

MOVIELENS_CSV_COLUMNS = ("userId", "movieId", "timestamp")
COLUMNS = ("user_id", "item_id", "timestamp")
_WHAT = {"user_id": "user id", "item_id": "item id", "timestamp": "timestamp",
         "rating": "rating"}
_FLAGS = {"user_id": "--user_col", "item_id": "--item_col", "timestamp": "--time_col",
          "rating": "--rating_col"}
NO_TIME = "none"
_IDS = ("user_id", "item_id")
# Rows read at a time where the file takes the fast path (see _read_in_pieces): 25 MB of
# pandas' columns for a MovieLens file; 1 M read ml-20m's shape in 4.0-4.1 s, 2 M in 4.6-4.9 s
# (the whole file at once: 2.1-2.6 s, at twice the memory).
READ_ROWS = 1 << 20
TIME_FORMATS = ("integer", "number", "iso8601")

# name -> (reader name, separator, positions of user, item, timestamp, fields per line). `::` is
# read as ':' with the empty fields in between skipped, because pandas' C engine only takes
# 1-character separators and the python engine is many times slower. Neither format quotes its
# fields: a '"' is part of the field it is in.
_HEADERLESS = {
    "u.data": ("movielens-tab", "\t", [0, 1, 3], 4),
    "ratings.dat": ("movielens-dat", ":", [0, 2, 6], 7),
}
# the rating's position, as _HEADERLESS counts them
_HEADERLESS_RATING = {"u.data": 2, "ratings.dat": 4}

_KNOWN_FORMATS = (
    "known formats: u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv or any CSV whose "
    "header has userId,movieId,timestamp (ml-20m, ml-25m, ml-32m, ml-latest); for another CSV "
    "name its columns with --user_col, --item_col and --time_col, or read its first three "
    "columns as user, item, timestamp with --first_columns"
)

INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_EXACT_RULE = (f"ids and timestamps must be whole numbers from {INT64_MIN} to {INT64_MAX}: fix "
               "or remove that line")
_OTHER_KINDS = {"user_id": " (or read ids as text with --string_ids)",
                "item_id": " (or read ids as text with --string_ids)",
                "timestamp": " (or name another kind with --time_format number or iso8601)"}
# What pandas reads as a number, minus what it reads only as a float (nan, inf); anything the C
# parser accepts as an integer matches too, so a file reads the same on either path.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_PLAIN_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
# a ratings.dat line whose fields are separated by '::' and nothing else
_DAT_LINE = re.compile(r"[^:]*(?:::[^:]*)*")
_DAT_SEPARATORS = ("fields must be separated by '::', as in user::item::rating::timestamp; fix or "
                   "remove that line")


class RatingsError(cli.UserError):
    """A ratings file that cannot be used; the message is one line: file, problem, what to do."""


def load_ratings(path, user_col=None, item_col=None, time_col=None, first_columns=False,
                 rating_col=None, string_ids=False, time_format="integer"):
    """Read a ratings file; return (DataFrame[user_id, item_id, timestamp(, rating)], reader).

    Naming any of user_col, item_col, time_col reads `path` as a CSV with a header; a column not
    named keeps its MovieLens name (userId, movieId, timestamp); time_col NO_TIME reads none.
    first_columns reads it as a CSV with a header whose first three columns are user, item,
    timestamp, whatever their names. rating_col names the rating column of a CSV with a header
    (the headerless MovieLens files have theirs at a fixed place); it is read, as float64, only
    when given.
    """
    path = os.fspath(path)
    _check_file(path)
    kinds = _Kinds(string_ids, time_format)
    if first_columns:
        header = _header(path)
        if len(header) < 3:
            raise RatingsError(f"{path}: header {','.join(header)!r} has {len(header)} columns; "
                               "--first_columns reads user, item, timestamp from the first three")
        positions = [0, 1, 2]
        if rating_col:
            positions.append(_position(path, header, rating_col))
            _check_named_once(path, header, rating_col, "rating")
            if positions[-1] < 3:
                raise RatingsError(f"{path}: --rating_col names {rating_col!r}, which "
                                   f"--first_columns reads as the "
                                   f"{_WHAT[COLUMNS[positions[-1]]]}; name another column")
        return _read_with_header(path, header, positions, kinds), "csv-first-columns"
    if (user_col, item_col, time_col) != (None, None, None):
        wanted = (user_col or "userId", item_col or "movieId", time_col or "timestamp")
        wanted += (rating_col,) if rating_col else ()
        named = (user_col, item_col, time_col, rating_col)
        return _read_named(path, wanted, named, "csv-columns", kinds), "csv-columns"
    name = os.path.basename(path)
    if name in _HEADERLESS:
        reader, separator, positions, fields = _HEADERLESS[name]
        positions = positions + ([_HEADERLESS_RATING[name]] if rating_col else [])
        return _read_headerless(path, separator, positions, fields, kinds), reader
    if name == "ratings.csv" or set(MOVIELENS_CSV_COLUMNS) <= set(_header(path)):
        wanted = MOVIELENS_CSV_COLUMNS + ((rating_col,) if rating_col else ())
        return _read_named(path, wanted, (None, None, None, rating_col), "movielens-csv",
                           kinds), "movielens-csv"
    raise RatingsError(f"{path}: unknown ratings format; {_KNOWN_FORMATS}")


# The user and item column names of the readers whose files have no header, or a fixed one.
_ID_COLUMNS = {"movielens-tab": ("userId", "movieId"), "movielens-dat": ("userId", "movieId"),
               "movielens-csv": ("userId", "movieId"), "paper": ("user", "item")}


def id_columns(path, reader, user_col=None, item_col=None):
    """(user column, item column): the names the ids of `path` were read from by `reader`.

    MovieLens' userId and movieId for its files (the headerless ones too), the header's first
    two names for csv-first-columns, the names given (or their defaults) for csv-columns, user
    and item for the paper's files.
    """
    if reader == "csv-first-columns":
        return tuple(name.strip() for name in _header(path)[:2])
    if reader == "csv-columns":
        return user_col or "userId", item_col or "movieId"
    return _ID_COLUMNS[reader]


def first_line(reader):
    """The line of the file that a reader's first row comes from."""
    return 1 if reader in ("movielens-tab", "movielens-dat", "paper") else 2


def load_paper_ratings(path):
    """A PREFIX.train.rating or PREFIX.test.rating file of the NCF paper's published data
    (hexiangnan/neural_collaborative_filtering): tab-separated, no header: user, item, rating,
    timestamp, integers."""
    path = os.fspath(path)
    _check_file(path)
    return _read_headerless(path, "\t", [0, 1, 3], 4, _Kinds(False, "integer"))


def load_negatives(path, string_ids=False):
    """Test negatives in the NCF paper's PREFIX.test.negative format: per line `(user,item)`, the
    test pair, then that user's negative items, tab-separated.

    Returns (users, items, negatives [lines, count]) in original ids, as numpy arrays: int64, or
    str objects with string_ids. Every line must have the same number of negatives.
    """
    path = os.fspath(path)
    _check_file(path)
    parse = _text_id if string_ids else _integer_id
    users, items, negatives = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                fields = line.rstrip("\r\n").rstrip("\t").split("\t")
                pair = re.fullmatch(r"\(([^,]*),([^,]*)\)", fields[0].strip(" "))
                if pair is None:
                    raise RatingsError(f"{path}: line {number}: starts with "
                                       f"{_shown(fields[0])}, not (user,item); write the test "
                                       "pair first, then its negatives, tab-separated")
                users.append(parse(pair[1], path, number))
                items.append(parse(pair[2], path, number))
                negatives.append([parse(field, path, number) for field in fields[1:]])
                if len(negatives[-1]) != len(negatives[0]) or not negatives[0]:
                    raise RatingsError(f"{path}: line {number}: {len(negatives[-1])} negatives, "
                                       f"line 1 has {len(negatives[0])}; give every test pair the "
                                       "same number (at least one)")
    except UnicodeDecodeError:
        raise RatingsError(f"{path}: not UTF-8 text; write the negatives as text") from None
    except OSError as e:
        raise RatingsError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
    if not users:
        raise RatingsError(f"{path}: holds no line; write one per test pair")
    dtype = object if string_ids else np.int64
    return (np.array(users, dtype=dtype), np.array(items, dtype=dtype),
            np.array(negatives, dtype=dtype))


def _integer_id(text, path, number):
    value = _exact_integer(text.strip(" "))
    if isinstance(value, str):
        raise RatingsError(f"{path}: line {number}: id {_shown(text)} {value}; {_EXACT_RULE}"
                           f"{_OTHER_KINDS['user_id']}")
    return value


def _text_id(text, path, number):
    if not text.strip(" "):
        raise RatingsError(f"{path}: line {number}: an empty id; fix or remove that line")
    return text.strip(" ")


class _Kinds:
    """How each column's text is read: "integer" (exact int64), "text", "number", "iso8601"."""

    def __init__(self, string_ids, time_format):
        ids = "text" if string_ids else "integer"
        self.of = {"user_id": ids, "item_id": ids, "timestamp": time_format, "rating": "number"}

    def text_dtypes(self, positions):
        """dtype for read_csv: text ids are read as str at once, rather than read again."""
        return {position: str for column, position in zip(COLUMNS, positions)
                if self.of[column] == "text"}

    @property
    def read_options(self):
        # text ids are kept as written: "NA" or "null" is an id, not a missing value
        return {"keep_default_na": False} if self.of["user_id"] == "text" else {}


def _check_file(path):
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RatingsError(f"{path}: no such file; check the path (prepare_dataset.sh downloads "
                           "MovieLens)") from None
    except OSError as e:
        raise RatingsError(f"{path}: cannot read ({e.strerror}); check the path and its "
                           "permissions") from None
    if stat.S_ISDIR(mode):
        raise RatingsError(f"{path}: is a directory; give the ratings file inside it")
    if not stat.S_ISREG(mode):
        # /dev/zero reads as an endless empty file, a FIFO waits for a writer that may never come
        raise RatingsError(f"{path}: not a regular file (a device, a pipe or a socket); copy "
                           "the ratings into a file and give that")
    if os.path.getsize(path) == 0:
        raise RatingsError(f"{path}: file is empty; download or write it again")


def _header(path):
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            return next(csv.reader([f.readline()]), [])
    except OSError as e:
        raise RatingsError(f"{path}: cannot read ({e.strerror}); check its permissions") from None


def _position(path, header, column):
    if column not in header:
        raise RatingsError(f"{path}: header {','.join(header)!r} lacks {column}; name the rating "
                           "column with --rating_col")
    return header.index(column)


def _read_headerless(path, separator, positions, fields, kinds):
    options = dict(sep=separator, header=None, quoting=csv.QUOTE_NONE, **kinds.read_options)
    dtype = {**_unused_as_category(fields, positions), **kinds.text_dtypes(positions)}

    def well_formed(piece):
        return len(piece.columns) == fields and not (separator == ":"
                                                     and _stray_dat_fields(piece))

    pieces = _read_in_pieces(path, options, dtype, positions, kinds, well_formed)
    if pieces is not None:
        return pieces
    frame = _read(path, options, dtype, fields)
    if len(frame.columns) != fields:
        # the C parser takes the field count from the first line and refuses longer lines
        # after it, so only the first line can have the wrong count here
        problem = _field_count(path, 1, len(frame.columns), fields, options)
        raise RatingsError(f"{path}: line 1: {problem}")
    if separator == ":":
        _check_dat_separators(frame, path)
    return _columns(frame, path, 1, options, positions, kinds)


def _check_dat_separators(frame, path):
    """Refuse the first line whose separators are not all '::'. Read as ':'-separated, a line of
    7 fields is '::'-separated exactly when fields 1, 3 and 5 are empty (a shorter line lacks a
    value, refused later). Their categories are looked at first: a well-formed file has none but
    "", and then no row need be."""
    if _stray_dat_fields(frame):
        between = frame.iloc[:, 1:6:2]
        filled = (between.notna() & between.ne("")).any(axis=1).to_numpy()
        raise RatingsError(f"{path}: line {int(np.flatnonzero(filled)[0]) + 1}: {_DAT_SEPARATORS}")


def _stray_dat_fields(frame):
    """Whether a ratings.dat frame read as ':'-separated holds a line not separated by '::'."""
    return any((column.cat.categories != "").any() for _, column in frame.iloc[:, 1:6:2].items())


def _read_named(path, wanted, named, reader, kinds):
    """wanted: the names of the user, item and time columns (time NO_TIME: none), then rating's
    when it is read; named: the user_col, item_col, time_col and rating_col given (None: left at
    its default), to say which flags name a column twice."""
    read = [(role, column, given)
            for role, column, given in zip(COLUMNS + ("rating",), wanted, named)
            if column != NO_TIME]
    for _, column, _ in read:
        # one column read as two things, e.g. user ids as items, gives no error later
        flags = [_FLAGS[role] + ("" if given else " (by default)")
                 for role, other, given in read if other == column]
        if len(flags) > 1:
            raise RatingsError(f"{path}: {', '.join(flags[:-1])} and {flags[-1]} name the same "
                               f"column {column!r}; name a different column for each")
    header = _header(path)
    missing = [column for column in wanted if column not in header and column != NO_TIME]
    if missing:
        hint = ("name the right columns with --user_col, --item_col, --time_col"
                if reader == "csv-columns" else
                "a MovieLens ratings.csv starts with userId,movieId,rating,timestamp; for other "
                "columns use --user_col, --item_col, --time_col")
        if missing == list(wanted[3:]):
            hint = "name the rating column with --rating_col"
        raise RatingsError(f"{path}: header {','.join(header)!r} lacks {', '.join(missing)}; "
                           f"{hint}")
    for role, column, _ in read:
        _check_named_once(path, header, column, role)
    positions = [None if column == NO_TIME else header.index(column) for column in wanted]
    return _read_with_header(path, header, positions, kinds)


def _check_named_once(path, header, column, role):
    # which of the columns of that name holds the values cannot be told; the first is no better
    # a guess than the others
    if header.count(column) > 1:
        raise RatingsError(f"{path}: line 1: the header repeats {column!r}, the {_WHAT[role]} "
                           f"column; rename all but one of them, or name another with "
                           f"{_FLAGS[role]}")


def _read_with_header(path, header, positions, kinds):
    options = kinds.read_options
    read = [position for position in positions if position is not None]
    dtype = {**_unused_as_category(len(header), read), **kinds.text_dtypes(positions)}
    pieces = _read_in_pieces(path, options, dtype, positions, kinds,
                             lambda piece: isinstance(piece.index, pd.RangeIndex))
    if pieces is not None:
        return pieces
    frame = _read(path, options, dtype)
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas turns the extra leading fields of a first line longer than the header into an
        # index, shifting every column
        raise RatingsError(f"{path}: line 2: more fields than the header's {len(header)}; fix or "
                           "remove that line")
    return _columns(frame, path, 2, options, positions, kinds)


def _unused_as_category(fields, positions):
    """dtype for read_csv: the fields not converted become categories.

    They are read at all, rather than left out with usecols, so that the C parser checks every
    line's field count; usecols turns that check off. A category costs a byte per row.
    """
    return {field: "category" for field in range(fields) if field not in positions}


def _read_in_pieces(path, options, dtype, positions, kinds, well_formed):
    """What _columns returns for the file, read READ_ROWS rows at a time, or None.

    The columns of a whole-file read are held as int64 twice over (pandas' pieces, then their
    concatenation) before _columns narrows them: a peak of 53 bytes a rating at ml-20m's shape,
    24 here (where freed blocks go back to the system, as convert.py has them). Here each piece
    is narrowed before the next is read, and the pieces are joined one column at a time. Only the
    fast paths are taken: every id and time a plain int64 and every number a finite one, and
    each piece well_formed (a test of the reader's own). Anything else, a read error included,
    gives None, and the whole-file read then takes the file and says what is wrong with it, so
    that errors and slow paths are exactly as before.
    """
    names = (COLUMNS + ("rating",))[:len(positions)]
    if any(position is not None and kinds.of[column] not in ("integer", "number")
           for column, position in zip(names, positions)):
        return None
    pieces = {column: [] for column in names}
    rows = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            with pd.read_csv(path, engine="c", skip_blank_lines=False, dtype=dtype,
                             chunksize=READ_ROWS, **options) as reader:
                for piece in reader:
                    if not well_formed(piece):
                        return None
                    for column, position in zip(names, positions):
                        values = _plain_values(piece, position, column, kinds.of[column], rows)
                        if values is None:
                            return None
                        pieces[column].append(values)
                    rows += len(piece)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, UnicodeDecodeError,
            OSError):
        return None
    if not rows:
        return None
    # joined column by column, each one's pieces let go of as soon as it is whole
    return pd.DataFrame({column: np.concatenate(pieces.pop(column)) for column in names},
                        copy=False)


def _plain_values(piece, position, column, kind, first_row):
    """A piece's column as _columns would make it, where the fast path takes it; else None."""
    if position is None:
        return np.arange(first_row, first_row + len(piece), dtype=np.int64)
    values = piece.iloc[:, position]
    if kind == "integer":
        if values.dtype != np.int64:
            return None
        return _narrowed(values.to_numpy()) if column in _IDS else values.to_numpy()
    # not uint64 (beyond int64), which the whole-file read may take as text
    if values.dtype.kind in "if" and np.isfinite(values).all():
        return values.to_numpy(dtype=np.float64)
    return None


def _narrowed(values):
    """int64 ids as int32 when they all fit: half the memory for the steps that follow."""
    if values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max:
        return values.astype(np.int32)
    return values


def _read(path, options, dtype, fields=None):
    # Blank lines are kept (as missing values) so that row i of the frame is line i + first_line
    # of the file, and an error can point at the right line.
    try:
        with warnings.catch_warnings():
            # a column read as int in some blocks and not in others is scanned again exactly
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            frame = pd.read_csv(path, engine="c", skip_blank_lines=False, dtype=dtype, **options)
    except pd.errors.EmptyDataError:
        raise RatingsError(f"{path}: file is empty; download or write it again") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())
        counts = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", problem)
        if counts:
            expected, line, saw = map(int, counts.groups())
            if fields is not None and expected != fields:
                # pandas expects the first line's count: there, not here, is the wrong one
                expected, line, saw = fields, 1, expected
            raise RatingsError(f"{path}: line {line}: "
                               f"{_field_count(path, line, saw, expected, options)}") from None
        raise RatingsError(f"{path}: cannot parse ({problem}); check that the file is complete and "
                           f"in a known format ({_KNOWN_FORMATS})") from None
    except OSError as e:
        raise RatingsError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
    if frame.empty:
        raise RatingsError(f"{path}: no ratings in the file; download or write it again")
    return frame


def _field_count(path, line, saw, expected, options):
    """What is wrong with a line of saw fields where expected were: counted as the file's reader
    sees them, for `::` files are read as ':' (_HEADERLESS). That count is only true of a line
    whose separators are all '::', so such a file's line is looked at first."""
    if options.get("sep") != ":":
        return f"{saw} fields, expected {expected}; fix or remove that line"
    if not _DAT_LINE.fullmatch(_line_text(path, line)):
        return _DAT_SEPARATORS
    return f"{(saw + 1) // 2} fields, expected {(expected + 1) // 2}; fix or remove that line"


def _line_text(path, number):
    """Line `number` (from 1) of the file, without its line end; read only to describe an error."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return next(itertools.islice(f, number - 1, None), "").rstrip("\r\n")


def _columns(frame, path, first_line, options, positions, kinds):
    """Columns user_id, item_id, timestamp (and rating) from frame's fields at positions, each
    read as kinds says; a position None (no time column) gives each row its position.

    A field pandas read as int64 is exact: the C parser gives int64 only when every value is an
    integer literal that fits. Anything else (float, uint64, text) may hold rounded or wrapped
    values, so that field is read again as text and each value parsed exactly, and the first that
    is not an int64 refuses the file. Text ids, ISO-8601 times and numbers pandas did not read
    as finite ones are read again as text too, and the first value that is not one names its
    line.
    """
    names = (COLUMNS + ("rating",))[:len(positions)]
    result = pd.DataFrame(index=frame.index)
    for column, position in zip(names, positions):
        if position is None:
            result[column] = np.arange(len(frame), dtype=np.int64)
            continue
        kind = kinds.of[column]
        values = frame.iloc[:, position]
        if kind == "integer" and values.dtype == np.int64:
            result[column] = values
        elif kind == "number" and values.dtype.kind in "iuf" and np.isfinite(values).all():
            # pandas reads inf and 1e400 as numbers: the text pass refuses them, naming the line
            result[column] = values.astype(np.float64)
        elif kind == "text":
            # read as str with no missing-value markers: "" is the only missing id
            result[column] = _texts(values.to_numpy(), column, path, first_line)
        else:
            text = _read(path, dict(options, usecols=[position], na_filter=False),
                         {position: str}).iloc[:, 0].to_numpy()
            result[column] = _PARSE[kind](text, column, path, first_line)
    # ids fit int32 in every MovieLens release
    for column in _IDS:
        if result[column].dtype == np.int64:
            result[column] = _narrowed(result[column].to_numpy())
    return result


def _refuse(path, row, first_line, column, text, problem, rule):
    problem = f"missing {_WHAT[column]}" if not text else f"{_WHAT[column]} {_shown(text)} {problem}"
    raise RatingsError(f"{path}: line {row + first_line}: {problem}; {rule}")


def _texts(fields, column, path, first_line):
    # Stripped once per distinct value: a log has far fewer ids than rows.
    codes, uniques = pd.factorize(fields)
    stripped = np.array([value.strip(" \t") for value in uniques], dtype=object)
    empty = np.flatnonzero((codes < 0) | np.isin(codes, np.flatnonzero(stripped == "")))
    if len(empty):
        _refuse(path, int(empty[0]), first_line, column, "", "",
                "every row needs a user id and an item id: fix or remove that line")
    return stripped[codes]


def _numbers(fields, column, path, first_line):
    values = pd.to_numeric(pd.Series(fields, dtype=object).str.strip(" \t"), errors="coerce")
    bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=np.float64)))
    if len(bad):
        _refuse(path, int(bad[0]), first_line, column, fields[bad[0]].strip(" \t"),
                "is not a finite number", f"{_WHAT[column]}s must be numbers: fix or remove "
                "that line")
    return values.to_numpy(dtype=np.float64)


def _datetimes(fields, column, path, first_line):
    stripped = pd.Series(fields, dtype=object).str.strip(" \t")
    # one offset-aware parse: a time without an offset is taken as UTC
    times = pd.to_datetime(stripped, format="ISO8601", utc=True, errors="coerce")
    bad = np.flatnonzero(times.isna().to_numpy())
    if len(bad):
        _refuse(path, int(bad[0]), first_line, column, stripped.iloc[bad[0]],
                "is not an ISO-8601 date-time", "write times like 2024-05-01T13:45:00 or "
                "2024-05-01 13:45:00+02:00: fix or remove that line")
    return times.to_numpy(dtype="datetime64[ns]").astype(np.int64)


def _exact_integers(fields, column, path, first_line):
    values = np.empty(len(fields), dtype=np.int64)
    for row, field in enumerate(fields):
        text = field.strip(" \t")
        value = _exact_integer(text)
        if isinstance(value, str):
            _refuse(path, row, first_line, column, text, value,
                    _EXACT_RULE + _OTHER_KINDS[column])
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


_PARSE = {"integer": _exact_integers, "text": _texts, "number": _numbers,
          "iso8601": _datetimes}
