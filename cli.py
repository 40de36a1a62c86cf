"""What the command-line tools share: the project's one-line errors, the seeds they take, what
they do when stdout's reader goes away, the memory to plan for and how it is reused, the exit
of a multi-process run."""
import argparse
import copy
import ctypes
import os
import sys
import traceback


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `PROG: error: PROBLEM; see --help`, exit status 2:
    argparse's usage block above it would bury the problem in a log."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def check_seed(parser, seed):
    """Refuse a --seed outside [0, 2^63): one range for every tool, so that a seed one of them
    took the others take too; it fits torch's and numpy's 64-bit seeds, signed or not."""
    if not 0 <= seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2^63), got {seed}")


# The shape flag a model kind has no use for, and the part it would size.
UNUSED_SHAPE_FLAGS = {"gmf": ("--layers", "MLP layers"), "mlp": ("--factors", "MF embeddings")}


def refuse_unused_shape_flag(parser, args, kind):
    """parser.error for a --factors or --layers given (not None) to a model `kind` without the
    part it sizes; call before fill_defaults."""
    unused, part = UNUSED_SHAPE_FLAGS.get(kind, (None, None))
    if unused and getattr(args, unused.removeprefix("--")) is not None:
        parser.error(f"{unused}: --model {kind} has no {part}; drop {unused}")


def fill_defaults(args, defaults):
    """Give each flag of `defaults` (name: value) that was not given its default. Such flags are
    declared without one, so that the checks run before this can tell a flag given from one
    left out, and refuse one the run has no use for."""
    for name, default in defaults.items():
        if getattr(args, name) is None:
            # a copy: a list default changed by one run would be another run's default
            setattr(args, name, copy.copy(default))


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
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_cpu_out_of_memory(error):
    """Whether a RuntimeError is the CPU allocator failing: torch gives that failure no type of
    its own (CUDA's is torch.OutOfMemoryError), only this text."""
    return "can't allocate memory" in str(error)


# mallopt's parameter numbers (glibc's malloc.h): the most blocks served by mmap, and the free
# memory at the top of the heap above which free() returns it to the system.
_M_MMAP_MAX = -4
_M_TRIM_THRESHOLD = -1
# Free memory the heap keeps at its top: more than a CPU training piece's activations (about
# 0.4 GB), so the next piece finds them; beyond it, memory goes back to the system.
KEPT_FREE_BYTES = 2 ** 30


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
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES) == 1 and mallopt(_M_MMAP_MAX, 0) == 1


def world_size():
    """Processes in this run, as torchrun (or the legacy launcher) announces it; 1 without."""
    return int(os.environ.get("WORLD_SIZE", 1))


def run_as_process(main):
    """Run `main()` as the process; one of several under torchrun leaves without finalizing
    Python.

    A gloo worker thread lets go of a finished collective's tensors only after the caller
    has returned, and letting go of a tensor Python knows takes the GIL. A worker that asks
    for it while the interpreter finalizes is ended mid-C++, which aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded.
    destroy_process_group() leaves those threads running and nothing public joins them, so a
    multi-process run flushes its output and exits before finalization instead. Nothing is
    lost: files are written atomically and the log is closed after every record.
    """
    several = world_size() > 1
    try:
        main()
        status = 0
    except SystemExit as leaving:
        status = 0 if leaving.code is None else leaving.code
    except BaseException as error:
        # An error no one-line message covers: its traceback, then the same exit as the others.
        if not several:
            raise
        traceback.print_exc()
        status = 130 if isinstance(error, KeyboardInterrupt) else 1
    if several:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
