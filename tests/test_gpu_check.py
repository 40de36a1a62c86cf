"""scripts/gpu_check.sh and gpu_check.py on a machine without a GPU: the skip, the refusal of a
CPU-only torch beside a GPU, the CPU dry run of the whole sequence, and the logic the GPU run
relies on (deadline, table, exit status, resume comparison, bandwidths)."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import cli  # noqa: E402
import dataloading  # noqa: E402
import gpu_check  # noqa: E402
import ncf  # noqa: E402
import train  # noqa: E402
from gpu_check import Result, Step, Timing  # noqa: E402
from neumf import NeuMF  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
H200_LINE = "GPU 0: NVIDIA H200 (UUID: GPU-6f1c2a9e-0000-0000-0000-000000000000)"


def fake_nvidia_smi(directory, script):
    """A directory holding an `nvidia-smi` that runs `script` (sh), for the front of PATH."""
    directory.mkdir()
    path = directory / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(directory)


def run_script(tmp_path, nvidia_smi, *args):
    # The GPU machine may lack tqdm: shadow it with a module that fails to import.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "tqdm.py").write_text("raise ImportError('no tqdm here')\n")
    env = dict(os.environ, PATH=f"{nvidia_smi}:{os.environ['PATH']}", PYTHON=sys.executable,
               OUT=str(tmp_path / "out"), PYTHONPATH=str(blocked))
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_without_a_gpu_it_skips_and_succeeds(tmp_path):
    # nvidia-smi without a driver behind it, as on a machine without a GPU.
    smi = fake_nvidia_smi(tmp_path / "bin", "echo 'NVIDIA-SMI has failed because it couldn't "
                                            "communicate with the NVIDIA driver.'\nexit 9\n")
    done = run_script(tmp_path, smi)
    assert done.returncode == 0, done.stderr
    assert done.stdout == gpu_check.SKIP_MESSAGE + "\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_a_gpu_beside_a_cpu_only_torch_fails_in_one_line(tmp_path):
    """A GPU box whose python3 has a CPU-only torch once printed the skip and passed."""
    done = run_script(tmp_path, fake_nvidia_smi(tmp_path / "bin", f"echo '{H200_LINE}'\n"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    line = done.stderr
    assert line.startswith("gpu_check.py: error: nvidia-smi lists 1 GPU(s) (GPU 0: NVIDIA H200")
    assert f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)" in line
    assert "Docker image" in line and "https://download.pytorch.org/whl/cu" in line
    assert not (tmp_path / "out").exists()


def test_a_python_without_torch_is_a_one_line_error(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ImportError('no torch here')\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(shadow))
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"gpu_check.py: error: {sys.executable} has no torch; set PYTHON to "
                           f"the interpreter that has it (python3 in the project's Docker image) "
                           f"or pip install -r requirements.txt\n")


def test_a_cuda_torch_that_sees_no_gpu_names_its_cuda_version(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    problem = gpu_check.cuda_problem([H200_LINE])
    assert "torch.version.cuda 12.8" in problem and "torch.cuda.is_available() is False" in problem
    assert "CUDA_VISIBLE_DEVICES ()" in problem and "\n" not in problem
    assert gpu_check.cuda_problem([]) is None


@pytest.mark.parametrize("script, listed", [
    (f"echo '{H200_LINE}'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-1)'\n"
     "echo '  MIG 1g.18gb     Device  0: (UUID: MIG-2)'\n", 2),
    ("exit 0\n", 0),
    ("echo 'No devices were found'\nexit 6\n", 0),
])
def test_listed_gpus_counts_the_gpus_nvidia_smi_names(tmp_path, monkeypatch, script, listed):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', script)}:"
                               f"{os.environ['PATH']}")
    gpus = gpu_check.listed_gpus()
    assert len(gpus) == listed and all(line.startswith("GPU ") for line in gpus)


def test_listed_gpus_without_nvidia_smi_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_check.listed_gpus() == []


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", ("H200", 4800)),
    ("NVIDIA H100 80GB HBM3", ("H100 SXM", 3350)),
    ("NVIDIA H100 PCIe", ("H100 PCIe", 2000)),
    ("NVIDIA A100-SXM4-40GB", ("A100 40GB", 1555)),
    ("NVIDIA A100-PCIE-40GB", ("A100 40GB", 1555)),
    ("NVIDIA A100-SXM4-80GB", ("A100 80GB", 2039)),
    ("NVIDIA A100 80GB PCIe", ("A100 80GB PCIe", 1935)),
    ("Tesla V100-SXM2-16GB", ("V100", 900)),
    ("NVIDIA L40S", ("L40S", 864)),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_bandwidth_of_known_cards(name, expected):
    assert gpu_check.bandwidth(name) == expected


def report(tmp_path, names=("one", "two", "three")):
    return gpu_check.Report(str(tmp_path), list(names), "**heading**", {"device": "test"})


def table_lines(markdown):
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_the_table_is_one_markdown_table_and_a_failed_row_fails_the_run(tmp_path, capsys):
    table = report(tmp_path)
    table.set("one", Result("pass", "a | b\nc"), 1.25)
    table.set("two", Result("info", "figures"))
    assert table.exit_status() == 0
    written = (tmp_path / "gpu_check.md").read_text()
    lines = written.splitlines()
    assert lines[0] == "**heading**"
    # One table: its rows are consecutive lines, each of four cells.
    rows = table_lines(written)
    assert rows == lines[2:2 + len(rows)] and len(rows) == 5
    assert rows[2] == "| one | pass | a \\| b c | 1.2 |"
    assert rows[3] == "| two | info | figures |  |"
    assert rows[4] == "| three | not reached |  |  |"
    assert lines[-1] == "1 pass, 1 info, 1 pending; exit status 0"
    table.set("three", Result("fail", "broken"), 0.5)
    assert table.exit_status() == 1
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["passed"] is False
    assert [row["status"] for row in saved["rows"]] == ["pass", "info", "fail"]
    assert (tmp_path / "gpu_check.md").read_text().endswith("exit status 1\n")
    assert "three: fail (0.5 s): broken" in capsys.readouterr().out


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeTools:
    def __init__(self):
        self.dropped = []

    def drop(self, key):
        self.dropped.append(key)


def test_the_deadline_skips_what_no_longer_fits_and_says_so(tmp_path):
    clock = FakeClock()
    tools = FakeTools()
    names = ("fast", "slow", "after slow", "scaled", "broken", "last")
    runner = gpu_check.Runner(report(tmp_path, names), gpu_check.Budget(50, 10, clock), tools)

    def takes(seconds, result=Result("pass", "done")):
        def action(cap):
            clock.now += seconds
            return result
        return action

    def broken(cap):
        raise RuntimeError("planted")

    runner.run(Step("fast", takes(30), Timing(20, 100), tools=("a",)))
    # 50 s - 30 s - the 10 s reserve = 10 s left.
    runner.run(Step("slow", takes(1), Timing(11, 100), tools=("b",)))
    runner.run(Step("after slow", takes(1), Timing(1, 100), needs=("slow",)))
    runner.run(Step("scaled", takes(1), Timing(1, 100),
                    expected=lambda done: done.report.rows["fast"].seconds / 2))
    runner.run(Step("broken", broken, Timing(1, 100)))
    runner.run(Step("last", takes(2), Timing(1, 100), skip="a reason"))
    rows = runner.report.rows
    assert (rows["fast"].status, rows["fast"].seconds) == ("pass", 30)
    assert (rows["slow"].status, rows["slow"].figures) == ("skip", "deadline: needs about 11 s, "
                                                                   "10 s left")
    assert rows["after slow"].figures == "needs slow, which did not pass"
    assert rows["scaled"].figures == "deadline: needs about 15 s, 10 s left"
    assert (rows["broken"].status, rows["broken"].figures) == ("fail", "RuntimeError: planted")
    assert (rows["last"].status, rows["last"].figures) == ("skip", "a reason")
    assert tools.dropped == ["a", "b"]
    assert runner.report.exit_status() == 1


def test_a_step_gets_at_most_what_is_left_and_stops_at_its_cap(tmp_path):
    runner = gpu_check.Runner(report(tmp_path, ("capped", "several", "extra")),
                              gpu_check.Budget(0.3, 0.0))
    caps = []

    def sleeps(cap):
        caps.append(cap)
        time.sleep(5)

    start = time.monotonic()
    runner.run(Step("capped", sleeps, Timing(0, 100)))
    assert time.monotonic() - start < 2 and caps[0] <= 0.3
    row = runner.report.rows["capped"]
    assert row.status == "fail" and row.figures.startswith("TimeoutError: stopped at its cap")
    # The cap also ends a wait on a tool's process, and the Runner stops that process.
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(60)\n")
    tools = gpu_check.Tools(str(tmp_path), dict(os.environ), ahead=0)
    tools.plan("sleeper", str(sleeper))
    runner.tools, runner.budget = tools, gpu_check.Budget(0.5, 0.0)
    launched = []

    def waits_on_its_tool(cap):
        launched.append(tools.take("sleeper"))
        launched[0].process.wait()

    runner.run(Step("several", waits_on_its_tool, Timing(0, 100), tools=("sleeper",)))
    assert runner.report.rows["several"].figures.startswith("TimeoutError: stopped at its cap")
    assert launched[0].process.poll() is not None
    # SIGTERM (as cli.run raises it) stops the run, and the row says where it came.
    def terminated(cap):
        raise SystemExit(143)

    runner.budget = gpu_check.Budget(100, 0.0)
    with pytest.raises(SystemExit):
        runner.run(Step("several", terminated, Timing(0, 10)))
    assert runner.report.rows["several"].figures == "stopped during this step (SIGTERM)"
    # A step of several rows: one it does not fill is reported as not measured.
    runner.run(Step("several", lambda cap: Result("fail", "no"), Timing(0, 10),
                    rows=("extra",)))
    assert runner.report.rows["extra"].figures == "not measured: several did not pass"


def test_a_failed_row_makes_the_run_exit_1_and_the_rest_still_runs(tmp_path, monkeypatch,
                                                                     capsys):
    def plan(self):
        return [Step("broken", lambda cap: 1 / 0, Timing(0, 10)),
                Step("after it", lambda cap: Result("pass", "ran"), Timing(0, 10))]

    monkeypatch.setattr(gpu_check.Acceptance, "plan", plan)
    assert gpu_check.main(["--dry-run-cpu", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "gpu_check.py: some rows FAILED (see the table)\n"
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [(row["name"], row["status"]) for row in rows] == [("broken", "fail"),
                                                              ("after it", "pass")]
    assert "ZeroDivisionError: division by zero" in (tmp_path / "gpu_check.md").read_text()


def logged_run(precision, rates, peak):
    epochs = [{"epoch": epoch, "train_throughput": rate, "hr@10": 0.5, "train_loss": 0.4,
               "train_epoch_time": 99.3e6 / rate, "validation_epoch_time": 0.3}
              for epoch, rate in enumerate(rates)]
    return gpu_check.Run({"precision": precision}, epochs,
                         {"best_train_throughput": max(rates)}, {"peak_memory_bytes": peak})


def test_memory_and_comparison_rows_of_an_h200(tmp_path):
    check = gpu_check.Acceptance(True, str(tmp_path), str(tmp_path))
    check.device = torch.device("cuda", 0)  # only read, never used
    check.environment.update(device_name="NVIDIA H200", memory_bytes=141 * 2 ** 30)
    check.runs = {"o2": logged_run("float16", [60e6, 80e6], 9 * 2 ** 30),
                  "o0": logged_run("tf32", [40e6, 50e6], 14 * 2 ** 30),
                  "compiled_o2": logged_run("float16", [5e6, 95e6], None)}
    check.inference = {"tf32": 150e6, "amp": 260e6}
    memory = check.memory_step()
    assert memory.status == "pass" and "O2 9.0 GiB, O0 14.0 GiB of this GPU's 141.0 GiB" in (
        memory.figures)
    a100 = check.versus("A100 40GB")
    assert a100.status == "info"
    assert a100.figures.startswith("H200 4800 GB/s = 3.09x the A100 40GB's 1555 GB/s; ")
    assert "O0 (tf32): ours 50 M vs 22.6 M samples/s = 2.21x" in a100.figures
    assert "O2 (float16): ours 80 M vs 34.1 M samples/s = 2.35x, compiled 95 M = 2.79x" in (
        a100.figures)
    # 30 epochs of the best epoch's 99.3 M samples / 80 M samples/s + 0.3 s of evaluation.
    assert "train + eval time 46 s vs their time to train 94 s" in a100.figures
    assert "amp ours 260 M vs 82.7 M samples/s = 3.14x" in a100.figures
    v100 = check.versus("V100 16GB")
    assert "5.33x the V100 16GB's 900 GB/s" in v100.figures and "forward" not in v100.figures
    check.runs["o0"] = logged_run("tf32", [40e6, 50e6], 40 * 2 ** 30)
    assert check.memory_step().status == "fail"
    check.runs = {}
    assert check.memory_step().status == "skip"
    check.environment["device_name"] = "NVIDIA GeForce RTX 4090"
    assert "memory bandwidth unknown" in check.versus("A100 40GB").figures


def states(seed, epochs=((0, 0.5, 0.6), (1, 0.6, 0.5))):
    torch.manual_seed(seed)
    model = {"weight": torch.randn(4, 3), "bias": torch.randn(3)}
    records = [{"epoch": epoch, "hr@10": hr, "ndcg@10": hr / 2, "train_loss": loss,
                "validation_loss": loss, "train_throughput": 1e6 + epoch}
               for epoch, hr, loss in epochs]
    return {"epochs": records, "model": model, "last": copy.deepcopy(model)}


def test_resume_comparison_asks_bit_equality_of_deterministic_runs():
    reference = states(0)
    resumed = states(0)
    resumed["epochs"][1]["train_throughput"] = 2e6  # timings may differ
    result = gpu_check.compare_resume(reference, resumed)
    assert result.status == "pass" and result.figures.startswith("bit-equal")
    assert "(4 tensors)" in result.figures

    one_ulp = states(0)
    one_ulp["last"]["bias"][0] = torch.nextafter(one_ulp["last"]["bias"][0], torch.tensor(9.0))
    result = gpu_check.compare_resume(reference, one_ulp)
    assert result.status == "fail" and "1 of 4 tensors differ (first last bias" in result.figures

    other_hr = states(0, ((0, 0.5, 0.6), (1, 0.61, 0.5)))
    result = gpu_check.compare_resume(reference, other_hr)
    assert result.status == "fail" and "records differ (HR@10 by up to 0.0100)" in result.figures


def test_resume_comparison_of_nondeterministic_runs_allows_a_tolerance():
    reference = states(0)
    # Epoch 0 already differs between two fresh runs: a nondeterministic kernel.
    close = states(0, ((0, 0.501, 0.6001), (1, 0.602, 0.5)))
    close["model"]["weight"] += 1e-4
    result = gpu_check.compare_resume(reference, close)
    assert result.status == "pass" and result.figures.startswith("within tolerance")
    assert result.values["deterministic"] is False
    far = states(0, ((0, 0.501, 0.6001), (1, 0.62, 0.5)))
    assert gpu_check.compare_resume(reference, far).status == "fail"
    drifted = states(0, ((0, 0.501, 0.6001), (1, 0.6, 0.5)))
    drifted["last"]["weight"] *= 1.1
    assert gpu_check.compare_resume(reference, drifted).status == "fail"
    missing = states(0, ((0, 0.5, 0.6),))
    assert gpu_check.compare_resume(reference, missing).status == "fail"


# What every row of the dry run is, and why the skipped ones are skipped.
DRY_RUN_ROWS = {
    gpu_check.ENVIRONMENT: "info", gpu_check.FORWARD: "pass", gpu_check.AMP_STEP: "pass",
    gpu_check.TEST_DATA: "pass", gpu_check.DATASET: "pass", gpu_check.TRAIN_O2: "pass",
    gpu_check.TEST_MODE: "pass", gpu_check.FULL_RANKING: "pass", gpu_check.EVAL_PARITY: "pass",
    gpu_check.RESUME: "pass", gpu_check.TRAIN_O0: "pass", gpu_check.INFERENCE: "info",
    gpu_check.MEMORY: "skip",
    gpu_check.RECOMMEND: "pass", gpu_check.SERVE: "pass", gpu_check.TORCHSCRIPT: "pass",
    gpu_check.ONNX: "pass", gpu_check.ALL_USERS: "pass", gpu_check.TORCHRUN: "skip",
    gpu_check.COMPILED_O2: "skip", gpu_check.COMPILED_O0: "skip", gpu_check.VS_A100: "info",
    gpu_check.VS_V100: "info",
}


def test_dry_run_runs_the_whole_sequence_into_one_table_in_OUT(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # any `import tqdm` here now fails
    # A proxy that refuses everything: the request to serve.py must not go through it.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert gpu_check.main(["--dry-run-cpu"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert {name: row["status"] for name, row in rows.items()} == DRY_RUN_ROWS, result
    assert result["passed"] is True
    assert rows[gpu_check.MEMORY]["figures"] == "dry run: no GPU memory to measure"
    assert rows[gpu_check.TORCHRUN]["figures"].startswith("dry run: no GPUs")
    assert rows[gpu_check.COMPILED_O2]["figures"].startswith("dry run: compiling on a CPU")
    # The SIGKILL landed inside epoch 1 and the resumed run equals the uninterrupted one.
    assert "into epoch 1" in rows[gpu_check.RESUME]["figures"]
    assert "bit-equal" in rows[gpu_check.RESUME]["figures"]
    for name in (gpu_check.TRAIN_O2, gpu_check.TRAIN_O0):
        epochs = rows[name]["values"]["epochs"]
        assert len(epochs) == gpu_check.EPOCHS and all(
            record["train_throughput"] > 0 for record in epochs)
    assert rows[gpu_check.FULL_RANKING]["seconds"] > 0
    assert rows[gpu_check.EVAL_PARITY]["values"]["equal"] is True
    table = (tmp_path / "gpu_check.md").read_text()
    lines = table.splitlines()
    first = lines.index("| step | result | figures | seconds |")
    assert len(table_lines(table)) == 2 + len(DRY_RUN_ROWS)
    assert all(line.startswith("|") for line in lines[first:first + 2 + len(DRY_RUN_ROWS)])
    assert "tiny shape" in lines[0] and lines[-1].endswith("exit status 0")
    assert table in capsys.readouterr().out
    # The work directory with the dataset and checkpoints is gone; OUT holds the two files.
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.md"]


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(gpu_check.main, ["--dry-run-cpu", "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--out" in error and str(blocker / "out") in error


def test_forward_comparison_sees_a_changed_weight():
    torch.manual_seed(0)
    reference = gpu_check.order_one_embeddings(NeuMF(30, 20, 8, [16, 8]).eval())
    users, items = torch.randint(0, 30, (64,)), torch.randint(0, 20, (64,))
    same = gpu_check.compare_forward(reference, copy.deepcopy(reference), users, items)
    assert same["fp32"] == (0.0, 0.0)
    changed = copy.deepcopy(reference)
    with torch.no_grad():
        changed.final.weight[0, 0] += 1e-3
    absolute, relative = gpu_check.compare_forward(reference, changed, users, items)["fp32"]
    assert relative > gpu_check.FORWARD_LIMITS["fp32"] and absolute > 0


def test_positives_for_steps_is_the_fewest_that_give_that_many_steps():
    args = ncf.parse_args(["--data", "x", "-b", "1000"])
    ctx = train.Context(torch.device("cpu"), 0, 1, True)
    for steps in (1, 4, 7):
        positives = gpu_check.positives_for_steps(steps, args)
        assert train.steps_per_epoch(positives * 5, args, ctx) == steps
        assert train.steps_per_epoch((positives - 1) * 5, args, ctx) == steps - 1


def test_generated_dataset_is_a_converted_directory_of_its_shape(tmp_path):
    shape = gpu_check.Shape("test", 50, 40, 20_000, 1024, 8, (16, 8), 64, 64)
    train_pairs, test, negatives = gpu_check.generate_dataset(shape, torch.device("cpu"))
    gpu_check.write_dataset(str(tmp_path), train_pairs, test, negatives)
    dataset = dataloading.open_dataset(str(tmp_path))
    assert (dataset.nb_users, dataset.nb_items) == (shape.nb_users, shape.nb_items)
    assert dataset.fingerprint == dataloading.tensors_fingerprint(train_pairs, test, negatives)
    assert torch.equal(dataset.train, train_pairs) and len(dataset.train) == shape.nb_positives
    assert torch.equal(torch.unique(dataset.train[:, 0]), torch.arange(shape.nb_users))
    assert torch.equal(dataset.test[:, 0], torch.arange(shape.nb_users))
    assert dataset.negatives.shape == (shape.nb_users, gpu_check.TEST_NEGATIVES)
    assert torch.equal(torch.load(tmp_path / "user_ids.pt"), torch.arange(1, 51))
    counts = torch.bincount(dataset.train[:, 1], minlength=shape.nb_items)
    # Zipf-like popularity: the first items are rated several times as often as the last.
    assert counts[:5].sum() > 3 * counts[-5:].sum()
    # Popularity alone ranks the test items well above chance, and not perfectly.
    assert gpu_check.CHANCE_HR < gpu_check.popularity_hr(train_pairs, test, negatives) < 0.95
