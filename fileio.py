"""Writing files so that no reader ever sees a half-written one, even after a power loss."""
import contextlib
import errno
import fcntl
import glob
import os
import stat

import cli

LOCK_NAME = ".lock"


class DirectoryLocked(cli.UserError):
    """Another live process holds the directory's lock; `holder` is its pid as it wrote it."""

    def __init__(self, directory, holder):
        super().__init__(f"{directory}: in use by another process (pid {holder or 'unknown'})")
        self.directory = directory
        self.holder = holder


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary name beside `path`; renamed onto `path` when the block completes,
    removed when it fails (a killed process leaves only a dot-file, never a partial `path`)."""
    with staged_output(path) as temporary:
        yield temporary
    try:
        os.replace(temporary, path)
        # With the file's own fsync (staged_output): without the two, a power loss after the
        # rename can leave `path` empty, for the rename may reach the disk before the data, and
        # the rename itself may be lost.
        fsync_path(os.path.dirname(os.path.abspath(path)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


@contextlib.contextmanager
def staged_output(path):
    """Yields a temporary name beside `path`, flushed to the disk when the block completes and
    left for the caller to rename onto `path` (os.replace), as atomic_output does; removed when
    the block fails. Several files staged first and renamed after are all or nothing.

    The name is our own rather than mkstemp's, whose files are private (0600) whatever the umask,
    and it carries the pid, so the leftovers of a killed writer are recognised and removed by
    the next writer of the same file.
    """
    check_replaceable(path)
    directory, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(directory, name)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        yield temporary
        fsync_path(temporary)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


NOT_REGULAR = "exists and is not a regular file (a device, pipe or link)"


def check_replaceable(path):
    """Raise OSError (strerror NOT_REGULAR) when `path` exists as a device, pipe or link.

    A rename onto one replaces the thing itself rather than writing through it: as root,
    `--output /dev/null` would leave a file where the device was. A directory is left to the
    caller's own message.
    """
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise OSError(errno.EEXIST, NOT_REGULAR, path)


def fsync_path(path):
    """Flush a file's or a directory's contents to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(directory, name):
    """Remove atomic_output's temporaries of `directory/name` whose writer no longer exists."""
    pattern = os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")
    for temporary in glob.glob(pattern):
        pid = temporary[:-len(".tmp")].rsplit(".", 1)[1]
        if pid.isdigit() and not process_exists(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def lock_directory(directory):
    """An open file holding an exclusive lock on `directory` until it is closed or the process
    ends (the kernel drops the lock of a dead process, so no stale lock is ever left);
    raises DirectoryLocked when another process holds it.

    The holder's pid is written into the lock file so that the refused process can name it.
    """
    path = os.path.join(directory, LOCK_NAME)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise DirectoryLocked(directory, holder) from None
        # The holder before may have removed the file (held_directory) between our open and
        # our lock: a lock on a file no longer in the directory keeps no one else out.
        if is_open_file_at(handle, path):
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def is_open_file_at(handle, path):
    """Whether the file `handle` has open is still the one that `path` names."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def make_writable_dir(path):
    """Create `path` if needed and prove a file can be written there; raises OSError if not.
    Returns the directories it created, deepest first.

    Checked at start so a run fails in its first second, not after its first epoch.
    """
    created = []
    missing = os.path.abspath(path)
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    with removed_if_failed(created):
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    return created


@contextlib.contextmanager
def removed_if_failed(created):
    """Directories make_writable_dir created are removed again, those still empty, when the
    block fails: a refused input leaves no trace of the output it would have written."""
    try:
        yield
    except BaseException:
        for directory in created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


@contextlib.contextmanager
def held_directory(path):
    """`path` locked for the block (lock_directory), after make_writable_dir; raises what those
    raise. When the block fails, the directories created here are removed again if nothing but
    the lock was put in them: a run refused at its start leaves no trace of its output.
    """
    created = make_writable_dir(path)
    with removed_if_failed(created):
        try:
            handle = lock_directory(path)
        except OSError:
            # An empty file fits on a full disk, its pid does not: the file would keep the new
            # directory from being removed.
            if created:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(path, LOCK_NAME))
            raise
        try:
            yield
        except BaseException:
            if created:
                remove_lone_lock(path)
            raise
        finally:
            handle.close()


def remove_lone_lock(directory):
    """Remove the lock file of `directory`, held by the caller, when it is all there is.

    Removed while still held, so no one can be holding it then: a process that opened it
    meanwhile finds it gone once it has the lock, and takes a new one (lock_directory).
    """
    with contextlib.suppress(OSError):
        if os.listdir(directory) == [LOCK_NAME]:
            os.remove(os.path.join(directory, LOCK_NAME))
