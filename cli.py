"""What the command-line tools share: the user-error type and the runner that turns it into one
line and exit status 2, the seeds they take, what they do when stdout's reader goes away, the
memory to plan for and how it is reused."""
import argparse
import contextlib
import ctypes
import inspect
import os
import signal
import sys
import traceback


class UserError(Exception):
    """A problem the user can fix: `run` prints it as `PROG: error: MESSAGE`, exit status 2.

    The message names the flag, file or row at fault and what to do about it.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `PROG: error: PROBLEM; see --help`, exit status 2:
    argparse's usage block above it would bury the problem in a log. --help shows every
    default."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_DefaultsShown, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        # argparse hands out the default list itself: one parse's change would be the next's
        # default.
        for name, value in vars(parsed).items():
            if isinstance(value, list) and value is self.get_default(name):
                setattr(parsed, name, list(value))
        return parsed, extras

    def given(self, argv, names):
        """The flags among `names` (their dests, in that order) that the command line `argv`
        gives: one that has a default cannot be told by its value from the same value given."""
        defaults = {name: self.get_default(name) for name in names}
        self.set_defaults(**dict.fromkeys(names, _NOT_GIVEN))
        try:
            parsed = super().parse_known_args(argv)[0]
        finally:
            self.set_defaults(**defaults)
        return [name for name in names if getattr(parsed, name) is not _NOT_GIVEN]


_NOT_GIVEN = object()


class _DefaultsShown(argparse.HelpFormatter):
    """Help with `(default: VALUE)` after each flag whose help does not say its default
    already, unless the default is off, none or empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def check_seed(parser, seed):
    """Refuse a --seed outside [0, 2^63): one range for every tool, so that a seed one of them
    took the others take too; it fits torch's and numpy's 64-bit seeds, signed or not."""
    if not 0 <= seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2^63), got {seed}")


# The shape flag a model kind has no use for, and the part it would size.
UNUSED_SHAPE_FLAGS = {"gmf": ("--layers", "MLP layers"), "mlp": ("--factors", "MF embeddings")}


def refuse_unused_shape_flag(parser, given, kind):
    """parser.error for a --factors or --layers among `given` (flag names without dashes) to a
    model `kind` without the part it sizes."""
    unused, part = UNUSED_SHAPE_FLAGS.get(kind, (None, None))
    if unused and unused.removeprefix("--") in given:
        parser.error(f"{unused}: --model {kind} has no {part}; drop {unused}")


def discard_stdout():
    """Send the rest of stdout to /dev/null: the reader of its pipe went away (`| head -1`), and
    what is still buffered would otherwise fail again at exit, with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def physical_memory():
    """Bytes of RAM the machine has: the most any one allocation could ever get."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory():
    """Bytes the system can still give this process (Linux's MemAvailable); None elsewhere."""
    return proc_field_bytes("/proc/meminfo", "MemAvailable")


