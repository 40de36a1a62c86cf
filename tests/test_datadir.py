"""One validation of a data directory before ncf.py or recommend.py uses it (open_dataset)."""
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

import cli
import convert
import dataloading
import ncf
import recommend

# 3 users, 3 items; every user has one test row and 2 test negatives.
TRAIN = [[0, 0], [0, 1], [1, 1], [1, 2], [2, 0], [2, 2]]
TEST = [[0, 2], [1, 0], [2, 1]]
NEGATIVES = [[0, 2], [1, 2], [0, 0]]


def write_converted(directory, train=TRAIN, test=TEST, negatives=NEGATIVES):
    """A directory as this project's convert.py writes it (its write_outputs)."""
    os.makedirs(directory, exist_ok=True)
    tensors = {"train_ratings": torch.tensor(train), "test_ratings": torch.tensor(test),
               "test_negatives": torch.tensor(negatives),
               "user_ids": torch.tensor([10, 20, 30]), "item_ids": torch.tensor([7, 8, 9])}
    metadata = {"users": 3, "items": 3, "train": len(train), "test": len(test),
                "valid_negative": len(negatives[0])}
    convert.write_outputs(str(directory), tensors, metadata)
    return directory


def write_original(directory):
    """A directory as the original convert.py writes it: the three tensors only."""
    os.makedirs(directory, exist_ok=True)
    for name, rows in zip(dataloading.DATA_FILES, (TRAIN, TEST, NEGATIVES)):
        torch.save(torch.tensor(rows), os.path.join(directory, name))
    return directory


def save(directory, name, tensor):
    torch.save(tensor, os.path.join(directory, name))


def edit_metadata(directory, **changes):
    path = os.path.join(directory, "metadata.json")
    metadata = json.loads(open(path).read())
    metadata.update(changes)
    open(path, "w").write(json.dumps(metadata))


def write_text(directory, name, text):
    open(os.path.join(directory, name), "w").write(text)


def remove(directory, name):
    os.remove(os.path.join(directory, name))


