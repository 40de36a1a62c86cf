import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

import datasize  # noqa: E402
import generate  # noqa: E402


def test_samples_per_second_come_from_the_first_and_last_progress_lines():
    lines = [(10.0, "31832577 parameters"),
             (40.0, "epoch 0: 4/473 steps (1%), 0.13 steps/s, about 59 min left"),
             (70.5, "epoch 0: 8/473 steps (2%), 0.13 steps/s, about 59 min left"),
             (101.0, "epoch 0: 1,012/2,473 steps (41%), 17 steps/s, about 1 min 26 s left"),
             (102.0, "ncf.py: terminated (SIGTERM)")]
    # (1,012 - 4) steps of 1,024 samples in 61 s
    assert datasize.samples_per_second(lines, 1024) == pytest.approx(1008 * 1024 / 61)
    assert datasize.samples_per_second(lines[:2], 1024) is None


def test_a_step_that_would_not_fit_is_skipped_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(datasize.cli, "available_memory", lambda: 5e9)
    fixed, per_rating = datasize.NEEDS["convert.py"]
    assert datasize.fits("convert.py", (4.4e9 - fixed) / per_rating, 2)
    # 4.6 GB is more than 90 % of 5 GB
    assert not datasize.fits("convert.py", (4.6e9 - fixed) / per_rating, 1)
    assert not datasize.fits("convert.py", (6e9 - fixed) / per_rating, 3)
    assert capsys.readouterr().out == "".join(
        f"skipping convert.py at {size}: it needs about {needed} GB, 5.0 GB are available (90% "
        f"of it to plan on)\n" for size, needed in (("1x", 4.6), ("3x", 6.0)))
    monkeypatch.setattr(datasize.cli, "available_memory", lambda: None)
    assert datasize.fits("convert.py", 10 ** 12, 4)


def test_copies_number_each_copys_users_past_the_previous_ones(tmp_path):
    frame = pd.DataFrame({"userId": [1, 1, 3], "movieId": [10, 20, 10],
                          "rating": [4.0, 3.5, 1.0], "timestamp": [100, 200, 300]})
    generate.write_csv(frame, tmp_path / "ratings.csv", chunk_rows=2, copies=3)
    written = pd.read_csv(tmp_path / "ratings.csv")
    assert written["userId"].tolist() == [1, 1, 3, 4, 4, 6, 7, 7, 9]
    for copy in range(3):
        rows = written.iloc[3 * copy:3 * copy + 3].reset_index(drop=True)
        assert rows.drop(columns="userId").equals(frame.drop(columns="userId"))


def test_peaks_are_read_for_a_process_and_its_children():
    assert datasize.vm_hwm(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in datasize.descendants(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert datasize.vm_hwm(child.pid) is None
