"""Files: atomic writes (caches, chunks and models are replaced whole or not at all), one
writer at a time per cache, and the sha256 that identifies weights and model files.

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
refuses the second one, and only while the first one's process lives.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featgender.errors import FeatgenderError

try:  # POSIX only
    import fcntl
    import resource
except ImportError:
    fcntl = resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# write() failures that mean "no room": a full disk, a quota, a file-size limit (ulimit -f)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_write(target: str | os.PathLike, *, size: int | None = None, kind: str | None = None) -> Iterator[Path]:
    """Yield the temporary path to write ``target``'s new content to; on success it replaces
    ``target``. On any error the temporary file is removed and ``target`` is untouched; running
    out of disk space becomes a one-line :class:`FeatgenderError` naming ``target``. ``size``:
    the bytes the content will take at most, refused before anything is written when there is
    no room for them. ``kind``: what the content is, so that a file of another kind is not
    replaced (:func:`check_writable`, which also makes ``target``'s folder)."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    check_writable(target, kind)
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


# The first bytes of what featgender writes, and what a file that starts so holds (torch's
# legacy files are pickles too: both are told apart from caches and zip checkpoints).
CACHE, CHECKPOINT, HEAD_MODEL = "a feature cache (HDF5)", "a torch file", "a pickle (a joblib head model)"
KIND_MAGIC = {CACHE: b"\x89HDF\r\n\x1a\n", CHECKPOINT: b"PK\x03\x04", HEAD_MODEL: b"\x80"}


def file_kind(path: str | os.PathLike) -> str | None:
    """Which of :data:`KIND_MAGIC`'s kinds ``path`` holds, by its first bytes; None if none or unreadable."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
    except OSError:
        return None
    return next((kind for kind, magic in KIND_MAGIC.items() if start.startswith(magic)), None)


def check_writable(target: str | os.PathLike, kind: str | None = None) -> None:
    """Refuse, in one line naming ``target``, a path no file can be written to (a folder, a
    read-only place), or one holding a file of another ``kind`` than the one to write there (a
    cache is not replaced by a model), before the work whose result goes there. The probe is
    a file of its own name, made and removed: another writer's ``.tmp`` is left alone."""
    target = Path(target)
    if target.is_dir():
        raise FeatgenderError(f"{target}: is a folder; name the file to write")
    found = file_kind(target) if kind is not None else None
    if found is not None and found != kind:
        raise FeatgenderError(f"{target}: holds {found}, which {kind} would replace; write it elsewhere")
    _probe(target.parent, str(target))


def check_writable_folder(folder: str | os.PathLike, option: str) -> None:
    """:func:`check_writable` for the folder a report goes to, given as ``option``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FeatgenderError(f"{option} {folder}: is a file; name a folder")
    _probe(folder, f"{option} {folder}")


def _probe(folder: Path, name: str) -> None:
    """Make ``folder`` and a file of its own name in it, then remove the file; ``name`` is what
    the error calls the place."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".probe"):
            pass
    except OSError as error:
        raise FeatgenderError(f"{name}: cannot be written ({error.strerror})") from None


def _no_room_error(target: Path, why: str) -> FeatgenderError:
    return FeatgenderError(
        f"{target}: no space left to write it ({why}); "
        "nothing already written was changed: free some space and run again"
    )


def _check_room(target: Path, size: int) -> None:
    free = shutil.disk_usage(target.parent).free
    if size > free:
        raise _no_room_error(target, f"needs about {size / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    if limit is not None and limit != resource.RLIM_INFINITY and size > limit:
        raise _no_room_error(
            target, f"needs about {size / 2**20:,.1f} MiB, the file size limit (ulimit -f) is {limit / 2**20:,.1f} MiB"
        )


def _no_room(error: BaseException) -> int | None:
    """The errno of a failed write for want of space, or None. HDF5 reports its write errors
    in the message (as RuntimeError when they surface while closing the file)."""
    if isinstance(error, OSError) and error.errno in NO_ROOM:
        return error.errno
    found = re.search(r"errno = (\d+)", str(error)) if isinstance(error, (OSError, RuntimeError)) else None
    return int(found.group(1)) if found and int(found.group(1)) in NO_ROOM else None


@contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Be the only writer of ``target`` for the block, by a lock on ``<target>.lock``; a second
    writer, in another process or a thread of this one, is refused with a one-line
    :class:`FeatgenderError` naming the holder.

    The lock is a POSIX record lock (``lockf``), which belongs to the process that took it:
    unlike an flock, the loader workers it forks do not inherit it, so a writer killed with
    ``kill -9`` frees the cache at once even while its workers linger. The kernel frees the
    lock of a dead process, so a stale ``.lock`` file never blocks a rerun. Where the file
    system has no locks (Lustre mounted without them), this warns and goes on.
    """
    if fcntl is None:  # no locks on this platform
        yield
        return
    lock = Path(target).with_name(Path(target).name + ".lock")
    key = os.path.realpath(lock)
    with _HELD_GUARD:  # record locks do not exclude the threads of one process: this set does
        if key in _HELD:
            raise _busy_error(target, f"{socket.gethostname()} pid {os.getpid()}")
        _HELD.add(key)
    try:
        with _locked(lock, target):
            yield
    finally:
        with _HELD_GUARD:
            _HELD.discard(key)


_HELD: set[str] = set()  # lock files held by this process
_HELD_GUARD = threading.Lock()


def _busy_error(target: str | os.PathLike, holder: str) -> FeatgenderError:
    return FeatgenderError(
        f"{target}: {holder} is writing it; wait for it to end, or stop it and run again (it resumes)"
    )


@contextmanager
def _locked(lock: Path, target: str | os.PathLike) -> Iterator[None]:
    """Hold the record lock on ``lock``, its file naming this host and process."""
    while True:
        handle = open(lock, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                logger.warning(
                    "%s: no lock on this file system (%s); make sure one job writes it at a time", lock, error.strerror
                )
                break
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise _busy_error(target, holder) from None
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
        handle.close()  # closing frees the lock


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["NO_ROOM", "atomic_write", "exclusive", "file_sha256"]