# (id, form of the directory, change, what the error line names)
BAD_DIRECTORIES = [
    ("killed conversion", "converted",
     lambda d: write_text(d, ".converting", ""), ".converting: a conversion into"),
    ("killed while replacing", "converted",
     lambda d: (write_text(d, ".converting", ""),
                save(d, "train_ratings.pt", torch.tensor(TRAIN[:4]))),
     ".converting: a conversion into"),
    ("killed while converting afresh", "original",
     lambda d: (write_text(d, ".converting", ""), remove(d, "test_negatives.pt")),
     ".converting: a conversion into"),
    ("train of another conversion", "converted",
     lambda d: save(d, "train_ratings.pt", torch.tensor(TRAIN[:4])),
     "metadata.json: records train = 6 but the tensors beside it have 4"),
    ("negatives of another conversion", "converted",
     lambda d: save(d, "test_negatives.pt", torch.tensor([[0], [1], [2]])),
     "metadata.json: records valid_negative = 2 but the tensors beside it have 1"),
    ("item beyond the tables", "converted",
     lambda d: save(d, "train_ratings.pt", torch.tensor(TRAIN[:5] + [[2, 7]])),
     "metadata.json: records items = 3 but the tensors beside it have 8"),
    ("user beyond the tables", "converted",
     lambda d: save(d, "train_ratings.pt", torch.tensor(TRAIN[:5] + [[5, 0]])),
     "metadata.json: records users = 3 but the tensors beside it have 6"),
    ("test negative out of range", "converted",
     lambda d: save(d, "test_negatives.pt", torch.tensor([[0, 2], [1, 2], [0, 3]])),
     "metadata.json: records items = 3 but the tensors beside it have 4"),
    ("metadata not JSON", "converted",
     lambda d: write_text(d, "metadata.json", "{half"), "metadata.json: cannot be read"),
    ("metadata not an object", "converted",
     lambda d: write_text(d, "metadata.json", "[]"), "metadata.json: not a JSON object"),
    ("metadata without counts", "converted",
     lambda d: write_text(d, "metadata.json", "{}"), "metadata.json: records train = null"),
    ("metadata count of another kind", "converted",
     lambda d: edit_metadata(d, test="3"), 'metadata.json: records test = "3" but'),
    ("negative user", "original",
     lambda d: save(d, "train_ratings.pt", torch.tensor(TRAIN[:5] + [[-1, 0]])),
     "holds the negative id -1"),
    ("negative test negative", "original",
     lambda d: save(d, "test_negatives.pt", torch.tensor([[0, 2], [1, -3], [0, 0]])),
     "holds the negative id -3"),
    ("negative test item", "converted",
     lambda d: save(d, "test_ratings.pt", torch.tensor([[0, 2], [1, -1], [2, 1]])),
     "holds the negative id -1"),
    ("empty test set", "original",
     lambda d: (save(d, "test_ratings.pt", torch.zeros(0, 2, dtype=torch.int64)),
                save(d, "test_negatives.pt", torch.zeros(0, 2, dtype=torch.int64))),
     "test_ratings.pt: holds no test pair"),
    ("empty training set", "original",
     lambda d: save(d, "train_ratings.pt", torch.zeros(0, 2, dtype=torch.int64)),
     "train_ratings.pt: holds no training pair"),
    ("no negative column", "original",
     lambda d: save(d, "test_negatives.pt", torch.zeros(3, 0, dtype=torch.int64)),
     "test_negatives.pt: has no column of test negatives"),
    ("fewer negative rows", "original",
     lambda d: save(d, "test_negatives.pt", torch.tensor(NEGATIVES[:2])),
     "test_negatives.pt: has 2 rows but test_ratings.pt has 3"),
    ("test user repeated", "original",
     lambda d: save(d, "test_ratings.pt", torch.tensor([[0, 2], [0, 0], [2, 1]])),
     "test_ratings.pt: a user has more than one test row"),
    ("test rows out of user order", "original",
     lambda d: save(d, "test_ratings.pt", torch.tensor(TEST).flip(0)),
     "test_ratings.pt: the test rows are not in user order, so they no longer line up with "
     "their negatives' rows; re-run convert.py"),
    ("three columns", "original",
     lambda d: save(d, "train_ratings.pt", torch.tensor([row + [5] for row in TRAIN])),
     "train_ratings.pt: has 3 columns, not 2"),
    ("one test column", "original",
     lambda d: save(d, "test_ratings.pt", torch.tensor([[0], [1], [2]])),
     "test_ratings.pt: has 1 columns, not 2"),
    ("sparse", "original",
     lambda d: save(d, "train_ratings.pt", torch.tensor(TRAIN).to_sparse()),
     "train_ratings.pt: expected a dense 2-D int64 tensor"),
    ("float", "converted",
     lambda d: save(d, "test_negatives.pt", torch.tensor(NEGATIVES, dtype=torch.float32)),
     "test_negatives.pt: expected a dense 2-D int64 tensor"),
    ("one dimension", "original",
     lambda d: save(d, "test_ratings.pt", torch.tensor([2, 0, 1])),
     "test_ratings.pt: expected a dense 2-D int64 tensor"),
    ("not a tensor", "original",
     lambda d: save(d, "test_ratings.pt", {"rows": torch.tensor(TEST)}),
     "test_ratings.pt: expected a dense 2-D int64 tensor"),
    ("damaged", "converted",
     lambda d: write_text(d, "train_ratings.pt", "PK\x03\x04 cut short"),
     "train_ratings.pt: cannot be read"),
    ("missing", "original",
     lambda d: remove(d, "test_negatives.pt"), "test_negatives.pt: not found"),
]


@pytest.fixture(params=BAD_DIRECTORIES, ids=[case[0] for case in BAD_DIRECTORIES])
def bad_directory(request, tmp_path):
    _, form, change, expected = request.param
    directory = str(tmp_path / "data")
    (write_converted if form == "converted" else write_original)(directory)
    dataloading.open_dataset(directory)  # usable before the change
    change(directory)
    return directory, expected


def one_error_line(capsys, prog, main, argv):
    with pytest.raises(SystemExit) as caught:
        cli.run(main, argv)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def test_ncf_refuses_in_one_line(bad_directory, tmp_path, capsys):
    directory, expected = bad_directory
    line = one_error_line(capsys, "ncf.py", ncf.main, [
        "--data", directory, "--checkpoint_dir", str(tmp_path / "ck"),
        "--log_path", str(tmp_path / "log.json")])
    assert expected in line and "convert.py" in line
    assert not (tmp_path / "log.json").exists()


def test_recommend_refuses_in_one_line(bad_directory, tmp_path, capsys):
    directory, expected = bad_directory
    line = one_error_line(capsys, "recommend.py", recommend.main, [
        "--data", directory, "--checkpoint", str(tmp_path / "model.pth"), "--users", "10",
        "--device", "cpu"])
    assert expected in line


def test_both_forms_give_sizes_and_fingerprint(tmp_path):
    ours = dataloading.open_dataset(write_converted(str(tmp_path / "ours")))
    original = dataloading.open_dataset(write_original(str(tmp_path / "original")))
    expected = dataloading.tensors_fingerprint(
        torch.tensor(TRAIN), torch.tensor(TEST), torch.tensor(NEGATIVES))
    assert ours[3:6] == original[3:6] == (3, 3, expected)
    assert ours.metadata["fingerprint"] == expected and original.metadata is None
    assert [tensor.tolist() for tensor in ours[:3]] == [TRAIN, TEST, NEGATIVES]


