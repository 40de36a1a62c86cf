"""The 2023 layout: feature_spec.yaml and its tensors, read into the Dataset the 2019 layout of
the same data gives, written by `convert.py --format 2023`, and the YAML subset they use."""
import json
import math
import os
import shutil
import warnings

import pytest
import torch
import torch.serialization

import cli
import convert
import ncf
import transcode
from conftest import write_clustered_dataset
from dataloading import DataError, open_dataset
from feature_spec import YamlError, parse_yaml, yaml_text

# The feature spec as the 2023 original's convert.py writes it: yaml.dump of its dict (PyYAML
# 5.1 and later: block style, keys sorted, a list at its key's indentation).
NVIDIA_SPEC = """channel_spec:
  item_ch:
  - item
  label_ch:
  - label
  user_ch:
  - user
feature_spec:
  item:
    cardinality: {items}
    dtype: torch.int64
  label:
    dtype: torch.float32
  user:
    cardinality: {users}
    dtype: torch.int64
metadata:
  test_samples_per_series: {length}
source_spec:
  test:
  - features:
    - user
    - item
    files:
    - test_data_0.pt
    type: torch_tensor
  - features:
    - label
    files:
    - test_data_1.pt
    type: torch_tensor
  train:
  - features:
    - user
    - item
    files:
    - train_data_0.pt
    type: torch_tensor
  - features:
    - label
    files:
    - train_data_1.pt
    type: torch_tensor

"""


def save_as_from_cuda(tensor, path):
    """torch.save as the 2023 original's convert.py saves, from the GPU: the file says cuda:0."""
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(tensor, path)
    finally:
        torch.serialization.location_tag = real


def write_nvidia_2023(directory, dataset):
    """The 2023 original's layout of `dataset` (a 2019-layout Dataset), written as its
    convert.py writes it: tensors saved from the GPU, each user's positive first."""
    os.makedirs(directory, exist_ok=True)
    length = dataset.negatives.shape[1] + 1
    users = dataset.test[:, 0].repeat_interleave(length)
    items = torch.cat((dataset.test[:, 1:], dataset.negatives), dim=1).reshape(-1)
    labels = torch.zeros(len(dataset.test), length)
    labels[:, 0] = 1
    for name, tensor in [("train_data_0.pt", dataset.train),
                         ("train_data_1.pt", torch.ones(len(dataset.train), 1)),
                         ("test_data_0.pt", torch.stack((users, items), dim=1)),
                         ("test_data_1.pt", labels.reshape(-1, 1))]:
        save_as_from_cuda(tensor, os.path.join(directory, name))
    with open(os.path.join(directory, "feature_spec.yaml"), "w") as spec:
        spec.write(NVIDIA_SPEC.format(users=dataset.nb_users, items=dataset.nb_items,
                                      length=length))
    return directory


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A clustered 2019 directory, and the 2023 original's layout of the same data."""
    top = tmp_path_factory.mktemp("layouts")
    old = write_clustered_dataset(str(top / "2019"), nb_users=60, nb_items=40, clusters=4,
                                  per_user=8, negatives=20)
    return old, write_nvidia_2023(str(top / "2023"), open_dataset(old))


def assert_same_dataset(first, second, same_metadata=True):
    for field, one, other in zip(first._fields, first, second):
        if isinstance(one, torch.Tensor):
            assert one.dtype == other.dtype and torch.equal(one, other), field
        elif field != "metadata" or same_metadata:
            assert one == other, field


def test_the_2023_originals_layout_gives_the_2019_dataset(clustered):
    old, new = clustered
    assert_same_dataset(open_dataset(old), open_dataset(new))


def test_the_same_hit_rate_from_either_layout(clustered, tmp_path, capsys):
    hit_rates = []
    for data in clustered:
        ncf.main(["--data", data, "-e", "2", "-b", "512", "--seed", "5", "--threshold", "1.1",
                  "--checkpoint_dir", "", "--log_path", str(tmp_path / "log.json")])
        hit_rates.append([line.split(",")[0] for line in capsys.readouterr().out.splitlines()
                          if line.startswith("Epoch ")])
    assert len(hit_rates[0]) == 2 and hit_rates[0] == hit_rates[1]


