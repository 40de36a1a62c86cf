import ctypes
import errno
import functools
import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint
import cli
import convert
import dataloading
import fileio
import generate
import load
import progress
from conftest import REAL_DATA, ROOT
from neumf import NeuMF

HEADER = "userId,movieId,rating,timestamp\n"
TENSOR_FILES = [f"{name}.pt" for name in convert.TENSORS]

# User 9 has 2 ratings and is dropped at --min_ratings 3; it comes first and rates an item of
# its own, so numbering before the filter would show. User 7 rates 100 twice (t=50, then t=60):
# the earlier one stays, so its latest is 200 (t=50, after 100 in file order) rather than the
# repeat. User 5's three ratings share one timestamp: the last in the file is its test item.
TINY = HEADER + """\
9,400,5,10
7,100,4,50
7,200,3,50
9,999,5,11
5,300,2,20
7,100,1,60
5,200,2,20
5,400,2,20
7,400,3,40
"""


def tensors(directory):
    return {name: torch.load(Path(directory) / f"{name}.pt", weights_only=True)
            for name in convert.TENSORS}


def run(*argv):
    return convert.main([str(a) for a in argv])


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(TINY)
    return path


def test_protocol_on_a_hand_made_file(tmp_path, tiny, capsys):
    output = tmp_path / "out"
    assert run("--path", tiny, "--output", output, "--min_ratings", 3, "--valid_negative", 5) == 0
    got = tensors(output)
    assert got["user_ids"].tolist() == [7, 5]
    assert got["item_ids"].tolist() == [100, 200, 300, 400]
    # time order: (5,300) (5,200) (5,400) t=20, (7,400) t=40, (7,100) (7,200) t=50, (7,100) t=60
    assert got["train_ratings"].tolist() == [[1, 2], [1, 1], [0, 3], [0, 0]]
    assert got["test_ratings"].tolist() == [[0, 1], [1, 3]]
    negatives = got["test_negatives"]
    assert negatives.shape == (2, 5)
    # not a training positive; user 0's test item (1) may be drawn
    assert set(negatives[0].tolist()) <= {1, 2}
    assert set(negatives[1].tolist()) <= {0, 3}
    for tensor in got.values():
        assert tensor.dtype == torch.int64
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata.pop("fingerprint") == convert.tensors_fingerprint(
        got["train_ratings"], got["test_ratings"], got["test_negatives"])
    assert metadata == {
        "format_version": 1, "source": str(tiny.resolve()), "reader": "movielens-csv",
        "user_column": "userId", "item_column": "movieId", "seed": 1, "valid_negative": 5,
        "min_ratings": 3, "ratings_read": 9,
        "users_dropped": 1, "duplicates_dropped": 1, "users": 2, "items": 4, "train": 4,
        "test": 2}
    assert capsys.readouterr().out == (
        "convert.py: read 9 ratings; kept 2 users (1 dropped), 4 items; 1 duplicates dropped; "
        f"train 4, test 2, test negatives 2x5 -> {output}\n")


def random_frame(seed, users=60, items=40, rows=2000):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(1000, 1000 + users, rows) * 3,
        "item_id": rng.integers(0, items, rows) * 7 + 1,
        # a narrow time range: many ties, and with 2000 rows, many repeated pairs
        "timestamp": rng.integers(0, 50, rows),
    })


def reference(frame, min_ratings):
    """The protocol written plainly in pandas: (train, test) in original ids."""
    counts = frame["user_id"].value_counts()
    kept = frame[frame["user_id"].map(counts) >= min_ratings]
    ordered = kept.sort_values("timestamp", kind="stable")
    ordered = ordered.drop_duplicates(["user_id", "item_id"], keep="first")
    test = ordered.groupby("user_id").tail(1)
    train = ordered.drop(test.index)
    return train[["user_id", "item_id"]].values, test.sort_values("user_id"), kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_plain_pandas_reference(seed):
    frame = random_frame(seed)
    # convert empties the frame it is given
    result = convert.convert(frame.copy(), seed=seed, valid_negative=30, min_ratings=30)
    train, test, kept = reference(frame, 30)
    user_ids, item_ids = result["user_ids"].numpy(), result["item_ids"].numpy()
    assert user_ids.tolist() == pd.unique(kept["user_id"]).tolist()
    assert item_ids.tolist() == pd.unique(kept["item_id"]).tolist()
    dense_train = result["train_ratings"].numpy()
    assert np.array_equal(np.stack([user_ids[dense_train[:, 0]],
                                    item_ids[dense_train[:, 1]]], 1), train)
    dense_test = result["test_ratings"].numpy()
    # test rows are sorted by dense user id, i.e. by first appearance
    order = pd.Index(test["user_id"]).get_indexer(user_ids)
    assert np.array_equal(item_ids[dense_test[:, 1]], test["item_id"].to_numpy()[order])
    assert result["users_dropped"] == frame["user_id"].nunique() - len(user_ids)
    assert result["duplicates_dropped"] == len(kept) - len(train) - len(test)