def proc_field_bytes(path, key):
    """The `key:` line of a Linux /proc file given in kB (/proc/meminfo, /proc/PID/status), in
    bytes; None where the file cannot be read (another system, a process gone) or lacks it."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_cpu_out_of_memory(error):
    """Whether a RuntimeError is the CPU allocator failing: torch gives that failure no type of
    its own (CUDA's is torch.OutOfMemoryError), only this text."""
    return "can't allocate memory" in str(error)


# mallopt's parameter numbers (glibc's malloc.h): the most blocks served by mmap, the size from
# which a block gets pages of its own (handed back to the system when it is freed), and the free
# memory at the top of the heap above which free() returns it to the system.
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
# Free memory the heap keeps at its top: more than a CPU training piece's activations (about
# 0.4 GB), so the next piece finds them; beyond it, memory goes back to the system.
KEPT_FREE_BYTES = 2 ** 30
# The size from which return_freed_memory gives blocks pages of their own.
OWN_PAGES_BYTES = 2 ** 20


def _mallopt(*settings):
    """glibc's mallopt(parameter, value) for each pair in turn; True where each took, False
    where there is no mallopt (another C library), which changes nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def reuse_freed_memory():
    """Have the C allocator keep freed memory for the next tensor instead of returning it to the
    system; True where it could (glibc), False elsewhere, which changes nothing else.

    glibc serves every block over 32 MB with fresh pages from the kernel and hands them back
    when freed, so a CPU training step paid a page fault and the kernel's zero-fill for every
    4 KiB of its activations, then again for the next piece: at the ml-20m shape that was a
    third of a float32 step and half of a bfloat16 one (bench/train_bench.py). Served from
    malloc's heap, the next piece reuses the same memory. The heap must also keep free memory
    at its top: with the mmap setting fixed, glibc no longer raises its trim threshold (128
    KiB) on its own, and a block freed at the top would go back to the kernel each time (the
    float32 scorer lost a third of its speed to that).
    """
    return _mallopt((_M_TRIM_THRESHOLD, KEPT_FREE_BYTES), (_M_MMAP_MAX, 0))


def return_freed_memory():
    """Have the C allocator hand every block of OWN_PAGES_BYTES or more back to the system when
    it is freed, convert.py's choice; True where it could (glibc), False elsewhere.

    glibc raises that threshold on its own to the size of each such block freed, up to 32 MB,
    and serves smaller blocks from its heap after that. Reading and the steps that go a piece
    at a time keep some pieces and free others; kept ones interleaved with freed ones pin the
    heap, which cannot shrink past them: 0.6 GB more at the peak of 100 M ratings. A fixed
    threshold stops the raising (its cost: fresh pages, zero-filled, for each piece).
    """
    return _mallopt((_M_MMAP_THRESHOLD, OWN_PAGES_BYTES))


def world_size():
    """Processes in this run, as torchrun (or the legacy launcher) announces it; 1 without."""
    return int(os.environ.get("WORLD_SIZE", 1))


def run(main, argv=None):
    """Run a tool's `main(argv)` as the process and leave with its exit status.

    A UserError is one stderr line and status 2; a reader of stdout that went away (`| head`)
    ends the tool quietly with 0; Ctrl-C is one line and 130, SIGTERM one line and 143 (both
    unwind, so a failed run still removes what it created). Under torchrun every line starts
    with the process's rank, and a process of several leaves by os._exit (see
    `_leave_without_finalizing`).
    """
    prog = os.path.basename(inspect.getfile(main))
    several = world_size() > 1
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if several else ""

    def say(message):
        print(f"{prefix}{prog}: {message}", file=sys.stderr, flush=True)

    try:
        with _sigterm_as_exit(lambda: say("terminated (SIGTERM)")):
            returned = main(argv)
        # A tool may return its exit status; anything else it returns is for its callers.
        status = returned if type(returned) is int else 0
    except SystemExit as leaving:
        status = 0 if leaving.code is None else leaving.code
    except UserError as error:
        say(f"error: {error}")
        status = 2
    except BrokenPipeError:
        discard_stdout()
        status = 0
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C)")
        status = 130
    except BaseException:
        # An error no one-line message covers: its traceback, then the same exit as the others.
        if not several:
            raise
        traceback.print_exc()
        status = 1
    if several:
        _leave_without_finalizing(status)
    sys.exit(status)


@contextlib.contextmanager
def _sigterm_as_exit(announce):
    """SIGTERM (`kill`, `docker stop`, torchrun stopping the other workers) unwinds like Ctrl-C:
    one line, then SystemExit(143) from wherever the main thread is, through its cleanups."""
    def stop(signum, frame):
        announce()
        raise SystemExit(128 + signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals to whoever runs this one
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _leave_without_finalizing(status):
    """Exit a process of a multi-process run before Python finalizes.

    A gloo worker thread lets go of a finished collective's tensors only after the caller
    has returned, and letting go of a tensor Python knows takes the GIL. A worker that asks
    for it while the interpreter finalizes is ended mid-C++, which aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded.
    destroy_process_group() leaves those threads running and nothing public joins them.
    Nothing is lost: files are written atomically and the log is closed after every record.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