def test_a_spec_named_elsewhere_is_read_and_its_files_are_relative_to_it(clustered, tmp_path):
    old, new = clustered
    moved = tmp_path / "data"
    (moved / "spec").mkdir(parents=True)
    for name in os.listdir(new):
        if name.endswith(".pt"):
            shutil.copy(os.path.join(new, name), moved / "spec" / name)
    shutil.copy(os.path.join(new, "feature_spec.yaml"), moved / "spec" / "mine.yaml")
    assert_same_dataset(open_dataset(old), open_dataset(str(moved), "spec/mine.yaml"))
    with pytest.raises(DataError, match=r"/spec/other.yaml: not found; .*--feature_spec_file"):
        open_dataset(str(moved), "spec/other.yaml")
    with pytest.raises(DataError, match=r"/train_ratings.pt: not found; convert the ratings "
                                        r"first .* \(the 2023 layout's feature_spec.yaml is not "
                                        r"there either\)"):
        open_dataset(str(moved))


@pytest.fixture(scope="module")
def ratings(tmp_path_factory):
    path = tmp_path_factory.mktemp("ratings") / "ratings.csv"
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(30):
        lines += [f"{user},{(user * 7 + step * 3) % 50},4,{step * 10 + user}"
                  for step in range(6)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("extra", [[], ["--validation"], ["--string_ids"]])
def test_convert_writes_the_2023_layout_that_reads_back_as_the_2019_one(ratings, tmp_path,
                                                                      extra, capsys):
    common = ["--path", ratings, "--min_ratings", "3", "--valid_negative", "7", *extra]
    assert convert.main(common + ["--output", str(tmp_path / "old")]) == 0
    assert convert.main(common + ["--output", str(tmp_path / "new"), "--format", "2023"]) == 0
    old, new = (open_dataset(str(tmp_path / name)) for name in ("old", "new"))
    assert_same_dataset(old, new, same_metadata=False)
    assert new.metadata == {**old.metadata, "layout": "2023"}
    id_maps = (["user_ids.json", "item_ids.json"] if extra == ["--string_ids"] else
               ["item_ids.pt", "user_ids.pt"])
    mappings = ["test", "train"] + ["validation"] * (extra == ["--validation"])
    assert sorted(os.listdir(tmp_path / "new")) == sorted(
        ["feature_spec.yaml", "metadata.json", *id_maps]
        + [f"{mapping}_data_{part}.pt" for mapping in mappings for part in (0, 1)])
    spec = parse_yaml((tmp_path / "new" / "feature_spec.yaml").read_text())
    assert spec["feature_spec"] == {
        "user": {"dtype": "torch.int64", "cardinality": 30},
        "item": {"dtype": "torch.int64", "cardinality": new.nb_items},
        "label": {"dtype": "torch.float32"}}
    assert spec["metadata"] == {"test_samples_per_series": 8}
    assert spec["channel_spec"] == {"user_ch": ["user"], "item_ch": ["item"],
                                    "label_ch": ["label"]}
    assert spec["source_spec"]["test"] == [
        {"type": "torch_tensor", "features": ["user", "item"], "files": ["test_data_0.pt"]},
        {"type": "torch_tensor", "features": ["label"], "files": ["test_data_1.pt"]}]
    assert sorted(spec["source_spec"]) == mappings
    load = {name: torch.load(tmp_path / "new" / f"{name}.pt", weights_only=True)
            for name in ("train_data_0", "train_data_1", "test_data_0", "test_data_1")}
    assert (load["train_data_0"].dtype, load["test_data_0"].dtype) == (torch.int64,) * 2
    assert load["train_data_1"].dtype == load["test_data_1"].dtype == torch.float32
    assert torch.equal(load["train_data_0"], old.train)
    assert load["train_data_1"].shape == (len(old.train), 1) and bool(
        (load["train_data_1"] == 1).all())
    series = load["test_data_0"].view(30, 8, 2)
    assert torch.equal(series[:, 0], old.test) and torch.equal(series[:, 1:, 1], old.negatives)
    assert torch.equal(load["test_data_1"].view(30, 8), torch.tensor([[1.0] + [0.0] * 7] * 30))


def test_each_layout_replaces_the_other(ratings, tmp_path, capsys):
    output = str(tmp_path / "data")
    for layout, kept in [("2023", "feature_spec.yaml"), ("2019", "train_ratings.pt"),
                         ("2023", "feature_spec.yaml")]:
        convert.main(["--path", ratings, "--output", output, "--min_ratings", "3",
                      "--valid_negative", "7", "--format", layout])
        names = os.listdir(output)
        assert kept in names and ("train_ratings.pt" in names) != ("feature_spec.yaml" in names)
        open_dataset(output)


def copy_of(directory, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(directory, copy)
    return str(copy)


def edit_spec(directory, old, new, count=1):
    path = os.path.join(directory, "feature_spec.yaml")
    text = open(path).read()
    assert text.count(old) >= count, old
    open(path, "w").write(text.replace(old, new, count))


def save(directory, name, tensor):
    torch.save(tensor, os.path.join(directory, name))


def load(directory, name):
    return torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)


def change_tensor(name, change):
    return lambda d: save(d, name, change(load(d, name)))


def swap_rows(first, second):
    def swap(tensor):
        tensor = tensor.clone()
        tensor[[first, second]] = tensor[[second, first]]
        return tensor
    return swap


def set_rows(rows, value):
    def set_value(tensor):
        tensor = tensor.clone()
        tensor[rows] = value
        return tensor
    return set_value


# (id, change of the 2023 directory of 60 users, series of 21, what the one line says)
BAD_2023 = [
    ("csv chunk", lambda d: edit_spec(d, "type: torch_tensor", "type: csv"),
     "feature_spec.yaml: source_spec.test[0].type is 'csv'; ncf.py reads torch_tensor chunks"),
    ("chunks of unequal rows", change_tensor("test_data_0.pt", lambda t: t[:-1]),
     "test_data_1.pt: has 1260 rows but"),
    ("series of unequal length", lambda d: (
        save(d, "test_data_0.pt", load(d, "test_data_0.pt")[:-1]),
        save(d, "test_data_1.pt", load(d, "test_data_1.pt")[:-1])),
     "test_data_0.pt: its 1259 rows are no whole number of series of 21"),
    ("interleaved series", change_tensor("test_data_0.pt", swap_rows(20, 21)),
     "test_data_0.pt: rows 0 to 20 are one series but hold users 0 and 1"),
    ("positive not first", change_tensor("test_data_1.pt", swap_rows(21, 25)),
     "test_data_1.pt: row 25: user 1's positive is not first in its series (rows 21 to 41)"),
    ("no positive", change_tensor("test_data_1.pt", set_rows(42, 0.0)),
     "test_data_1.pt: user 2's series (rows 42 to 62) has no positive"),
    ("two positives", change_tensor("test_data_1.pt", set_rows(43, 1.0)),
     "test_data_1.pt: user 2's series (rows 42 to 62) has 2 positives"),
    ("label neither 0 nor 1", change_tensor("test_data_1.pt", set_rows(5, 0.5)),
     "test_data_1.pt: row 5: label 0.5; a label is 1"),
    ("training negatives", change_tensor("train_data_1.pt", set_rows(slice(0, 3), 0.0)),
     "train_data_1.pt: 3 of its"),
    ("user with two series", change_tensor("test_data_0.pt", set_rows(slice(21, 42, None),
                                                                      torch.tensor([0, 7]))),
     "test_data_0.pt: user 0 has two series (rows 0 and 21 on)"),
    ("item cardinality below the ids", lambda d: edit_spec(d, "cardinality: 40",
                                                           "cardinality: 39"),
     "feature_spec.yaml: feature_spec.item.cardinality is 39 but the data holds item id 39; "
     "raise it to 40 or more, or set it to auto"),
    ("user cardinality below the ids", lambda d: edit_spec(d, "cardinality: 60",
                                                           "cardinality: 12"),
     "feature_spec.user.cardinality is 12 but the data holds user id 59"),
    ("cardinality not a count", lambda d: edit_spec(d, "cardinality: 60", "cardinality: many"),
     "feature_spec.user.cardinality is 'many'; give the number of ids"),
    ("series length missing", lambda d: edit_spec(d, "test_samples_per_series: 21", "other: 1"),
     "metadata.test_samples_per_series is missing"),
    ("series length 1", lambda d: edit_spec(d, "test_samples_per_series: 21",
                                            "test_samples_per_series: 1"),
     "metadata.test_samples_per_series is 1"),
    ("two files in a chunk", lambda d: edit_spec(d, "- test_data_1.pt",
                                                 "- test_data_1.pt\n    - more.pt"),
     "source_spec.test[1].files must name one file"),
    ("missing chunk file", lambda d: os.remove(os.path.join(d, "train_data_1.pt")),
     "train_data_1.pt: not found"),
    ("damaged chunk", lambda d: open(os.path.join(d, "test_data_0.pt"), "w").write("PK\x03"),
     "test_data_0.pt: cannot be read"),
    ("plain pickle", lambda d: __import__("pickle").dump(
        load(d, "test_data_0.pt"), open(os.path.join(d, "test_data_0.pt"), "wb")),
     "test_data_0.pt: cannot be read (UnpicklingError)"),
    ("wrong column count", change_tensor("train_data_0.pt", lambda t: t[:, :1]),
     "train_data_0.pt: expected a dense 2-D tensor of 2 column(s) (user, item)"),
    ("float ids", change_tensor("train_data_0.pt", lambda t: t.float()),
     "train_data_0.pt: the user ids (user) are torch.float32"),
    ("negative id", change_tensor("test_data_0.pt", set_rows(3, torch.tensor([0, -4]))),
     "holds the negative id -4"),
    ("no training pair", lambda d: (save(d, "train_data_0.pt", torch.zeros(0, 2).long()),
                                    save(d, "train_data_1.pt", torch.zeros(0, 1))),
     "train_data_0.pt: holds no training pair"),
    ("feature of no chunk", lambda d: edit_spec(d, "  - label\n  user_ch", "  - rating\n  user_ch"),
     "source_spec.train has no column of feature 'rating' (channel_spec.label_ch)"),
    ("channel missing", lambda d: edit_spec(d, "  item_ch:\n  - item\n", ""),
     "channel_spec.item_ch lists no feature"),
    ("feature twice", lambda d: edit_spec(d, "    - label\n    files:\n    - test_data_1.pt",
                                          "    - item\n    files:\n    - test_data_1.pt"),
     "source_spec.test[1]: feature 'item' is also a column of"),
    ("section missing", lambda d: edit_spec(d, "metadata:\n  test_samples_per_series: 21\n", ""),
     "feature_spec.yaml: has no metadata mapping"),
    ("YAML outside the subset", lambda d: edit_spec(d, "  item:\n    cardinality",
                                                    "  item: &x\n    cardinality"),
     "feature_spec.yaml: line 9: '&x': anchors"),
    ("bad indentation", lambda d: edit_spec(d, "    dtype: torch.int64",
                                            "      dtype: torch.int64"),
     "feature_spec.yaml: line 11: a line that does not fit the structure above it"),
    ("both layouts", lambda d: save(d, "train_ratings.pt", torch.zeros(1, 2).long()),
     "holds both layouts, feature_spec.yaml and train_ratings.pt"),
]


@pytest.fixture(params=BAD_2023, ids=[case[0] for case in BAD_2023])
def bad_2023(request, clustered, tmp_path):
    _, change, expected = request.param
    directory = copy_of(clustered[1], tmp_path)
    open_dataset(directory)  # usable before the change
    change(directory)
    return directory, expected


def test_bad_2023_directories_are_one_line_naming_the_fault(bad_2023, tmp_path, capsys):
    directory, expected = bad_2023
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as leaving:
            cli.run(ncf.main, ["--data", directory, "--checkpoint_dir", str(tmp_path / "ck"),
                               "--log_path", str(tmp_path / "log.json")])
    assert leaving.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncf.py: error: "), lines
    assert expected in lines[0] and "; " in lines[0]
    # torch's warning about a plain pickle's protocol no longer comes first
    assert [str(warning.message) for warning in caught] == []


def test_a_larger_cardinality_sizes_the_tables(clustered, tmp_path):
    directory = copy_of(clustered[1], tmp_path)
    edit_spec(directory, "cardinality: 40", "cardinality: 45")
    edit_spec(directory, "cardinality: 60", "cardinality: auto")
    assert open_dataset(directory)[3:5] == (60, 45)


def test_series_in_any_user_order_and_positives_of_int_labels(clustered, tmp_path):
    """The 2023 original ranks each series wherever it stands; ours sorts them by user."""
    old, new = clustered
    directory = copy_of(new, tmp_path)
    order = torch.arange(60).flip(0)
    for name, dtype in (("test_data_0.pt", None), ("test_data_1.pt", torch.int64)):
        tensor = load(directory, name)
        tensor = tensor.view(60, 21, -1)[order].reshape(60 * 21, -1)
        save(directory, name, tensor if dtype is None else tensor.to(dtype))
    assert_same_dataset(open_dataset(old), open_dataset(directory))


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.update(train=5), "metadata.json: records train = 5 but the tensors beside it "
                                  "have"),
    (lambda m: m.update(validation=60), "it and metadata.json disagree: metadata.json has a "
                                        "validation split, "),
])
def test_metadata_json_is_checked_against_the_2023_tensors(ratings, tmp_path, capsys, change,
                                                           expected):
    output = tmp_path / "data"
    convert.main(["--path", ratings, "--output", str(output), "--min_ratings", "3",
                  "--format", "2023"])
    metadata = json.loads((output / "metadata.json").read_text())
    change(metadata)
    (output / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DataError, match=expected):
        open_dataset(str(output))