def test_invariants():
    frame = random_frame(3, users=80, items=50, rows=3000)
    result = convert.convert(frame, seed=5, valid_negative=40, min_ratings=20)
    train, test = result["train_ratings"], result["test_ratings"]
    negatives, users, items = result["test_negatives"], result["users"], result["items"]
    assert train.dtype == test.dtype == negatives.dtype == torch.int64
    assert train.shape == (result["train"], 2)
    assert test.shape == (users, 2) and negatives.shape == (users, 40)
    assert result["user_ids"].shape == (users,) and result["item_ids"].shape == (items,)
    assert test[:, 0].tolist() == list(range(users))
    assert set(train[:, 0].tolist()) == set(range(users))
    assert set(train[:, 1].tolist()) | set(test[:, 1].tolist()) == set(range(items))
    assert int(negatives.min()) >= 0 and int(negatives.max()) < items
    positives = set(map(tuple, train.tolist()))
    assert len(positives) == len(train)
    assert not positives & set(map(tuple, test.tolist()))
    for user in range(users):
        assert not {(user, item) for item in negatives[user].tolist()} & positives


def test_test_positive_can_be_drawn():
    # user 1 has trained on items 0..2 and is tested on 3: only 3 is left to draw
    frame = pd.DataFrame({"user_id": [1, 1, 1, 1, 2], "item_id": [0, 1, 2, 3, 0],
                          "timestamp": [1, 2, 3, 4, 5]})
    result = convert.convert(frame, seed=1, valid_negative=20, min_ratings=1)
    assert result["test_negatives"][0].tolist() == [3] * 20


def test_convert_lets_go_of_the_columns_it_is_given():
    frame = random_frame(5)
    result = convert.convert(frame, seed=1, valid_negative=5, min_ratings=1)
    assert frame.columns.empty
    assert result["ratings_read"] == 2000


def test_blocks_of_draws_give_valid_negatives(monkeypatch):
    monkeypatch.setattr(convert, "DRAWS_PER_BLOCK", 64)
    frame = random_frame(4)
    result = convert.convert(frame, seed=2, valid_negative=30, min_ratings=25)
    positives = set(map(tuple, result["train_ratings"].tolist()))
    for user, row in enumerate(result["test_negatives"].tolist()):
        assert not {(user, item) for item in row} & positives


@pytest.mark.parametrize("values", [
    np.array([5, 3, 5, 3, 1, 5, -2, 3]),
    np.array([2**62, -2**62, 5, 5, -2**62, 2**62]),  # too wide for the composite key
])
def test_stable_order(values):
    assert convert._stable_order(values).tolist() == np.argsort(values, kind="stable").tolist()


def test_same_seed_same_files_other_seed_other_negatives(tmp_path, tiny):
    frame = random_frame(6)
    frame.rename(columns={"user_id": "userId", "item_id": "movieId"}).to_csv(
        tmp_path / "ratings.csv", index=False)
    source = tmp_path / "ratings.csv"
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run("--path", source, "--output", tmp_path / name, "--seed", seed, "--min_ratings", 5)
    for file in TENSOR_FILES + ["metadata.json"]:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    a, c = tensors(tmp_path / "a"), tensors(tmp_path / "c")
    assert torch.equal(a["train_ratings"], c["train_ratings"])
    assert torch.equal(a["test_ratings"], c["test_ratings"])
    assert not torch.equal(a["test_negatives"], c["test_negatives"])


def test_seeds_up_to_the_range_every_tool_takes_are_fine(tmp_path, tiny):
    # [0, 2^63), as ncf.py's; below and above it is refused (test_tools_errors.py)
    for seed in (0, 2 ** 63 - 1):
        assert run("--path", tiny, "--output", tmp_path / "out", "--seed", seed,
                   "--min_ratings", 1) == 0


def failure(capsys, *argv):
    with pytest.raises(SystemExit) as caught:
        cli.run(convert.main, [str(a) for a in argv])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error: "), captured.err
    return lines[0]


def no_results(directory):
    return not directory.exists() or not [p for p in directory.iterdir()
                                          if p.suffix in (".pt", ".json", ".tmp")]