def test_fingerprint_tells_contents_and_shapes_apart():
    train, test = torch.tensor(TRAIN), torch.tensor(TEST)
    base = dataloading.tensors_fingerprint(train, test, torch.tensor(NEGATIVES))
    other_negative = dataloading.tensors_fingerprint(train, test, torch.tensor(
        [[0, 2], [1, 2], [0, 1]]))
    # the same 12 numbers cut into other rows
    moved_row = dataloading.tensors_fingerprint(train[:5], torch.cat((train[5:], test)),
                                                torch.tensor(NEGATIVES))
    assert len({base, other_negative, moved_row}) == 3
    assert base == dataloading.tensors_fingerprint(train.clone(), test.t().contiguous().t(),
                                                   torch.tensor(NEGATIVES))


def test_metadata_without_fingerprint_is_hashed_at_load(tmp_path):
    directory = write_converted(str(tmp_path / "data"))
    path = os.path.join(directory, "metadata.json")
    metadata = json.loads(open(path).read())
    expected = metadata.pop("fingerprint")
    open(path, "w").write(json.dumps(metadata))
    assert dataloading.open_dataset(directory).fingerprint == expected


def train_args(data, checkpoints, *extra):
    return ["--data", str(data), "--checkpoint_dir", str(checkpoints), "--log_path",
            str(checkpoints / "log.json"), "-b", "2048", "--threshold", "1.1", *extra]


def test_original_directory_is_used_with_a_note(clustered_data, tmp_path, capsys):
    ncf.main(train_args(clustered_data, tmp_path, "-e", "1"))
    out = capsys.readouterr().out
    assert (f"note: {clustered_data} has no metadata.json: taken as converted by an original's "
            f"convert.py or transcode.py") in out
    assert "Epoch 0:" in out


@pytest.fixture(scope="module")
def one_epoch(clustered_data, tmp_path_factory):
    """A run of one epoch on a copy of clustered_data, and that copy."""
    data = tmp_path_factory.mktemp("resume") / "data"
    shutil.copytree(clustered_data, data)
    checkpoints = data.parent / "ck"
    ncf.main(train_args(data, checkpoints, "-e", "1"))
    return data, checkpoints


def test_resume_refuses_data_with_other_test_negatives(one_epoch, tmp_path, capsys):
    data, checkpoints = one_epoch
    other = tmp_path / "reconverted"
    shutil.copytree(data, other)
    negatives = torch.load(other / "test_negatives.pt", weights_only=True)
    torch.save(negatives.roll(1, dims=1), other / "test_negatives.pt")
    work = tmp_path / "ck"
    shutil.copytree(checkpoints, work)
    capsys.readouterr()
    line = one_error_line(capsys, "ncf.py", ncf.main, 
        train_args(other, work, "-e", "2", "--resume"))
    assert "last.pth: the saved run's data fingerprint differs from that of --data" in line
    assert "Epoch 1" not in capsys.readouterr().out


def test_resume_from_a_copy_of_the_data_warns(one_epoch, tmp_path, capsys):
    data, checkpoints = one_epoch
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    work = tmp_path / "ck"
    shutil.copytree(checkpoints, work)
    capsys.readouterr()
    ncf.main(train_args(copy, work, "-e", "2", "--resume"))
    out = capsys.readouterr().out
    assert (f"warning: resuming with --data {copy} instead of {data}, which holds the same "
            f"data") in out
    assert "Epoch 1:" in out


def test_conversion_onto_a_full_disk_leaves_nothing(small_disk, tmp_path, capsys):
    ratings = tmp_path / "ratings.csv"
    # 1,000 users x 20 ratings: about 300 KiB of training pairs, more than the disk holds
    ratings.write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{user},{(user * 7 + step) % 500},5,{step}\n" for user in range(1000)
        for step in range(20)))
    output = small_disk / "data"
    line = one_error_line(capsys, "convert.py", convert.main, 
        ["--path", str(ratings), "--output", str(output)])
    assert f"{output}: cannot write the output (No space left on device)" in line
    # nor the directory it created
    assert os.listdir(small_disk) == []


def test_a_plain_pickle_is_one_line_without_torchs_warning(tmp_path):
    """pickle.dump rather than torch.save: torch warned about the pickle protocol, two lines of
    its own above ours."""
    directory = write_original(str(tmp_path / "data"))
    with open(os.path.join(directory, "test_ratings.pt"), "wb") as handle:
        pickle.dump(torch.tensor(TEST), handle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(dataloading.DataError, match="test_ratings.pt: cannot be read "
                                                        r"\(UnpicklingError\); re-run convert.py"):
            dataloading.open_dataset(directory)
    assert [str(warning.message) for warning in caught] == []
