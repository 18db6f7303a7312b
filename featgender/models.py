"""Any saved model opened for images, by its file: a head artifact (``.joblib``, run in torch),
a fine-tuned network (``.pt``, torch) or an exported ONNX graph (``.onnx``, onnxruntime).

Torch is imported only for the first two: ``featgender.load("model.onnx")`` works on an
install without it (``pip install 'featgender[onnx]'``).
"""

from __future__ import annotations

from pathlib import Path

from featgender.defaults import EXPORTED_SUFFIX, FINETUNED_SUFFIXES
from featgender.predictor import ImagePredictor


def load(path: str | Path, *, trusted: bool = False, **options) -> ImagePredictor:
    """A saved model ready for images: ``featgender.load(path).predict(images)``.

    ``options``: device, batch_size, workers, face_box (see :class:`ImagePredictor`). Loading
    a head artifact runs a pickle: only artifacts written by featgender on this machine open,
    unless ``trusted`` (see :func:`featgender.heads.load_model`); fine-tuned checkpoints load
    with ``weights_only=True``; an ONNX graph is data, and needs no trust.
    """
    suffix = Path(path).suffix
    if suffix == EXPORTED_SUFFIX:
        from featgender.runtime import OnnxPredictor

        return OnnxPredictor(path, **options)
    if suffix in FINETUNED_SUFFIXES:
        from featgender.predict import FinetunedPredictor

        return FinetunedPredictor(path, **options)
    from featgender.heads import load_model
    from featgender.predict import Predictor

    return Predictor(load_model(path, trusted=trusted), **options)