@pytest.mark.parametrize("name,text,expected", [
    ("ratings.csv", None, "no such file"),
    ("ratings.csv", "", "file is empty"),
    ("ratings.csv", "user,movie,rating\n1,2,3\n", "lacks userId, movieId, timestamp"),
    ("ratings.csv", HEADER + "1,2,3,4\nx,2,3,5\n", "line 3: user id 'x' is not an integer"),
    ("u.data", "1\t2\t3\t4\n1\t2\t3\tyesterday\n", "line 2: timestamp 'yesterday'"),
    ("ratings.csv", HEADER + "1,2,3,4\n", "no user has 20 ratings (the most any user has is 1); "
                                          "lower --min_ratings"),
    ("votes.txt", "a b c\n", "unknown ratings format"),
])
def test_bad_input(tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    line = failure(capsys, "--path", path, "--output", tmp_path / "out")
    assert line.startswith(f"convert.py: error: {path}: ")
    assert expected in line
    assert no_results(tmp_path / "out")


def test_unwritable_output(tmp_path, tiny, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = failure(capsys, "--path", tiny, "--output", blocker / "out")
    assert f"{blocker / 'out'}: cannot write the output" in line
    assert "choose a writable --output" in line


@pytest.mark.parametrize("flag,value", [("--valid_negative", 0), ("--min_ratings", 0),
                                        ("--seed", "one"), ("--frobnicate", 1)])
def test_bad_flags(tmp_path, tiny, capsys, flag, value):
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", flag, value)
    assert flag in line
    assert no_results(tmp_path / "out")


def test_bring_your_own_columns_from_the_command_line(tmp_path, capsys):
    source = tmp_path / "clicks.csv"
    source.write_text("who,what,when\n" + "".join(f"{u},{i},{u + i}\n"
                                                  for u in range(3) for i in range(4)))
    assert run("--path", source, "--output", tmp_path / "out", "--min_ratings", 1,
               "--user_col", "who", "--item_col", "what", "--time_col", "when") == 0
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["reader"] == "csv-columns"
    assert tensors(tmp_path / "out")["test_ratings"].tolist() == [[0, 3], [1, 3], [2, 3]]


def fail_on_call(number, real, error):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)
    return failing


@pytest.fixture
def finished(tmp_path, tiny, capsys):
    """The bytes of each file of a conversion of `tiny` that ran to the end."""
    reference = tmp_path / "reference"
    assert run("--path", tiny, "--output", reference, "--min_ratings", 1) == 0
    capsys.readouterr()
    return {file: (reference / file).read_bytes() for file in TENSOR_FILES + ["metadata.json"]}


def assert_nothing_left(output):
    """A failed conversion into a fresh directory removes all it wrote, marker included, and
    the directory, which it created."""
    assert not output.exists()
    assert sorted(path.name for path in output.parent.iterdir()) == ["ratings.csv"]


# os.replace is called once per file: the five tensors, then metadata.json.
@pytest.mark.parametrize("failing_rename", [1, 3, 6])
def test_failed_rename_removes_what_it_wrote(tmp_path, tiny, monkeypatch, capsys,
                                             failing_rename):
    output = tmp_path / "out"
    monkeypatch.setattr(convert.os, "replace",
                        fail_on_call(failing_rename, os.replace, OSError(5, "Input/output error")))
    line = failure(capsys, "--path", tiny, "--output", output, "--min_ratings", 1)
    assert "Input/output error" in line
    assert_nothing_left(output)


def test_failed_write_removes_what_it_wrote(tmp_path, tiny, monkeypatch, capsys):
    output = tmp_path / "out"
    real_save = torch.save
    calls = []

    def save_then_run_out_of_space(obj, f):
        calls.append(obj)
        if len(calls) == 2:
            f.write(b"half a tensor")
            raise OSError(28, "No space left on device")
        real_save(obj, f)
    monkeypatch.setattr(convert.torch, "save", save_then_run_out_of_space)
    line = failure(capsys, "--path", tiny, "--output", output, "--min_ratings", 1)
    assert "No space left on device" in line
    assert_nothing_left(output)


def test_interrupted_rerun_leaves_a_refused_directory(tmp_path, tiny, finished, monkeypatch):
    output = tmp_path / "out"
    assert run("--path", tiny, "--output", output, "--min_ratings", 1) == 0
    monkeypatch.setattr(convert.os, "replace",
                        fail_on_call(2, os.replace, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run("--path", tiny, "--output", output, "--min_ratings", 1)
    # the new train_ratings.pt is removed again; the earlier conversion's other files stay
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [".converting", "metadata.json"] + TENSOR_FILES[1:])
    for name in TENSOR_FILES[1:]:
        assert (output / name).read_bytes() == finished[name], name
    with pytest.raises(dataloading.DataError, match="started and did not finish"):
        dataloading.open_dataset(str(output))


def full_disk_on_save(number):
    """torch.save that writes half a tensor, then finds the disk full, on its number-th call."""
    real_save = torch.save
    calls = []

    def save(obj, f):
        calls.append(obj)
        if len(calls) == number:
            f.write(b"half a tensor")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)
    return save


def listing(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir()}


# (what fails, on which call): the tensors are saved five times, then each of the six files
# is flushed to disk, metadata.json last
@pytest.mark.parametrize("target,number", [("save", 1), ("save", 3), ("save", 5), ("fsync", 6)])
def test_a_failed_conversion_leaves_the_earlier_one_usable(tmp_path, tiny, monkeypatch, capsys,
                                                           target, number):
    output = tmp_path / "out"
    # with a validation split, which the new conversion, without one, would remove
    assert run("--path", tiny, "--output", output, "--min_ratings", 3, "--validation") == 0
    earlier = listing(output)
    if target == "save":
        monkeypatch.setattr(convert.torch, "save", full_disk_on_save(number))
    else:
        monkeypatch.setattr(fileio, "fsync_path", fail_on_call(
            number, fileio.fsync_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    capsys.readouterr()
    line = failure(capsys, "--path", tiny, "--output", output, "--min_ratings", 1)
    assert line == (f"convert.py: error: {output}: cannot write the output (No space left on "
                    "device); check free space and permissions")
    assert listing(output) == earlier
    assert len(dataloading.open_dataset(str(output)).validation) == 2


def test_a_conversion_that_leaves_nothing_to_train_on_is_refused(tmp_path, capsys):
    ratings = tmp_path / "ratings.csv"
    # each user's one distinct item is its test positive
    ratings.write_text("userId,movieId,rating,timestamp\n1,10,5,100\n2,11,5,200\n1,10,4,300\n")
    line = failure(capsys, "--path", ratings, "--output", tmp_path / "out", "--min_ratings", 1,
                   "--valid_negative", 1)
    assert line == (f"convert.py: error: {ratings}: no training pair is left: each of the 2 "
                    f"users kept has only 1 distinct item(s), all held out; raise --min_ratings "
                    f"above 1, or add interactions")
    assert no_results(tmp_path / "out")


def test_a_refused_conversion_removes_the_output_directories_it_created(tmp_path, capsys):
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(HEADER + "1,2,3,4\n")
    output = tmp_path / "new" / "deeper" / "out"
    failure(capsys, "--path", ratings, "--output", output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.csv"]
    # a directory that was there before is the user's: it stays, empty or not
    existing = tmp_path / "existing"
    existing.mkdir()
    failure(capsys, "--path", ratings, "--output", existing / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "ratings.csv"]
    assert list(existing.iterdir()) == []
    failure(capsys, "--path", ratings, "--output", existing)
    assert existing.is_dir()
    failure(capsys, "--paper", tmp_path / "missing", "--output", output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "ratings.csv"]


def test_a_given_test_file_is_refused_at_its_own_line_whatever_the_training_reader(tmp_path,
                                                                                   capsys):
    (tmp_path / "train").mkdir()
    train = tmp_path / "train" / "u.data"  # headerless: its rows start at line 1
    train.write_text("1\t10\t5\t100\n1\t11\t5\t200\n2\t10\t4\t150\n")
    test = tmp_path / "test.csv"  # a header: its rows start at line 2
    test.write_text("userId,movieId,rating,timestamp\n1,12,5,500\n3,11,5,500\n")
    line = failure(capsys, "--path", train, "--test_path", test, "--output", tmp_path / "out")
    assert line.startswith(f"convert.py: error: {test}: line 3: user 3 has no training row")


def given_split(tmp_path):
    """Flags of a split given with --test_path and --test_negatives_path: users 1 and 2."""
    header = "userId,movieId,rating,timestamp\n"
    files = {"train.csv": header + "1,10,3,1\n1,11,3,2\n2,10,3,1\n",
             "test.csv": header + "1,12,3,5\n2,11,3,5\n",
             "test.negative": "(1,12)\t13\t14\n(2,11)\t12\t13\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return ["--path", tmp_path / "train.csv", "--test_path", tmp_path / "test.csv",
            "--test_negatives_path", tmp_path / "test.negative"]


def paper(tmp_path):
    """Flags of the NCF paper's files, PREFIX.train.rating and the others: users 0 and 1."""
    files = {".train.rating": "0\t5\t5\t1\n1\t5\t4\t2\n1\t6\t4\t3\n",
             ".test.rating": "0\t6\t4\t9\n1\t7\t5\t9\n",
             ".test.negative": "(0,6)\t8\t9\n(1,7)\t9\t8\n"}
    for suffix, text in files.items():
        (tmp_path / f"ml-1m{suffix}").write_text(text)
    return ["--paper", tmp_path / "ml-1m"]


@pytest.mark.parametrize("split,negatives", [(given_split, "test.negative"),
                                             (paper, "ml-1m.test.negative")])
@pytest.mark.parametrize("flag,value", [("--valid_negative", 50), ("--seed", 7), ("-s", 0),
                                        ("--valid_negative", 100)])
def test_given_negatives_refuse_the_flags_that_draw_them(tmp_path, capsys, split, negatives,
                                                         flag, value):
    output = tmp_path / "out"
    line = failure(capsys, *split(tmp_path), "--output", output, flag, value)
    name = "--seed" if flag == "-s" else flag
    assert line == (f"convert.py: error: {name}: the test negatives come from "
                    f"{tmp_path / negatives}, not drawn; drop {name}")
    assert no_results(output)


def test_drawn_negatives_of_a_given_split_take_the_seed(tmp_path):
    output = tmp_path / "out"
    flags = given_split(tmp_path)[:-2]
    assert run(*flags, "--output", output, "--seed", 7, "--valid_negative", 3) == 0
    metadata = json.loads((output / "metadata.json").read_text())
    assert (metadata["seed"], metadata["valid_negative"]) == (7, 3)


@pytest.mark.parametrize("column", ["nosuchcol", "rating"])
def test_a_rating_column_without_min_rating_is_refused(tmp_path, tiny, capsys, column):
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", "--min_ratings", 1,
                   "--rating_col", column)
    assert line == "convert.py: error: --rating_col goes with --min_rating; add it or drop " \
                   "--rating_col"
    assert no_results(tmp_path / "out")


@pytest.mark.parametrize("flag", ["--user_col", "--item_col", "--time_col", "--rating_col"])
def test_an_empty_column_name_is_refused(tmp_path, tiny, capsys, flag):
    # "" once fell back to the default column, or ended in a KeyError traceback (--rating_col)
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", "--min_ratings", 1,
                   "--min_rating", 3, flag, "")
    assert line == (f"convert.py: error: {flag} is empty; name a column of the file's header, "
                    f"or drop {flag}")
    assert no_results(tmp_path / "out")


def test_a_min_rating_of_0_is_refused_with_a_given_split(tmp_path, capsys):
    output = tmp_path / "out"
    # drawn negatives: only the filter is refused
    line = failure(capsys, *given_split(tmp_path)[:-2], "--output", output, "--min_rating", 0)
    assert line.startswith("convert.py: error: --min_rating: a split given with --test_path or "
                           "--paper is used as it is")
    assert no_results(output)


def test_the_rating_column_is_named_for_min_rating(tmp_path, tiny, capsys):
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", "--min_rating", 0,
                   "--rating_col", "nosuchcol")
    assert "lacks nosuchcol; name the rating column with --rating_col" in line
    assert run("--path", tiny, "--output", tmp_path / "out", "--min_ratings", 1,
               "--min_rating", 3, "--rating_col", "rating") == 0
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())[
        "rows_below_min_rating"] == 4


