"""`fit --out-of-core` against the in-memory fit, on the CelebA-sized cache of ``heads_speed.py``.

Each fit runs in a process of its own so that its peak memory (VmHWM, Linux) is its own. Prints
one JSON line per fit: fit seconds, test accuracy, and the peak resident memory after the
imports, after the fit, and after evaluating on the test split (read into memory).

    python benchmarks/out_of_core.py [--rows 162770] [--dim 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from heads_speed import generated_cache  # beside this file


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def fit_once(cache: Path, out_of_core: bool) -> None:
    """The child: one fit, then its evaluation on the test split; one JSON line."""
    from featgender.evaluate import evaluate_model
    from featgender.training import train_head

    imported_mb = peak_mb()
    model, _ = train_head(cache, "logreg", out_of_core=out_of_core, eval_split=None)
    fitted_mb = peak_mb()
    accuracy = evaluate_model(model, cache, split="test")["accuracy"]
    print(
        json.dumps(
            {
                "fit": "out-of-core (SGD, 16,384-row chunks)" if out_of_core else "in memory (lbfgs)",
                "fit_s": model.training["fit_seconds"],
                "test_accuracy": round(accuracy, 4),
                "after_imports_mb": round(imported_mb),
                "fit_peak_mb": round(fitted_mb),
                "evaluation_peak_mb": round(peak_mb()),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=162_770)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-of-core", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fit_once(args.child, args.out_of_core)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "generated.h5"
        generated_cache(cache, args.rows, args.dim)
        for mode in ([], ["--out-of-core"]):
            subprocess.run([sys.executable, __file__, "--child", str(cache), *mode], check=True)


if __name__ == "__main__":
    main()
