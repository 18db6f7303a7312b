"""Extractions in another process that stop where a test says, so that tests wait for what the
code under test did (a file it wrote), never for "it should still be running by now".

``holding_code(folder, after_chunks)`` is Python to run before an extraction in a subprocess:
once a chunk is written and at least ``after_chunks`` chunks are on disk (every chunk when 0),
the writer says so with the file ``held-<chunks on disk>`` in ``folder`` and waits for
``go-<same number>`` there. A held extraction is fully alive: its loader workers run, it holds
its cache's lock, and the chunks before are on disk. :func:`wait_until_held` waits for that
file; :func:`release` lets the extraction go on.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

HOLD_TIMEOUT_S = 600  # a bound for a hung run, never a guess of how fast a machine is


def holding_code(folder: Path, after_chunks: int = 0) -> str:
    return f"""
import pathlib, time
from featgender.cache import CacheWriter
_write_chunk = CacheWriter._write_chunk
def _write_chunk_then_hold(self, *args):
    _write_chunk(self, *args)
    done = len(self.partial.chunk_starts())
    if done >= {after_chunks}:
        folder = pathlib.Path({str(folder)!r})
        (folder / f"held-{{done}}").touch()
        while not (folder / f"go-{{done}}").exists():
            time.sleep(0.005)
CacheWriter._write_chunk = _write_chunk_then_hold
"""


def wait_until_held(process: subprocess.Popen, folder: Path, chunks: int) -> None:
    """Wait until ``process`` holds with ``chunks`` chunks on disk; fails with its error output
    if it ends first."""
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not (folder / f"held-{chunks}").exists():
        if process.poll() is not None:
            error = process.stderr.read() if process.stderr else ""
            raise AssertionError(
                f"the extraction ended (status {process.returncode}) before it held after "
                f"{chunks} chunks: {error[-2000:]}"
            )
        assert time.monotonic() < deadline, f"no hold after {chunks} chunks within {HOLD_TIMEOUT_S} s"
        time.sleep(0.005)


def release(folder: Path, chunks: int) -> None:
    """Let the extraction held after ``chunks`` chunks go on."""
    (folder / f"go-{chunks}").touch()