@pytest.mark.parametrize("split", [None, given_split])
def test_a_reader_that_goes_away_after_the_conversion_ends_it_quietly(tmp_path, tiny, split):
    output = tmp_path / "out"
    flags = split(tmp_path) if split else ["--path", tiny, "--min_ratings", 1]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the summary is printed
    done = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--output", output,
                           *map(str, flags)], stdout=write_end, stderr=subprocess.PIPE,
                          text=True)
    os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")
    dataloading.open_dataset(str(output))


def test_atomic_save_gives_the_same_bytes_every_time(tmp_path):
    state = {"weight": torch.arange(6.0).reshape(2, 3), "step": 4}
    checkpoint.atomic_save(state, tmp_path / "first.pth")
    checkpoint.atomic_save(state, tmp_path / "first.pth")
    checkpoint.atomic_save(state, tmp_path / "second.pth")
    assert (tmp_path / "first.pth").read_bytes() == (tmp_path / "second.pth").read_bytes()
    loaded = torch.load(tmp_path / "first.pth", weights_only=True)
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["step"] == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.pth", "second.pth"]


def test_load_state_names_the_file_when_the_weights_do_not_fit():
    model = NeuMF(3, 4, 2, [4, 2])
    state = NeuMF(3, 5, 2, [4, 2]).state_dict()
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load_state(model, state, "run/model.pth")
    message = str(caught.value)
    assert message.startswith("run/model.pth: does not fit NeuMF (size mismatch for "
                              "mf_item_embed.weight: ") and "\n" not in message
    fitting = NeuMF(3, 4, 2, [4, 2])
    checkpoint.load_state(model, fitting.state_dict(), "run/model.pth")
    assert torch.equal(model.mf_item_embed.weight, fitting.mf_item_embed.weight)


