import copy
import json
import math
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
import torch

import bounded_topk
import cli
import progress
import recommend
import recommender
import scoring
from neumf import NeuMF, build
from recommender import best_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_IDS = [101, 7, 55, 300]                       # original id of dense user 0, 1, 2, 3
ITEM_IDS = [900 + 3 * item for item in range(10)]  # original id of dense item 0..9
TRAIN = [(0, 0), (0, 4), (0, 7), (1, 1), (1, 2), (2, 0), (2, 9), (3, 3)]
TRAIN += [(3, item) for item in range(4, 10) if item != 6]  # user 3 trained on all but 0, 1, 2, 6
TEST = [(0, 2), (1, 5), (2, 3), (3, 6)]


def model_for(nb_users, nb_items, seed=0):
    torch.manual_seed(seed)
    model = NeuMF(nb_users, nb_items, 4, [8, 4])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture
def data(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    torch.save(torch.tensor(TRAIN), directory / "train_ratings.pt")
    torch.save(torch.tensor(TEST), directory / "test_ratings.pt")
    torch.save(torch.zeros(4, 3, dtype=torch.int64), directory / "test_negatives.pt")
    torch.save(torch.tensor(USER_IDS), directory / "user_ids.pt")
    torch.save(torch.tensor(ITEM_IDS), directory / "item_ids.pt")
    checkpoint = tmp_path / "model.pth"
    torch.save(model_for(4, 10).state_dict(), checkpoint)
    movies = tmp_path / "movies.csv"
    titles = pd.DataFrame({"movieId": ITEM_IDS, "title": [f'Film "{item}", part {item}'
                                                          for item in range(10)],
                           "genres": "Drama"})
    titles.to_csv(movies, index=False)
    return {"dir": str(directory), "checkpoint": str(checkpoint), "movies": str(movies),
            "tmp": tmp_path}


def recommend_argv(data, *args):
    return ["--data", data["dir"], "--checkpoint", data["checkpoint"], *args]


def run(data, *args):
    return recommend.main(recommend_argv(data, *args))


def expected_top(user, k):
    """Best untrained items of a dense user by the plain forward: (original movie ids, scores)."""
    model = model_for(4, 10)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.full((10,), user), torch.arange(10)).view(-1))
    trained = {item for u, item in TRAIN if u == user}
    ranked = sorted((item for item in range(10) if item not in trained),
                    key=lambda item: -scores[item].item())[:k]
    return [ITEM_IDS[item] for item in ranked], [scores[item].item() for item in ranked]


