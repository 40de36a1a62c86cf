import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli
import generate  # noqa: E402

SMALL = generate.PRESETS["small"]


@pytest.fixture(scope="module")
def small():
    return generate.generate_ratings(*SMALL, seed=1)


def test_cli_is_deterministic_and_seeded(tmp_path, capsys):
    done = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--output", str(tmp_path / "a.csv"), "-h"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0 and "--preset" in done.stdout
    for name, seed in [("a", "5"), ("b", "5"), ("c", "6")]:
        assert generate.main(["--output", str(tmp_path / f"{name}.csv"), "--seed", seed]) == 0
        summary = capsys.readouterr().out
        assert re.fullmatch(r"wrote .*: 1500 users, 1000 items, \d+ ratings in [\d.]+ s\n", summary)
    a, b, c = ((tmp_path / f"{name}.csv").read_bytes() for name in "abc")
    assert a == b
    assert a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "c.csv"]


def test_file_format_is_ml20m_csv(tmp_path, small):
    path = tmp_path / "deep" / "ratings.csv"
    generate.write_csv(small, path, chunk_rows=999)
    lines = path.read_text().splitlines()
    assert lines[0] == "userId,movieId,rating,timestamp"
    row = re.compile(r"[1-9]\d*,[1-9]\d*,(0\.5|[1-4]\.[05]|5\.0),[1-9]\d{8,9}")
    assert all(row.fullmatch(line) for line in lines[1:])
    assert path.read_bytes() == small.to_csv(index=False).encode()


def test_shape(small):
    n_users, n_items, mean = SMALL
    per_user = small.groupby("userId").size()
    assert per_user.index.tolist() == list(range(1, n_users + 1))
    assert per_user.min() >= generate.MIN_RATINGS
    assert small["movieId"].nunique() == n_items
    assert small["movieId"].max() > n_items  # sparse ids, as in MovieLens
    assert abs(len(small) - n_users * mean) < 0.01 * n_users * mean
    assert not small.duplicated(["userId", "movieId"]).any()
    assert small.equals(small.sort_values(["userId", "movieId"]))
    assert set(small["rating"]) <= {k / 2 for k in range(1, 11)}
    assert small["timestamp"].between(generate.FIRST_TIME, generate.LAST_TIME).all()


