"""The defaults that the library, the command line and the web page share, each defined once.

Plain values (and the core count they start from) with no imports beyond the standard
library, so the command line can name them in its ``--help`` without loading torch.
"""

import os

DEFAULT_BACKBONE = "efficientnet_lite0"  # works offline (its weights install from the package registry)
DEFAULT_HEAD = "logreg"
MODELS_FOLDER = "models"  # where models are saved when no --out is given
SERVE_HOST = "127.0.0.1"  # this machine only: another address needs --auth
SERVE_PORT = 7860
# model files by kind: a head artifact is any other file (``.joblib``)
FINETUNED_SUFFIXES = (".pt", ".pth")  # `featgender finetune` checkpoints: networks, not head artifacts
EXPORTED_SUFFIX = ".onnx"  # `featgender export`: one ONNX graph, run on onnxruntime


def cores() -> int:
    """The CPU cores this process may run on: what worker and thread counts default to."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_model_path(head: str) -> str:
    """Where ``featgender fit`` saves a head when no ``--out`` is given."""
    return f"{MODELS_FOLDER}/{head}.joblib"
