"""The defaults that the library, the command line and the web page share, each defined once.

Plain values with no imports, so the command line can name them in its ``--help`` without
loading torch.
"""

DEFAULT_BACKBONE = "efficientnet_lite0"  # works offline (its weights install from the package registry)
DEFAULT_HEAD = "logreg"
MODELS_FOLDER = "models"  # where models are saved when no --out is given
SERVE_HOST = "127.0.0.1"  # this machine only: another address needs --auth
SERVE_PORT = 7860
# model files by kind: a head artifact is any other file (``.joblib``)
FINETUNED_SUFFIXES = (".pt", ".pth")  # `featgender finetune` checkpoints: networks, not head artifacts
EXPORTED_SUFFIX = ".onnx"  # `featgender export`: one ONNX graph, run on onnxruntime


def default_model_path(head: str) -> str:
    """Where ``featgender fit`` saves a head when no ``--out`` is given."""
    return f"{MODELS_FOLDER}/{head}.joblib"
