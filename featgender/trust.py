"""Which model files this machine wrote: loading a pickle from elsewhere takes ``--trusted``.

A head artifact is a joblib pickle, and unpickling runs code. Every artifact featgender saves
has its sha256 recorded in ``$FEATGENDER_HOME/trusted-models.txt`` (default
``~/.cache/featgender``); :func:`featgender.heads.load_model` opens only files whose sha256
is listed there, unless told the file is trusted. The check happens before unpickling.
"""

from __future__ import annotations

import os
from pathlib import Path

from featgender.files import file_sha256


def trust_list() -> Path:
    """The file of sha256s (one ``<sha256> <path>`` line per artifact written here)."""
    home = os.environ.get("FEATGENDER_HOME") or Path.home() / ".cache" / "featgender"
    return Path(home) / "trusted-models.txt"


def record(path: str | Path) -> str:
    """Add an artifact we just wrote to the trust list; returns its sha256."""
    digest = file_sha256(Path(path))
    listing = trust_list()
    listing.parent.mkdir(parents=True, exist_ok=True)
    with open(listing, "a") as handle:
        handle.write(f"{digest} {Path(path).resolve()}\n")
    return digest


def is_trusted(digest: str) -> bool:
    """Whether an artifact with this sha256 was written by featgender on this machine."""
    listing = trust_list()
    return listing.is_file() and any(line.split(" ", 1)[0] == digest for line in listing.read_text().splitlines())