REAL = Path(REAL_DATA)


@pytest.mark.skipif(not REAL_DATA or not REAL.is_file(),
                    reason="NCF_REAL_DATA does not name ml-latest-small's ratings.csv")
def test_ml_latest_small(tmp_path, capsys):
    assert run("--path", REAL, "--output", tmp_path) == 0
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert {key: metadata[key] for key in ("ratings_read", "users_dropped", "duplicates_dropped",
                                           "users", "items", "train", "test")} == {
        "ratings_read": 100836, "users_dropped": 0, "duplicates_dropped": 0, "users": 610,
        "items": 9724, "train": 100226, "test": 610}
    got = tensors(tmp_path)
    frame = pd.read_csv(REAL).rename(columns={"userId": "user_id", "movieId": "item_id"})
    train, test, _ = reference(frame, 20)
    user_ids, item_ids = got["user_ids"].numpy(), got["item_ids"].numpy()
    dense = got["train_ratings"].numpy()
    assert np.array_equal(np.stack([user_ids[dense[:, 0]], item_ids[dense[:, 1]]], 1), train)
    order = pd.Index(test["user_id"]).get_indexer(user_ids)
    assert np.array_equal(item_ids[got["test_ratings"][:, 1].numpy()],
                          test["item_id"].to_numpy()[order])


# (rows after the header, message or None when it converts); each a case of issue 10.2
ISSUE_ROWS = [
    (f"{2**63},1,3,1\n", f"line 2: user id '{2**63}' does not fit in 64 bits"),
    (f"{2**64 - 1},1,3,1\n", f"line 2: user id '{2**64 - 1}' does not fit in 64 bits"),
    (f"1,1,3,1\n2,1,3,{2**63}\n", f"line 3: timestamp '{2**63}' does not fit in 64 bits"),
    (f"1,1,3,1\n2,1,3,{-2**63 - 1}\n",
     f"line 3: timestamp '{-2**63 - 1}' does not fit in 64 bits"),
    ("1,1,3,1\n2,1,3,1,extra\n", "line 3: 5 fields, expected 4"),
    ("1,1,3,1\n2,1,3,0x10\n", "line 3: timestamp '0x10' is not an integer"),
]


