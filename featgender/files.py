"""Atomic file writes (caches, chunks and models are replaced whole or not at all), and one
writer at a time per cache.

Every file featgender writes goes through :func:`atomic_write`: the content is written to
``<target>.tmp``, flushed to disk, then renamed over ``target`` (atomic on POSIX file
systems). A kill leaves at most a stale ``.tmp`` that the next write overwrites; a full disk
removes the ``.tmp`` and leaves ``target`` as it was.

HDF5 files are the exception that needs a check first: HDF5 cannot recover from a write that
fails for want of space (the file can then never be closed, and h5py crashes the process when
it tries again: h5py issues #914 and #2160), so the HDF5 writers give the size they will need
and are refused up front when the disk, or ``ulimit -f``, has no room for it.

Two extractions writing the same cache at once (a job launched twice, a requeued job whose
first run still runs) would write the same temporary files over each other: :func:`exclusive`
refuses the second one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from featgender.errors import FeatgenderError

try:  # POSIX only
    import fcntl
    import resource
except ImportError:
    fcntl = resource = None

logger = logging.getLogger(__name__)

# write() failures that mean "no room": a full disk, a quota, a file-size limit (ulimit -f)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_write(target: str | os.PathLike, *, size: int | None = None) -> Iterator[Path]:
    """Yield the temporary path to write ``target``'s new content to; on success it replaces
    ``target``. On any error the temporary file is removed and ``target`` is untouched; running
    out of disk space becomes a one-line :class:`FeatgenderError` naming ``target``. ``size``:
    the bytes the content will take at most, refused before anything is written when there is
    no room for them."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    if size is not None:
        _check_room(target, size)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        code = _no_room(error)
        if code:
            raise _no_room_error(target, os.strerror(code)) from None
        raise


def _no_room_error(target: Path, why: str) -> FeatgenderError:
    return FeatgenderError(f"{target}: no space left to write it ({why}); "
                           "nothing already written was changed: free some space and run again")


def _check_room(target: Path, size: int) -> None:
    free = shutil.disk_usage(target.parent).free
    if size > free:
        raise _no_room_error(target, f"needs about {size / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    if limit is not None and limit != resource.RLIM_INFINITY and size > limit:
        raise _no_room_error(target, f"needs about {size / 2**20:,.1f} MiB, the file size limit "
                                     f"(ulimit -f) is {limit / 2**20:,.1f} MiB")


def _no_room(error: BaseException) -> int | None:
    """The errno of a failed write for want of space, or None. HDF5 reports its write errors
    in the message (as RuntimeError when they surface while closing the file)."""
    if isinstance(error, OSError) and error.errno in NO_ROOM:
        return error.errno
    found = re.search(r"errno = (\d+)", str(error)) if isinstance(error, (OSError, RuntimeError)) else None
    return int(found.group(1)) if found and int(found.group(1)) in NO_ROOM else None


@contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Be the only writer of ``target`` for the block, by an flock on ``<target>.lock``; a
    second writer is refused with a one-line :class:`FeatgenderError` naming the holder. The
    kernel frees the lock of a killed process, so a stale ``.lock`` file never blocks a rerun.
    Where the file system has no flock (Lustre mounted without it), this warns and goes on."""
    if fcntl is None:  # no flock on this platform
        yield
        return
    lock = Path(target).with_name(Path(target).name + ".lock")
    while True:
        handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FeatgenderError(f"{target}: {holder} is writing it; wait for it to end, "
                                  "or stop it and run again (it resumes)") from None
        except OSError as error:
            logger.warning("%s: no lock on this file system (%s); make sure one job writes it at a time",
                           lock, error.strerror)
            break
        try:  # the file locked must still be the one at that path (a finishing holder unlinks it)
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


__all__ = ["NO_ROOM", "atomic_write", "exclusive"]