# (YAML text, the value PyYAML gives it)
YAML_CASES = [
    ("a: 1\nb: two\nc:\nd: ~\n", {"a": 1, "b": "two", "c": None, "d": None}),
    ("- 1\n- - x\n  - y\n-\n- k: v\n  l: [1, 'a b']\n",
     [1, ["x", "y"], None, {"k": "v", "l": [1, "a b"]}]),
    ("top:\n  list:\n  - a\n  - b\n  next: 3\n", {"top": {"list": ["a", "b"], "next": 3}}),
    ("top:\n    - indented\n    - list\n", {"top": ["indented", "list"]}),
    ("# comment\n---\nkey: value # trailing\nhash: a#b\nq: 'x # y'\n",
     {"key": "value", "hash": "a#b", "q": "x # y"}),
    ("s: 'it''s'\nd: \"tab\\there\"\n'quoted key': 1\n",
     {"s": "it's", "d": "tab\there", "quoted key": 1}),
    ("f: {a: 1, 'b c': torch.int64}\ne: {}\nl: []\n",
     {"f": {"a": 1, "b c": "torch.int64"}, "e": {}, "l": []}),
    ("n: [1_000, 0x1f, 017, 0b11, -0, +5, 1.5, .5, 1.0e+3, 1e3, .inf, -.inf]\n",
     {"n": [1000, 31, 15, 3, 0, 5, 1.5, 0.5, 1000.0, "1e3", math.inf, -math.inf]}),
    ("b: [yes, No, on, OFF, true, False, null, Null, '', auto]\n",
     {"b": [True, False, True, False, True, False, None, None, "", "auto"]}),
    ("", None),
]


