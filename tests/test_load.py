import os
import warnings

import numpy as np
import pandas as pd
import pytest

import load
from load import RatingsError, load_ratings


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def rows(frame):
    return frame[["user_id", "item_id", "timestamp"]].values.tolist()


def assert_integer_columns(frame):
    assert list(frame.columns) == ["user_id", "item_id", "timestamp"]
    for dtype in frame.dtypes:
        assert np.issubdtype(dtype, np.integer)


def test_ml_100k_u_data(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
                                     "22\t377\t1\t878887116\n")
    frame, reader = load_ratings(path)
    assert reader == "movielens-tab"
    assert_integer_columns(frame)
    assert rows(frame) == [[196, 242, 881250949], [186, 302, 891717742], [22, 377, 878887116]]


def test_ml_1m_and_10m_ratings_dat(tmp_path):
    # ml-10m has half-star ratings; the rating column is not read, so they do not matter
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3.5::978302109\n"
                                          "2::122::4::838985046\n")
    frame, reader = load_ratings(path)
    assert reader == "movielens-dat"
    assert_integer_columns(frame)
    assert rows(frame) == [[1, 1193, 978300760], [1, 661, 978302109], [2, 122, 838985046]]


def test_ml_20m_ratings_csv(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n"
                                          "1,2,3.5,1112486027\n1,29,not-a-rating,1112484676\n")
    frame, reader = load_ratings(path)
    assert reader == "movielens-csv"
    assert_integer_columns(frame)
    assert rows(frame) == [[1, 2, 1112486027], [1, 29, 1112484676]]


def test_movielens_header_recognised_at_any_name(tmp_path):
    path = write(tmp_path, "export.txt", "timestamp,movieId,userId,rating\n5,20,3,4.0\n6,21,3,1\n")
    frame, reader = load_ratings(path)
    assert reader == "movielens-csv"
    assert rows(frame) == [[3, 20, 5], [3, 21, 6]]


