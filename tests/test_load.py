import numpy as np
import pandas as pd
import pytest

from load import DataError, load_ratings


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
    with pytest.raises(DataError) as caught:
        load_ratings(path, **columns)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_missing_file(tmp_path):
    assert "no such file" in error(tmp_path / "ratings.csv")


def test_directory(tmp_path):
    assert "is a directory" in error(tmp_path)


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
