"""The acceptance run of NCF on an NVIDIA GPU machine: every step a row of one markdown table.

    bash scripts/gpu_check.sh [--out DIR]          # what a GPU machine runs (8 minutes at most)
    python3 scripts/gpu_check.py --dry-run-cpu     # the same sequence, tiny, on the CPU (CI)

The steps, cheap and decisive first (docs/gpu.md says what each row means and what it takes on
an H200): the environment; the CUDA forward pass, an AMP training step and the test data against
the CPU's; a dataset of ml-20m's shape, written as convert.py writes one; ncf.py end to end in
subprocesses at batch 2^20: O2, --mode test and --full_ranking on its model.pth, float16 against
float32 evaluation, a SIGKILL in epoch 1 and --resume against the uninterrupted run, O0; the
peak GPU memory of training; recommend.py, serve.py and export.py on the trained model;
torchrun over every GPU; O2 and O0 with --compile; the original's published figures beside ours.

A row is pass, fail, skip (with its reason) or info (figures without a criterion). Every step
has a time cap and the run a deadline: a step that no longer fits is skipped and says so.
gpu_check.md (the table) and gpu_check.json are written to --out (default: $OUT if set, else
./gpu_check_out) after every step. Exit status 1 when a row failed; 2 when nvidia-smi lists a
GPU that this torch cannot use; 0 without any GPU, when nothing is checked.
"""
import contextlib
import copy
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass, field

# The deadline counts from here: importing torch can take seconds on a fresh machine, and the
# shell's hard stop counts them too.
STARTED = time.monotonic()

# ncf.py and its modules live in the repository root, one level up.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

try:
    import torch
except ImportError:
    # One line, as cli.run gives a user's error: every module below needs torch.
    print(f"gpu_check.py: error: {sys.executable} has no torch; set PYTHON to the interpreter "
          f"that has it (python3 in the project's Docker image) or pip install -r "
          f"requirements.txt", file=sys.stderr)
    sys.exit(2)

import cli  # noqa: E402
import dataloading  # noqa: E402
import evaluation  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402
from checkpoint import load_checkpoint, load_model, model_state  # noqa: E402
from child_process import failure_reason  # noqa: E402
from fileio import atomic_output, make_writable_dir  # noqa: E402
from inference import AUTOCAST_DTYPES, benchmark, device_name, synchronize  # noqa: E402
from logger import log_records, read_log  # noqa: E402
from neumf import NeuMF  # noqa: E402

SKIP_MESSAGE = "no NVIDIA GPU (nvidia-smi is missing or lists none): skipping GPU checks"
SEED = 1
TEST_NEGATIVES = 100
TOPK = 10
# HR@10 of a model that ranks at random: 10 of the 101 candidates.
CHANCE_HR = TOPK / (TEST_NEGATIVES + 1)
EPOCHS = 2
AMP_CHECK_STEPS = 3
# Limits on max |device - CPU| / max |CPU logit|. fp32 differs by summation order only
# (about 3e-7 seen); tf32 and fp16 round inputs to 10 mantissa bits (about 5e-4 seen for fp16).
FORWARD_LIMITS = {"fp32": 1e-5, "tf32": 1e-2, "amp": 1e-2}
MODES = tuple(FORWARD_LIMITS)
# The TorchScript file run on the GPU against the eager model, relative to max |logit|.
EXPORT_LIMIT = 1e-5
EXPORT_PAIRS = 1000
# The resumed run against the uninterrupted one, only where two fresh runs already differ at
# epoch 0 (a nondeterministic kernel) so that bit-equality cannot be asked: HR@10 per epoch,
# and each weight tensor relative to its largest |value|.
HR_TOLERANCE = 0.005
WEIGHT_TOLERANCE = 1e-2
# The epoch records a resumed run must repeat exactly, where the runs are deterministic.
RESUME_COMPARED = ("hr@10", "ndcg@10", "train_loss", "validation_loss")
# When to SIGKILL the interrupted run: this share of its epoch 0's training time after its
# last.pth of epoch 0 appears, so that it dies inside epoch 1.
KILL_AT = 0.3
POLL_SECONDS = 0.005
# Seconds a stopped process has between SIGTERM (torchrun passes it on to its workers) and
# SIGKILL.
STOP_GRACE = 3.0
# The original trained at this batch on an A100 40GB: our peak must fit there too, with room
# for the CUDA context and the allocator's cached blocks.
ORIGINAL_CARD_BYTES = 36 * 2 ** 30
# The original's default number of epochs: its "time to train" figures are that many epochs of
# training and evaluation (141 s / 30 = 4.7 s, 99.3 M samples / 22.6 M samples/s = 4.4 s).
ORIGINAL_EPOCHS = 30
# Peak memory bandwidth of known cards in GB/s (NVIDIA's data sheets), matched in this order
# on torch.cuda.get_device_name: the first pattern found in the name wins.
BANDWIDTHS = (
    (r"H200", "H200", 4800),
    (r"H100 NVL", "H100 NVL", 3900),
    (r"H100.*PCIe", "H100 PCIe", 2000),
    (r"H100", "H100 SXM", 3350),
    (r"A100.*80GB.*PCIe", "A100 80GB PCIe", 1935),
    (r"A100.*80GB", "A100 80GB", 2039),
    (r"A100", "A100 40GB", 1555),
    (r"V100S", "V100S", 1134),
    (r"V100", "V100", 900),
    (r"L40S", "L40S", 864),
)


@dataclass(frozen=True)
class Published:
    """The original's figures on one GPU, ml-20m, batch 1,048,576 (its README): samples/s in
    O0 (TF32 on an A100: PyTorch's default for matrix products then; FP32 on a V100) and O2,
    and its time to train in each; HR@10 where it gives one."""
    bandwidth: int
    o0: float
    o2: float
    o0_seconds: float
    o2_seconds: float
    hr: float | None


PUBLISHED = {"A100 40GB": Published(1555, 22.6e6, 34.1e6, 141, 94, 0.9589),
             "V100 16GB": Published(900, 10.4e6, 21.8e6, 302, 145, None)}
# The original's forward passes on one A100 40GB at batch 1,048,576, samples/s.
PUBLISHED_INFERENCE = {"tf32": 57.5e6, "amp": 82.7e6}
INFERENCE_BATCHES = 20


@dataclass(frozen=True)
class Shape:
    name: str
    nb_users: int
    nb_items: int
    nb_positives: int
    batch_size: int
    factors: int
    layers: tuple
    check_ids: int  # (user, item) pairs of the forward comparison
    check_batch_size: int  # batch of the AMP step check


ML20M = Shape("ml-20m", 138_493, 26_744, 19_861_770, 2 ** 20, 64, (256, 256, 128, 64),
              65_536, 65_536)
# Epochs of about 120 steps: long enough that the SIGKILL lands inside epoch 1 on a busy CPU.
TINY = Shape("tiny", 500, 300, 25_000, 1024, 8, (32, 16, 8), 512, 128)
# recommend.py's and serve.py's users, in original ids (the dataset's user i has id i + 1).
RECOMMEND_USERS = (1, 2, 3)
# Tastes of the generated users and genres of its items (generate_dataset).
TASTES, GENRES = 32, 20


@dataclass(frozen=True)
class Timing:
    """Seconds a step is planned to take (it is skipped when fewer are left before the
    deadline) and the most it may take (then it is stopped and fails)."""
    expected: float
    cap: float


# Step names, which are the table's rows, in run order.
ENVIRONMENT = "environment"
FORWARD = "forward pass vs CPU"
AMP_STEP = "AMP training step"
TEST_DATA = "test data vs CPU"
DATASET = "dataset"
TRAIN_O2 = "ncf.py O2"
TEST_MODE = "ncf.py --mode test"
FULL_RANKING = "ncf.py --full_ranking"
EVAL_PARITY = "evaluation float16 vs float32"
RESUME = "SIGKILL in epoch 1, --resume"
TRAIN_O0 = "ncf.py O0"
INFERENCE = "forward passes"
MEMORY = "peak GPU memory"
RECOMMEND = "recommend.py --users"
SERVE = "serve.py"
TORCHSCRIPT = "export.py torchscript"
ONNX = "export.py onnx"
ALL_USERS = "recommend.py --all_users"
TORCHRUN = "torchrun (NCCL)"
COMPILED_O2 = "ncf.py O2 --compile"
COMPILED_O0 = "ncf.py O0 --compile"
VS_A100 = "vs original, A100 40GB"
VS_V100 = "vs original, V100 16GB"