@pytest.mark.parametrize("text,expected", ISSUE_ROWS)
def test_ids_and_times_that_would_be_corrupted_are_refused(tmp_path, capsys, text, expected):
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + text)
    line = failure(capsys, "--path", path, "--output", tmp_path / "out", "--min_ratings", 1)
    assert line.startswith(f"convert.py: error: {path}: {expected}; ")
    assert no_results(tmp_path / "out")


def test_large_ids_are_not_merged_by_a_float_row(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + f"{2**53 + 1},1,3,1\n{2**53},1,3,2\n5.0,1,3,3\n{2**53 + 1},2,3,4\n")
    assert run("--path", path, "--output", tmp_path / "out", "--min_ratings", 1) == 0
    assert tensors(tmp_path / "out")["user_ids"].tolist() == [2**53 + 1, 2**53, 5]


def test_latest_time_stays_latest_at_the_top_of_the_range(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + f"1,10,3,{2**63 - 1}\n1,20,3,{-2**63}\n1,30,3,0\n")
    assert run("--path", path, "--output", tmp_path / "out", "--min_ratings", 1) == 0
    got = tensors(tmp_path / "out")
    assert got["test_ratings"].tolist() == [[0, 0]]
    assert got["train_ratings"].tolist() == [[0, 1], [0, 2]]


def test_first_columns_reads_any_header(tmp_path, capsys):
    source = tmp_path / "clicks.csv"
    source.write_text("who,what,when,score\n" + "".join(f"{u},{i},{u + i},1\n"
                                                         for u in range(3) for i in range(4)))
    assert failure(capsys, "--path", source, "--output", tmp_path / "out").endswith(
        "or read its first three columns as user, item, timestamp with --first_columns")
    assert run("--path", source, "--output", tmp_path / "out", "--min_ratings", 1,
               "--first_columns") == 0
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["reader"] == \
        "csv-first-columns"
    assert tensors(tmp_path / "out")["test_ratings"].tolist() == [[0, 3], [1, 3], [2, 3]]


@pytest.mark.parametrize("flag", ["--user_col", "--item_col", "--time_col"])
def test_first_columns_excludes_the_column_flags(tmp_path, tiny, capsys, flag):
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", "--first_columns",
                   flag, "userId")
    assert line.startswith("convert.py: error: --first_columns reads the first three columns")
    assert no_results(tmp_path / "out")


def test_defaults_of_the_original():
    args = convert._arguments([])
    assert (args.path, args.output, args.seed, args.valid_negative) == (
        "/data/ml-20m/ratings.csv", "/data", 1, 100)
    assert convert._arguments(["-s", "7"]).seed == 7


def test_test_negatives_too_large_for_any_machine_are_refused_before_reading(tmp_path, capsys):
    # the file does not exist: the flag is refused before it is looked at
    line = failure(capsys, "--path", tmp_path / "ratings.csv", "--output", tmp_path / "out",
                   "--valid_negative", 10**15)
    assert line.startswith(f"convert.py: error: --valid_negative {10**15}: the test negatives "
                           "need at least 8,000,000.0 GB (users x negatives x 8 bytes = 1 x "
                           f"{10**15} x 8), more than this machine's ")
    assert line.endswith(" of memory; lower --valid_negative")
    assert not (tmp_path / "out").exists()


def test_test_negatives_too_large_for_this_machine_are_refused_once_users_are_counted(
        tmp_path, tiny, capsys, monkeypatch):
    # tiny keeps 2 users at --min_ratings 3: 2 x 10**8 x 8 bytes = 1.6 GB; one user's 0.8 fit
    monkeypatch.setattr(convert.cli, "physical_memory", lambda: 10**9)
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", "--min_ratings", 3,
                   "--valid_negative", 10**8)
    assert line == ("convert.py: error: --valid_negative 100000000: the test negatives need at "
                    "least 1.6 GB (users x negatives x 8 bytes = 2 x 100000000 x 8), more than "
                    "this machine's 1.0 GB of memory; lower --valid_negative")
    assert no_results(tmp_path / "out")


@pytest.mark.parametrize("where", ["load_ratings", "convert", "write_outputs"])
def test_out_of_memory_is_one_line(tmp_path, tiny, capsys, monkeypatch, where):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(convert, where, out_of_memory)
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", "--min_ratings", 1)
    assert line == (f"convert.py: error: {tiny}: out of memory while converting it; free some "
                    "memory, use a machine with more, or lower --valid_negative")
    assert no_results(tmp_path / "out")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_min_rating_that_is_no_finite_number_is_refused(tmp_path, tiny, capsys, value):
    """nan passed the flag checks and was then reported as `no rating is that high`."""
    line = failure(capsys, "--path", tiny, "--output", tmp_path / "out", f"--min_rating={value}")
    assert line == (f"convert.py: error: --min_rating must be a finite number, not "
                    f"{float(value)}; give the lowest rating to keep")
    assert not (tmp_path / "out").exists()