def test_recommendations_are_untrained_items_in_original_ids(data, capsys):
    table = run(data, "--users", "55", "101", "--topk", "3")
    assert table["userId"].tolist() == [55] * 3 + [101] * 3
    assert table["rank"].tolist() == [1, 2, 3] * 2
    for original, dense in ((55, 2), (101, 0)):
        rows = table[table["userId"] == original]
        movies, scores = expected_top(dense, 3)
        assert rows["movieId"].tolist() == movies
        assert rows["score"].tolist() == pytest.approx(scores, abs=1e-5)
        trained = {ITEM_IDS[item] for u, item in TRAIN if u == dense}
        assert not trained & set(rows["movieId"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["userId", "rank", "movieId", "score"]
    assert printed[1].split()[:3] == ["55", "1", str(expected_top(2, 1)[0][0])]


def test_a_user_with_few_untrained_items_gets_only_those(data):
    table = run(data, "--users", "300", "--topk", "10")
    # The test positive (item 6) is not a training item, so it may be recommended.
    assert sorted(table["movieId"]) == [ITEM_IDS[item] for item in (0, 1, 2, 6)]
    assert table["rank"].tolist() == [1, 2, 3, 4]


def test_titles_are_added_from_movies_csv(data):
    table = run(data, "--users", "7", "--topk", "2", "--movies", data["movies"])
    dense_items = [(movie - 900) // 3 for movie in table["movieId"]]
    assert table["title"].tolist() == [f'Film "{item}", part {item}' for item in dense_items]


# (file name, its bytes, the titles read from it)
TITLE_FILES = [
    # ml-100k: pipe-separated, latin-1, with release date, video date, URL and genre flags
    ("u.item", b"900|Caf\xe9 Society (1995)|01-Jan-1995||http://imdb/x|0|1\n"
               b"903|unknown||||1|0\n", {900: "Caf\u00e9 Society (1995)", 903: "unknown"}),
    # ml-1m: '::'-separated, latin-1; a title holds ':'; 0x85 is a character, not a line end
    ("movies.dat", b"900::Star Wars: Episode IV (1977)::Action|Sci-Fi\n"
                   b"903::Wait\x85 and Caf\xe9 (1990)::Drama\n",
     {900: "Star Wars: Episode IV (1977)", 903: "Wait\x85 and Caf\u00e9 (1990)"}),
    # ml-10m: the same layout in UTF-8, here with Windows line ends and a blank last line
    ("movies.dat", "900::Caf\u00e9 (1995)::Drama\r\n903::Am\u00e9lie (2001)::Comedy\r\n\r\n"
     .encode(), {900: "Caf\u00e9 (1995)", 903: "Am\u00e9lie (2001)"}),
    # A movie given twice keeps its first title, as movies.csv's does.
    ("movies.dat", b"900::First (1990)::Drama\n900::Second (1991)::Drama\n", {900: "First (1990)"}),
]


@pytest.mark.parametrize("name, content, expected", TITLE_FILES)
def test_titles_come_from_u_item_and_movies_dat_too(data, name, content, expected):
    path = data["tmp"] / name
    path.write_bytes(content)
    titles = recommender.load_titles(str(path))
    assert titles.to_dict() == expected and titles.index.dtype == "int64"
    table = run(data, "--users", "7", "--topk", "9", "--movies", str(path))
    assert table["title"].tolist() == [expected.get(movie, "") for movie in table["movieId"]]
    assert set(expected) & set(table["movieId"])


@pytest.mark.parametrize("name, content, line, layout", [
    ("movies.dat", b"900::Heat (1995)::Action\n903,Casino (1995),Drama\n", 2,
     "MovieID::Title::Genres (ml-1m, ml-10m)"),
    ("movies.dat", b"x900::Heat (1995)::Action\n", 1, "MovieID::Title::Genres (ml-1m, ml-10m)"),
    ("u.item", b"900|Heat (1995)|01-Jan-1995\n903|Casino (1995)\n", 2,
     "movie id|title|release date|... (ml-100k)"),
    # 19 digits, past the largest 64-bit integer
    ("u.item", b"9999999999999999999|Heat (1995)|01-Jan-1995\n", 1,
     "movie id|title|release date|... (ml-100k)"),
])
def test_a_title_file_of_another_layout_is_refused_at_its_line(data, capsys, name, content,
                                                               line, layout):
    path = data["tmp"] / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(recommend.main, recommend_argv(data, "--users", "7", "--movies", str(path)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"recommend.py: error: --movies {path}: line {line} is "
                                       f"not {layout}; pass that file as MovieLens ships it\n")


def write_metadata(directory, **recorded):
    """A metadata.json for test_recommend's data, as convert.py writes one, with `recorded`."""
    counts = {"users": 4, "items": 10, "train": len(TRAIN), "test": len(TEST),
              "valid_negative": 3}
    with open(os.path.join(directory, "metadata.json"), "w") as handle:
        json.dump({"format_version": 1, "reader": "csv-columns", **counts, **recorded}, handle)


@pytest.mark.parametrize("recorded, user_column, item_column", [
    ({"user_column": "visitor", "item_column": "product"}, "visitor", "product"),
    ({"user_column": "user", "item_column": "item"}, "user", "item"),  # the paper's files
    ({}, "userId", "movieId"),  # a conversion that did not record them
    # Names that would clash with another column, or with each other, are not taken.
    ({"user_column": "who", "item_column": "score"}, "userId", "movieId"),
    ({"user_column": "id", "item_column": "id"}, "userId", "movieId"),
])
def test_the_id_columns_are_named_as_the_converted_ratings(data, capsys, recorded, user_column,
                                                          item_column):
    write_metadata(data["dir"], **recorded)
    output = str(data["tmp"] / "recs.csv")
    run(data, "--all_users", "--output", output, "--topk", "2", "--movies", data["movies"])
    written = pd.read_csv(output)
    assert list(written.columns) == [user_column, "rank", item_column, "score", "title"]
    assert written[user_column].tolist() == [7, 7, 55, 55, 101, 101, 300, 300]
    assert written["title"].tolist() == [f'Film "{(movie - 900) // 3}", part {(movie - 900) // 3}'
                                         for movie in written[item_column]]
    capsys.readouterr()
    table = run(data, "--users", "7", "--topk", "2")
    assert list(table.columns) == [user_column, "rank", item_column, "score"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == [user_column, "rank", item_column, "score"]
    assert printed[1].split()[:3] == ["7", "1", str(table[item_column][0])]


def test_movies_csv_of_other_data_gets_a_note(data, tmp_path, capsys):
    run(data, "--users", "7", "--topk", "2", "--movies", data["movies"])
    assert capsys.readouterr().err == ""
    other = tmp_path / "other_movies.csv"
    pd.DataFrame({"movieId": [1, 2], "title": ["A", "B"], "genres": "Drama"}).to_csv(other,
                                                                                 index=False)
    table = run(data, "--users", "7", "--topk", "2", "--movies", str(other))
    assert table["title"].tolist() == ["", ""]
    err = capsys.readouterr().err.strip()
    assert err == (f"recommend.py: note: --movies {other}: none of its movieIds is an item of "
                   f"the data; titles stay blank (pass the movies file of the ratings that "
                   f"convert.py read)")


def test_unknown_user_is_a_one_line_error(data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(recommend.main, recommend_argv(data, "--users", "101", "999"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown user id 999" in error


def test_an_id_map_naming_an_id_twice_is_refused(data, capsys):
    path = os.path.join(data["dir"], "user_ids.pt")
    torch.save(torch.tensor([101, 7, 101, 300]), path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(recommend.main, recommend_argv(data, "--users", "101"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"recommend.py: error: {path}: id 101 appears twice; "
                                       f"each original id maps to one dense id, re-run "
                                       f"convert.py on this directory\n")


def test_missing_id_map_says_to_rerun_convert(data, capsys):
    os.remove(os.path.join(data["dir"], "item_ids.pt"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(recommend.main, recommend_argv(data, "--users", "101"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "item_ids.pt: not found" in error and "convert.py" in error


def test_checkpoint_of_another_dataset_is_refused(data, capsys):
    torch.save(model_for(5, 10).state_dict(), data["checkpoint"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(recommend.main, recommend_argv(data, "--users", "101"))
    assert exit_info.value.code == 2
    assert "checkpoint has 5 users and 10 items, data has 4 users" in capsys.readouterr().err


def test_all_users_csv_round_trip(data):
    output = str(data["tmp"] / "recs.csv")
    assert run(data, "--all_users", "--output", output, "--topk", "3",
               "--movies", data["movies"]) is None
    written = pd.read_csv(output)
    assert list(written.columns) == ["userId", "rank", "movieId", "score", "title"]
    assert written["userId"].tolist() == [7] * 3 + [55] * 3 + [101] * 3 + [300] * 3
    one_by_one = run(data, "--users", "7", "55", "101", "300", "--topk", "3",
                     "--movies", data["movies"])
    for column in ("userId", "rank", "movieId", "title"):
        assert written[column].tolist() == one_by_one[column].tolist()
    assert written["score"].tolist() == pytest.approx(one_by_one["score"].tolist(), abs=1e-6)
    assert sorted(os.listdir(data["tmp"])) == ["data", "model.pth", "movies.csv", "recs.csv"]


def test_all_users_reports_its_progress_on_stderr(data, monkeypatch, capsys):
    # A clock 30 s on at each reading: a line at every batch, here of one user each.
    readings = iter(range(30, 10 ** 6, 30))
    monkeypatch.setattr(recommend, "Progress", lambda *args: progress.Progress(
        *args, clock=lambda: next(readings)))
    monkeypatch.setattr(recommender.Recommender, "users_per_batch", lambda self: 1)
    run(data, "--all_users", "--output", str(data["tmp"] / "recs.csv"), "--topk", "2")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "recommend: 1/4 users (25%), 0.033 users/s, about 1 min 30 s left",
        "recommend: 2/4 users (50%), 0.033 users/s, about 1 min 0 s left",
        "recommend: 3/4 users (75%), 0.033 users/s, about 30 s left",
        "recommend: 4/4 users (100%), 0.033 users/s",
    ]
    assert captured.out == ""


def test_output_without_all_users_is_refused(data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(recommend.main, recommend_argv(data, "--users", "101", "--output", "x.csv"))
    assert exit_info.value.code == 2
    assert "--output goes with --all_users" in capsys.readouterr().err


def test_new_flag_names_give_the_same_table(data):
    old = run(data, "--users", "7", "--topk", "3")
    new = recommend.main(["--data", data["dir"], "--load_checkpoint_path", data["checkpoint"],
                          "--users", "7", "-k", "3"])
    pd.testing.assert_frame_equal(old, new)
    assert len(new) == 3


def test_an_item_scored_nan_is_recommended_last(data, monkeypatch):
    model = model_for(4, 10)
    with torch.no_grad():
        model.mf_item_embed.weight[8] = float("nan")
    # handed over past the loader, which refuses a checkpoint holding NaN weights
    monkeypatch.setattr(recommender, "load_model", lambda path, device: model)
    table = run(data, "--users", "55", "--topk", "10")
    # User 55 (dense 2) trained on items 0 and 9, leaving eight; item 8 scores NaN.
    movies, scores = expected_top(2, 8)
    movies.remove(ITEM_IDS[8])
    assert table["movieId"].tolist() == movies + [ITEM_IDS[8]]
    assert table["score"].iloc[:7].tolist() == pytest.approx(
        [score for movie, score in zip(*expected_top(2, 8)) if movie != ITEM_IDS[8]], abs=1e-5)
    assert math.isnan(table["score"].iloc[7])


def test_a_reader_that_goes_away_ends_it_quietly(data):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    done = subprocess.run([sys.executable, os.path.join(ROOT, "recommend.py"), "--data",
                           data["dir"], "--load_checkpoint_path", data["checkpoint"],
                           "--users", "7", "55", "101", "300"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=data["tmp"])
    os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("requested,device,native,expected", [
    ("auto", "cpu", True, True),
    ("auto", "cpu", False, False),
    ("fp32", "cpu", True, False),
    ("bf16", "cpu", False, True),
    ("auto", "cuda", True, True),
    ("auto", "cuda", False, False),
])
def test_auto_precision_shortlists_only_where_bf16_is_native(monkeypatch, requested, device,
                                                             native, expected):
    monkeypatch.setattr(recommender.train, "cpu_has_native_bf16",
                        lambda: native and device == "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: native and device == "cuda")
    assert recommender.shortlist_wanted(requested, device) == expected


# (model, bounds: "dropped" where they would pay but keep too many items, "kept", "unpaid" below
# BOUNDED_MIN_ITEMS; native bf16, --precision flags, whether the bfloat16 shortlist is built)
SHORTLIST_PATHS = [
    ("neumf", "dropped", True, [], True),
    ("neumf", "dropped", False, [], False),
    ("neumf", "dropped", True, ["--precision", "fp32"], False),
    ("neumf", "dropped", False, ["--precision", "bf16"], True),
    ("neumf", "kept", True, [], False),
    ("neumf", "kept", True, ["--precision", "bf16"], False),
    ("neumf", "unpaid", True, [], False),
    ("neumf", "unpaid", True, ["--precision", "bf16"], False),
    # No hidden layer: no bounds however many items, so no shortlist either.
    ("gmf", "dropped", True, ["--precision", "bf16"], False),
]


@pytest.mark.parametrize("kind,bounds,native,flags,shortlisted", SHORTLIST_PATHS)
def test_the_bf16_shortlist_is_built_only_where_the_bounds_were_dropped(
        data, monkeypatch, kind, bounds, native, flags, shortlisted):
    if kind != "neumf":
        torch.save(build(kind, 4, 10, 4, [8, 4]).state_dict(), data["checkpoint"])
    # 10 items: the bounds apply from 1 item, and a top-10 keeps all of them, more than a
    # MAX_KEPT_SHARE of 0.25 (dropped) and no more than 1.0 (kept).
    monkeypatch.setattr(bounded_topk, "BOUNDED_MIN_ITEMS", 11 if bounds == "unpaid" else 1)
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", 1.0 if bounds == "kept" else 0.25)
    monkeypatch.setattr(recommender.train, "cpu_has_native_bf16", lambda: native)
    built = []
    original = recommend.Recommender

    def spy(*args):
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(recommend, "Recommender", spy)
    output = str(data["tmp"] / "recs.csv")
    run(data, "--all_users", "--output", output, "--topk", "3", "--device", "cpu", *flags)
    assert (built[0].bounds is not None) == (bounds == "kept")
    assert (built[0].shortlist_scorer is not None) == shortlisted
    # Ten items fit in the shortlist: bf16 only picks it, so the answer is float32's exactly.
    fp32 = str(data["tmp"] / "fp32.csv")
    run(data, "--all_users", "--output", fp32, "--topk", "3", "--device", "cpu",
        "--precision", "fp32")
    pd.testing.assert_frame_equal(pd.read_csv(output), pd.read_csv(fp32))


def test_bf16_shortlist_misses_float32_top_items_only_at_near_ties():
    nb_users, nb_items, k = 40, 900, 10
    model = model_for(nb_users, nb_items, seed=3)
    scorer = scoring.FactoredScorer(model)
    shortlist_scorer = scoring.FactoredScorer(copy.deepcopy(model).bfloat16(), 2 ** 12)
    users = torch.arange(nb_users)
    excluded = torch.rand(nb_users, nb_items, generator=torch.Generator().manual_seed(0)) < 0.1
    exact_items, exact_logits = best_items(scorer, None, users, excluded, k)
    items, logits = best_items(scorer, shortlist_scorer, users, excluded, k)
    all_logits = scorer(users)
    assert torch.equal(logits, all_logits.gather(1, items))
    assert not excluded.gather(1, items).any()
    # An item can leave the float32 top k only for one float32 ranks at most a bfloat16 rounding
    # step (8 bits: 2**-8 of the largest logit, twice for both sides) below the k-th.
    step = 2 * 2 ** -8 * all_logits.abs().max()
    assert (logits[:, -1] >= exact_logits[:, -1] - step).all()
    differing = (items != exact_items).any(dim=1)
    assert differing.float().mean() <= 0.05
    assert torch.equal(items[~differing], exact_items[~differing])


def test_an_output_that_is_a_pipe_or_link_is_not_replaced(data, capsys, tmp_path):
    # The rename would replace the pipe or link itself (as root, /dev/null: fileio).
    pipe, link = tmp_path / "pipe.csv", tmp_path / "link.csv"
    os.mkfifo(pipe)
    link.symlink_to(tmp_path / "elsewhere.csv")
    for output in (pipe, link):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(recommend.main, recommend_argv(data, "--all_users", "--output", str(output)))
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            f"recommend.py: error: --output {output}: cannot write (exists and is not a regular "
            f"file (a device, pipe or link)); pass a writable file path\n")
    assert os.path.islink(link) and not os.path.exists(link)
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


@pytest.mark.parametrize("max_share, kept", [(1.0, True), (0.25, False)])
def test_item_bounds_are_kept_only_where_they_rule_items_out(data, monkeypatch, max_share, kept):
    # 10 items for a top-10: every untrained item stays, more than a quarter of them.
    monkeypatch.setattr(bounded_topk, "BOUNDED_MIN_ITEMS", 1)
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", max_share)
    built = recommender.Recommender(data["dir"], data["checkpoint"])
    assert (built.bounds is not None) == kept
    users = torch.arange(4)
    table = built.table(users, 3)
    built.bounds = None
    pd.testing.assert_frame_equal(table, built.table(users, 3))
    monkeypatch.setattr(bounded_topk, "BOUNDED_MIN_ITEMS", 11)
    assert recommender.Recommender(data["dir"], data["checkpoint"]).bounds is None