# On an H200 at ml-20m's shape, with an epoch taking 2 to 10 s and compiling about 60 s; the
# tools' interpreters start ahead of their turn, so a step's time is its own work.
GPU_TIMES = {
    ENVIRONMENT: Timing(2, 30), FORWARD: Timing(5, 60), AMP_STEP: Timing(3, 60),
    TEST_DATA: Timing(1, 30), DATASET: Timing(10, 90), TRAIN_O2: Timing(30, 150),
    TEST_MODE: Timing(10, 60), EVAL_PARITY: Timing(8, 60), RESUME: Timing(40, 180),
    TRAIN_O0: Timing(30, 150), INFERENCE: Timing(5, 30), RECOMMEND: Timing(10, 60),
    SERVE: Timing(10, 60), TORCHSCRIPT: Timing(10, 60), ONNX: Timing(15, 60),
    ALL_USERS: Timing(20, 90),
    TORCHRUN: Timing(40, 150), COMPILED_O2: Timing(100, 240), COMPILED_O0: Timing(100, 240),
}
# The CPU dry run: seconds on a 2-core machine, capped well above them.
DRY_RUN_TIMES = {name: Timing(2, 60) for name in GPU_TIMES}
GPU_DEADLINE, DRY_RUN_DEADLINE = 440, 240
# Seconds kept after the last step for the derived rows and the files.
RESERVE = 10
# The tool interpreters importing ahead of the running step.
AHEAD = 3
# Tools' runs in the dry run: no GPU whatever the machine, one thread for tiny shapes (two
# threads of one tiny product spin on a busy 2-core machine: 2 s an epoch instead of 0.05).
DRY_RUN_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
# Where a tool's process writes what its run cannot print: peak GPU memory, full-ranking time.
PROBE_ENV = "GPU_CHECK_PROBE"
LAUNCH = ("import sys; sys.path.insert(0, {scripts!r}); import gpu_check; "
          "gpu_check.launched_tool(sys.argv[1], sys.argv[2:], {imports!r})")
# What a training run imports only once it runs, imported by its process while it waits:
# torch.optim imports torch._dynamo at the first optimizer, a second or more of CPU time.
TRAINING_IMPORTS = ("torch._dynamo",)


@dataclass
class Result:
    status: str  # pass, fail, skip or info
    figures: str
    values: dict = field(default_factory=dict)


@dataclass
class Row:
    name: str
    status: str = "pending"
    figures: str = ""
    seconds: float | None = None
    values: dict = field(default_factory=dict)


