"""progress.Progress: a line every 30 s where the output is no terminal, never more."""
import io

from progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_one_line_per_interval_with_rate_and_time_left():
    clock, log = Clock(), io.StringIO()
    with Progress(1000, "epoch 3", "step", stream=log, clock=clock) as shown:
        for _ in range(100):
            clock.now += 1.0  # 1 step a second: 100 s in all
            shown.update(1)
    assert log.getvalue().splitlines() == [
        "epoch 3: 30/1,000 steps (3%), 1 steps/s, about 16 min 10 s left",
        "epoch 3: 60/1,000 steps (6%), 1 steps/s, about 15 min 40 s left",
        "epoch 3: 90/1,000 steps (9%), 1 steps/s, about 15 min 10 s left",
    ]


def test_nothing_before_the_first_interval_nor_when_disabled():
    clock, log = Clock(), io.StringIO()
    shown = Progress(10, "x", "item", stream=log, clock=clock)
    clock.now = 29.9
    shown.update(10)
    quiet = Progress(10, "x", "item", stream=log, clock=clock, enabled=False)
    clock.now = 1000.0
    quiet.update(10)
    assert log.getvalue() == ""


def test_a_finished_count_has_no_time_left():
    clock, log = Clock(), io.StringIO()
    shown = Progress(4, "convert", "user", stream=log, clock=clock)
    clock.now = 40.0
    shown.update(4)
    assert log.getvalue() == "convert: 4/4 users (100%), 0.1 users/s\n"


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 60, 425, 3600, 7385)] == [
        "0 s", "59 s", "1 min 0 s", "7 min 5 s", "1 h 0 min", "2 h 3 min"]
