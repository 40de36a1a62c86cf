"""Your own data (issue 13 items 1-4): any ids and times, rating and item filters, a split given
by the user or by the NCF paper's files, and the validation split."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import cli
import convert
import dataloading
import recommend
from neumf import NeuMF

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "examples" / "events.csv"
EVENT_COLUMNS = ("--user_col", "customer", "--item_col", "product", "--time_col", "when")


def run(*argv):
    return convert.main([str(a) for a in argv])


def load(directory, name):
    return torch.load(Path(directory) / f"{name}.pt", weights_only=True).tolist()


def id_map(directory, name):
    return json.loads((Path(directory) / f"{name}.json").read_text())


def failure(capsys, *argv):
    with pytest.raises(SystemExit) as caught:
        cli.run(convert.main, [str(a) for a in argv])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("convert.py: error: ")
    return lines[0]


def nothing_written(directory):
    return not directory.exists() or not list(directory.iterdir())


def test_string_ids_and_iso_times_with_validation(tmp_path):
    out = tmp_path / "out"
    assert run("--path", EVENTS, "--output", out, *EVENT_COLUMNS, "--string_ids",
               "--time_format", "iso8601", "--min_ratings", 3, "--valid_negative", 2,
               "--validation") == 0
    assert id_map(out, "user_ids") == ["alice", "bob", "carol"]
    assert id_map(out, "item_ids") == ["tea", "coffee", "cake", "juice"]
    assert not (out / "user_ids.pt").exists()
    # alice: cake 01-01 08:00, coffee 01-02, tea 01-03, juice 01-07; bob: coffee 01-01 09:00
    # (written +00:00), cake 01-02, tea 01-05; carol: tea 01-02, cake 01-04, coffee 01-06
    assert load(out, "train_ratings") == [[0, 2], [1, 1], [0, 1], [2, 0]]
    assert load(out, "test_ratings") == [[0, 3], [1, 0], [2, 1]]
    assert load(out, "validation_ratings") == [[0, 0], [1, 2], [2, 2]]
    train = set(map(tuple, load(out, "train_ratings")))
    for name in ("test_negatives", "validation_negatives"):
        rows = load(out, name)
        assert len(rows) == 3 and all(len(row) == 2 for row in rows)
        assert not {(user, item) for user, row in enumerate(rows) for item in row} & train
    metadata = json.loads((out / "metadata.json").read_text())
    assert (metadata["validation"], metadata["users"], metadata["train"]) == (3, 3, 4)
    assert (metadata["string_ids"], metadata["time_format"]) == (True, "iso8601")
    tensors = [torch.load(out / f"{name}.pt", weights_only=True) for name in
               ("train_ratings", "test_ratings", "test_negatives", "validation_ratings",
                "validation_negatives")]
    assert metadata["fingerprint"] == dataloading.tensors_fingerprint(*tensors)


def test_without_validation_nothing_of_it_is_left(tmp_path):
    out = tmp_path / "out"
    common = ("--path", EVENTS, "--output", out, *EVENT_COLUMNS, "--string_ids",
              "--time_format", "iso8601", "--min_ratings", 3)
    assert run(*common, "--validation") == 0
    assert run(*common) == 0
    assert not list(out.glob("validation_*"))
    metadata = json.loads((out / "metadata.json").read_text())
    assert "validation" not in metadata
    # the held-out item is back in training: alice trains on cake, coffee, tea
    assert load(out, "test_ratings") == [[0, 3], [1, 0], [2, 1]]
    assert len(load(out, "train_ratings")) == 7


def test_validation_refuses_a_user_with_two_distinct_items(tmp_path, capsys):
    path = tmp_path / "ratings.csv"
    # user 2 rates item 1 twice: three rows, two distinct items
    path.write_text("userId,movieId,rating,timestamp\n1,1,5,1\n1,2,5,2\n1,3,5,3\n"
                    "2,1,5,1\n2,1,5,2\n2,2,5,3\n")
    line = failure(capsys, "--path", path, "--output", tmp_path / "out", "--min_ratings", 3,
                   "--validation")
    assert line == (f"convert.py: error: {path}: user 2 has fewer than 3 distinct items; "
                    "--validation holds out 2 of each user's items and trains on the rest: "
                    "raise --min_ratings to 3 or more, or remove that user's rows")
    assert nothing_written(tmp_path / "out")


def test_validation_negatives_may_be_the_held_out_items():
    # user 1 trained on 0..2, validated on 3, tested on 4: only 3 and 4 can be drawn
    frame = pd.DataFrame({"user_id": [1, 1, 1, 1, 1, 2, 2, 2],
                          "item_id": [0, 1, 2, 3, 4, 0, 1, 2],
                          "timestamp": [1, 2, 3, 4, 5, 6, 7, 8]})
    result = convert.convert(frame, seed=1, valid_negative=50, min_ratings=1, validation=True)
    assert result["validation_ratings"].tolist() == [[0, 3], [1, 1]]
    assert result["test_ratings"].tolist() == [[0, 4], [1, 2]]
    assert set(result["test_negatives"][0].tolist()) == {3, 4}
    assert set(result["validation_negatives"][0].tolist()) == {3, 4}
    assert result["train_ratings"].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_float_looking_and_uuid_ids_stay_as_written(tmp_path):
    uuid = "0b7e8f3c-9d2a-4c1e-8f6b-2a3d4e5f6a7b"
    path = write(tmp_path, "log.csv", f"u,i,t\n1.5,{uuid},1\n1.50,{uuid},2\n NA ,x,3\n1.5,x,4\n")
    out = tmp_path / "out"
    assert run("--path", path, "--output", out, "--user_col", "u", "--item_col", "i",
               "--time_col", "t", "--string_ids", "--min_ratings", 1, "--valid_negative", 1) == 0
    assert id_map(out, "user_ids") == ["1.5", "1.50", "NA"]
    assert id_map(out, "item_ids") == [uuid, "x"]


def test_number_times_sort_by_their_value_not_their_whole_part(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n"
                                          "1,10,5,1.7\n1,20,5,1.2\n1,30,5,-0.5\n1,40,5,1e-3\n")
    out = tmp_path / "out"
    assert run("--path", path, "--output", out, "--time_format", "number", "--min_ratings", 1,
               "--valid_negative", 1) == 0
    # times -0.5 (30), 0.001 (40), 1.2 (20), 1.7 (10): 10 is the latest
    assert load(out, "train_ratings") == [[0, 2], [0, 3], [0, 1]]
    assert load(out, "test_ratings") == [[0, 0]]


def test_no_time_column_file_order_is_time_order(tmp_path):
    path = write(tmp_path, "clicks.csv", "who,what\nb,3\na,1\nb,1\na,2\nb,2\n")
    out = tmp_path / "out"
    assert run("--path", path, "--output", out, "--user_col", "who", "--item_col", "what",
               "--time_col", "none", "--string_ids", "--min_ratings", 1,
               "--valid_negative", 1) == 0
    assert id_map(out, "user_ids") == ["b", "a"]
    assert id_map(out, "item_ids") == ["3", "1", "2"]
    assert load(out, "train_ratings") == [[0, 0], [1, 1], [0, 1]]
    assert load(out, "test_ratings") == [[0, 2], [1, 2]]
    assert json.loads((out / "metadata.json").read_text())["time_col"] == "none"


def test_min_rating_then_min_item_ratings_then_min_ratings(tmp_path):
    # Below 3 stars: (1,30) (3,10). Then items with fewer than 2 rows left: 30 (user 2 only)
    # and 40 (user 3 only). Then users with fewer than 2 rows left: user 3, who has only 20.
    # Users first would keep user 3 (40 and 20), then drop 40 and leave user 3 one row.
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n"
                 "1,10,4,1\n1,20,5,2\n1,30,2,3\n2,10,3,4\n2,20,4.5,5\n2,30,5,6\n"
                 "3,10,2,7\n3,40,5,8\n3,20,4,9\n")
    out = tmp_path / "out"
    assert run("--path", path, "--output", out, "--min_rating", 3, "--min_item_ratings", 2,
               "--min_ratings", 2, "--valid_negative", 1) == 0
    assert load(out, "user_ids") == [1, 2]
    assert load(out, "item_ids") == [10, 20]
    assert load(out, "train_ratings") == [[0, 0], [1, 0]]
    assert load(out, "test_ratings") == [[0, 1], [1, 1]]
    metadata = json.loads((out / "metadata.json").read_text())
    assert {key: metadata[key] for key in ("rows_below_min_rating", "items_dropped",
                                           "users_dropped", "min_rating",
                                           "min_item_ratings")} == {
        "rows_below_min_rating": 2, "items_dropped": 2, "users_dropped": 1, "min_rating": 3.0,
        "min_item_ratings": 2}


def test_min_rating_reads_the_rating_of_headerless_files(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::10::5::1\n1::20::1::2\n1::30::4::3\n")
    out = tmp_path / "out"
    assert run("--path", path, "--output", out, "--min_rating", 4, "--min_ratings", 1,
               "--valid_negative", 1) == 0
    assert load(out, "item_ids") == [10, 30]


# (file name, text, extra flags, expected error after "convert.py: error: ")
BAD_ROWS = [
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\nx,2,3,5\n", [],
     "{path}: line 3: user id 'x' is not an integer; ids and timestamps must be whole numbers"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\nx,2,3,5\n", [],
     "(or read ids as text with --string_ids)"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4.5\n", [],
     "(or name another kind with --time_format number or iso8601)"),
    ("ratings.csv", "userId,movieId,rating,timestamp\na,b,3,4\n,c,3,5\n", ["--string_ids"],
     "{path}: line 3: missing user id; every row needs a user id and an item id"),
    ("ratings.csv", "userId,movieId,rating,timestamp\na,b,3,4\nc, ,3,5\n", ["--string_ids"],
     "{path}: line 3: missing item id; "),
    ("u.data", "a\tb\t3\t4\n\n", ["--string_ids"], "{path}: line 2: missing user id; "),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4.5\n1,3,3,soon\n",
     ["--time_format", "number"], "{path}: line 3: timestamp 'soon' is not a finite number; "),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,nan\n",
     ["--time_format", "number"], "{path}: line 2: timestamp 'nan' is not a finite number; "),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,2024-01-01\n1,3,3,yesterday\n",
     ["--time_format", "iso8601"],
     "{path}: line 3: timestamp 'yesterday' is not an ISO-8601 date-time; write times like"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,2024-01-01\n1,3,3,\n",
     ["--time_format", "iso8601"], "{path}: line 3: missing timestamp; "),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,2024-13-01\n",
     ["--time_format", "iso8601"], "{path}: line 2: timestamp '2024-13-01' is not an ISO-8601"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,good,5\n",
     ["--min_rating", "3"], "{path}: line 3: rating 'good' is not a finite number; "),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,,5\n",
     ["--min_rating", "3"], "{path}: line 3: missing rating; "),
    ("ratings.csv", "userId,movieId,timestamp\n1,2,4\n", ["--min_rating", "3"],
     "{path}: header 'userId,movieId,timestamp' lacks rating; name the rating column with "
     "--rating_col"),
    ("events.csv", "u,i,t,stars\n1,2,3,4\n", ["--min_rating", "3", "--user_col", "u",
                                               "--item_col", "i", "--time_col", "t"],
     "{path}: header 'u,i,t,stars' lacks rating; name the rating column with --rating_col"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n", ["--min_rating", "4"],
     "--min_rating 4.0: no rating is that high (the highest is 3); lower --min_rating"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n2,3,3,4\n",
     ["--min_item_ratings", "2"], "--min_item_ratings 2: no item has that many ratings (the "
                                  "most any item has is 1); lower --min_item_ratings"),
]


@pytest.mark.parametrize("name,text,flags,expected", BAD_ROWS)
def test_bad_rows_are_refused_naming_the_line(tmp_path, capsys, name, text, flags, expected):
    path = write(tmp_path, name, text)
    line = failure(capsys, "--path", path, "--output", tmp_path / "out", "--min_ratings", 1,
                   *flags)
    assert expected.format(path=path) in line
    assert nothing_written(tmp_path / "out")


# a given split: users a, b; the test file's rows are out of user order on purpose
TRAIN = "user,item,time\na,x,3\nb,y,1\na,y,2\nb,z,5\na,x,9\n"
TEST = "user,item,time\nb,x,6\na,z,4\n"
SPLIT_COLUMNS = ("--user_col", "user", "--item_col", "item", "--time_col", "time",
                 "--string_ids")


def given_split(tmp_path, test=TEST, negatives=None, train=TRAIN):
    paths = [write(tmp_path, "train.csv", train), write(tmp_path, "test.csv", test)]
    flags = ["--path", paths[0], "--test_path", paths[1], *SPLIT_COLUMNS]
    if negatives is not None:
        flags += ["--test_negatives_path", write(tmp_path, "test.negative", negatives)]
    return flags


def test_given_split_with_drawn_negatives(tmp_path):
    out = tmp_path / "out"
    assert run(*given_split(tmp_path), "--output", out, "--valid_negative", 4) == 0
    assert id_map(out, "user_ids") == ["a", "b"]
    assert id_map(out, "item_ids") == ["x", "y", "z"]
    # time order: (b,y) 1, (a,y) 2, (a,x) 3, (b,z) 5; the repeated (a,x) at 9 dropped
    assert load(out, "train_ratings") == [[1, 1], [0, 1], [0, 0], [1, 2]]
    assert load(out, "test_ratings") == [[0, 2], [1, 0]]
    negatives = load(out, "test_negatives")
    assert set(negatives[0]) == {2} and set(negatives[1]) == {0}
    metadata = json.loads((out / "metadata.json").read_text())
    assert (metadata["duplicates_dropped"], metadata["test_source"]) == (
        1, str(tmp_path / "test.csv"))
    assert (metadata["user_column"], metadata["item_column"]) == ("user", "item")


def test_given_split_with_given_negatives(tmp_path):
    out = tmp_path / "out"
    negatives = "(a,z)\tw\tz\n(b,x)\tx\tw\n"
    assert run(*given_split(tmp_path, negatives=negatives), "--output", out) == 0
    # w appears only among the negatives: it gets the next item id
    assert id_map(out, "item_ids") == ["x", "y", "z", "w"]
    assert load(out, "test_negatives") == [[3, 2], [0, 3]]
    assert json.loads((out / "metadata.json").read_text())["valid_negative"] == 2


def test_given_negatives_that_are_positives_are_kept_with_a_note(tmp_path, capsys):
    out = tmp_path / "out"
    # x and y are a's and b's training items, z is a's test positive
    assert run(*given_split(tmp_path, negatives="(a,z)\tx\tz\n(b,x)\ty\tw\n"),
               "--output", out) == 0
    assert load(out, "test_negatives") == [[0, 2], [1, 3]]
    assert capsys.readouterr().err == (
        f"convert.py: note: {tmp_path / 'test.negative'}: 2 of the given test negatives are "
        f"training items of their user and 1 the user's test positive; kept as given (drawn "
        f"ones are never training items)\n")
    assert run(*given_split(tmp_path), "--output", tmp_path / "drawn",
               "--valid_negative", 4) == 0
    assert capsys.readouterr().err == ""


PAPER_TRAIN = "0\t5\t5\t978300760\n0\t7\t3\t978300700\n1\t5\t4\t978300000\n1\t6\t4\t978300001\n"
PAPER_TEST = "0\t6\t4\t978824291\n1\t7\t5\t978300019\n"
PAPER_NEGATIVES = "(0,6)\t8\t9\t8\n(1,7)\t9\t8\t7\n"


def paper(tmp_path, train=PAPER_TRAIN, test=PAPER_TEST, negatives=PAPER_NEGATIVES):
    prefix = tmp_path / "ml-1m"
    for suffix, text in ((".train.rating", train), (".test.rating", test),
                         (".test.negative", negatives)):
        write(tmp_path, f"ml-1m{suffix}", text)
    return prefix


def test_the_papers_files(tmp_path):
    out = tmp_path / "out"
    assert run("--paper", paper(tmp_path), "--output", out) == 0
    assert load(out, "user_ids") == [0, 1]
    assert load(out, "item_ids") == [5, 7, 6, 8, 9]
    # time order: (1,5) (1,6) (0,7) (0,5)
    assert load(out, "train_ratings") == [[1, 0], [1, 2], [0, 1], [0, 0]]
    assert load(out, "test_ratings") == [[0, 2], [1, 1]]
    assert load(out, "test_negatives") == [[3, 4, 3], [4, 3, 1]]
    metadata = json.loads((out / "metadata.json").read_text())
    assert (metadata["reader"], metadata["valid_negative"]) == ("paper", 3)
    # the paper's files have no header: its columns are named for what they hold
    assert (metadata["user_column"], metadata["item_column"]) == ("user", "item")


# (what to change, expected error after "convert.py: error: "); {test}, {negatives}: the files
SPLIT_REFUSALS = [
    (dict(test="user,item,time\nb,x,6\nc,z,4\na,z,4\n"),
     "{test}: line 3: user c has no training row; hold out an item of a training user"),
    (dict(test="user,item,time\nb,x,6\na,z,4\nb,z,7\n"),
     "{test}: line 4: a second test row for user b (the first is line 2); hold out one item"),
    (dict(test="user,item,time\na,z,4\n"),
     "{test}: user b has training rows but no test row; add its held-out item"),
    (dict(test="user,item,time\nb,x,6\na,y,4\n"),
     "{test}: line 3: item y is among user a's training rows; a held-out item must not be"),
    (dict(negatives="(a,z)\tx\n(b,y)\tx\n"),
     "{negatives}: line 2: (b,y) is not a test pair of {test}; fix or remove that line"),
    (dict(negatives="(a,z)\tx\n(c,x)\tx\n"),
     "{negatives}: line 2: (c,x) is not a test pair of {test}"),
    (dict(negatives="(a,z)\tx\n(a,z)\ty\n(b,x)\tz\n"),
     "{negatives}: line 2: a second line for the test pair (a,z); remove one of them"),
    (dict(negatives="(a,z)\tx\n"),
     "{negatives}: no line for user b's test pair; give every test pair its negatives"),
    (dict(negatives="(a,z)\tx\ty\n(b,x)\tz\n"),
     "{negatives}: line 2: 1 negatives, line 1 has 2; give every test pair the same number"),
    (dict(negatives="(a,z)\n"), "{negatives}: line 1: 0 negatives, line 1 has 0"),
    (dict(negatives="a,z\tx\n"), "{negatives}: line 1: starts with 'a,z', not (user,item)"),
    (dict(negatives=""), "{negatives}: file is empty"),
]


@pytest.mark.parametrize("change,expected", SPLIT_REFUSALS)
def test_given_split_refusals(tmp_path, capsys, change, expected):
    flags = given_split(tmp_path, **{"negatives": "(a,z)\tx\n(b,x)\ty\n", **change})
    line = failure(capsys, *flags, "--output", tmp_path / "out")
    assert expected.format(test=tmp_path / "test.csv",
                           negatives=tmp_path / "test.negative") in line
    assert nothing_written(tmp_path / "out")


PAPER_REFUSALS = [
    (dict(test="0\t6\t4\t1\n2\t7\t5\t1\n"), "{prefix}.test.rating: line 2: user 2 has no "
                                            "training row"),
    (dict(negatives="(0,6)\t8\n(1,7)\tnine\n"),
     "{prefix}.test.negative: line 2: id 'nine' is not an integer"),
    (dict(train="0\t5\t5\n"), "{prefix}.train.rating: line 1: 3 fields, expected 4"),
]


@pytest.mark.parametrize("change,expected", PAPER_REFUSALS)
def test_the_papers_files_refused(tmp_path, capsys, change, expected):
    prefix = paper(tmp_path, **change)
    line = failure(capsys, "--paper", prefix, "--output", tmp_path / "out")
    assert expected.format(prefix=prefix) in line


BAD_FLAGS = [
    (["--test_negatives_path", "n"], "--test_negatives_path goes with --test_path"),
    (["--test_path", "t", "--min_ratings", "3"], "--min_ratings: a split given with"),
    (["--test_path", "t", "--min_rating", "3"], "--min_rating: a split given with"),
    (["--paper", "p", "--min_item_ratings", "2"], "--min_item_ratings: a split given with"),
    (["--paper", "p", "--validation"], "--validation: a split given with"),
    (["--paper", "p", "--string_ids"], "--string_ids: --paper reads the paper's own format"),
    (["--paper", "p", "--test_path", "t"], "--test_path: --paper reads the paper's own format"),
    (["--paper", "p", "--user_col", "u"], "--user_col: --paper reads"),
    (["--min_item_ratings", "0"], "--min_item_ratings must be at least 1, not 0"),
    (["--time_format", "julian"], "--time_format"),
    (["--min_rating", "high"], "--min_rating"),
]


@pytest.mark.parametrize("flags,expected", BAD_FLAGS)
def test_bad_flags(tmp_path, capsys, flags, expected):
    line = failure(capsys, "--output", tmp_path / "out", *flags)
    assert expected in line
    assert nothing_written(tmp_path / "out")


def test_recommend_answers_in_text_ids(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--path", EVENTS, "--output", out, *EVENT_COLUMNS, "--string_ids",
               "--time_format", "iso8601", "--min_ratings", 3, "--valid_negative", 2) == 0
    torch.manual_seed(0)
    torch.save(NeuMF(3, 4, 4, [8, 4]).state_dict(), tmp_path / "model.pth")
    capsys.readouterr()
    table = recommend.main(["--data", str(out), "--checkpoint", str(tmp_path / "model.pth"),
                            "--users", "carol", "alice", "-k", "4"])
    # alice trained on cake, coffee, tea; carol on tea, cake: what is left, in text ids, under
    # the names of the columns they were read from
    assert table["customer"].unique().tolist() == ["carol", "alice"]
    assert sorted(table["product"][table["customer"] == "carol"]) == ["coffee", "juice"]
    assert table["product"][table["customer"] == "alice"].tolist() == ["juice"]
    # the printed table is headed by the same names
    assert capsys.readouterr().out.split()[:4] == ["customer", "rank", "product", "score"]
    with pytest.raises(SystemExit):
        cli.run(recommend.main, ["--data", str(out), "--checkpoint", str(tmp_path / "model.pth"),
                                 "--users", "dave"])
    assert "unknown user id dave" in capsys.readouterr().err