def test_heavy_tails(small):
    per_user = small.groupby("userId").size()
    assert per_user.max() >= 5 * per_user.median()
    per_item = small.groupby("movieId").size().sort_values(ascending=False)
    top = per_item.iloc[: len(per_item) // 100].sum() / len(small)
    assert top >= 5 / 100  # the top 1% of items hold at least 5x their even share


def test_min_ratings_holds_on_a_crowded_catalogue():
    frame = generate.generate_ratings(300, 40, 12.5, seed=3, min_ratings=12)
    assert frame.groupby("userId").size().min() >= 12
    assert not frame.duplicated(["userId", "movieId"]).any()


def hit_rates(frame, model, seed=0, negatives=100, k=10):
    """HR@k of three scorers on the latest rating of each user, SPEC's sampled protocol."""
    rng = np.random.default_rng(seed)
    n_items = len(model.movie_ids)
    users = frame["userId"].to_numpy() - 1
    items = np.searchsorted(model.movie_ids, frame["movieId"].to_numpy())
    order = np.lexsort((np.arange(len(frame)), frame["timestamp"].to_numpy(), users))
    users, items = users[order], items[order]
    last = np.r_[users[1:] != users[:-1], True]
    test_user, test_item = users[last], items[last]
    train = np.sort(users[~last] * n_items + items[~last])
    negative = rng.integers(n_items, size=(len(test_user), negatives))
    while True:
        keys = test_user[:, None] * n_items + negative
        clash = train[np.minimum(np.searchsorted(train, keys), len(train) - 1)] == keys
        if not clash.any():
            break
        negative[clash] = rng.integers(n_items, size=clash.sum())
    counts = np.bincount(items[~last], minlength=n_items)
    scorers = {
        "oracle": lambda u, i: model.log_scores(u, i),
        "popularity": lambda u, i: counts[i] + rng.random(np.shape(i)),
        "chance": lambda u, i: rng.random(np.shape(i)),
    }
    result = {}
    for name, score in scorers.items():
        positive = score(test_user, test_item)[:, None]
        others = score(np.broadcast_to(test_user[:, None], negative.shape), negative)
        first = np.zeros(negative.shape, dtype=bool)  # repeats of a negative count once
        ranked = np.argsort(negative, axis=1, kind="stable")
        sorted_items = np.take_along_axis(negative, ranked, axis=1)
        np.put_along_axis(
            first, ranked, np.c_[np.ones(len(negative), bool), np.diff(sorted_items) != 0], axis=1
        )
        above = (others > positive) & first & (negative != test_item[:, None])
        result[name] = float((above.sum(axis=1) < k).mean())
    return result


def test_planted_taste_is_learnable_beyond_popularity(small):
    model = generate.plant_model(SMALL[0], SMALL[1], seed=1)
    hr = hit_rates(small, model)
    assert 0.6 < hr["oracle"] < 0.98
    assert hr["popularity"] < hr["oracle"] - 0.15
    assert hr["chance"] < 0.2


def test_bad_flags_give_one_line_and_exit_2(tmp_path, capsys):
    out = str(tmp_path / "r.csv")
    for args in (
        [],
        ["--output", out, "--preset", "ml-1b"],
        ["--output", out, "--users", "0"],
        ["--output", out, "--items", "5"],
        ["--output", out, "--mean_ratings", "1e9"],
        ["--output", out, "--seed", "-1"],
        ["--output", out, "--users", "many"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.run(generate.main, args)
        assert exited.value.code == 2, args
        error = capsys.readouterr().err
        assert error.startswith("generate.py: error: ") and error.count("\n") == 1, error
    assert not list(tmp_path.iterdir())


def expect_one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        cli.run(generate.main, argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_failed_write_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full_disk(chunk):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate, "_csv_chunk", full_disk)
    # the directory it created for the output goes too
    out = tmp_path / "new" / "r.csv"
    line = expect_one_line_exit_2(capsys, ["--output", str(out), "--users", "30"])
    assert line == (f"generate.py: error: --output {out}: cannot write (No space left on "
                    f"device); pass a writable path with free space")
    assert not list(tmp_path.iterdir())


def test_sizes_beyond_memory_are_refused_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate.cli, "available_memory", lambda: 10 * 2 ** 30)
    monkeypatch.setattr(generate, "generate_ratings", pytest.fail)
    # 90 M ratings at 128 bytes, 1.5 M users at 64 and 1,000 items at 2,048: 10.8 GiB.
    line = expect_one_line_exit_2(capsys, ["--output", str(tmp_path / "new" / "r.csv"),
                                           "--users", "1500000", "--mean_ratings", "60"])
    assert line == ("generate.py: error: --users 1500000 --items 1000 --mean_ratings 60: need "
                    "about 10.8 GiB, more than the 10.0 GiB available; pass smaller sizes")
    assert not list(tmp_path.iterdir())


def test_running_out_of_memory_anyway_is_one_line(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(generate, "generate_ratings", out_of_memory)
    line = expect_one_line_exit_2(capsys, ["--output", str(tmp_path / "new" / "r.csv")])
    assert line == ("generate.py: error: --users 1500 --items 1000 --mean_ratings 50: ran out "
                    "of memory; pass smaller sizes")
    assert not list(tmp_path.iterdir())


def test_seeds_outside_every_tools_range_are_refused(tmp_path, capsys):
    # convert.py refuses a seed from 2^63 on: a generated file's seed must be one it takes.
    line = expect_one_line_exit_2(capsys, ["--output", str(tmp_path / "r.csv"),
                                           "--seed", str(2 ** 63)])
    assert line == ("generate.py: error: --seed must be in [0, 2^63), got 9223372036854775808; "
                    "see --help")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_nonsense_mean_is_named_not_sized_in_memory(tmp_path, capsys, value):
    line = expect_one_line_exit_2(capsys, ["--output", str(tmp_path / "r.csv"),
                                           "--mean_ratings", value])
    assert line == (f"generate.py: error: --mean_ratings {value}: must lie between "
                    f"--min_ratings 20 and 333, the most one user may rate out of 1000 items; "
                    f"see --help")


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_an_output_that_is_no_regular_file_is_not_replaced(tmp_path, capsys, kind):
    # The rename would put the CSV in place of a device (/dev/null, as root), pipe or link.
    out = tmp_path / "r.csv"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        (tmp_path / "target.csv").write_text("kept\n")
        out.symlink_to(tmp_path / "target.csv")
    line = expect_one_line_exit_2(capsys, ["--output", str(out), "--users", "30"])
    assert line == (f"generate.py: error: --output {out}: exists and is not a regular file (a "
                    f"device, pipe or link); pass the name of a new or regular file")
    assert stat.S_ISFIFO(os.lstat(out).st_mode) if kind == "fifo" else out.is_symlink()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["r.csv"] + (["target.csv"] if kind == "link" else []))