@pytest.mark.parametrize("text, expected", YAML_CASES)
def test_the_yaml_subset_reads_as_pyyaml_does(text, expected):
    assert parse_yaml(text) == expected
    try:
        import yaml
    except ImportError:
        return
    assert yaml.safe_load(text) == expected


@pytest.mark.parametrize("text, line, problem", [
    ("a: 1\n  b: 2\n", 2, "a line that does not fit the structure above it"),
    ("a:\n  - x\n - y\n", 3, "a line that does not fit"),
    ("a: 1\na: 2\n", 2, "the key 'a' a second time"),
    ("a: 'open\n", 1, "a quote that does not close on its line"),
    ("a: [x, y\n", 1, "a [ that does not close on its line"),
    ("a: [x, [y]]\n", 1, "an item of [ ] that is not a scalar"),
    ("a: *alias\n", 1, "anchors, aliases, tags, block text"),
    ("a: |\n  text\n", 1, "anchors, aliases, tags, block text"),
    ("a: b: c\n", 1, "nested entries"),
    ("a:\n\t- x\n", 2, "a tab in the indentation"),
    ("a: 1\n---\nb: 2\n", 2, "a second document"),
    ("a: \"\\x41\"\n", 1, "an escape in double quotes that JSON lacks"),
])
def test_yaml_outside_the_subset_names_its_line(text, line, problem):
    with pytest.raises(YamlError) as caught:
        parse_yaml(text)
    assert caught.value.line == line and problem in caught.value.problem