class Report:
    """The table so far, every planned step a row; saved after each row, so a run stopped by
    the shell's hard stop still leaves what it measured, and which steps it never reached."""

    def __init__(self, out_dir, names, heading, environment):
        self.out_dir = out_dir
        self.rows = {name: Row(name) for name in names}
        self.heading = heading
        self.environment = environment

    def set(self, name, result, seconds=None):
        row = self.rows[name]
        row.status, row.figures, row.values, row.seconds = (result.status, result.figures,
                                                            result.values, seconds)
        took = "" if seconds is None else f" ({seconds:.1f} s)"
        print(f"{name}: {result.status}{took}: {result.figures}", flush=True)
        self.save()

    def failed(self):
        return any(row.status == "fail" for row in self.rows.values())

    def exit_status(self):
        return 1 if self.failed() else 0

    def counts(self):
        statuses = [row.status for row in self.rows.values()]
        return ", ".join(f"{statuses.count(status)} {status}"
                         for status in ("pass", "fail", "skip", "info", "pending")
                         if status in statuses)

    def markdown(self):
        lines = [self.heading, "", "| step | result | figures | seconds |", "|---|---|---|---:|"]
        for row in self.rows.values():
            status = "not reached" if row.status == "pending" else row.status
            seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
            lines.append(f"| {cell(row.name)} | {status} | {cell(row.figures)} | {seconds} |")
        lines += ["", f"{self.counts()}; exit status {self.exit_status()}"]
        return "\n".join(lines) + "\n"

    def save(self):
        result = {"environment": self.environment, "rows": [asdict(row) for row in
                                                            self.rows.values()],
                  "passed": not self.failed()}
        # Rewritten after every row: a run killed mid-write keeps the previous files.
        with atomic_output(os.path.join(self.out_dir, "gpu_check.json")) as temporary, \
                open(temporary, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        with atomic_output(os.path.join(self.out_dir, "gpu_check.md")) as temporary, \
                open(temporary, "w", encoding="utf-8") as handle:
            handle.write(self.markdown())


def cell(text):
    """Text as one markdown table cell: a `|` would start another column, a newline another
    row."""
    return " ".join(str(text).split()).replace("|", "\\|")


class Budget:
    """The run's deadline; `left` is what the steps may still take, a reserve kept back."""

    def __init__(self, total, reserve, clock=time.monotonic, start=None):
        self.clock = clock
        self.deadline = (clock() if start is None else start) + total
        self.reserve = reserve

    def left(self):
        return self.deadline - self.reserve - self.clock()


@dataclass
class Step:
    """One step of the sequence. `action(cap)` returns its Result, or a dict of Results by row
    when it also fills the further `rows`; `expected`, where given, replaces the timing's: a
    number of seconds or a function of the Runner giving them. A step whose `needs` did not
    pass, or with a `skip` reason, is skipped; so are its `tools`' runs."""
    name: str
    action: object
    timing: Timing
    expected: object = None
    needs: tuple = ()
    skip: str = ""
    rows: tuple = ()
    tools: tuple = ()


class Runner:
    """Runs steps in order against the budget, each under its cap, into the report."""

    def __init__(self, report, budget, tools=None):
        self.report = report
        self.budget = budget
        self.tools = tools

    def run(self, step):
        names = (step.name, *step.rows)
        reason = step.skip or self.missing(step)
        expected = step.timing.expected
        if step.expected is not None:
            expected = step.expected(self) if callable(step.expected) else step.expected
        left = self.budget.left()
        if not reason and left < expected:
            reason = f"deadline: needs about {expected:.0f} s, {max(left, 0.0):.0f} s left"
        if reason:
            for key in step.tools:
                self.tools.drop(key)
            for name in names:
                self.report.set(name, Result("skip", reason))
            return
        cap = min(step.timing.cap, left)
        start = self.budget.clock()
        try:
            with time_cap(cap):
                results = step.action(cap)
        except Exception as error:  # any failure is the result being reported
            results = Result("fail", f"{type(error).__name__}: {error}")
        except BaseException as stop:
            # SIGTERM from the shell's hard stop (cli.run makes it SystemExit(143)), or Ctrl-C:
            # the table says where it came.
            how = ("SIGTERM" if isinstance(stop, SystemExit) and stop.code == 128 + signal.SIGTERM
                   else type(stop).__name__)
            self.report.set(step.name, Result("fail", f"stopped during this step ({how})"))
            raise
        finally:
            for key in step.tools:
                self.tools.drop(key)
        took = self.budget.clock() - start
        if isinstance(results, Result):
            results = {step.name: results}
        for name in names:
            result = results.get(name) or Result("skip", f"not measured: {step.name} did "
                                                         f"not pass")
            seconds = result.values.pop("seconds", None)
            self.report.set(name, result, took if name == step.name else seconds)

    def missing(self, step):
        for need in step.needs:
            if self.report.rows[need].status not in ("pass", "info"):
                return f"needs {need}, which did not pass"
        return ""


@contextlib.contextmanager
def time_cap(seconds):
    """Raise TimeoutError in the main thread once `seconds` have passed: the step's one timer,
    which also interrupts a wait on its tool's process or on a request; the Runner then stops
    the step's tools."""
    def expire(signum, frame):
        raise TimeoutError(f"stopped at its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Launched:
    """One process of a step; a tool's is started before its turn: it imports torch and the
    project, then waits on stdin for `go` (launched_tool). Its output goes to files in the work
    directory, which a step reads while it runs."""

    def __init__(self, key, command, env, workdir):
        self.key = key
        self.stdout_path = os.path.join(workdir, f"{key}.out")
        self.stderr_path = os.path.join(workdir, f"{key}.err")
        self.probe_path = os.path.join(workdir, f"{key}.probe.json")
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            # Its own session: stopping it stops what it started (compile workers, torchrun's).
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=workdir,
                env={**env, PROBE_ENV: self.probe_path}, start_new_session=True)
        self.began = None

    def go(self):
        self.began = time.monotonic()
        try:
            self.process.stdin.write(b"go\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it failed while importing: its exit status and stderr say why

    def cancel(self):
        """Let a process whose step was skipped leave without running its tool."""
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()

    def signal(self, number):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, number)

    def stop(self):
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()

    def stdout(self):
        with open(self.stdout_path, errors="replace") as handle:
            return handle.read()

    def stderr(self):
        with open(self.stderr_path, errors="replace") as handle:
            return handle.read()

    def probe(self):
        try:
            with open(self.probe_path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def failure(self):
        return failure_reason(subprocess.CompletedProcess(self.process.args,
                                                          self.process.returncode,
                                                          stderr=self.stderr()))


class Tools:
    """The sequence's tool runs (ncf.py, recommend.py, ...) in the order they come.

    Importing torch and the project takes a process seconds, more than a step's own work in
    the dry run: the next AHEAD runs import while the current step runs, then wait for their
    turn."""

    def __init__(self, workdir, env, ahead=AHEAD):
        self.workdir = workdir
        self.env = env
        self.ahead = ahead
        self.planned = {}  # key: command, in run order
        self.launched = {}

    def plan(self, key, tool, *args, imports=()):
        """The run `key` of `tool` with `args`, which imports `imports` while it waits."""
        launch = LAUNCH.format(scripts=SCRIPTS, imports=tuple(imports))
        self.planned[key] = [sys.executable, "-c", launch, os.path.join(ROOT, tool),
                             *map(str, args)]

    def start(self, key):
        self.launched[key] = Launched(key, self.planned[key], self.env, self.workdir)

    def top_up(self):
        waiting = sum(1 for key in self.planned if key in self.launched)
        for key in self.planned:
            if waiting >= self.ahead:
                break
            if key not in self.launched:
                self.start(key)
                waiting += 1

    def take(self, key):
        """The run `key`, told to go."""
        if key not in self.launched:
            self.start(key)
        del self.planned[key]
        launched = self.launched[key]
        launched.go()
        self.top_up()
        return launched

    def drop(self, key):
        """A run whose step is over or skipped: stopped, or told to leave unstarted."""
        self.planned.pop(key, None)
        launched = self.launched.get(key)
        if launched is not None:
            launched.stop() if launched.began else launched.cancel()
        self.top_up()

    def close(self):
        """Stop a run still going (the sequence was stopped) and let waiting ones leave."""
        self.planned.clear()
        for launched in self.launched.values():
            launched.stop() if launched.began else launched.cancel()
        for launched in self.launched.values():
            try:
                launched.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                launched.stop()


def launched_tool(path, args, imports=()):
    """The child's side of Launched: import `imports`, wait for the parent's `go`, then run
    the tool at `path` as `python PATH ARGS` would, and write to $GPU_CHECK_PROBE what its run
    does not print: its peak GPU memory and the seconds spent in full-ranking evaluation."""
    for module in imports:
        importlib.import_module(module)
    if sys.stdin.readline().strip() != "go":
        return  # its step was skipped
    full_ranking_seconds = []
    unwrapped = evaluation.full_ranking_evaluation

    def timed_full_ranking(model, splits, settings, ctx):
        synchronize(ctx.device)
        start = time.perf_counter()
        metrics = unwrapped(model, splits, settings, ctx)
        synchronize(ctx.device)
        full_ranking_seconds.append(time.perf_counter() - start)
        return metrics

    evaluation.full_ranking_evaluation = timed_full_ranking
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
        with open(os.environ[PROBE_ENV], "w") as handle:
            json.dump({"peak_memory_bytes": peak,
                       "full_ranking_seconds": full_ranking_seconds}, handle)


def listed_gpus():
    """The lines of `nvidia-smi -L` naming a GPU; none where it is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.startswith("GPU ")]


def cuda_problem(gpus):
    """Why this torch, which sees no CUDA device, cannot check the GPUs nvidia-smi lists
    (`gpus`); None where it lists none. Skipping them would be a pass that checked nothing."""
    if not gpus:
        return None
    listed = f"nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]})"
    if torch.version.cuda is None:
        return (f"{listed} but torch {torch.__version__} is a CPU-only build "
                f"(torch.version.cuda is None); run this in the project's Docker image "
                f"(docker build -t ncf .; README: Docker and GPUs) or install a CUDA build from "
                f"PyTorch's index (pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu128) and set PYTHON to that interpreter")
    return (f"{listed} but torch {torch.__version__} (torch.version.cuda {torch.version.cuda}) "
            f"sees none (torch.cuda.is_available() is False); check CUDA_VISIBLE_DEVICES "
            f"({os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) and that the driver's CUDA "
            f"version (nvidia-smi) is at least {torch.version.cuda}, or use the project's Docker "
            f"image")


def bandwidth(name):
    """(card, GB/s) for a torch.cuda.get_device_name, or None for a card not in BANDWIDTHS."""
    for pattern, card, gigabytes in BANDWIDTHS:
        if re.search(pattern, name, re.IGNORECASE):
            return card, gigabytes
    return None


def rate(samples_per_second):
    if samples_per_second >= 1e6:
        return f"{samples_per_second / 1e6:.3g} M"
    return f"{samples_per_second / 1e3:.3g} k"


def gib(count):
    return f"{count / 2 ** 30:.1f} GiB"


def set_precision(mode):
    tf32 = mode != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def recipe(shape, batch_size=None):
    return train.Recipe(batch_size=batch_size or shape.batch_size, seed=SEED,
                        factors=shape.factors, layers=list(shape.layers))


def positives_for_steps(steps, args):
    """Fewest positives whose epoch holds `steps` full batches."""
    return -(-steps * args.batch_size // (1 + args.negative_samples))


def draw(cdf, count, generator):
    """`count` ids with probabilities proportional to the increments of `cdf`."""
    uniform = torch.rand(count, generator=generator, device=cdf.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, uniform * cdf[-1]).clamp_(max=len(cdf) - 1)


def generate_dataset(shape, device, seed=SEED):
    """(train [N, 2], test [U, 2], negatives [U, 100]), int64 on `device`: the tensors
    convert.py writes for ratings of `shape`, drawn in seconds (generate.py --preset ml-20m
    and convert.py took 32 s and 14 s on a 2-core CPU, a tenth of the run's budget).

    Item popularity is Zipf-like and user activity lognormal, as in MovieLens. Each user has one
    of TASTES tastes, which weighs items by genre, and draws its training and test items from
    the same weights: a model that learns tastes ranks the test item above what popularity
    alone does. Negatives are uniform over the items, as the original's; repeats among a user's
    candidates are masked by evaluation.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    popularity = 1.0 / (torch.arange(shape.nb_items, device=device, dtype=torch.float64) + 10.0)
    genres = torch.randint(0, GENRES, (shape.nb_items,), generator=generator, device=device)
    # Cubed exponentials: each taste likes a few genres much more than the rest.
    affinity = torch.empty(TASTES, GENRES, device=device, dtype=torch.float64).exponential_(
        generator=generator) ** 3
    cdfs = torch.cumsum(popularity * affinity[:, genres], dim=1)
    # Taste t's distribution over items as the span (t, t + 1] of one sorted sequence.
    tastes = torch.arange(TASTES, device=device, dtype=torch.float64)
    flat_cdf = (cdfs / cdfs[:, -1:] + tastes[:, None]).flatten()
    user_tastes = torch.randint(0, TASTES, (shape.nb_users,), generator=generator, device=device)

    def items_of(users):
        taste = user_tastes[users]
        uniform = torch.rand(len(users), generator=generator, device=device,
                             dtype=torch.float64)
        index = torch.searchsorted(flat_cdf, taste + uniform)
        return (index - taste * shape.nb_items).clamp_(0, shape.nb_items - 1)

    activity = torch.empty(shape.nb_users, device=device, dtype=torch.float64)
    user_cdf = torch.cumsum(activity.log_normal_(0.0, 1.3, generator=generator), 0)
    train_users = draw(user_cdf, shape.nb_positives, generator)
    # Every user rates something, so nb_users is max id + 1 as dataloading computes it.
    train_users[:shape.nb_users] = torch.arange(shape.nb_users, device=device)
    users = torch.arange(shape.nb_users, device=device)
    negatives = torch.randint(0, shape.nb_items, (shape.nb_users, TEST_NEGATIVES),
                              generator=generator, device=device)
    return (torch.stack((train_users, items_of(train_users)), dim=1),
            torch.stack((users, items_of(users)), dim=1), negatives)


def write_dataset(directory, train_pairs, test, negatives):
    """The tensors as convert.py's own writer leaves them, with id maps (original id = dense id
    + 1) and metadata.json (counts and fingerprint: no reader hashes 430 MB again)."""
    # Imported here: convert imports pandas, half a second of every tool process's start, and
    # those processes import this module.
    from convert import FORMAT_VERSION, write_outputs
    tensors = {"train_ratings": train_pairs.cpu(), "test_ratings": test.cpu(),
               "test_negatives": negatives.cpu()}
    nb_users = int(test[:, 0].max()) + 1
    nb_items = max(int(train_pairs[:, 1].max()), int(test[:, 1].max()),
                   int(negatives.max())) + 1
    tensors.update(user_ids=torch.arange(1, nb_users + 1), item_ids=torch.arange(1, nb_items + 1))
    metadata = {"format_version": FORMAT_VERSION, "source": "scripts/gpu_check.py (generated)",
                "seed": SEED, "valid_negative": TEST_NEGATIVES, "users": nb_users,
                "items": nb_items, "train": len(train_pairs), "test": len(test)}
    os.makedirs(directory, exist_ok=True)
    write_outputs(directory, tensors, metadata)


def popularity_hr(train_pairs, test, negatives):
    """HR@10 of ranking each user's candidates by their training count: what a model that
    learnt popularity alone reaches."""
    _, items, duplicate_mask = dataloading.create_test_data(test, negatives)
    counts = torch.bincount(train_pairs[:, 1], minlength=int(items.max()) + 1).double()
    ranks = evaluation.positive_ranks(counts[items], items, duplicate_mask)
    return evaluation.hit_rate_and_ndcg(ranks, TOPK)[0]


def compare_forward(reference, model, users, items):
    """{mode: (max |model - reference|, that over max |reference|)} for the same ids.

    `reference` runs in fp32 on its device (the CPU); `model` on its own in each mode.
    """
    reference_device = next(reference.parameters()).device
    device = next(model.parameters()).device
    with torch.inference_mode():
        expected = reference(users.to(reference_device), items.to(reference_device)).float()
        scale = expected.abs().max().item()
        differences = {}
        for mode in MODES:
            set_precision(mode)
            with torch.autocast(device.type, dtype=torch.float16, enabled=mode == "amp"):
                got = model(users.to(device), items.to(device)).float().to(reference_device)
            difference = (got - expected).abs().max().item()
            differences[mode] = (difference, difference / scale)
    return differences


def order_one_embeddings(model):
    """Embeddings redrawn from N(0, 1) (training starts at 0.01): the activations are then of
    order 1, so a wrong kernel shows in the logits instead of hiding under the output bias."""
    with torch.no_grad():
        for table in (model.mf_user_embed, model.mf_item_embed, model.mlp_user_embed,
                      model.mlp_item_embed):
            table.weight.normal_()
    return model


def compare_resume(reference, resumed):
    """Result of a run resumed after a SIGKILL against the uninterrupted `reference`.

    Each is {"epochs": its log's epoch records, "model": model.pth's weights, "last":
    last.pth's}. The resumed run's epoch 0 was trained by the killed process, from scratch as
    the reference's was: equal records there show the training deterministic, and then every
    record and tensor must be equal. Where epoch 0 already differs, a kernel is
    nondeterministic, bit-equality cannot be asked, and HR_TOLERANCE and WEIGHT_TOLERANCE apply.
    """
    expected = {record["epoch"]: record for record in reference["epochs"]}
    got = {record["epoch"]: record for record in resumed["epochs"]}
    if sorted(got) != sorted(expected) or not expected:
        return Result("fail", f"the resumed run logged epochs {sorted(got)}, the uninterrupted "
                              f"one {sorted(expected)}")
    deterministic = all(got[0][key] == expected[0][key] for key in RESUME_COMPARED)
    records_equal = all(got[epoch][key] == expected[epoch][key]
                        for epoch in expected for key in RESUME_COMPARED)
    hr_difference = max(abs(got[epoch]["hr@10"] - expected[epoch]["hr@10"])
                        for epoch in expected)
    unequal, largest, count = [], 0.0, 0
    for part in ("model", "last"):
        for name, tensor in reference[part].items():
            count += 1
            other = resumed[part][name]
            if torch.equal(tensor, other):
                continue
            unequal.append(f"{part} {name}")
            scale = tensor.abs().max().item() or 1.0
            largest = max(largest, (tensor.double() - other.double()).abs().max().item() / scale)
    hrs = ", ".join(f"{got[epoch]['hr@10']:.4f}" for epoch in sorted(got))
    values = {"deterministic": deterministic, "records_equal": records_equal,
              "hr_difference": hr_difference, "unequal_tensors": unequal,
              "largest_relative_difference": largest}
    if deterministic:
        if records_equal and not unequal:
            return Result("pass", f"bit-equal: HR@10 per epoch {hrs} and every loss as "
                                  f"uninterrupted; model.pth and last.pth equal tensor by tensor "
                                  f"({count} tensors)", values)
        differing = (f"{len(unequal)} of {count} tensors differ (first {unequal[0]}, at most "
                     f"{largest:.3g} of its largest value)" if unequal else "tensors equal")
        records = "equal" if records_equal else "differ"
        return Result("fail", f"not equal to the uninterrupted run, though epoch 0 of both "
                              f"matched exactly: logged records {records} (HR@10 by up to "
                              f"{hr_difference:.4f}); {differing}", values)
    passed = hr_difference <= HR_TOLERANCE and largest <= WEIGHT_TOLERANCE
    return Result("pass" if passed else "fail",
                  f"within tolerance, not bit-equal: two fresh runs already differ at epoch 0 "
                  f"(a nondeterministic GPU kernel), so bit-equality cannot be asked; HR@10 per "
                  f"epoch {hrs} differs by at most {hr_difference:.4f} (limit {HR_TOLERANCE}), "
                  f"weights by at most {largest:.3g} of each tensor's largest value (limit "
                  f"{WEIGHT_TOLERANCE})", values)


@dataclass
class Run:
    """What a finished ncf.py run logged: its settings, epoch records and summary, and what
    its probe saw (peak GPU memory, full-ranking seconds)."""
    parameters: dict
    epochs: list
    summary: dict
    probe: dict


def read_run(launched, log_path):
    records = read_log(log_path) if os.path.exists(log_path) else []
    parameters = log_records(records, "parameter")
    summaries = log_records(records, "summary")
    return Run(parameters[-1] if parameters else {}, log_records(records, "epoch"),
               summaries[-1] if summaries else {}, launched.probe())


def training_result(run, launched, what):
    """The row of a training run: pass when it trained EPOCHS epochs to finite losses and an
    HR@10 above chance."""
    if launched.process.returncode:
        return Result("fail", f"{what} failed: {launched.failure()}")
    epochs = run.epochs
    rates = ", ".join(rate(record["train_throughput"]) for record in epochs)
    hrs = ", ".join(f"{record['hr@10']:.4f}" for record in epochs)
    losses = ", ".join(f"{record['train_loss']:.4f}" for record in epochs)
    last = epochs[-1] if epochs else {}
    peak = run.probe.get("peak_memory_bytes")
    figures = (f"{run.parameters.get('precision')}, {len(epochs)} epochs: {rates} samples/s; "
               f"HR@10 {hrs}; loss {losses}; last epoch: train "
               f"{last.get('train_epoch_time', 0):.2f} s, eval "
               f"{last.get('validation_epoch_time', 0):.2f} s"
               + (f"; peak {gib(peak)}" if peak else ""))
    values = {"precision": run.parameters.get("precision"), "epochs": epochs,
              "summary": run.summary, "peak_memory_bytes": peak}
    problems = []
    if len(epochs) != EPOCHS:
        problems.append(f"{len(epochs)} epochs logged, not {EPOCHS}")
    if not all(math.isfinite(record["train_loss"]) for record in epochs):
        problems.append("a loss is not finite")
    if epochs and not last["hr@10"] > CHANCE_HR:
        problems.append(f"HR@10 {last['hr@10']:.4f} is no better than chance ({CHANCE_HR:.3f})")
    if problems:
        return Result("fail", "; ".join(problems) + "; " + figures, values)
    return Result("pass", figures, values)


def compared_rates(ours, theirs):
    return f"ours {rate(ours)} vs {rate(theirs)} samples/s = {ours / theirs:.2f}x"


class Acceptance:
    """The sequence on one machine: a GPU at ml-20m's shape, or the CPU dry run at a tiny one."""

    def __init__(self, dry_run, out_dir, workdir):
        self.dry_run = dry_run
        # The GPU run's deadline counts from the process's start, as the shell's hard stop
        # does; the dry run's from here (tests call main long after importing this module).
        if dry_run:
            self.device, self.shape, self.times = torch.device("cpu"), TINY, DRY_RUN_TIMES
            deadline, start, env = DRY_RUN_DEADLINE, None, {**os.environ, **DRY_RUN_ENV}
        else:
            self.device, self.shape, self.times = torch.device("cuda", 0), ML20M, GPU_TIMES
            torch.cuda.set_device(self.device)
            deadline, start, env = GPU_DEADLINE, STARTED, dict(os.environ)
        self.workdir = workdir
        self.data = os.path.join(workdir, "data")
        self.tools = Tools(workdir, {**env, "PYTHONUNBUFFERED": "1"})
        self.environment = self.describe()
        shape = self.shape
        heading = (f"**gpu_check{' --dry-run-cpu' if dry_run else ''}**: "
                   f"{self.environment['device_name']}; torch {torch.__version__}, CUDA "
                   f"{torch.version.cuda or 'none'}; {self.environment['date']}; {shape.name} "
                   f"shape: {shape.nb_users:,} users, {shape.nb_items:,} items, "
                   f"{shape.nb_positives:,} training positives (generated), batch "
                   f"{shape.batch_size:,}")
        self.steps = self.plan()
        names = [name for step in self.steps for name in (step.name, *step.rows)]
        self.report = Report(out_dir, names, heading, self.environment)
        self.runner = Runner(self.report, Budget(deadline, RESERVE, start=start), self.tools)
        self.runs = {}
        self.known_items = {}
        self.inference = {}

    def describe(self):
        env = {"device": str(self.device), "device_name": device_name(self.device),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                   "%Y-%m-%d %H:%M UTC")}
        if self.device.type == "cuda":
            env["gpus"] = torch.cuda.device_count()
        return env

    def ncf_flags(self, run_dir, *flags):
        shape = self.shape
        return ["--data", self.data, "-e", EPOCHS, "-b", shape.batch_size, "--factors",
                shape.factors, "--layers", *shape.layers, "--checkpoint_dir", run_dir,
                "--log_path", os.path.join(run_dir, "log.json"), *flags]

    def run_dir(self, key):
        return os.path.join(self.workdir, key)

    def model_path(self):
        return os.path.join(self.run_dir("o2"), "model.pth")

    def plan(self):
        """The steps in run order, and the tool runs they take, planned with the Tools."""
        shape, tools, times = self.shape, self.tools, self.times
        device = self.device.type
        model = self.model_path()
        tools.plan("o2", "ncf.py", *self.ncf_flags(self.run_dir("o2")),
                   imports=TRAINING_IMPORTS)
        tools.plan("test", "ncf.py", "--data", self.data, "--mode", "test", "--full_ranking",
                   "--factors", shape.factors, "--layers", *shape.layers,
                   "--load_checkpoint_path", model, "--log_path",
                   os.path.join(self.workdir, "test.json"))
        for key, flags in (("killed", ()), ("resumed", ("--resume",)),
                           ("o0", ("--opt_level", "O0"))):
            run_dir = self.run_dir("resume" if key in ("killed", "resumed") else key)
            tools.plan(key, "ncf.py", *self.ncf_flags(run_dir, *flags), imports=TRAINING_IMPORTS)
        tools.plan("recommend", "recommend.py", "--data", self.data, "--load_checkpoint_path",
                   model, "--users", *RECOMMEND_USERS, "--device", device)
        tools.plan("serve", "serve.py", "--data", self.data, "--load_checkpoint_path", model,
                   "--port", 0, "--device", device)
        tools.plan("torchscript", "export.py", "--data", self.data, "--load_checkpoint_path",
                   model, "--format", "torchscript", "--output",
                   os.path.join(self.workdir, "ncf.pt"))
        onnx_missing = [name for name in ("onnx", "onnxruntime")
                        if importlib.util.find_spec(name) is None]
        if not onnx_missing:
            tools.plan("onnx", "export.py", "--data", self.data, "--load_checkpoint_path",
                       model, "--format", "onnx", "--output",
                       os.path.join(self.workdir, "ncf.onnx"))
        tools.plan("all_users", "recommend.py", "--data", self.data, "--load_checkpoint_path",
                   model, "--all_users", "--output", os.path.join(self.workdir, "all.csv"),
                   "--device", device)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        compile_skip = ("dry run: compiling on a CPU takes about a minute (C++ kernels); "
                        "tests/test_training.py runs --compile" if self.dry_run else "")
        if not compile_skip:
            for key, flags in (("compiled_o2", ()), ("compiled_o0", ("--opt_level", "O0"))):
                tools.plan(key, "ncf.py", *self.ncf_flags(self.run_dir(key), "--compile", *flags),
                           imports=TRAINING_IMPORTS)
        torchrun_skip = ("dry run: no GPUs; tests/test_distributed.py runs torchrun over gloo"
                         if self.dry_run else f"{gpus} GPU visible: NCCL needs two or more"
                         if gpus < 2 else "")
        trained = (TRAIN_O2,)

        def scaled(name, factor, extra=0.0):
            """Expected seconds of the training step `name` from what O2 took on this machine;
            its timing's before O2 has run."""
            def expected(runner):
                took = runner.report.rows[TRAIN_O2].seconds
                return times[name].expected if took is None else took * factor + extra
            return expected

        return [
            Step(ENVIRONMENT, self.environment_step, times[ENVIRONMENT]),
            Step(FORWARD, self.forward_step, times[FORWARD]),
            Step(AMP_STEP, self.amp_step, times[AMP_STEP]),
            Step(TEST_DATA, self.test_data_step, times[TEST_DATA]),
            Step(DATASET, self.dataset_step, times[DATASET]),
            Step(TRAIN_O2, lambda cap: self.train_step("o2", cap), times[TRAIN_O2],
                 needs=(DATASET,), tools=("o2",)),
            Step(TEST_MODE, self.test_mode_step, times[TEST_MODE], needs=trained,
                 rows=(FULL_RANKING,), tools=("test",)),
            Step(EVAL_PARITY, self.eval_parity_step, times[EVAL_PARITY], needs=trained),
            Step(RESUME, self.resume_step, times[RESUME], expected=scaled(RESUME, 1.5),
                 needs=trained, tools=("killed", "resumed")),
            Step(TRAIN_O0, lambda cap: self.train_step("o0", cap), times[TRAIN_O0],
                 expected=scaled(TRAIN_O0, 1.3), needs=(DATASET,), tools=("o0",)),
            Step(INFERENCE, self.inference_step, times[INFERENCE]),
            Step(MEMORY, lambda cap: self.memory_step(), Timing(0, 10),
                 skip="dry run: no GPU memory to measure" if self.dry_run else ""),
            Step(RECOMMEND, self.recommend_step, times[RECOMMEND], needs=trained,
                 tools=("recommend",)),
            Step(SERVE, self.serve_step, times[SERVE], needs=trained, tools=("serve",)),
            Step(TORCHSCRIPT, self.torchscript_step, times[TORCHSCRIPT], needs=trained,
                 tools=("torchscript",)),
            Step(ONNX, lambda cap: self.export_step("onnx", cap), times[ONNX], needs=trained,
                 skip=f"{' and '.join(onnx_missing)} not installed "
                      f"(requirements-optional.txt)" if onnx_missing else "",
                 tools=("onnx",)),
            Step(ALL_USERS, self.all_users_step, times[ALL_USERS], needs=trained,
                 tools=("all_users",)),
            Step(TORCHRUN, lambda cap: self.torchrun_step(gpus, cap), times[TORCHRUN],
                 expected=scaled(TORCHRUN, 1.0), needs=(DATASET,), skip=torchrun_skip),
            Step(COMPILED_O2, lambda cap: self.train_step("compiled_o2", cap),
                 times[COMPILED_O2], expected=scaled(COMPILED_O2, 1.0, 60.0), needs=(DATASET,),
                 skip=compile_skip, tools=("compiled_o2",)),
            Step(COMPILED_O0, lambda cap: self.train_step("compiled_o0", cap),
                 times[COMPILED_O0], expected=scaled(COMPILED_O0, 1.3, 60.0), needs=(DATASET,),
                 skip=compile_skip, tools=("compiled_o0",)),
            Step(VS_A100, lambda cap: self.versus("A100 40GB"), Timing(0, 10)),
            Step(VS_V100, lambda cap: self.versus("V100 16GB"), Timing(0, 10)),
        ]

    def run(self):
        self.report.save()
        self.tools.top_up()
        for step in self.steps:
            self.runner.run(step)
            if self.device.type == "cuda":
                # The tools' processes allocate their own: this one's cache only takes from them.
                torch.cuda.empty_cache()
        return self.report.exit_status()

    # The steps, in run order.

    def environment_step(self, cap):
        env = self.environment
        if self.device.type == "cpu":
            return Result("info", f"dry run on the CPU: {env['device_name']}; torch "
                                  f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}; the "
                                  f"tools run with " + ", ".join(
                                      f"{key}={value!r}" for key, value in DRY_RUN_ENV.items()),
                          env)
        properties = torch.cuda.get_device_properties(self.device)
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                    "--format=csv,noheader"], capture_output=True,
                                   text=True).stdout.split()
        except OSError:
            query = []
        allowed = torch.backends.cuda.matmul.allow_tf32
        overrides = {name: os.environ.get(name, "unset")
                     for name in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE")}
        # ncf.py's O0 allows TF32 unless --no_tf32; whether cuBLAS then uses it is tf32_active's.
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            o0_tf32 = scoring.tf32_active(self.device)
            torch.backends.cuda.matmul.allow_tf32 = False
            forced = scoring.tf32_active(self.device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed
        with contextlib.suppress(AttributeError, RuntimeError):
            # A tuple in torch 2.x, an int in older releases.
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
        env.update(driver=query[0] if query else "?",
                   memory_bytes=properties.total_memory,
                   capability=f"{properties.major}.{properties.minor}",
                   multiprocessors=properties.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(),
                   torch_allow_tf32=allowed, o0_tf32=o0_tf32, no_tf32_refused=forced, **overrides)
        return Result("info", (
            f"{env['device_name']}, {gib(properties.total_memory)}, compute capability "
            f"{env['capability']}, {properties.multi_processor_count} SMs; {env['gpus']} GPU(s) "
            f"visible; driver {env['driver']}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, cuDNN {env['cudnn']}, NCCL {env.get('nccl', '?')}; TF32: "
            f"torch allow_tf32 {allowed} by default, " + ", ".join(
                f"{name}={value}" for name, value in overrides.items())
            + f", so ncf.py O0 runs float32 products in {'TF32' if o0_tf32 else 'IEEE float32'}"
            + (" and --no_tf32 is refused (the override forces TF32)" if forced else "")), env)

    def forward_step(self, cap):
        shape = self.shape
        torch.manual_seed(SEED)
        reference = order_one_embeddings(
            NeuMF(shape.nb_users, shape.nb_items, shape.factors, shape.layers).eval())
        model = copy.deepcopy(reference).to(self.device)
        generator = torch.Generator().manual_seed(SEED)
        users = torch.randint(0, shape.nb_users, (shape.check_ids,), generator=generator)
        items = torch.randint(0, shape.nb_items, (shape.check_ids,), generator=generator)
        differences = compare_forward(reference, model, users, items)
        passed = all(relative <= FORWARD_LIMITS[mode]
                     for mode, (_, relative) in differences.items())
        return Result("pass" if passed else "fail",
                      f"max |{self.device.type} - cpu| / max |logit| over {shape.check_ids:,} "
                      f"pairs: " + ", ".join(
                          f"{mode} {relative:.2g} (limit {FORWARD_LIMITS[mode]:g})"
                          for mode, (_, relative) in differences.items()),
                      {mode: {"max_abs_difference": absolute, "relative_difference": relative}
                       for mode, (absolute, relative) in differences.items()})

    def amp_step(self, cap):
        shape = self.shape
        set_precision("amp")
        ctx = train.Context(self.device, rank=0, world_size=1, is_main=False,
                            autocast_dtype=torch.float16)
        args = recipe(shape, batch_size=shape.check_batch_size)
        model, loss_module = train.build_model(args, shape.nb_users, shape.nb_items, ctx)
        before = [parameter.detach().clone() for parameter in model.parameters()]
        optimizer = train.build_optimizer(args, model)
        scaler = torch.amp.GradScaler(self.device.type)
        positives = positives_for_steps(AMP_CHECK_STEPS, args)
        generator = torch.Generator(device=self.device).manual_seed(SEED)
        users, items = (torch.randint(0, count, (positives,), generator=generator,
                                      device=self.device, dtype=torch.int32)
                        for count in (shape.nb_users, shape.nb_items))
        loss = train.train_epoch(loss_module, optimizer, scaler,
                                 dataloading.Positives.from_pairs(users, items, shape.nb_users),
                                 shape.nb_items, 0, args, ctx)
        after = list(model.parameters())
        updated = all(not torch.equal(old, new) for old, new in zip(before, after))
        finite = all(bool(torch.isfinite(new).all()) for new in after)
        return Result("pass" if math.isfinite(loss) and updated and finite else "fail",
                      f"{AMP_CHECK_STEPS} steps of batch {args.batch_size:,} through "
                      f"train.train_epoch (float16 autocast, GradScaler, fused Adam): mean loss "
                      f"{loss:.4f}, every parameter updated: {updated}, all finite: {finite}, "
                      f"loss scale {scaler.get_scale():g}",
                      {"loss": loss, "updated": updated, "finite": finite})

    def test_data_step(self, cap):
        """create_test_data and positive_ranks give the CPU's results on rows full of repeats
        and ties."""
        generator = torch.Generator().manual_seed(SEED)
        nb_users, nb_items = 4096, 40
        negatives = torch.randint(0, nb_items, (nb_users, TEST_NEGATIVES), generator=generator)
        test = torch.stack((torch.arange(nb_users), torch.randint(0, nb_items, (nb_users,),
                                                                   generator=generator)), dim=1)
        scores = torch.randint(0, 8, (nb_users, TEST_NEGATIVES + 1), generator=generator) / 8.0
        expected = dataloading.create_test_data(test, negatives)
        expected += (evaluation.positive_ranks(scores, expected[1], expected[2]),)
        got = dataloading.create_test_data(test.to(self.device), negatives.to(self.device))
        got += (evaluation.positive_ranks(scores.to(self.device), got[1], got[2]),)
        names = ("users", "items", "duplicate_mask", "ranks")
        differing = [name for name, want, have in zip(names, expected, got)
                     if not torch.equal(want, have.cpu())]
        return Result("fail" if differing else "pass",
                      f"create_test_data + positive_ranks on {nb_users:,} rows of {nb_items} "
                      f"items ({int(expected[2].sum()):,} repeats, scores in 8 levels): "
                      + (f"{', '.join(differing)} differ from the CPU's" if differing
                         else "equal to the CPU's"))

    def dataset_step(self, cap):
        synchronize(self.device)
        start = time.perf_counter()
        train_pairs, test, negatives = generate_dataset(self.shape, self.device)
        synchronize(self.device)
        generated = time.perf_counter() - start
        popular = popularity_hr(train_pairs, test, negatives)
        train_pairs = train_pairs.cpu()
        for user in RECOMMEND_USERS:
            self.known_items[user] = set(train_pairs[train_pairs[:, 0] == user - 1, 1].tolist())
        write_dataset(self.data, train_pairs, test, negatives)
        return Result("pass", f"{len(train_pairs):,} training positives of {len(test):,} users, "
                              f"{TEST_NEGATIVES} test negatives each, generated on "
                              f"{self.device.type} in {generated:.1f} s and written as "
                              f"convert.py writes them; popularity alone: HR@10 {popular:.4f}",
                      {"popularity_hr": popular, "generate_seconds": generated})

    def go(self, key):
        """Run the tool `key` to its end (the step's cap stops it)."""
        launched = self.tools.take(key)
        launched.process.wait()
        return launched

    def train_step(self, key, cap):
        launched = self.go(key)
        run = read_run(launched, os.path.join(self.run_dir(key), "log.json"))
        self.runs[key] = run
        return training_result(run, launched, "ncf.py")

    def test_mode_step(self, cap):
        launched = self.go("test")
        if launched.process.returncode:
            return Result("fail", f"ncf.py --mode test failed: {launched.failure()}")
        run = read_run(launched, os.path.join(self.workdir, "test.json"))
        trained = self.runs["o2"].summary
        hr, best = run.summary.get("hr@10"), trained.get("best_accuracy")
        if hr is None or best is None:
            return Result("fail", f"no HR@10 logged (test {hr}, training's best {best})")
        test = Result("pass" if hr == best else "fail",
                      f"HR@10 {hr:.4f} of model.pth "
                      f"{'equals' if hr == best else 'differs from'} the training's best "
                      f"{best:.4f} (epoch {trained.get('best_epoch')})", {"hr": hr, "best": best})
        seconds = (run.probe.get("full_ranking_seconds") or [None])[0]
        full_hr, full_ndcg = run.summary.get("full_hr@10"), run.summary.get("full_ndcg@10")
        if full_hr is None or seconds is None:
            full = Result("fail", f"no full-ranking figures logged (HR@10 {full_hr}) or timed "
                                  f"({seconds} s)")
        else:
            full = Result("pass", f"full HR@10 {full_hr:.4f}, NDCG@10 {full_ndcg:.4f}: each test "
                                  f"item among all {self.shape.nb_items:,} items its user did "
                                  f"not train on, in {seconds:.2f} s",
                          {"full_hr": full_hr, "seconds": seconds})
        return {TEST_MODE: test, FULL_RANKING: full}

    def eval_parity_step(self, cap):
        """Evaluation under O2's autocast ranks the float32 logits, as without it."""
        splits = dataloading.load_splits(self.data, self.device)
        model = load_model(self.model_path(), self.device).eval()
        args = recipe(self.shape)
        mixed = AUTOCAST_DTYPES[self.device.type]
        ctx = train.Context(self.device, 0, 1, False)
        test = splits.test
        float32_ranks, _ = evaluation.sampled_ranks(model, test.users, test.items,
                                                    test.duplicate_mask, args, ctx)
        with torch.autocast(self.device.type, dtype=mixed):
            mixed_ranks, _ = evaluation.sampled_ranks(model, test.users, test.items,
                                                      test.duplicate_mask, args, ctx)
        # What ranking the low-precision logits themselves would give, for scale.
        low_ranks = torch.empty_like(float32_ranks)
        rows = max(1, args.valid_batch_size // test.items.shape[1])
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=mixed):
            for start in range(0, len(test.users), rows):
                items = test.items[start:start + rows]
                users = test.users[start:start + rows, None].expand_as(items)
                scores = model(users.reshape(-1), items.reshape(-1)).float().view(items.shape)
                low_ranks[start:start + rows] = evaluation.positive_ranks(
                    scores, items, test.duplicate_mask[start:start + rows])
        moved = int((low_ranks != float32_ranks).sum())
        equal = torch.equal(float32_ranks, mixed_ranks)
        name = str(mixed).removeprefix("torch.")
        hr32 = evaluation.hit_rate_and_ndcg(float32_ranks, TOPK)[0]
        low_hr = evaluation.hit_rate_and_ndcg(low_ranks, TOPK)[0]
        return Result("pass" if equal else "fail",
                      f"ranks of all {len(float32_ranks):,} users "
                      f"{'equal' if equal else 'differ'} under {name} autocast and without "
                      f"(HR@10 {hr32:.4f}); ranking {name} logits instead would move "
                      f"{moved:,} users' ranks (HR@10 {low_hr:.4f})",
                      {"equal": equal, "moved_by_low_precision": moved})

    def resume_step(self, cap):
        resume_dir = self.run_dir("resume")
        killed = self.tools.take("killed")
        last = os.path.join(resume_dir, "last.pth")
        while not os.path.exists(last):
            if killed.process.poll() is not None:
                return Result("fail", f"the run to interrupt ended before epoch 1: "
                                      f"{killed.failure()}")
            time.sleep(POLL_SECONDS)
        epoch_line = re.search(r"Epoch 0: .*?train_time = ([\d.]+)", killed.stdout())
        delay = KILL_AT * float(epoch_line.group(1)) if epoch_line else 0.0
        time.sleep(delay)
        killed.signal(signal.SIGKILL)
        killed.process.wait()
        killed_epochs = read_run(killed, os.path.join(resume_dir, "log.json")).epochs
        if [record["epoch"] for record in killed_epochs] != [0]:
            return Result("fail", f"the SIGKILL came {delay:.2f} s after last.pth of epoch 0, "
                                  f"once epochs {[r['epoch'] for r in killed_epochs]} were "
                                  f"logged: not inside epoch 1")
        resumed = self.go("resumed")
        if resumed.process.returncode:
            return Result("fail", f"ncf.py --resume failed: {resumed.failure()}")
        if "Resuming from" not in resumed.stdout():
            return Result("fail", "ncf.py --resume did not resume from last.pth")

        def state(run_dir, epochs):
            return {"epochs": epochs, **{part: model_state(load_checkpoint(path), path)
                                         for part, path in (
                                             ("model", os.path.join(run_dir, "model.pth")),
                                             ("last", os.path.join(run_dir, "last.pth")))}}

        result = compare_resume(
            state(self.run_dir("o2"), self.runs["o2"].epochs),
            state(resume_dir, read_run(resumed, os.path.join(resume_dir, "log.json")).epochs))
        result.figures = (f"killed {delay:.2f} s into epoch 1 (after last.pth of epoch 0); "
                          + result.figures)
        return result

    def inference_step(self, cap):
        """The forward pass alone at the training batch, as the original's inference figures:
        TF32 (where the GPU has it) and float16 autocast."""
        shape = self.shape
        torch.manual_seed(SEED)
        model = NeuMF(shape.nb_users, shape.nb_items, shape.factors, shape.layers).to(self.device)
        parts = []
        for mode, precision in (("tf32", "fp32"), ("amp", "amp")):
            set_precision(mode)
            result = benchmark(model, shape.batch_size, INFERENCE_BATCHES, precision,
                               self.device)
            if mode == "tf32":
                name = "tf32" if scoring.tf32_active(self.device) else "fp32"
            else:
                name = f"{result['dtype']} autocast"
            self.inference[mode] = result["throughput"]
            parts.append(f"{name} {rate(result['throughput'])} samples/s (p99 "
                         f"{result['latency_p99_ms']:.2f} ms)")
        return Result("info", f"batch {shape.batch_size:,}, {INFERENCE_BATCHES} passes each: "
                              + ", ".join(parts), dict(self.inference))

    def memory_step(self):
        peaks = {key: self.runs[key].probe.get("peak_memory_bytes")
                 for key in ("o2", "o0") if key in self.runs}
        peaks = {key: peak for key, peak in peaks.items() if peak}
        if not peaks:
            return Result("skip", "needs ncf.py O2 or O0 with its peak memory")
        total = self.environment.get("memory_bytes", 0)
        fits = max(peaks.values()) <= ORIGINAL_CARD_BYTES
        return Result("pass" if fits else "fail",
                      f"torch.cuda.max_memory_allocated of training at batch "
                      f"{self.shape.batch_size:,} (the whole run, evaluation included): "
                      + ", ".join(f"{key.upper()} {gib(peak)}" for key, peak in peaks.items())
                      + f" of this GPU's {gib(total)}; "
                      + (f"within {gib(ORIGINAL_CARD_BYTES)}, so the original's recipe still "
                         f"fits its A100 40GB" if fits else
                         f"over {gib(ORIGINAL_CARD_BYTES)}: the original's recipe would no "
                         f"longer fit its A100 40GB"),
                      {"peak_memory_bytes": peaks})

    def recommend_step(self, cap):
        launched = self.go("recommend")
        if launched.process.returncode:
            return Result("fail", f"recommend.py failed: {launched.failure()}")
        rows = [line.split() for line in launched.stdout().splitlines()[1:] if line.strip()]
        answers = {}
        for user, rank, item, score, *_ in rows:
            answers.setdefault(int(user), []).append((int(rank), int(item) - 1, float(score)))
        problems = []
        for user in RECOMMEND_USERS:
            answer = answers.get(user, [])
            if [rank for rank, _, _ in answer] != list(range(1, TOPK + 1)):
                problems.append(f"user {user}: ranks {[rank for rank, _, _ in answer]}")
            scores = [score for _, _, score in answer]
            if scores != sorted(scores, reverse=True):
                problems.append(f"user {user}: scores not best first")
            trained = [item for _, item, _ in answer if item in self.known_items[user]]
            if trained:
                problems.append(f"user {user}: recommends trained item {trained[0] + 1}")
        return Result("fail" if problems else "pass",
                      "; ".join(problems) if problems else
                      f"{len(RECOMMEND_USERS)} users x top {TOPK} on {self.device.type}, best "
                      f"first, no item the user trained on (the process's time includes "
                      f"loading the data and model)")

    def serve_step(self, cap):
        start = time.monotonic()
        launched = self.tools.take("serve")
        try:
            while True:
                found = re.search(r"serving on (http://\S+)", launched.stdout())
                if found:
                    break
                if launched.process.poll() is not None:
                    return Result("fail", f"serve.py failed: {launched.failure()}")
                time.sleep(POLL_SECONDS)
            ready = time.monotonic() - start
            url = f"{found.group(1)}/recommend?user={RECOMMEND_USERS[0]}&k={TOPK}"
            latencies = []
            # No proxy, whatever http_proxy says: the server is on this machine.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            for _ in range(2):  # the first request pays for the scorer's first call
                began = time.perf_counter()
                with opener.open(url) as response:
                    answer = json.load(response)
                latencies.append(time.perf_counter() - began)
            launched.process.send_signal(signal.SIGTERM)
            status = launched.process.wait()
        finally:
            launched.stop()
        items = answer.get("items", [])
        passed = (len(items) == TOPK and answer.get("fallback") is None
                  and status == 128 + signal.SIGTERM)
        return Result("pass" if passed else "fail",
                      f"listening after {ready:.1f} s; GET /recommend?user="
                      f"{RECOMMEND_USERS[0]}&k={TOPK}: {len(items)} items, fallback "
                      f"{answer.get('fallback')}, {latencies[-1] * 1e3:.1f} ms (first "
                      f"{latencies[0] * 1e3:.1f} ms); SIGTERM: exit status {status}",
                      {"latencies_ms": [latency * 1e3 for latency in latencies]})

    def export_step(self, kind, cap):
        launched = self.go(kind)
        if launched.process.returncode:
            return Result("fail", f"export.py --format {kind} failed: {launched.failure()}")
        return Result("pass", "export.py loaded its file back and matched the model within "
                              "1e-5 on batches of 1 and 1,000 pairs"
                              + (" (onnxruntime)" if kind == "onnx" else ""))

    def torchscript_step(self, cap):
        result = self.export_step("torchscript", cap)
        if result.status != "pass":
            return result
        set_precision("fp32")
        with warnings.catch_warnings():
            # torch.jit is deprecated for new work; its files are what export.py writes.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(os.path.join(self.workdir, "ncf.pt"),
                                      map_location=self.device)
        model = load_model(self.model_path(), self.device).eval()
        generator = torch.Generator().manual_seed(SEED)
        users = torch.randint(0, self.shape.nb_users, (EXPORT_PAIRS,), generator=generator)
        items = torch.randint(0, self.shape.nb_items, (EXPORT_PAIRS,), generator=generator)
        users, items = users.to(self.device), items.to(self.device)
        with torch.inference_mode():
            expected = model(users, items)
            got = scripted(users, items)
        relative = ((got - expected).abs().max() / expected.abs().max()).item()
        passed = relative <= EXPORT_LIMIT
        return Result("pass" if passed else "fail",
                      f"{result.figures}; loaded on {self.device.type}: max |TorchScript - "
                      f"model| = {relative:.2g} of max |logit| over {EXPORT_PAIRS:,} pairs "
                      f"(limit {EXPORT_LIMIT:g})", {"relative_difference": relative})

    def all_users_step(self, cap):
        launched = self.go("all_users")
        seconds = time.monotonic() - launched.began
        if launched.process.returncode:
            return Result("fail", f"recommend.py --all_users failed: {launched.failure()}")
        with open(os.path.join(self.workdir, "all.csv"), "rb") as handle:
            lines = sum(1 for _ in handle) - 1
        expected = self.shape.nb_users * TOPK
        return Result("pass" if lines == expected else "fail",
                      f"{lines:,} rows (expected {expected:,}) for {self.shape.nb_users:,} "
                      f"users: {self.shape.nb_users / seconds:,.0f} users/s, data and model "
                      f"loading included", {"rows": lines})

    def torchrun_step(self, gpus, cap):
        run_dir = self.run_dir("torchrun")
        # Started at its turn: torchrun starts its workers' interpreters itself. It reads no
        # stdin, so `go` only starts its clock.
        launched = Launched("torchrun", [sys.executable, "-m", "torch.distributed.run",
                                         "--standalone", f"--nproc_per_node={gpus}",
                                         os.path.join(ROOT, "ncf.py"),
                                         *map(str, self.ncf_flags(run_dir))],
                            self.tools.env, self.workdir)
        launched.go()
        try:
            launched.process.wait()
        finally:
            launched.stop()
        run = read_run(launched, os.path.join(run_dir, "log.json"))
        self.runs["torchrun"] = run
        return training_result(run, launched, f"torchrun over {gpus} GPUs")

    def versus(self, card):
        """Our figures beside the original's on `card`, with the memory-bandwidth ratio of this
        GPU to that card: NCF's steps are bandwidth-bound (embedding gathers and scatters)."""
        published = PUBLISHED[card]
        name = self.environment["device_name"]
        known = bandwidth(name) if self.device.type == "cuda" else None
        parts = [(f"{known[0]} {known[1]} GB/s = {known[1] / published.bandwidth:.2f}x the "
                  f"{card}'s {published.bandwidth} GB/s") if known else
                 (f"{name}: memory bandwidth unknown (add it to BANDWIDTHS); the {card} has "
                  f"{published.bandwidth} GB/s")]
        values = {"bandwidth": known[1] if known else None, "card_bandwidth": published.bandwidth}
        for level, theirs, seconds in (("O0", published.o0, published.o0_seconds),
                                       ("O2", published.o2, published.o2_seconds)):
            eager = self.runs.get(level.lower())
            compiled = self.runs.get(f"compiled_{level.lower()}")
            if not (eager and eager.epochs):
                parts.append(f"{level}: not measured")
                continue
            ours = eager.summary.get("best_train_throughput") or max(
                record["train_throughput"] for record in eager.epochs)
            text = f"{level} ({eager.parameters.get('precision')}): {compared_rates(ours, theirs)}"
            if compiled and compiled.epochs:
                best = max(record["train_throughput"] for record in compiled.epochs)
                text += f", compiled {rate(best)} = {best / theirs:.2f}x"
            epoch = min(record["train_epoch_time"] + record["validation_epoch_time"]
                        for record in eager.epochs)
            text += (f"; {ORIGINAL_EPOCHS} epochs at our best epoch's train + eval time "
                     f"{ORIGINAL_EPOCHS * epoch:.0f} s vs their time to train {seconds} s")
            parts.append(text)
            values[level] = {"ours": ours, "theirs": theirs, "epoch_seconds": epoch,
                             "their_seconds": seconds}
        if card == "A100 40GB" and self.inference:
            parts.append("forward passes: " + ", ".join(
                f"{mode} {compared_rates(self.inference[mode], theirs)}"
                for mode, theirs in PUBLISHED_INFERENCE.items() if mode in self.inference))
        if published.hr is not None:
            parts.append(f"their HR@10 {published.hr} is on real ml-20m, ours on generated data: "
                         f"not comparable")
        return Result("info", "; ".join(parts), values)


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="gpu_check.py",
                                description="The acceptance run of NCF on an NVIDIA GPU machine")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="directory for gpu_check.md and gpu_check.json "
                             "(default: $OUT if set, else ./gpu_check_out)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the sequence on the CPU at a tiny shape (tests the script)")
    return parser.parse_args(argv)


def prepare_out(path):
    try:
        make_writable_dir(path)
    except OSError as error:
        raise cli.UserError(f"--out {path}: cannot write there ({error.strerror}); pass --out "
                            f"with a writable directory") from None


def main(argv=None):
    args = parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        problem = cuda_problem(listed_gpus())
        if problem:
            raise cli.UserError(problem)
        print(SKIP_MESSAGE)
        return 0
    prepare_out(args.out)
    workdir = tempfile.mkdtemp(prefix="gpu_check_")
    check = None
    try:
        check = Acceptance(args.dry_run_cpu, args.out, workdir)
        print(f"{check.report.heading}; writing to {args.out}", flush=True)
        status = check.run()
        print()
        print(check.report.markdown(), end="", flush=True)
        if status:
            print("gpu_check.py: some rows FAILED (see the table)", file=sys.stderr)
        return status
    finally:
        if check is not None:
            check.tools.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main)
