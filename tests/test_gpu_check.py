"""scripts/gpu_check.sh and gpu_check.py on a machine without a GPU: the skip, the CPU dry run of
the whole code path, and the helpers the GPU run relies on."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import cli  # noqa: E402
import gpu_check  # noqa: E402
import ncf  # noqa: E402
import train  # noqa: E402
from neumf import NeuMF  # noqa: E402

CHECKS = {"forward fp32", "forward tf32", "forward amp", "amp step", "test data"}


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")]).returncode == 0


def test_without_cuda_it_skips_and_succeeds(tmp_path):
    # The GPU machine may lack tqdm: shadow it with a module that fails to import.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "tqdm.py").write_text("raise ImportError('no tqdm here')\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable,
               OUT=str(tmp_path / "out"), PYTHONPATH=str(blocked))
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == gpu_check.SKIP_MESSAGE + "\n"
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_the_table_and_json_to_OUT(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # any `import tqdm` now fails
    assert gpu_check.main(["--dry-run-cpu"]) == 0
    shape = gpu_check.TINY
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["all_checks_passed"]
    assert {check["name"] for check in result["checks"]} == CHECKS
    rows = {(row["benchmark"], row["mode"], row["batch_size"]): row for row in result["rows"]}
    expected = ({("train", mode, shape.batch_size) for mode in gpu_check.MODES}
                | {("eval", mode, shape.valid_batch_size) for mode in gpu_check.MODES}
                | {("inference", mode, batch) for mode in gpu_check.MODES
                   for batch in shape.inference_batches})
    assert set(rows) == expected and len(result["rows"]) == len(expected)
    for (benchmark, mode, batch), row in rows.items():
        assert row["throughput"] > 0, row
        if benchmark == "train":
            # ncf.py's definition: positives x (1 + 4 negatives), partial batch included.
            assert row["samples"] % 5 == 0
            assert row["steps"] == row["samples"] // batch
            assert row["throughput"] == pytest.approx(row["samples"] / row["seconds"])
        if benchmark == "eval":
            assert row["samples"] % (shape.nb_users * 101) == 0
            assert 0.0 <= row["hr@10"] <= 1.0
    table = (tmp_path / "gpu_check.md").read_text()
    assert result["environment"]["device_name"] in table.splitlines()[0]
    assert table.count("\n| train |") == 3 and table.count("\n| inference |") == 6
    assert table in capsys.readouterr().out


def test_a_failing_section_fails_the_run_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu_check, "check_test_data", broken)
    # Timing is covered above; without it this run takes a second.
    monkeypatch.setattr(gpu_check, "time_training", lambda *args: None)
    monkeypatch.setattr(gpu_check, "time_inference", lambda *args: None)
    assert gpu_check.main(["--dry-run-cpu", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {check["name"]: check["passed"] for check in result["checks"]}
    assert status == {"forward fp32": True, "forward tf32": True, "forward amp": True,
                      "amp step": True, "test data ran": False}
    assert "RuntimeError: planted" in (tmp_path / "gpu_check.md").read_text()


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


def test_generated_tensors_have_the_shape_ncf_load_data_gives():
    shape = gpu_check.Shape("test", 50, 40, 20_000, 1024, 1024, (64,), 64, 64, 8, (16, 8))
    data = gpu_check.generate_tensors(shape, torch.device("cpu"))
    assert data.train_users.dtype == data.train_items.dtype == torch.int32
    assert len(data.train_users) == shape.nb_positives
    assert torch.equal(torch.unique(data.train_users), torch.arange(shape.nb_users,
                                                                    dtype=torch.int32))
    assert 0 <= int(data.train_items.min()) and int(data.train_items.max()) < shape.nb_items
    assert data.test_items.shape == (shape.nb_users, 101)
    assert torch.equal(data.test_users, torch.arange(shape.nb_users, dtype=torch.int32))
    counts = torch.bincount(data.train_items.long(), minlength=shape.nb_items)
    # Zipf-like popularity: the first item is rated several times as often as the last.
    assert counts[0] > 3 * counts[-1]
    # Duplicate mask marks repeats only: each row's first occurrences are unmasked.
    for row, mask in zip(data.test_items, data.duplicate_mask):
        assert len(torch.unique(row)) == int((~mask).sum())