def test_the_yaml_written_reads_back_the_same():
    value = {"plain": "torch.int64", "words": ["yes", "null", "1", "1.5", "", "a b", "a: b",
                                               "#x", "it's", "é"],
             "numbers": [0, -3, 2 ** 40, 1.5, 1e20, -2.0, math.inf, -math.inf],
             "empty": {}, "none": [], "nothing": None, "flags": [True, False],
             "nested": [{"a": [1, {"b": [[2, 3], []]}]}, [[4]]]}
    text = yaml_text(value)
    assert parse_yaml(text) == value
    try:
        import yaml
    except ImportError:
        return
    assert yaml.safe_load(text) == value


def test_the_2023_templates_of_nvidia_read():
    """data/ml-20m/feature_spec_template.yaml of the 2023 original, comments and all."""
    template = """feature_spec:
  user:
    dtype: torch.int64
    cardinality: 138493
  label:
    dtype: torch.float32

metadata:
  test_samples_per_series: 101

source_spec:
  train:
    - type: torch_tensor
      features:
        # For torch_tensor, each line corresponds to a column. They are ordered
        - user
        - item
      files:
        # Loader currently only supports one file per chunk
        - train_data_0.pt # Paths are relative to data-spec's directory
channel_spec:
  user_ch: # Channel names are model-specific magics (in this model, neumf_constants.py)
    - user

# Requirements:
"""
    assert parse_yaml(template) == {
        "feature_spec": {"user": {"dtype": "torch.int64", "cardinality": 138493},
                         "label": {"dtype": "torch.float32"}},
        "metadata": {"test_samples_per_series": 101},
        "source_spec": {"train": [{"type": "torch_tensor", "features": ["user", "item"],
                                   "files": ["train_data_0.pt"]}]},
        "channel_spec": {"user_ch": ["user"]}}


