"""Progress of a long step, for whoever watches it: tqdm's bar on a terminal; in a log file or a
pipe, one line every 30 seconds (`WHAT: 1,200/5,000 users (24%), 80 users/s, about 48 s left`),
so a long run is never silent there and never floods it.

    with Progress(total, "recommend", "user") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""
import sys
import time

# Seconds between two lines where the output is not a terminal.
INTERVAL = 30.0


class Progress:
    def __init__(self, total, what, unit, stream=None, enabled=True, interval=None,
                 clock=time.monotonic):
        """`stream`: where the progress goes (default stderr); `enabled`: False shows nothing
        (a process that is not the one that prints, say)."""
        self.total, self.what, self.unit = total, what, unit
        self.stream = stream or sys.stderr
        self.interval = INTERVAL if interval is None else interval
        self.clock = clock
        self.done = 0
        self.bar = None
        self.quiet = not enabled
        if enabled and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=what, unit=unit, file=self.stream,
                                leave=False, dynamic_ncols=True)
        self.start = self.last = clock()

    def update(self, count=1):
        self.done += count
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(count)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.say(now)

    def say(self, now):
        rate = self.done / max(now - self.start, 1e-9)
        shown_rate = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        line = (f"{self.what}: {self.done:,}/{self.total:,} {self.unit}s "
                f"({self.done / max(self.total, 1):.0%}), {shown_rate} {self.unit}s/s")
        if 0 < rate and self.done < self.total:
            line += f", about {format_seconds((self.total - self.done) / rate)} left"
        try:
            print(line, file=self.stream, flush=True)
        except BrokenPipeError:
            # Whoever read it went away; the work goes on, and so does its own output.
            self.quiet = True

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_seconds(seconds):
    """`42 s`, `7 min 5 s`, `2 h 3 min`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
