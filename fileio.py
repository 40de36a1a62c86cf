"""Writing files so that no reader ever sees a half-written one."""
import contextlib
import os


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary name beside `path`; renamed onto `path` when the block completes,
    removed when it fails (a killed process leaves only a dot-file, never a partial `path`).

    The name is our own rather than mkstemp's, whose files are private (0600) whatever the umask.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def make_writable_dir(path):
    """Create `path` if needed and prove a file can be written there; raises OSError if not.

    Checked at start so a run fails in its first second, not after its first epoch.
    """
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    open(probe, "w").close()
    os.remove(probe)
