import json
import math
import os
import struct
import sys

import pytest

import cli
import plot_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(path, records, extra_lines=()):
    lines = ["DLLL " + json.dumps(record) for record in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def epoch(number, hr, ndcg, loss, k=10):
    return {"timestamp": str(number), "type": "LOG", "step": [number],
            "data": {"epoch": number, f"hr@{k}": hr, f"ndcg@{k}": ndcg, "train_loss": loss}}


def test_last_record_of_an_epoch_wins_and_epochs_are_sorted(tmp_path, capsys):
    # A run killed during epoch 1 and resumed: epoch 1 logged twice, a cut line between.
    log = write_log(tmp_path / "log.json", [
        {"type": "LOG", "step": "PARAMETER", "data": {"data": "somewhere"}},
        epoch(0, 0.40, 0.20, 0.50),
        epoch(1, 0.45, 0.22, 0.45),
        {"type": "LOG", "step": "PARAMETER", "data": {"first_epoch": 1}},
        epoch(1, 0.47, 0.23, 0.44),
        epoch(2, 0.60, 0.35, None),
        {"type": "LOG", "step": [], "data": {"best_accuracy": 0.6}},
    ], extra_lines=['DLLL {"type": "LOG", "step": [3'])
    curve, _ = plot_curve.read_curve(str(log))
    assert curve["epoch"] == [0, 1, 2]
    assert curve["hr@10"] == [0.40, 0.47, 0.60]
    assert curve["ndcg@10"] == [0.20, 0.23, 0.35]
    assert curve["train_loss"][:2] == [0.50, 0.44] and math.isnan(curve["train_loss"][2])
    assert set(curve) == {"epoch", "hr@10", "ndcg@10", "train_loss"}
    assert "line 8 is not JSON" in capsys.readouterr().err


def test_a_changed_topk_gives_one_series_per_k(tmp_path):
    log = write_log(tmp_path / "log.json", [epoch(0, 0.4, 0.2, 0.5, k=10),
                                            epoch(1, 0.3, 0.1, 0.4, k=5)])
    curve, _ = plot_curve.read_curve(str(log))
    assert curve["hr@10"][0] == 0.4 and math.isnan(curve["hr@10"][1])
    assert math.isnan(curve["hr@5"][0]) and curve["hr@5"][1] == 0.3


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "log.json", [epoch(n, 0.4 + n / 50, 0.2 + n / 100, 0.5 - n / 40)
                                            for n in range(8)])
    output = tmp_path / "plots" / "curve.png"
    curve = plot_curve.main(["--log", str(log), "--output", str(output)])
    assert curve["epoch"] == list(range(8))
    data = output.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 700)
    assert len(data) > 10_000
    assert sorted(path.name for path in output.parent.iterdir()) == ["curve.png"]


def test_replaces_an_existing_output(tmp_path):
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "log.json", [epoch(0, 0.4, 0.2, 0.5)])
    output = tmp_path / "curve.png"
    output.write_bytes(b"old")
    plot_curve.main(["--log", str(log), "--output", str(output)])
    assert output.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("lines, message", [
    (None, "no such file"),
    ([], "no epoch records"),
    (["DLLL " + json.dumps({"type": "LOG", "step": "PARAMETER", "data": {"x": 1}}),
      "DLLL " + json.dumps({"type": "LOG", "step": [], "data": {}})],
     "no epoch records"),
])
def test_bad_logs_exit_2(tmp_path, capsys, lines, message):
    log = tmp_path / "log.json"
    if lines is not None:
        log.write_text("\n".join(lines))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(plot_curve.main, ["--log", str(log), "--output", str(tmp_path / "curve.png")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"plot_curve.py: error: --log {log}: {message}")
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "curve.png").exists()


