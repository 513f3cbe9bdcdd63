"""Atomic file writes: a reader sees the old file or the complete new one, never half."""

import contextlib
import os
import tempfile

import numpy as np

from cvae.errors import CvaeError


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Yield a file object in the target's directory; on success fsync and rename over path.

    On any exception the temp file is removed and path is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            # mkstemp makes the file owner-only; give it the mode open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def check_writable(path):
    """path, if a file can be written there (atomically: its directory takes a temp file);
    otherwise a one-line CvaeError saying why, before any work is done."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CvaeError(f"cannot write {path}: it is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise CvaeError(f"cannot write {path}: {directory} {what}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CvaeError(f"cannot write {path}: directory {directory} is not writable")
    return path


def write_bytes_atomic(path, data):
    """Replace path by data atomically; a failure is a one-line CvaeError and leaves the old
    file whole. Returns path."""
    try:
        with atomic_open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise CvaeError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def write_text_atomic(path, text):
    """write_bytes_atomic for text (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_default(value):
    """json.dumps default= for the numpy scalars and arrays callers put in metadata."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")
