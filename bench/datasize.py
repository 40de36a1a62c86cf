"""Conversion, training and evaluation at 1, 2, 5 and 10 times ml-20m's shape: time and memory.

    python bench/datasize.py [--sizes 1 2 5 10] [--workdir /tmp/ncf-datasize]
                             [--train_seconds 300] [-b 1048576] [--preset ml-20m]

Input: generate.py's ml-20m preset (seed 1; 138,493 users, 26,744 items, 20,000,263 ratings),
SIZE times over in one ratings.csv, each copy's users numbered past the previous copy's
(generate.write_csv's copies): SIZE x the users and ratings, the same items. Written once per
size into WORKDIR/PRESET-xSIZE/ (under a temporary name, then renamed) and reused. --preset
small makes a quick check of the script itself.

Each tool runs in a child process, so its peak RSS (VmHWM, or wait4's for one that exits) is
its own:
  convert.py             wall time, peak RSS
  ncf.py, 1 process      -e 1 -b BATCH_SIZE --opt_level O0 --checkpoint_dir '' for
                         --train_seconds, then stopped (SIGTERM): samples/s between its first
                         and last progress lines (a line every 30 s; an epoch that ends sooner:
                         its log's train_throughput), peak RSS
  ncf.py, 2 processes    the same under torchrun --nproc_per_node 2, each process with half the
                         cores' threads: samples/s of both, the sum of the two workers' peaks
  ncf.py --mode test     the untrained model, sampled protocol, every user: val_time, peak RSS
recommend.py --all_users is not run: it needs a trained model, and with an untrained one its
item bounds rule out nothing, so it scores every item: 10 to 43 minutes for ml-20m's users
alone on the 2-core development machine (docs/benchmarks.md), SIZE times that here.

A step whose estimated memory (NEEDS, from the figures measured here) exceeds 90 % of what the
machine has available is skipped with one line saying so. Prints one markdown table with the
machine, the command and the date.
"""
import datetime
import json
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cli  # noqa: E402
import generate  # noqa: E402
import inference  # noqa: E402
import torch  # noqa: E402
from child_process import failure_reason  # noqa: E402
from logger import log_records, read_log  # noqa: E402

# What a step is expected to need: a fixed part plus bytes per rating of the input, fitted to
# the peaks this script measured at 1x and 10x on the 2-core development machine (2026-12-04;
# 1x, 2x, 5x, 10x: convert.py 0.89, 1.50, 3.33, 6.39 GB; one process 1.46, 2.05, 3.87, 7.30;
# two 2.93, 4.25, 8.29, 15.55; evaluation 0.97, 1.65, 3.80, 7.31), rounded up. generate.py's
# is its ml-20m frame's.
NEEDS = {
    "generate.py": (2.2e9, 0),
    "convert.py": (0.4e9, 33),
    "ncf.py, 1 process": (0.85e9, 33),
    "ncf.py, 2 processes": (1.5e9, 71),
    "ncf.py --mode test": (0.35e9, 36),
}
# The share of the available memory a step may plan to take: the rest is left to whatever else
# the machine runs, which a step near the limit would have the kernel's OOM killer end.
USABLE = 0.9
PROGRESS = re.compile(r"epoch \d+: ([\d,]+)/([\d,]+) steps")
VAL_TIME = re.compile(r"val_time = ([\d.]+)")


def needed_bytes(step, ratings):
    fixed, per_rating = NEEDS[step]
    return fixed + per_rating * ratings


def fits(step, ratings, size):
    """Whether the step's estimated memory is within USABLE of what is available; if not, one
    line saying so."""
    needed, available = needed_bytes(step, ratings), cli.available_memory()
    if available is None or needed <= USABLE * available:
        return True
    print(f"skipping {step} at {size}x: it needs about {needed / 1e9:,.1f} GB, "
          f"{available / 1e9:,.1f} GB are available ({USABLE:.0%} of it to plan on)",
          flush=True)
    return False


def inputs(workdir, preset, sizes):
    """{size: path of its ratings.csv}, writing the missing ones from one generated frame."""
    paths = {size: os.path.join(workdir, f"{preset}-x{size}", "ratings.csv") for size in sizes}
    missing = [size for size in sizes if not os.path.exists(paths[size])]
    if missing and fits("generate.py", 0, min(missing)):
        started = time.perf_counter()
        # In a process of its own: a child's peak RSS as wait4 reports it starts from its
        # parent's peak (Linux carries it across exec), and generating takes 2 GB or more.
        writer = multiprocessing.get_context("spawn").Process(
            target=write_inputs, args=(preset, {size: paths[size] for size in missing}))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise cli.UserError(f"writing the generated ratings failed (exit status "
                                f"{writer.exitcode}); see its message above")
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return {size: path for size, path in paths.items() if os.path.exists(path)}