# The 2023 original's data/csv_conversion example, shortened: its spec, a training file of
# positives and given negatives, a test file of 3-sample series with the positive last.
CSV_SPEC = """feature_spec:
  user:
    cardinality: auto
  item:
    cardinality: auto
  label:

metadata:
  test_samples_per_series: 3

source_spec:
  train:
    - type: csv
      features: #Each line corresponds to a column in the csv files
        - user
        - item
        - label
      files:
        - train_data_1.csv # we assume no header
        - train_data_2.csv
  test:
    - type: csv
      features:
        - user
        - item
        - label
      files:
        - test_data_1.csv

channel_spec:
  user_ch: # Channel names are model-specific magics (in this model, neumf_constants.py)
    - user
  item_ch:
    - item
  label_ch:
    - label
"""
CSV_FILES = {
    "train_data_1.csv": "0, 3, 0\n0, 18, 1\n1, 4, 1\n",
    "train_data_2.csv": "1, 9, 0\n2, 5, 1\n2, 6, 1\n0, 2, 1\n",
    "test_data_1.csv": "1, 7, 0\n1, 6, 0\n1, 16, 1\n0, 8, 0\n0, 18, 0\n0, 17, 1\n2, 3, 1\n"
                       "2, 1, 0\n2, 19, 0",
}


def write_csv_dataset(directory, spec=CSV_SPEC, **changes):
    os.makedirs(directory, exist_ok=True)
    for name, text in {**CSV_FILES, "feature_spec.yaml": spec, **changes}.items():
        if text is not None:
            with open(os.path.join(directory, name), "w") as handle:
                handle.write(text)
    return str(directory)