def test_progress_goes_to_stderr_where_it_is_no_terminal(tmp_path, tiny, capsys, monkeypatch):
    """Silent before in a log or a pipe; now each step says how far it is (a line every 30 s,
    made every update here)."""
    monkeypatch.setattr(convert, "Progress", functools.partial(progress.Progress, interval=0.0))
    assert run("--path", tiny, "--output", tmp_path / "out", "--min_ratings", 3,
               "--valid_negative", 2, "--validation") == 0
    lines = [line.split(",")[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == [f"read {tiny}: 1/1 files (100%)",
                     *(f"convert: {step}/4 steps ({step * 25}%)"
                       for step in range(1, 5)),
                     "test negatives: 2/2 users (100%)", "validation negatives: 2/2 users (100%)",
                     *(f"write: {count}/8 files ({count / 8:.0%})" for count in range(1, 9))]


@pytest.mark.parametrize("text, flags, columns", [
    (TINY, [], ("userId", "movieId")),
    (TINY.replace("userId,movieId", "customer,sku"), ["--user_col", "customer", "--item_col",
                                                      "sku"], ("customer", "sku")),
    (TINY.replace("userId,movieId", "customer,movieId"), ["--user_col", "customer"],
     ("customer", "movieId")),
    (TINY.replace("userId,movieId,rating,timestamp", " who , what,when,x"), ["--first_columns"],
     ("who", "what")),
], ids=["movielens", "named", "one named", "first columns"])
def test_metadata_names_the_id_columns(tmp_path, capsys, text, flags, columns):
    path = tmp_path / "log.csv"
    path.write_text(text)
    run("--path", path, "--output", tmp_path / "out", "--min_ratings", 1, *flags)
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert (metadata["user_column"], metadata["item_column"]) == columns


@pytest.mark.parametrize("name, line, columns", [("u.data", "1\t2\t5\t10\n", ("userId", "movieId")),
                                                 ("ratings.dat", "1::2::5::10\n",
                                                  ("userId", "movieId"))])
def test_metadata_names_movielens_columns_for_its_headerless_files(tmp_path, capsys, name, line,
                                                                   columns):
    path = tmp_path / name
    path.write_text(line + line.replace("2", "3", 1).replace("10", "11"))
    run("--path", path, "--output", tmp_path / "out", "--min_ratings", 1)
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert (metadata["user_column"], metadata["item_column"]) == columns


# Issue 26: the conversion of identity_input as the code before the memory work wrote it, per
# set of flags: SHA-256 over each output file's name and bytes (metadata.json without its
# source path), in name order.
IDENTITY_INPUT = "96143afa96c9df830e3d009e19994c2fac5b7ddb89457bb6044461360c3ba866"
BEFORE_THE_MEMORY_WORK = [
    (["--min_ratings", "30"],
     "4c170f2bd9201449000aa8b55a4b3270b1135c4621163f8db3ef96dc30f5d4c4"),
    (["--validation", "--min_rating", "3", "--min_item_ratings", "40", "--seed", "7"],
     "fcbabe5ee06c2addd5072fa5d64ba69ef89696bbf5c517844c1c6acdc2e13018"),
    (["--string_ids", "--format", "2023", "--valid_negative", "20"],
     "0e54b06ca62639e5b7f1c66b2a95e89e13bf5835f9d42554a53b1a97b3e15247"),
    (["--time_format", "number"],
     "1df68e15be8e48d3ea8ffac4f2b1cce5aa1a27979a227ab1f6cd8fe9fa1cc6fe"),
]


@pytest.fixture(scope="module")
def identity_input(tmp_path_factory):
    """13,091 generated ratings of 300 users and 200 items with what the protocol sorts out:
    every 11th rating again a day later (a repeat), every 3rd time cut to its day (ties)."""
    frame = generate.generate_ratings(300, 200, 40.0, seed=3)
    repeats = frame.iloc[::11].copy()
    repeats["timestamp"] += 86400
    frame = pd.concat([frame, repeats], ignore_index=True)
    frame.loc[::3, "timestamp"] = frame["timestamp"].iloc[::3] // 86400 * 86400
    path = tmp_path_factory.mktemp("identity") / "ratings.csv"
    frame.to_csv(path, index=False)
    return path


def outputs_digest(directory):
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        content = path.read_bytes()
        if path.name == "metadata.json":
            metadata = json.loads(content)
            del metadata["source"]
            content = json.dumps(metadata, sort_keys=True).encode()
        digest.update(path.name.encode())
        digest.update(content)
    return digest.hexdigest()


def test_the_identity_input_is_the_one_recorded(identity_input):
    # Otherwise generate.py (or pandas' CSV writer) changed: record BEFORE_THE_MEMORY_WORK
    # again from a conversion known to be right.
    assert hashlib.sha256(identity_input.read_bytes()).hexdigest() == IDENTITY_INPUT


@pytest.mark.parametrize("flags, expected", BEFORE_THE_MEMORY_WORK,
                         ids=["filtered users", "filters and validation", "text ids, 2023",
                              "number times"])
def test_outputs_are_byte_identical_to_before_the_memory_work(tmp_path, identity_input,
                                                                monkeypatch, flags, expected):
    # pieces far smaller than the file, so that every step goes through many of them
    monkeypatch.setattr(convert, "PIECE_ROWS", 100)
    monkeypatch.setattr(load, "READ_ROWS", 333)
    assert run("--path", identity_input, "--output", tmp_path, *flags) == 0
    assert outputs_digest(tmp_path) == expected


def test_a_conversion_holds_about_25_bytes_a_rating(tmp_path, monkeypatch):
    """Issue 26: numpy's peak during a conversion (tracemalloc sees numpy's and pandas' arrays,
    not the allocator's slack) was 59 bytes a rating: the frame kept to the end, the columns
    read as int64 twice over, keys and positions sorted side by side. Now 27.5: the training
    tensor (16), the ratings' users and items in time order (8) and the rest."""
    path = tmp_path / "ratings.csv"
    generate.write_csv(generate.generate_ratings(*generate.PRESETS["small"], seed=1), path)
    monkeypatch.setattr(convert, "PIECE_ROWS", 4096)
    monkeypatch.setattr(load, "READ_ROWS", 4096)
    tracemalloc.start()
    try:
        run("--path", path, "--output", tmp_path / "out", "--valid_negative", 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ratings = json.loads((tmp_path / "out" / "metadata.json").read_text())["ratings_read"]
    assert peak / ratings < 32


@pytest.mark.parametrize("name, text, flags", [
    ("ratings.csv", HEADER + "1,2,3,4\n1,3,3,5\n\n1,4,3,6\n", []),
    ("ratings.csv", HEADER + "1,2,3,4\n1,3,3,5\n1.5,4,3,6\n", []),
    ("ratings.csv", HEADER + "1,2,3,4\n1,3,3,5\n1,4,3,6,7\n", []),
    ("ratings.csv", HEADER + "1,2,3,4\n1,3,3,5\n1,4,x,6\n", ["--min_rating", "3"]),
    ("ratings.dat", "1::2::3::4\n1::3::3::5\n1:4::3::6\n", []),
    ("u.data", "1\t2\t3\t4\n1\t3\t3\t5\n1\t4\t3\n", []),
], ids=["blank line", "float id", "extra field", "bad rating", "dat separator",
        "missing field"])
def test_a_bad_line_in_a_later_piece_is_refused_as_in_one_piece(tmp_path, capsys, monkeypatch,
                                                                name, text, flags):
    path = tmp_path / name
    path.write_text(text)
    argv = ["--path", path, "--output", tmp_path / "out", "--min_ratings", 1, *flags]
    whole = failure(capsys, *argv)
    assert "line 3" in whole or "line 4" in whole
    monkeypatch.setattr(load, "READ_ROWS", 1)
    assert failure(capsys, *argv) == whole


@pytest.mark.parametrize("values", [
    np.array([7, 3, 7, 9, 3, 3, 12, 9, 7, 5, 12, 3], dtype=np.int32),  # the table
    np.array([2**40, 3, 2**40, -2**40, 3, 8, 8, 2**40], dtype=np.int64),  # too wide for it
    np.array(["b", "a", "b", "c", "a", "d"], dtype=object),  # text
])
def test_first_appearance_ids_across_pieces(monkeypatch, values):
    monkeypatch.setattr(convert, "PIECE_ROWS", 5)
    codes, uniques = convert._first_appearance_ids(values)
    expected_codes, expected_uniques = pd.factorize(values)
    assert codes.tolist() == expected_codes.tolist()
    assert uniques.tolist() == expected_uniques.tolist()


@pytest.mark.parametrize("nb_items", [50, 2**55], ids=["one sort", "merge sort"])
def test_distinct_pairs_keep_the_earliest_of_each(monkeypatch, nb_items):
    # 4 users x 2^55 items x 5000 rows overflows the key * rows + row of the one sort
    rng = np.random.default_rng(0)
    user = rng.integers(0, 4, 5000).astype(np.int32)
    item = rng.integers(0, 50, 5000).astype(np.int32)
    monkeypatch.setattr(convert, "PIECE_ROWS", 333)
    is_train = np.ones(len(user), dtype=bool)
    pairs, kept_rows = convert._distinct_pairs(user, item, 4, nb_items, is_train)
    keys, earliest = np.unique(user.astype(np.int64) * nb_items + item, return_index=True)
    assert pairs.tolist() == keys.tolist()
    assert kept_rows.tolist() == earliest.tolist()
    assert np.flatnonzero(is_train).tolist() == sorted(earliest.tolist())


def test_freed_memory_is_handed_back_where_glibc_allows(monkeypatch):
    assert cli.return_freed_memory() is bool(glibc())

    class NoMallopt:
        pass

    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: NoMallopt())
    assert cli.return_freed_memory() is False


def glibc():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