def test_missing_matplotlib_exits_2(tmp_path, capsys, monkeypatch):
    for module in ("matplotlib", "matplotlib.backends", "matplotlib.backends.backend_agg",
                   "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)
    log = write_log(tmp_path / "log.json", [epoch(0, 0.4, 0.2, 0.5)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(plot_curve.main, ["--log", str(log), "--output", str(tmp_path / "curve.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "plot_curve.py: error: matplotlib is needed to draw the curve: pip install matplotlib "
        "(or pip install -r requirements-optional.txt)")
    assert not (tmp_path / "curve.png").exists()


def record(step, data):
    return {"type": "LOG", "step": step, "data": data}


@pytest.mark.parametrize("junk", [
    record([[1]], {"hr@10": 0.9}),
    record(["x"], {"hr@10": 0.9}),
    record([True], {"hr@10": 0.9}),
    record([-1], {"hr@10": 0.9}),
    record([1.5], {"hr@10": 0.9}),
    record([2 ** 60], {"hr@10": 0.9}),
    record([None], {"hr@10": 0.9}),
    record([{"epoch": 1}], {"hr@10": 0.9}),
    record([1], [0.9]),
    record([1], "hr 0.9"),
    record([1], None),
])
def test_an_odd_epoch_record_is_skipped_with_a_warning(tmp_path, capsys, junk):
    log = write_log(tmp_path / "log.json", [epoch(0, 0.4, 0.2, 0.5), junk,
                                            epoch(2, 0.6, 0.3, 0.4)])
    curve, _ = plot_curve.read_curve(str(log))
    assert curve == {"epoch": [0, 2], "train_loss": [0.5, 0.4], "hr@10": [0.4, 0.6],
                     "ndcg@10": [0.2, 0.3]}
    assert capsys.readouterr().err == (f"plot_curve.py: warning: {log} line 2: an epoch record "
                                       f"needs a step [EPOCH] with a whole number and an object "
                                       f"as data; skipped\n")


@pytest.mark.parametrize("value", ["0.9", [0.9], {"value": 0.9}, True, False, None,
                                   10 ** 400, {"nested": [[{"deep": [1]}]]}])
def test_a_metric_that_is_not_a_number_is_a_gap(tmp_path, value):
    log = write_log(tmp_path / "log.json", [epoch(0, 0.4, 0.2, 0.5), epoch(1, value, 0.3, value),
                                            epoch(2, 0.6, 0.35, 0.3)])
    curve, _ = plot_curve.read_curve(str(log))
    assert curve["hr@10"][::2] == [0.4, 0.6] and math.isnan(curve["hr@10"][1])
    assert math.isnan(curve["train_loss"][1]) and curve["ndcg@10"] == [0.2, 0.3, 0.35]


def test_whole_float_epochs_and_non_finite_metrics(tmp_path):
    log = tmp_path / "log.json"
    log.write_text('DLLL {"type": "LOG", "step": [1.0], "data": {"hr@10": Infinity}}\n'
                   'DLLL {"type": "LOG", "step": [0], "data": {"hr@10": NaN}}\n'
                   'DLLL {"type": "LOG", "step": [2.0], "data": {"hr@10": 0.5}}\n')
    curve, _ = plot_curve.read_curve(str(log))
    assert curve["epoch"] == [0, 1, 2] and all(isinstance(e, int) for e in curve["epoch"])
    assert [math.isnan(value) for value in curve["hr@10"]] == [True, True, False]


def test_a_log_of_junk_still_draws_its_good_epochs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "log.json", [
        epoch(0, 0.4, 0.2, 0.5), record([[1]], {}), record(["x"], {"hr@10": "high"}),
        epoch(1, "high", [1], {"a": 2}), record([2.0], {"hr@10": True, "hr@5": "x"}),
        epoch(3, 0.7, 0.4, 0.3), [1, 2, 3], "text", 17,
    ], extra_lines=["DLLL " + "[" * 100_000, "DLLL " + "9" * 5000])
    output = tmp_path / "curve.png"
    curve = plot_curve.main(["--log", str(log), "--output", str(output)])
    assert curve["epoch"] == [0, 1, 2, 3]
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    warnings = capsys.readouterr().err.splitlines()
    assert [line.split(" line ")[1].split()[0] for line in warnings] == ["2:", "3:", "10",
                                                                         "11"]


def epoch_of(number, metrics):
    return {"type": "LOG", "step": [number], "data": {"epoch": number, "train_loss": 0.5,
                                                       **metrics}}


def settings(**data):
    return {"type": "LOG", "step": "PARAMETER", "data": data}


# Each series peaks at a different epoch, so the star's epoch tells which one it marks.
REPORTED = [epoch_of(0, {"hr@1": 0.30, "hr@5": 0.50, "hr@10": 0.60, "hr@20": 0.70}),
            epoch_of(1, {"hr@1": 0.20, "hr@5": 0.55, "hr@10": 0.61, "hr@20": 0.69}),
            epoch_of(2, {"hr@1": 0.10, "hr@5": 0.52, "hr@10": 0.65, "hr@20": 0.68})]
VALIDATED = [epoch_of(0, {"hr@5": 0.50, "val_hr@5": 0.40}),
             epoch_of(1, {"hr@5": 0.45, "val_hr@5": 0.48})]


@pytest.mark.parametrize("records, star", [
    # ncf.py --report_topk 1 5 20 (-k 10): the settings say 10, though hr@1 sorts first.
    ([settings(topk=10, report_topk=[1, 5, 20])] + REPORTED, "best HR@10 0.6500 (epoch 2)"),
    ([settings(topk=5, report_topk=[1, 10, 20])] + REPORTED, "best HR@5 0.5500 (epoch 1)"),
    # With a validation split ncf.py selects on it, not on the test split.
    ([settings(topk=5)] + VALIDATED, "best VAL_HR@5 0.4800 (epoch 1)"),
    # Resumed with another -k: the last settings record holding one counts, not the resumed
    # run's {"first_epoch", "resumed"} record after it.
    ([settings(topk=20), settings(first_epoch=0, resumed=False), settings(topk=5),
      settings(first_epoch=1, resumed=True)] + REPORTED, "best HR@5 0.5500 (epoch 1)"),
    # No settings: ncf.py's default -k, or the log's only HR@k.
    (REPORTED, "best HR@10 0.6500 (epoch 2)"),
    (VALIDATED, "best VAL_HR@5 0.4800 (epoch 1)"),
    # true is no -k (Python would count it as 1): the default holds, not HR@1.
    ([settings(topk=True)] + REPORTED, "best HR@10 0.6500 (epoch 2)"),
    ([epoch_of(0, {"hr@1": 0.3, "hr@5": 0.5})], None),
])
def test_the_star_marks_the_hr_ncf_py_selected_on(tmp_path, monkeypatch, records, star):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    figures = []
    savefig = Figure.savefig

    def keep_figure(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    log = write_log(tmp_path / "log.json", records)
    plot_curve.main(["--log", str(log), "--output", str(tmp_path / "curve.png")])
    labels = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert [label for label in labels if label.startswith("best ")] == ([star] if star else [])


def test_a_directory_as_log_is_named_as_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(plot_curve.main, ["--log", str(tmp_path), "--output", str(tmp_path / "curve.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"plot_curve.py: error: --log {tmp_path}: is a directory; "
                                       f"pass the log.json ncf.py wrote in it (its --log_path)\n")


@pytest.mark.parametrize("kind", ["log", "hard link to the log", "link to the log", "fifo",
                                  "link"])
def test_an_output_it_would_destroy_is_refused(tmp_path, capsys, kind):
    log = write_log(tmp_path / "log.json", [epoch(0, 0.4, 0.2, 0.5)])
    before = log.read_bytes()
    output = log if kind == "log" else tmp_path / "curve.png"
    if kind == "hard link to the log":
        os.link(log, output)
    elif kind == "link to the log":
        output.symlink_to(log)
    elif kind == "fifo":
        os.mkfifo(output)
    elif kind == "link":
        (tmp_path / "elsewhere.png").write_bytes(b"kept")
        output.symlink_to(tmp_path / "elsewhere.png")
    kept = os.lstat(output)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(plot_curve.main, ["--log", str(log), "--output", str(output)])
    assert exit_info.value.code == 2
    problem = ("is the --log itself; pass another file name, such as curve.png"
               if "log" in kind else "exists and is not a regular file (a device, pipe or link); "
               "pass the name of a new or regular file")
    assert capsys.readouterr().err == f"plot_curve.py: error: --output {output}: {problem}\n"
    assert log.read_bytes() == before
    assert (os.lstat(output).st_ino, os.lstat(output).st_mode) == (kept.st_ino, kept.st_mode)


def test_every_metric_is_drawn_sampled_and_full_ranking_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: (
        figures.append(figure), savefig(figure, *args, **kwargs)))
    metrics = {"hr@10": 0.6, "ndcg@10": 0.4, "hr@5": 0.5, "ndcg@5": 0.3, "mrr": 0.35,
               "val_hr@10": 0.55, "val_ndcg@10": 0.33, "full_hr@10": 0.08, "full_ndcg@10": 0.04,
               "full_mrr": 0.03, "val_full_hr@10": 0.07, "validation_loss": 0.3,
               "eval_throughput": 1e6}
    log = write_log(tmp_path / "log.json", [epoch_of(n, metrics) for n in range(3)])
    curve = plot_curve.main(["--log", str(log), "--output", str(tmp_path / "curve.png")])
    assert set(curve) == {"epoch", "train_loss", *metrics} - {"validation_loss",
                                                            "eval_throughput"}
    sampled, full, loss = figures[0].axes
    assert sorted(line.get_label() for line in sampled.get_lines()
                  if not line.get_label().startswith("best ")) == [
        "HR@10", "HR@5", "MRR", "NDCG@10", "NDCG@5", "VAL_HR@10", "VAL_NDCG@10"]
    assert sorted(line.get_label() for line in full.get_lines()) == [
        "FULL_HR@10", "FULL_MRR", "FULL_NDCG@10", "VAL_FULL_HR@10"]
    assert loss.get_ylabel() == "training loss"