def write_inputs(preset, paths):
    """{size: path}: generate.py's preset, written size times over into each path."""
    frame = generate.generate_ratings(*generate.PRESETS[preset], seed=1)
    for size, path in paths.items():
        print(f"writing {path} (once)", flush=True)
        generate.write_csv(frame, path, copies=size)


def ratings_in(preset, size):
    """Ratings in a size's file, from generate.py's preset: the file need not be read."""
    users, _, mean_ratings = generate.PRESETS[preset]
    return round(size * users * mean_ratings)


class Child:
    """A tool run as a child process in a session of its own, its stdout lines kept with the
    time each arrived and the peaks (VmHWM) of the process and its descendants sampled while
    it runs."""

    def __init__(self, what, command, env=None):
        self.what, self.command = what, command
        self.lines = []
        self.peaks = {}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.stderr = []
        self.readers = [threading.Thread(target=self._read, args=(stream, kept), daemon=True)
                        for stream, kept in ((self.process.stdout, None),
                                             (self.process.stderr, self.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, kept):
        for line in stream:
            if kept is not None:
                kept.append(line)
                continue
            self.lines.append((time.perf_counter(), line.rstrip("\n")))
            # a long run is not silent here either
            if PROGRESS.search(line):
                print(f"  {line.rstrip()}", flush=True)

    def sample(self):
        """Remember the latest VmHWM of the process and of each descendant."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            peak = vm_hwm(pid)
            if peak is not None:
                self.peaks[pid] = peak

    def run_for(self, seconds):
        """Sample until the process exits or `seconds` pass, then stop it; True if it exited
        on its own."""
        deadline = self.started + seconds
        while self.process.poll() is None and time.perf_counter() < deadline:
            self.sample()
            time.sleep(1)
        exited = self.process.poll() is not None
        if not exited:
            self.sample()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.finish_reading()
        return exited

    def wait(self):
        """Wait for the process; its peak RSS (wait4's, which counts it alone) and wall time."""
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - self.started
        self.finish_reading()
        self.check()
        # ru_maxrss is in KiB on Linux
        return usage.ru_maxrss * 1024, seconds

    def finish_reading(self):
        """Wait for the last lines of an ended process: its pipes close after it does."""
        for reader in self.readers:
            reader.join()

    def check(self):
        if self.process.returncode:
            finished = subprocess.CompletedProcess(self.command, self.process.returncode,
                                                   stderr="".join(self.stderr))
            raise cli.UserError(f"{self.what} failed: {failure_reason(finished)}")


def descendants(pid):
    """Every process below pid, from /proc's children lists (Linux)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                for child in map(int, children.read().split()):
                    found += [child, *descendants(child)]
        except OSError:
            pass
    return found


def vm_hwm(pid):
    """A process's peak resident memory in bytes, None once it is gone."""
    return cli.proc_field_bytes(f"/proc/{pid}/status", "VmHWM")


def samples_per_second(lines, batch_size):
    """Training samples/s between the first and the last progress line, timed as they arrived;
    None with fewer than two lines."""
    progress = [(arrived, int(match[1].replace(",", ""))) for arrived, line in lines
                for match in [PROGRESS.search(line)] if match]
    if len(progress) < 2 or progress[-1][0] <= progress[0][0]:
        return None
    (first_time, first_steps), (last_time, last_steps) = progress[0], progress[-1]
    return (last_steps - first_steps) * batch_size / (last_time - first_time)


def convert(path, data):
    command = [sys.executable, "convert.py", "--path", path, "--output", data]
    print(shlex.join(command), flush=True)
    peak, seconds = Child("convert.py", command).wait()
    with open(os.path.join(data, "metadata.json")) as metadata:
        counts = json.load(metadata)
    return {"convert_s": seconds, "convert_peak": peak, "users": counts["users"],
            "items": counts["items"], "positives": counts["train"],
            "ratings": counts["ratings_read"]}


def train(step, data, processes, args, log_path):
    flags = ["ncf.py", "--data", data, "-e", "1", "-b", str(args.batch_size), "--opt_level", "O0",
             "--checkpoint_dir", "", "--log_path", log_path]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if processes == 1:
        command = [sys.executable, *flags]
    else:
        # torchrun would give each process one thread; split the cores as scaling.py does
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *flags]
    print(shlex.join(command), f"# for {args.train_seconds} s", flush=True)
    if os.path.exists(log_path):
        os.remove(log_path)
    child = Child(step, command, env)
    finished = child.run_for(args.train_seconds)
    if finished:
        child.check()
        rate = log_records(read_log(log_path), "epoch")[-1]["train_throughput"]
    else:
        rate = samples_per_second(child.lines, args.batch_size)
    # the workers, not torchrun's launcher, which only waits for them
    workers = [pid for pid in child.peaks if processes == 1 or pid != child.process.pid]
    return rate, sum(child.peaks[pid] for pid in workers)


def evaluate(data, log_path):
    command = [sys.executable, "ncf.py", "--data", data, "--mode", "test", "--opt_level", "O0",
               "--log_path", log_path]
    print(shlex.join(command), flush=True)
    child = Child("ncf.py --mode test", command)
    peak, _ = child.wait()
    found = [VAL_TIME.search(line) for _, line in child.lines]
    return [float(match[1]) for match in found if match][-1], peak


def measure(size, path, args):
    ratings = ratings_in(args.preset, size)
    folder = os.path.dirname(path)
    data = os.path.join(folder, "data")
    row = {"size": size}
    if not fits("convert.py", ratings, size):
        return row
    row.update(convert(path, data))
    print(f"  {row['convert_s']:.1f} s, {gigabytes(row['convert_peak'])}", flush=True)
    for processes in (1, 2):
        step = f"ncf.py, {processes} process{'es' if processes > 1 else ''}"
        if fits(step, ratings, size):
            rate, peak = row[f"train_{processes}"] = train(
                step, data, processes, args, os.path.join(folder, f"train-{processes}.json"))
            print(f"  {'-' if rate is None else f'{rate:,.0f}'} samples/s, {gigabytes(peak)}",
                  flush=True)
    if fits("ncf.py --mode test", ratings, size):
        row["eval"] = evaluate(data, os.path.join(folder, "eval.json"))
        print(f"  {row['eval'][0]:.1f} s, {gigabytes(row['eval'][1])}", flush=True)
    return row


def gigabytes(size):
    return f"{size / 1e9:.2f} GB"


def table(rows, argv):
    command = shlex.join(["python", "bench/datasize.py", *argv])
    lines = [f"{inference.cpu_model()}, {os.cpu_count()} cores, "
             f"{cli.physical_memory() / 2**30:.0f} GiB RAM, torch {torch.__version__}; "
             f"`{command}`; {datetime.date.today().isoformat()}", "",
             "| size | ratings | users | training positives | convert.py | convert peak RSS "
             "| 1 process: samples/s | vs 1x | peak RSS | 2 processes: samples/s | vs 1x "
             "| peak RSS, both | evaluation (val_time) | evaluation peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {processes: next((row[f"train_{processes}"][0] for row in rows
                             if row["size"] == 1 and row.get(f"train_{processes}")), None)
            for processes in (1, 2)}
    for row in rows:
        cells = [f"{row['size']}x"]
        if "ratings" in row:
            cells += [f"{row['ratings']:,}", f"{row['users']:,}", f"{row['positives']:,}",
                      f"{row['convert_s']:.1f} s", gigabytes(row["convert_peak"])]
        else:
            cells += ["skipped"] * 5
        for processes in (1, 2):
            rate, peak = row.get(f"train_{processes}", (None, None))
            if peak is None:
                cells += ["skipped"] * 3
                continue
            shown = "-" if rate is None else f"{rate:,.0f}"
            ratio = "-" if None in (rate, base[processes]) else f"x{rate / base[processes]:.2f}"
            cells += [shown, ratio, gigabytes(peak)]
        if "eval" in row:
            cells += [f"{row['eval'][0]:.1f} s", gigabytes(row["eval"][1])]
        else:
            cells += ["skipped"] * 2
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = cli.ArgumentParser(prog="datasize.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 5, 10],
                        help="copies of the ml-20m shape")
    parser.add_argument("--workdir", default="/tmp/ncf-datasize",
                        help="where the inputs are cached and the conversions written")
    parser.add_argument("--train_seconds", type=int, default=300,
                        help="how long each training run goes before it is stopped")
    parser.add_argument("-b", "--batch_size", type=int, default=2 ** 20,
                        help="ncf.py's, for training (a smaller one for --preset small)")
    parser.add_argument("--preset", choices=sorted(generate.PRESETS), default="ml-20m",
                        help="the shape copied (small: a quick check of this script)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1:
        parser.error(f"--sizes must be at least 1, got {min(args.sizes)}")
    if args.train_seconds < 70:
        parser.error("--train_seconds must be at least 70: samples/s is timed between "
                     "progress lines, 30 s apart")
    paths = inputs(args.workdir, args.preset, args.sizes)
    rows = [measure(size, paths[size], args) if size in paths else {"size": size}
            for size in args.sizes]
    print()
    print(table(rows, argv))
    return rows


if __name__ == "__main__":
    cli.run(main)