def test_transcode_reads_nvidias_csv_example(tmp_path, capsys):
    source = write_csv_dataset(tmp_path / "csv")
    output = tmp_path / "out"
    assert transcode.main(["--path", source, "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert captured.out == (f"transcode.py: 3 users, 20 items; samples: train 5, test 9 -> "
                            f"{output}\n")
    assert captured.err == ("transcode.py: note: left out 2 training samples labelled 0 (given "
                            "negatives): ncf.py trains on the positives and draws its own "
                            "negatives\n")
    dataset = open_dataset(str(output))
    assert dataset.train.tolist() == [[0, 18], [1, 4], [2, 5], [2, 6], [0, 2]]
    # series in user order, each positive first, its negatives in their order
    assert dataset.test.tolist() == [[0, 17], [1, 16], [2, 3]]
    assert dataset.negatives.tolist() == [[8, 18], [7, 6], [1, 19]]
    assert dataset[3:5] == (3, 20) and dataset.metadata is None
    spec = parse_yaml((output / "feature_spec.yaml").read_text())
    assert spec["feature_spec"] == {"user": {"dtype": "torch.int64", "cardinality": 3},
                                    "item": {"dtype": "torch.int64", "cardinality": 20},
                                    "label": {"dtype": "torch.float32"}}
    assert spec["metadata"] == {"test_samples_per_series": 3}
    labels = torch.load(output / "test_data_1.pt", weights_only=True)
    assert labels.dtype == torch.float32 and labels.view(-1).tolist() == [1, 0, 0] * 3


def test_transcoded_csv_of_a_conversion_is_that_dataset(clustered, tmp_path, capsys):
    """Every user's series written with its positive last, users in reverse order."""
    old = open_dataset(clustered[0])
    source = tmp_path / "csv"
    rows = [f"{user},{item},1" for user, item in old.train.tolist()]
    series = []
    for (user, positive), negatives in zip(old.test.tolist(), old.negatives.tolist()):
        series.append([f"{user},{item},0" for item in negatives] + [f"{user},{positive},1"])
    spec = (CSV_SPEC.replace("test_samples_per_series: 3", "test_samples_per_series: 21")
            .replace("        - train_data_2.csv\n", ""))
    write_csv_dataset(source, spec, **{
        "train_data_1.csv": "\n".join(rows) + "\n", "train_data_2.csv": None,
        "test_data_1.csv": "\n".join(line for lines in series[::-1] for line in lines) + "\n"})
    assert transcode.main(["--path", str(source), "--output", str(tmp_path / "out"),
                           "--feature_spec_out", "spec.yaml"]) == 0
    assert capsys.readouterr().err == ""
    assert_same_dataset(old, open_dataset(str(tmp_path / "out"), "spec.yaml"))


def csv_with(**changes):
    return lambda d: write_csv_dataset(d, **changes)


def spec_with(old, new):
    return lambda d: write_csv_dataset(d, CSV_SPEC.replace(old, new))


# (id, change of the example, what the one line names)
BAD_CSV = [
    ("torch_tensor chunk", spec_with("- type: csv", "- type: torch_tensor"),
     "feature_spec.yaml: source_spec.train[0] is of type 'torch_tensor', not csv"),
    ("missing file", csv_with(**{"train_data_2.csv": None}), "train_data_2.csv: no such file"),
    ("text id", csv_with(**{"train_data_2.csv": "1, 9, 0\n2, x, 1\n"}),
     "train_data_2.csv: line 2: item id 'x'; ids are whole numbers from 0"),
    ("negative id", csv_with(**{"train_data_1.csv": "0, 3, 0\n-1, 18, 1\n"}),
     "train_data_1.csv: line 2: user id '-1'"),
    ("label 2", csv_with(**{"test_data_1.csv": "1, 7, 2\n1, 6, 0\n1, 16, 1\n"}),
     "test_data_1.csv: line 1: label '2'; a label is 1"),
    ("series not whole", csv_with(**{"test_data_1.csv": "1, 7, 0\n1, 16, 1\n"}),
     "test_data_1.csv: line 2: the mapping's 2 rows are no whole number of series of 3"),
    ("series of two users", csv_with(**{"test_data_1.csv": "1, 7, 0\n1, 6, 0\n2, 16, 1\n"}),
     "test_data_1.csv: line 3: user 2 within user 1's series of 3"),
    ("two positives", csv_with(**{"test_data_1.csv": "1, 7, 1\n1, 6, 0\n1, 16, 1\n"}),
     "test_data_1.csv: line 1: user 1's series of 3 from this line has 2 positives"),
    ("no positive", csv_with(**{"test_data_1.csv": "1, 7, 0\n1, 6, 0\n1, 16, 0\n"}),
     "has 0 positives"),
    ("two series of a user", csv_with(**{"test_data_1.csv": "1, 7, 0\n1, 6, 0\n1, 16, 1\n"
                                                            "1, 2, 1\n1, 3, 0\n1, 4, 0\n"}),
     "test_data_1.csv: line 4: a second series of user 1 (the first from"),
    ("cardinality below the ids", spec_with("  item:\n    cardinality: auto",
                                            "  item:\n    cardinality: 19"),
     "feature_spec.item.cardinality is 19 but the data holds item id 19; raise it to 20"),
    ("chunks of unequal rows", lambda d: write_csv_dataset(d, CSV_SPEC.replace(
        """        - label
      files:
        - test_data_1.csv""", """      files: [ids.csv]
    - type: csv
      features: [label]
      files: [labels.csv]"""), **{"ids.csv": "1, 7\n1, 6\n1, 16\n", "labels.csv": "0\n1\n"}),
     "source_spec.test[1] has 2 rows but source_spec.test[0] has 3"),
    ("wrong field count", csv_with(**{"train_data_1.csv": "0, 3\n0, 18\n"}),
     "train_data_1.csv: line 1: 2 fields, but its chunk lists 3 features"),
    ("ragged line", csv_with(**{"train_data_1.csv": "0, 3, 0\n0, 18, 1, 4\n"}),
     "train_data_1.csv: cannot parse"),
    ("no test mapping", spec_with("  test:\n", "  other:\n"),
     "source_spec has no test mapping; ncf.py needs train and test"),
    ("feature missing", spec_with("  label_ch:\n    - label", "  label_ch:\n    - rating"),
     "source_spec.train has no column of feature 'rating'"),
    ("mapping name", spec_with("  test:\n", "  test:\n    - type: csv\n      features: [user, "
                                            "item, label]\n      files: [test_data_1.csv]\n"
                                            "  ../up:\n"),
     "source_spec.../up names files"),
    ("series length missing", spec_with("  test_samples_per_series: 3", "  other: 3"),
     "metadata.test_samples_per_series is None"),
    ("YAML outside the subset", spec_with("  item:\n", "  item: !tag\n"),
     "feature_spec.yaml: line 4: '!tag'"),
    ("no spec", lambda d: os.remove(os.path.join(write_csv_dataset(d), "feature_spec.yaml")),
     "feature_spec.yaml: no such file; give the spec's directory with --path"),
]


@pytest.mark.parametrize("change, expected", [case[1:] for case in BAD_CSV],
                         ids=[case[0] for case in BAD_CSV])
def test_transcode_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, change, expected):
    source = tmp_path / "csv"
    source.mkdir()
    change(str(source))
    with pytest.raises(SystemExit) as leaving:
        cli.run(transcode.main, ["--path", str(source), "--output", str(tmp_path / "out")])
    assert leaving.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("transcode.py: error: "), lines
    assert expected in lines[0] and "; " in lines[0]
    assert not (tmp_path / "out").exists()