def test_header_with_byte_order_mark(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,2,3,4\n")
    frame, reader = load_ratings(path)
    assert (reader, rows(frame)) == ("movielens-csv", [[1, 2, 4]])


def test_bring_your_own_columns(tmp_path):
    path = write(tmp_path, "events.csv", "ts,customer,sku,price\n100,7,70,9.99\n90,8,70,1\n")
    frame, reader = load_ratings(path, user_col="customer", item_col="sku", time_col="ts")
    assert reader == "csv-columns"
    assert_integer_columns(frame)
    assert rows(frame) == [[7, 70, 100], [8, 70, 90]]


def test_unnamed_columns_keep_movielens_names(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,when\n1,2,30\n")
    frame, reader = load_ratings(path, time_col="when")
    assert (reader, rows(frame)) == ("csv-columns", [[1, 2, 30]])


def test_ids_narrowed_only_when_they_fit(tmp_path):
    path = write(tmp_path, "ratings.csv", f"userId,movieId,timestamp\n1,{2**40},3\n")
    frame, _ = load_ratings(path)
    assert frame["user_id"].dtype == np.int32
    assert frame["item_id"].dtype == np.int64
    assert frame["item_id"].iloc[0] == 2**40


def test_whole_numbers_written_as_floats_are_accepted(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,timestamp\n1,2.0,3e2\n")
    frame, _ = load_ratings(path)
    assert_integer_columns(frame)
    assert rows(frame) == [[1, 2, 300]]


def error(path, **columns):
    with pytest.raises(RatingsError) as caught:
        load_ratings(path, **columns)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_missing_file(tmp_path):
    assert "no such file" in error(tmp_path / "ratings.csv")


def test_directory(tmp_path):
    assert "is a directory" in error(tmp_path)


def fifo(tmp_path):
    os.mkfifo(tmp_path / "ratings.csv")
    return tmp_path / "ratings.csv"


@pytest.mark.parametrize("make", [lambda tmp_path: "/dev/zero", fifo], ids=["device", "fifo"])
def test_what_is_no_regular_file_is_refused_before_reading(tmp_path, make):
    """/dev/zero was called empty; a FIFO with no writer hung the conversion."""
    assert "not a regular file (a device, a pipe or a socket); copy the ratings into a file" in (
        error(make(tmp_path)))


@pytest.mark.parametrize("name", ["ratings.csv", "u.data", "ratings.dat"])
def test_empty_file(tmp_path, name):
    assert "empty" in error(write(tmp_path, name, ""))


def test_whitespace_only_file(tmp_path):
    assert "empty" in error(write(tmp_path, "u.data", "\n"))


def test_header_only(tmp_path):
    assert "no ratings" in error(write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n"))


def test_header_without_needed_columns(tmp_path):
    message = error(write(tmp_path, "ratings.csv", "user,movie,rating\n1,2,3\n"))
    assert "lacks userId, movieId, timestamp" in message
    assert "--user_col" in message


def test_named_column_not_in_header(tmp_path):
    path = write(tmp_path, "events.csv", "customer,sku,ts\n1,2,3\n")
    message = error(path, user_col="customer", item_col="sku", time_col="time")
    assert "lacks time" in message


def test_non_numeric_id_names_line(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,abc,3,5\n")
    message = error(path)
    assert "line 3" in message and "item id 'abc' is not an integer" in message


def test_non_numeric_timestamp_in_headerless_file(tmp_path):
    path = write(tmp_path, "u.data", "1\t2\t3\t4\n1\t3\t3\t2024-01-01\n")
    assert "line 2: timestamp '2024-01-01' is not an integer" in error(path)


def test_fractional_timestamp(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::2::3::4\n1::3::3::4.5\n")
    assert "line 2: timestamp '4.5' is not an integer" in error(path)


def test_missing_value_and_blank_line_name_their_line(tmp_path):
    assert "line 3: missing timestamp" in error(
        write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,3,\n"))
    assert "line 2: missing user id" in error(
        write(tmp_path, "u.data", "1\t2\t3\t4\n\n1\t3\t3\t5\n"))


def test_too_few_fields(tmp_path):
    assert "line 1: 2 fields, expected 4" in error(write(tmp_path, "u.data", "1\t2\n"))


def test_unknown_format(tmp_path):
    message = error(write(tmp_path, "scores.txt", "a,b,c\n1,2,3\n"))
    assert "unknown ratings format" in message
    for known in ("u.data", "ratings.dat", "ratings.csv", "userId,movieId,timestamp",
                  "--user_col", "--item_col", "--time_col"):
        assert known in message


def test_file_order_is_kept(tmp_path):
    rng = np.random.default_rng(0)
    expected = rng.integers(0, 1000, size=(50, 3))
    pd.DataFrame(expected, columns=["userId", "movieId", "timestamp"]).to_csv(
        tmp_path / "ratings.csv", index=False)
    frame, _ = load_ratings(tmp_path / "ratings.csv")
    assert rows(frame) == expected.tolist()


# Each reader, as (file name, header, row writer from user, item, timestamp fields, options).
# The rating and note fields are read too (so that field counts are checked) but never used.
READERS = {
    "u.data": ("u.data", "", lambda u, i, t: f"{u}\t{i}\t3\t{t}", {}),
    "ratings.dat": ("ratings.dat", "", lambda u, i, t: f"{u}::{i}::3.5::{t}", {}),
    "ratings.csv": ("ratings.csv", "userId,movieId,rating,timestamp\n",
                    lambda u, i, t: f"{u},{i},3.5,{t}", {}),
    "named columns": ("events.csv", "ts,customer,note,sku\n", lambda u, i, t: f"{t},{u},x,{i}",
                      dict(user_col="customer", item_col="sku", time_col="ts")),
    "first columns": ("export.csv", "who,what,when,score\n", lambda u, i, t: f"{u},{i},{t},5",
                      dict(first_columns=True)),
}
GOOD = (1, 10, 100)
# stays exact whatever the other rows hold: a float64 keeps 2**53 + 1 as 2**53
BIG = 2**53 + 1

EXACT = [
    ("9007199254740993", BIG), ("9007199254740992", 2**53), ("5.0", 5), ("12.000", 12),
    ("1e3", 1000), ("1.5e1", 15), (" 7", 7), ("7 ", 7), ("+7", 7), ("007", 7), ("-0", 0),
    ("-12", -12), ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -2**63),
    ("9.223372036854775807e18", 2**63 - 1),
]
REFUSED = [
    ("9223372036854775808", "'9223372036854775808' does not fit in 64 bits"),
    ("18446744073709551615", "'18446744073709551615' does not fit in 64 bits"),
    ("-9223372036854775809", "'-9223372036854775809' does not fit in 64 bits"),
    ("1e19", "'1e19' does not fit in 64 bits"),
    ("1e999999999", "'1e999999999' does not fit in 64 bits"),
    ("1" * 60, f"'{'1' * 40}...' does not fit in 64 bits"),
    ("1.5", "'1.5' is not an integer"), ("1e-1", "'1e-1' is not an integer"),
    ("0x10", "'0x10' is not an integer"), ("1_000", "'1_000' is not an integer"),
    ("NaN", "'NaN' is not an integer"), ("inf", "'inf' is not an integer"),
    ("-inf", "'-inf' is not an integer"), ("5.0.0", "'5.0.0' is not an integer"),
    ("abc", "'abc' is not an integer"), ("True", "'True' is not an integer"),
    ("", "missing"), (" ", "missing"),
]
WHAT = {"user_id": "user id", "item_id": "item id", "timestamp": "timestamp"}


def write_rows(directory, reader, *fields):
    name, header, row, _ = READERS[reader]
    return write(directory, name, header + "".join(row(*f) + "\n" for f in fields))


def read_as(reader, path):
    return load_ratings(path, **READERS[reader][3])


def with_field(column, text):
    """GOOD with one field replaced by text."""
    fields = list(GOOD)
    fields[["user_id", "item_id", "timestamp"].index(column)] = text
    return fields


@pytest.mark.parametrize("text,value", EXACT)
@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp"])
@pytest.mark.parametrize("reader", READERS)
def test_ids_and_times_read_exactly(tmp_path, reader, column, text, value):
    path = write_rows(tmp_path, reader, GOOD, with_field(column, text), (BIG, BIG, BIG))
    frame, _ = read_as(reader, path)
    assert_integer_columns(frame)
    assert rows(frame) == [list(GOOD), with_field(column, value), [BIG, BIG, BIG]]


@pytest.mark.parametrize("text,problem", REFUSED)
@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp"])
@pytest.mark.parametrize("reader", READERS)
def test_ids_and_times_that_are_not_int64_are_refused(tmp_path, reader, column, text, problem):
    path = write_rows(tmp_path, reader, GOOD, with_field(column, text), GOOD)
    message = error(path, **READERS[reader][3])
    line = 2 if READERS[reader][1] == "" else 3
    what = WHAT[column]
    expected = f"missing {what}" if problem == "missing" else f"{what} {problem}"
    assert f": line {line}: {expected}; ids and timestamps must be whole numbers" in message


def test_large_ids_stay_apart_when_another_row_is_written_as_a_float(tmp_path):
    path = write_rows(tmp_path, "ratings.csv", (2**53 + 1, 1, 1), (2**53, 1, 2), ("5.0", 1, 3))
    frame, _ = load_ratings(path)
    assert frame["user_id"].tolist() == [2**53 + 1, 2**53, 5]


def test_all_integer_files_are_not_scanned_again(tmp_path, monkeypatch):
    def scanned(*args):
        raise AssertionError("the exact scan ran on an all-integer file")
    monkeypatch.setattr(load, "_exact_integers", scanned)
    for reader in READERS:
        frame, _ = read_as(reader, write_rows(tmp_path, reader, GOOD, (2**62, -3, -2**63)))
        assert rows(frame) == [list(GOOD), [2**62, -3, -2**63]]


def test_a_bad_value_past_the_first_block_names_its_line_and_warns_nothing(tmp_path):
    # pandas reads large files in blocks and warns when a column's type differs between them
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + "1,2,3,4\n" * 300_000 + "abc,2,3,4\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = error(path)
    assert "line 300002: user id 'abc' is not an integer" in message


# (reader, rows as written, expected: rows read or the error's text)
FIELD_COUNTS = [
    ("u.data", ["1\t10\t3\t100", "1\t10\t3\t100\t9"], "line 2: 5 fields, expected 4"),
    ("u.data", ["1\t10\t3\t100\t9", "1\t10\t3\t100"], "line 1: 5 fields, expected 4"),
    ("u.data", ["1\t10\t3\t100", "1\t10\t3"], "line 2: missing timestamp"),
    ("u.data", ["1\t10\t3", "1\t10\t3\t100"], "line 1: 3 fields, expected 4"),
    ("u.data", ["1\t10\t3", "1\t10\t3"], "line 1: 3 fields, expected 4"),
    ("ratings.dat", ["1::10::3", "1::10::3::100"], "line 1: 3 fields, expected 4"),
    ("ratings.dat", ["1::10::3::100", "1::10::3::100::9"], "line 2: 5 fields, expected 4"),
    ("ratings.dat", ["1::10::3::100::9", "1::10::3::100"], "line 1: 5 fields, expected 4"),
    ("ratings.dat", ["1::10::3::100", "1::10::3"], "line 2: missing timestamp"),
    ("ratings.csv", ["1,10,3,100", "1,10,3,100,9"], "line 3: 5 fields, expected 4"),
    ("ratings.csv", ["1,10,3,100,9", "1,10,3,100"], "line 2: more fields than the header's 4"),
    ("ratings.csv", ["1,10,3,100", "1,10,3"], "line 3: missing timestamp"),
    ("named columns", ["100,1,x,10", "100,1,x,10,"], "line 3: 5 fields, expected 4"),
    ("named columns", ["100,1,x,10", "100,1,x"], "line 3: missing item id"),
    ("first columns", ["1,10,100,5", "1,10,100,5,6"], "line 3: 5 fields, expected 4"),
    ("first columns", ["1,10,100,5,6", "1,10,100,5"], "line 2: more fields than the header's 4"),
    # a short row lacking only a field that is not read is taken as it stands
    ("first columns", ["1,10,100,5", "2,20,200"], [[1, 10, 100], [2, 20, 200]]),
    ("ratings.csv", ["1,10,,100", "2,20,3,200"], [[1, 10, 100], [2, 20, 200]]),
]


@pytest.mark.parametrize("reader,lines,expected", FIELD_COUNTS)
def test_field_counts(tmp_path, reader, lines, expected):
    name, header, _, options = READERS[reader]
    path = write(tmp_path, name, header + "".join(line + "\n" for line in lines))
    if isinstance(expected, list):
        assert rows(read_as(reader, path)[0]) == expected
    else:
        assert f": {expected};" in error(path, **options)


def test_first_columns_whatever_their_names(tmp_path):
    path = write(tmp_path, "log.txt", "userId,a,a,rating\n3,7,50,1\n4,8,40,2\n")
    frame, reader = load_ratings(path, first_columns=True)
    assert (reader, rows(frame)) == ("csv-first-columns", [[3, 7, 50], [4, 8, 40]])


def test_first_columns_needs_three(tmp_path):
    message = error(write(tmp_path, "log.csv", "user,item\n1,2\n"), first_columns=True)
    assert "header 'user,item' has 2 columns; --first_columns reads user, item, timestamp " \
        "from the first three" in message


def test_other_kinds_of_ids_and_times(tmp_path):
    path = write(tmp_path, "log.csv", "u,i,t,stars\n u1 ,A-7,2024-01-01T00:00:01,4.5\n"
                                      "NA,1.0,1970-01-01 01:00:00+01:00,2\n")
    frame, reader = load_ratings(path, user_col="u", item_col="i", time_col="t",
                                 rating_col="stars", string_ids=True, time_format="iso8601")
    assert reader == "csv-columns"
    assert frame["user_id"].tolist() == ["u1", "NA"]
    assert frame["item_id"].tolist() == ["A-7", "1.0"]
    # nanoseconds since 1970 UTC; the second time is midnight UTC written in +01:00
    assert frame["timestamp"].tolist() == [1704067201 * 10**9, 0]
    assert frame["rating"].tolist() == [4.5, 2.0]


def test_number_times_and_no_time_column(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,1.5\n1,3,3,-2\n")
    frame, _ = load_ratings(path, time_format="number")
    assert frame["timestamp"].dtype == np.float64
    assert frame["timestamp"].tolist() == [1.5, -2.0]
    frame, _ = load_ratings(path, time_col="none")
    assert rows(frame) == [[1, 2, 0], [1, 3, 1]]


def test_the_rating_is_read_only_when_asked(tmp_path):
    path = write(tmp_path, "u.data", "1\t2\tnot a number\t4\n")
    frame, _ = load_ratings(path)
    assert list(frame.columns) == ["user_id", "item_id", "timestamp"]
    assert "line 1: rating 'not a number' is not a finite number" in error(path,
                                                                           rating_col="rating")


@pytest.mark.parametrize("text", ["inf", "-inf", "1e400"])
def test_number_times_that_are_not_finite_are_refused_on_either_path(tmp_path, text):
    header = "userId,movieId,rating,timestamp\n"
    # pandas reads the first file's times as float64; the empty field of the second sends its
    # times through the field-by-field parse
    fast = write(tmp_path, "fast.csv", f"{header}1,2,3,{text}\n1,3,3,5\n")
    slow = write(tmp_path, "slow.csv", f"{header}1,2,3,{text}\n1,3,3,\n")
    expected = (f"line 2: timestamp '{text}' is not a finite number; timestamps must be "
                "numbers: fix or remove that line")
    assert error(fast, time_format="number") == f"{fast}: {expected}"
    assert error(slow, time_format="number") == f"{slow}: {expected}"


@pytest.mark.parametrize("columns,expected", [
    (dict(user_col="u", item_col="u", time_col="t"), "--user_col and --item_col name the same "
     "column 'u'"),
    (dict(user_col="u", item_col="i", time_col="u"), "--user_col and --time_col name the same "
     "column 'u'"),
    (dict(user_col="t", item_col="t", time_col="t"), "--user_col, --item_col and --time_col name "
     "the same column 't'"),
    (dict(item_col="userId"), "--user_col (by default) and --item_col name the same column "
     "'userId'"),
    (dict(user_col="u", item_col="i", time_col="none", rating_col="i"), "--item_col and "
     "--rating_col name the same column 'i'"),
    (dict(first_columns=True, rating_col="i"), "--rating_col names 'i', which --first_columns "
     "reads as the item id"),
])
def test_one_column_read_for_two_roles_is_refused(tmp_path, columns, expected):
    path = write(tmp_path, "log.csv", "u,i,t,userId,r\n1,10,300,1,5\n1,11,100,1,5\n")
    assert f"{path}: {expected}; name " in error(path, **columns)


@pytest.mark.parametrize("header,columns,repeated", [
    ("userId,movieId,timestamp,timestamp", {}, "'timestamp', the timestamp column"),
    ("u,u,i,t", dict(user_col="u", item_col="i", time_col="t"), "'u', the user id column"),
    ("userId,movieId,timestamp,rating,rating", dict(rating_col="rating"),
     "'rating', the rating column"),
    ("a,b,c,r,r", dict(first_columns=True, rating_col="r"), "'r', the rating column"),
])
def test_a_column_the_header_repeats_is_refused_when_read(tmp_path, header, columns, repeated):
    path = write(tmp_path, "log.csv", f"{header}\n1,10,300,4,5\n")
    assert f"{path}: line 1: the header repeats {repeated}; rename all but one" in error(
        path, **columns)
    # a repeated name that is not read does not matter
    path = write(tmp_path, "other.csv", "note,userId,movieId,note,timestamp\nx,1,10,y,300\n")
    assert rows(load_ratings(path)[0]) == [[1, 10, 300]]


@pytest.mark.parametrize("name,separator", [("u.data", "\t"), ("ratings.dat", "::")])
def test_headerless_files_have_no_quotes(tmp_path, name, separator):
    # read with CSV quotes, the first '"' would run on to the third: two lines read as one
    lines = [("1", '"10', "100"), ("1", "11", "200"), ("2", '12"', "300"), ("2", "13", "400")]
    path = write(tmp_path, name, "".join(separator.join((u, i, "5", t)) + "\n"
                                         for u, i, t in lines))
    frame, _ = load_ratings(path, string_ids=True)
    assert frame[["user_id", "item_id"]].values.tolist() == [[u, i] for u, i, _ in lines]
    assert frame["timestamp"].tolist() == [100, 200, 300, 400]
    assert f"{path}: line 1: item id '\"10' is not an integer;" in error(path)


@pytest.mark.parametrize("line,expected", [
    ("1:11:5:2:0:0:200", "fields must be separated by '::'"),
    ("1::11::5:2::200", "fields must be separated by '::'"),
    ("1:::11::5::200", "fields must be separated by '::'"),
    ("1::11::5::200:", "fields must be separated by '::'"),
    ("1:11::5", "fields must be separated by '::'"),
])
@pytest.mark.parametrize("string_ids", [False, True])
@pytest.mark.parametrize("at", [1, 2])
def test_ratings_dat_separators_are_checked(tmp_path, line, expected, string_ids, at):
    lines = ["1::10::5::100", "2::10::4::150", "2::12::4::300"]
    lines.insert(at - 1, line)
    path = write(tmp_path, "ratings.dat", "".join(text + "\n" for text in lines))
    assert f"{path}: line {at}: {expected}" in error(path, string_ids=string_ids)
