"""Running a benchmark's child process (ncf.py, convert.py, a measured variant) so that its
failure is one line, as the project's other errors are."""
import subprocess
import sys

import cli


def failure_reason(finished):
    """Why a finished process failed: its last stderr line (its own one-line error, or a
    traceback's last line), else how it ended."""
    lines = finished.stderr.strip().splitlines()
    if lines:
        return lines[-1]
    if finished.returncode < 0:
        return f"killed by signal {-finished.returncode}"
    return f"exit status {finished.returncode}"


def run_child(what, command, **kwargs):
    """subprocess.run(command, **kwargs), its stderr captured and passed on once it succeeds;
    a failure is a cli.UserError, `WHAT failed: REASON`.

    Captured rather than shown as it comes, so that a failure is that one line and not the
    child's error followed by a restatement of it.
    """
    finished = subprocess.run(command, stderr=subprocess.PIPE, text=True, **kwargs)
    if finished.returncode:
        raise cli.UserError(f"{what} failed: {failure_reason(finished)}")
    sys.stderr.write(finished.stderr)
    return finished
