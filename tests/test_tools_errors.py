"""The small tools' bad inputs, one table: each exits with status 2, prints one line on stderr,
`PROG: error: ...`, that names the flag or file at fault, and writes nothing."""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import cli
import convert
import generate
import inference
import plot_curve
import recommend
from conftest import ROOT, write_clustered_dataset
from logger import log_records, read_log
from neumf import NeuMF

TOOLS = {"convert.py": convert.main, "generate.py": generate.main, "inference.py": inference.main,
         "recommend.py": recommend.main, "plot_curve.py": plot_curve.main}
TINY_INFERENCE = ["--device", "cpu", "--n_users", "30", "--n_items", "20", "-f", "4",
                  "--layers", "8", "4", "--num_batches", "1", "--warmup_batches", "0",
                  "--log_path", "{tmp}/log.json"]
RECOMMEND = ["--data", "{data}", "--load_checkpoint_path", "{checkpoint}"]
HUGE = str(10 ** 12)

CASES = [
    ("generate.py", [], "--output"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--preset", "ml-1b"], "--preset"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--users", "0"], "--users 0"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--users", "many"], "--users"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--items", "5"], "--items 5"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--mean_ratings", "1e9"], "--mean_ratings"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--mean_ratings", "nan"], "--mean_ratings nan"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--min_ratings", "0"], "--min_ratings 0"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--seed", "-1"], "--seed must be in [0, 2^63)"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--users", HUGE], f"--users {HUGE}"),
    ("generate.py", ["--output", "{tmp}/r.csv", "--items", HUGE], f"--items {HUGE}"),
    ("generate.py", ["--output", "{tmp}/a_dir"], "--output {tmp}/a_dir"),
    ("generate.py", ["--output", "{tmp}/a_file/r.csv"], "--output {tmp}/a_file/r.csv"),
    ("inference.py", TINY_INFERENCE + ["--batch_sizes", "64", "0"], "--batch_sizes"),
    ("inference.py", TINY_INFERENCE + ["--batch_sizes", "1,x"], "--batch_sizes"),
    ("inference.py", TINY_INFERENCE + ["--batch_sizes", "1,,4"], "--batch_sizes"),
    ("inference.py", TINY_INFERENCE + ["--batch_sizes", HUGE], f"--batch_sizes {HUGE}"),
    ("inference.py", TINY_INFERENCE + ["--n_users", HUGE], f"--n_users {HUGE}"),
    ("inference.py", TINY_INFERENCE + ["--layers", "8", HUGE], f"--layers 8 {HUGE}"),
    ("inference.py", TINY_INFERENCE + ["--n_users", "0"], "--n_users"),
    ("inference.py", TINY_INFERENCE + ["--precision", "fp16"], "--precision"),
    ("inference.py", TINY_INFERENCE + ["--opt_level", "O3"], "--opt_level"),
    ("inference.py", TINY_INFERENCE + ["--fp16", "--precision", "fp32"], "--fp16"),
    ("inference.py", TINY_INFERENCE + ["--num_batches", "0"], "--num_batches"),
    ("inference.py", TINY_INFERENCE + ["--warmup_batches", "-1"], "--warmup_batches"),
    ("inference.py", TINY_INFERENCE + ["--layers", "7", "4"], "--layers"),
    ("inference.py", TINY_INFERENCE + ["--log_path", "{tmp}/a_file/log.json"], "--log_path"),
    ("inference.py", TINY_INFERENCE + ["-s", str(2 ** 64)], f"--seed must be in [0, 2^63), "
                                                             f"got {2 ** 64}"),
    ("inference.py", TINY_INFERENCE + ["--seed", "-1"], "--seed must be in [0, 2^63), got -1"),
    ("convert.py", ["--path", "{tmp}/a_file", "--output", "{tmp}/out", "--seed", "-1"],
     "--seed must be in [0, 2^63), got -1"),
    ("convert.py", ["--path", "{tmp}/a_file", "--output", "{tmp}/out", "-s", str(2 ** 64 - 1)],
     f"--seed must be in [0, 2^63), got {2 ** 64 - 1}"),
    ("inference.py", TINY_INFERENCE + ["--model", "gmf"], "--layers: --model gmf has no MLP"),
    ("inference.py", TINY_INFERENCE + ["--model", "mlp"], "--factors: --model mlp has no MF"),
    ("inference.py", ["--device", "cpu", "--load_checkpoint_path", "{tmp}/none.pth"],
     "{tmp}/none.pth"),
    ("recommend.py", ["--users", "1"], "--data"),
    ("recommend.py", RECOMMEND + ["--users", "1", "-k", "0"], "--topk"),
    ("recommend.py", RECOMMEND + ["--users", "one"], "--users"),
    ("recommend.py", RECOMMEND + ["--users", "99999"], "--users"),
    ("recommend.py", RECOMMEND + ["--all_users"], "--all_users"),
    ("recommend.py", RECOMMEND + ["--users", "1", "--output", "{tmp}/r.csv"], "--output"),
    ("recommend.py", RECOMMEND + ["--all_users", "--output", "{tmp}/none/r.csv"], "--output"),
    ("recommend.py", RECOMMEND + ["--all_users", "--output", "{tmp}/a_dir"], "--output"),
    ("recommend.py", RECOMMEND + ["--users", "1", "--movies", "{tmp}/none.csv"], "--movies"),
    ("recommend.py", RECOMMEND + ["--users", "1", "--movies", "{tmp}/a_file"], "--movies"),
    ("recommend.py", ["--data", "{tmp}/a_dir", "--load_checkpoint_path", "{checkpoint}",
                      "--users", "1"], "train_ratings.pt"),
    ("recommend.py", ["--data", "{data}", "--checkpoint", "{tmp}/none.pth", "--users", "1"],
     "{tmp}/none.pth"),
    ("plot_curve.py", [], "--log"),
    ("plot_curve.py", ["--log", "{tmp}/none.json"], "--log {tmp}/none.json"),
    ("plot_curve.py", ["--log", "{tmp}/a_dir"], "--log {tmp}/a_dir"),
    ("plot_curve.py", ["--log", "{tmp}/a_file"], "--log {tmp}/a_file"),
    ("plot_curve.py", ["--log", "{tmp}/binary.json"], "--log {tmp}/binary.json"),
    ("plot_curve.py", ["--log", "{tmp}/log.json", "--output", "{tmp}/a_file/c.png"],
     "--output {tmp}/a_file/c.png"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good inputs for the flags a case does not test, and things that are not what a flag
    wants: a plain file, a directory, a binary file."""
    tmp = tmp_path_factory.mktemp("inputs")
    data = write_clustered_dataset(str(tmp / "data"), nb_users=20, nb_items=30, per_user=5,
                                   negatives=5)
    # enough candidates for --report_topk 1 ... 100
    wide_data = write_clustered_dataset(str(tmp / "wide_data"), nb_users=20, nb_items=200,
                                        per_user=5, negatives=120)
    torch.save(torch.arange(20) * 10, os.path.join(data, "user_ids.pt"))
    torch.save(torch.arange(30) + 1, os.path.join(data, "item_ids.pt"))
    torch.save(NeuMF(20, 30, 4, [8, 4]).state_dict(), tmp / "model.pth")
    (tmp / "a_file").write_text("just text\n")
    (tmp / "a_dir").mkdir()
    (tmp / "binary.json").write_bytes(bytes(range(256)) * 8)
    epoch = {"type": "LOG", "step": [0], "data": {"hr@10": 0.5, "train_loss": 0.3}}
    (tmp / "log.json").write_text("DLLL " + json.dumps(epoch) + "\n")
    return {"tmp": str(tmp), "data": data, "wide_data": wide_data,
            "checkpoint": str(tmp / "model.pth")}


def listing(top):
    return sorted(os.path.relpath(os.path.join(folder, name), top)
                  for folder, folders, files in os.walk(top) for name in files + folders)


@pytest.mark.parametrize("tool, argv, named", CASES)
def test_bad_input_is_one_line_exit_2_naming_it(tool, argv, named, inputs, capsys):
    before = listing(inputs["tmp"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(TOOLS[tool], [word.format(**inputs) for word in argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{tool}: error: ")
    assert named.format(**inputs) in lines[0]
    assert "; " in lines[0]  # the problem, then what to do
    assert captured.out == ""
    assert listing(inputs["tmp"]) == before


# Run as programs: a closed stdout or a file size limit in pytest's own process would hit pytest.
BASELINES = ["baselines.py", "--data", "{wide_data}", "--method", "pop", "--device", "cpu",
             "--log_path", "{tmp}/log.json"]
INFERENCE = ["inference.py"] + TINY_INFERENCE + ["--precision", "fp32"]


def run_script(argv, inputs, **options):
    return subprocess.run([sys.executable] + [word.format(**inputs) for word in argv], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, timeout=300, **options)


@pytest.mark.parametrize("argv, logged", [
    (BASELINES, ["parameter", "summary"]),
    # Its header is the first thing it prints: nothing has been measured when the pipe fails.
    (INFERENCE + ["--batch_sizes", "1", "2"], ["parameter"]),
])
def test_a_closed_stdout_stops_quietly_with_whole_log_records(argv, logged, tmp_path, inputs):
    inputs = {**inputs, "tmp": str(tmp_path)}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        finished = run_script(argv, inputs, stdout=writer)
    finally:
        os.close(writer)
    assert (finished.returncode, finished.stderr) == (0, "")
    records = read_log(tmp_path / "log.json")
    assert [kind for kind in ("parameter", "summary") if log_records(records, kind)] == logged
    if "summary" in logged:
        assert "hr@10" in log_records(records, "summary")[0]


def limit_file_size(size):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def rows_printed(stdout):
    return len([line for line in stdout.splitlines() if line.startswith("fp32 ")])


# (command, file size limit, what the one line says the log keeps, the records it keeps)
FAILING_LOGS = [
    (BASELINES + ["--report_topk", *map(str, range(1, 101))], 4096,
     "writing failed (File too large); it holds the settings, not the results",
     ["parameter"]),
    # the settings do not fit: no empty log is left behind
    (BASELINES, 64, "cannot write there (File too large); pass --log_path with a writable",
     None),
    (INFERENCE + ["--batch_sizes", *map(str, range(1, 21))], 4096,
     "writing failed (File too large); it holds the settings and the {rows} row(s) printed "
     "above, of the 20 asked for", ["parameter", "rows"]),
    (INFERENCE, 64, "writing failed (File too large); nothing was logged, and the empty log is "
                    "removed", None),
]


@pytest.mark.parametrize("argv, size, kept, records", FAILING_LOGS,
                         ids=["baselines results", "baselines settings", "inference rows",
                              "inference settings"])
def test_a_failing_log_write_is_one_line_and_leaves_whole_records(argv, size, kept, records,
                                                                  tmp_path, inputs):
    """A log that could take no record was left empty (0 bytes), and inference.py said it held
    the rows printed above."""
    inputs = {**inputs, "tmp": str(tmp_path)}
    finished = run_script(argv, inputs, stdout=subprocess.PIPE, preexec_fn=limit_file_size(size))
    log = tmp_path / "log.json"
    assert finished.returncode == 2
    kept = kept.format(rows=rows_printed(finished.stdout))
    assert finished.stderr.startswith(f"{argv[0]}: error: --log_path {log}: {kept}")
    assert finished.stderr.count("\n") == 1
    if records is None:
        assert not log.exists()
        return
    logged = read_log(log)
    assert len(log_records(logged, "parameter")) == 1
    if "rows" in records:
        assert 0 < rows_printed(finished.stdout) == len(log_records(logged, "summary")) < 20
    else:
        assert finished.stdout.startswith("fit_time = ")
        assert not log_records(logged, "summary")


def test_a_log_without_room_for_the_2023_record_says_so(tmp_path, inputs):
    """Every row logged, the final record not: the log ends with the last whole record."""
    inputs = {**inputs, "tmp": str(tmp_path)}
    argv = INFERENCE + ["--batch_sizes", "1", "2"]
    assert run_script(argv, inputs, stdout=subprocess.PIPE).returncode == 0
    whole = (tmp_path / "log.json").read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    finished = run_script(argv, inputs, stdout=subprocess.PIPE,
                          preexec_fn=limit_file_size(len(whole) - len(last) // 2))
    assert finished.returncode == 2 and rows_printed(finished.stdout) == 2
    assert finished.stderr == (
        f"inference.py: error: --log_path {tmp_path / 'log.json'}: writing failed (File too "
        f"large); it holds the settings and every row printed above, not the 2023 record of "
        f"them all; free space or pass --log_path elsewhere\n")
    records = read_log(tmp_path / "log.json")
    assert [record["data"]["batch_size"] for record in records
            if record["type"] == "LOG" and record["step"] == []] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (BASELINES, "cannot write there (No space left on device); pass --log_path with a writable "
                "file"),
    (INFERENCE, "writing failed (No space left on device); nothing was logged, and the empty "
                "log is removed; free space or pass --log_path elsewhere"),
])
def test_a_log_on_a_full_disk_leaves_no_empty_file(argv, message, full_disk, inputs):
    log = full_disk / "log.json"
    finished = run_script([word.replace("{tmp}/log.json", str(log)) for word in argv], inputs,
                          stdout=subprocess.PIPE)
    assert finished.returncode == 2
    assert finished.stderr == f"{argv[0]}: error: --log_path {log}: {message}\n"
    assert os.listdir(full_disk) == ["filler"]