def test_transcode_writes_its_spec_only_into_the_output(tmp_path, capsys):
    source = write_csv_dataset(tmp_path / "csv")
    with pytest.raises(SystemExit):
        cli.run(transcode.main, ["--path", source, "--output", str(tmp_path / "out"),
                                 "--feature_spec_out", "../spec.yaml"])
    assert "--feature_spec_out ../spec.yaml: name a file of --output itself" in (
        capsys.readouterr().err)


def test_transcode_replaces_an_earlier_conversion_whole(ratings, tmp_path, capsys):
    """Its files replace a 2019 conversion's, metadata.json included, which would otherwise
    describe other tensors."""
    output = tmp_path / "out"
    convert.main(["--path", ratings, "--output", str(output), "--min_ratings", "3"])
    transcode.main(["--path", write_csv_dataset(tmp_path / "csv"), "--output", str(output)])
    assert sorted(os.listdir(output)) == ["feature_spec.yaml", "test_data_0.pt",
                                          "test_data_1.pt", "train_data_0.pt", "train_data_1.pt"]
    assert open_dataset(str(output))[3:5] == (3, 20)


def test_a_given_split_is_written_in_the_2023_layout_too(tmp_path, capsys):
    """--paper and --test_path go through the same writer."""
    prefix = tmp_path / "ml-1m"
    (tmp_path / "ml-1m.train.rating").write_text("0\t5\t5\t9\n0\t7\t3\t8\n1\t5\t4\t7\n1\t6\t4\t6\n")
    (tmp_path / "ml-1m.test.rating").write_text("0\t6\t4\t10\n1\t7\t5\t11\n")
    (tmp_path / "ml-1m.test.negative").write_text("(0,6)\t8\t9\t8\n(1,7)\t9\t8\t7\n")
    for layout in ("2019", "2023"):
        assert convert.main(["--paper", str(prefix), "--output", str(tmp_path / layout),
                             "--format", layout]) == 0
    old, new = (open_dataset(str(tmp_path / layout)) for layout in ("2019", "2023"))
    assert_same_dataset(old, new, same_metadata=False)
    assert new.metadata["layout"] == "2023" and new.negatives.tolist() == [[3, 4, 3], [4, 3, 1]]
