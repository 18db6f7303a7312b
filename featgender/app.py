"""A web page over a saved model (Gradio, extra ``app``): ``featgender serve``, or :func:`build`
to mount the page in an app of your own.

A photo goes in (upload, webcam, paste); it comes back with every face found boxed and
labelled with P(male), and a table of the faces. The decision threshold is a slider;
faces whose P(male) is within :data:`UNCERTAIN_BAND` of it are called 'uncertain'. A batch
tab takes many images or a zip and returns the CSV that ``featgender predict --csv`` writes.
A model card shows what the artifact records of itself, under a responsible-use note.

Faces are personal data: an upload is deleted as soon as it is read, results are drawn
into the page (no files), and Gradio's own temporary files live in a folder of ours that
:func:`serve` removes at exit. The page needs no network: no CDN fonts or scripts.
"""

from __future__ import annotations

import atexit
import base64
import html
import io
import logging
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

from featgender.data import IMAGE_SUFFIXES
from featgender.defaults import SERVE_HOST, SERVE_PORT
from featgender.errors import FeatgenderError
from featgender.faces.route import NO_FACE
from featgender.images import decode_image
from featgender.models import load
from featgender.predictor import Prediction, write_predictions_csv

logger = logging.getLogger(__name__)

UNCERTAIN_BAND = 0.1
MAX_UPLOAD = "25mb"
MAX_ZIP_IMAGES = 2000
QUEUE_SIZE = 16
RECENT_UPLOADS = QUEUE_SIZE  # bytes kept in memory for requests still queued with the same photo
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RESPONSIBLE_USE = (
    "**Responsible use.** The labels this model learned are the binary *perceived gender* "
    "annotations of CelebA / UTKFace, given by other people looking at a photo. The model says "
    "nothing about anyone's gender identity, and must not be used to make decisions about people. "
    "Uploaded photos are not kept."
)
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # local fonts: no CDN request, the page works offline
COLOURS = {"male": "#1f6fb4", "female": "#c2185b", "uncertain": "#6b7280"}


def call(probability: float, threshold: float, band: float = UNCERTAIN_BAND) -> str:
    """'male', 'female', or 'uncertain' within ``band`` of ``threshold``."""
    if abs(probability - threshold) < band:
        return "uncertain"
    return "male" if probability >= threshold else "female"


def model_card(predictor) -> str:
    """Markdown of what a loaded model records of itself: backbone, weights, head, training
    data, test metrics with 95% CIs, per-group accuracy gaps, library versions."""
    if hasattr(predictor, "checkpoint"):  # a fine-tuned network
        saved = predictor.checkpoint
        lines = [
            f"**Fine-tuned network** on `{saved['backbone']}` (weights {saved['config']['weights']}), "
            f"trainable blocks {', '.join(saved.get('trainable_blocks', [])) or 'head only'}, "
            f"best epoch {saved.get('best_epoch')}."
        ]
        metrics, versions = saved.get("metrics", {}), saved.get("versions", {})
    else:
        model = predictor.model
        backbones = "; ".join(
            f"`{entry['backbone']}` ({entry.get('weights')}, layer {entry.get('layer')}"
            f"{', flip' if entry.get('flip') else ''})"
            for entry in model.backbones
        )
        training = model.training
        caches = ", ".join(Path(str(cache)).name for cache in training.get("caches", []))
        datasets = training.get("datasets", [])
        source = (
            " + ".join(f"{entry['name']} ({entry['images']})" for entry in datasets)
            if len(datasets) > 1
            else caches or "its caches"
        )
        balance = ", ".join(training.get("balance") or []) or "none"
        lines = [
            f"**Head** `{model.head}` on {backbones}.",
            f"**Trained on** {training.get('images', '?')} images ({training.get('split', 'train')} split of "
            f"{source}); balanced by: {balance}.",
        ]
        metrics, versions = model.metrics, model.versions
    if metrics:
        lines += _metrics_card(metrics)
        for name, own in metrics.get("datasets", {}).items():
            lines += [f"**{name}**:", *_metrics_card(own)]
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))]
    return "\n".join(lines)


def _metrics_card(metrics: dict) -> list[str]:
    """Markdown lines of one evaluation: metrics with CIs, accuracy gaps, errors per group x gender."""
    from featgender.metrics import METRICS
    from featgender.report import group_gender_headline

    ci = metrics.get("ci95", {})
    rows = [
        f"| {name} | {metrics[name]:.4f} | {ci[name][0]:.4f} – {ci[name][1]:.4f} |"
        for name in METRICS
        if name in metrics and name in ci
    ]
    lines = [
        f"**Evaluated on** the {metrics.get('split', '?')} split, {metrics.get('n', '?')} images:",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
        *rows,
        "",
    ]
    for attribute, slices in metrics.get("subgroups", {}).items():
        groups = ", ".join(f"{group} {row['accuracy']:.3f} (n={row['n']})" for group, row in slices["groups"].items())
        lines.append(f"- {attribute}: largest accuracy gap {slices['accuracy_gap']:.3f} ({groups})")
    for attribute, table in metrics.get("group_gender", {}).items():
        cells = ", ".join(
            f"{cell['group']} {cell['gender']} {cell['error_rate']:.1%} (n={cell['n']})" for cell in table["cells"]
        )
        lines.append(f"- errors per {attribute} x gender ({group_gender_headline(table)}): {cells}")
    return lines + [""]


class FacePage:
    """What the page does, without Gradio: read an upload, find and classify the faces, draw
    them, and the batch CSV. One instance per loaded model."""

    def __init__(self, predictor, work_dir: str | Path):
        self.predictor = predictor
        self.work_dir = Path(work_dir)
        # Gradio files uploads by content: two requests with the same photo share one file,
        # and the first deletes it. The bytes of the last few stay in memory for the second.
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def analyse(self, upload: dict | str | None, threshold: float = 0.5) -> tuple[dict, str, list[list], str]:
        """Every face of an uploaded photo: what to keep for redrawing ({'image': data URL,
        'size', 'faces': [(box, P(male))]}), the drawing and table at ``threshold``
        (:func:`render`), and a message. The upload is deleted once read."""
        shown, message = self._read_faces(upload)
        return (shown, *render(shown, threshold), message)

    def _read_faces(self, upload: dict | str | None) -> tuple[dict, str]:
        taken = self._take(upload)
        if taken is None:
            return {}, "Upload, paste or take a photo first."
        name, content = taken
        try:
            pixels = decode_image(io.BytesIO(content))
        except Exception as error:  # PIL's many reasons, decompression bombs included
            return {}, f"{name}: cannot be read as an image ({type(error).__name__}: {error})"
        from PIL import Image

        picture = Image.fromarray(pixels)
        predictions = self.predictor.predict([picture], faces="photo", all_faces=True)
        faces = [(list(p.box), p.probability) for p in predictions if p.box is not None and p.probability is not None]
        shown = {"image": _data_url(picture), "size": list(picture.size), "faces": faces}
        if not faces:
            return shown, f"{name}: {NO_FACE}; nothing to classify."
        return shown, f"{name}: {len(faces)} face{'s' if len(faces) > 1 else ''} found."

    def batch(self, uploads: list, progress=None) -> tuple[str | None, str]:
        """The ``predict --csv`` file of many images and zips (largest face of each photo)."""
        folder = Path(tempfile.mkdtemp(prefix="batch-", dir=self.work_dir))
        try:
            paths = []
            for index, taken in enumerate(filter(None, map(self._take, uploads or []))):
                name, content = taken
                if zipfile.is_zipfile(io.BytesIO(content)):
                    paths += _unzip_images(io.BytesIO(content), folder / f"zip{index}")
                else:
                    (folder / str(index)).mkdir()
                    paths.append(folder / str(index) / name)
                    paths[-1].write_bytes(content)
            if not paths:
                return None, "No images given."
            predictions: list[Prediction] = []
            for start in range(0, len(paths), 16):
                predictions += self.predictor.predict(paths[start : start + 16], faces="auto")
                if progress is not None:
                    progress(min(1.0, (start + 16) / len(paths)), desc="classifying")
            rows = write_predictions_csv(predictions, folder / "predictions.csv")
            skipped = [p for p in predictions if p.error]
            message = f"{rows} of {len(paths)} images classified" + (
                f"; {len(skipped)} not ({skipped[0].error.replace(str(folder), '')}, ...)" if skipped else "."
            )
            return str(folder / "predictions.csv"), message
        finally:
            for path in folder.glob("*/**/*"):  # the images; the CSV stays for the browser to fetch
                if path.is_file():
                    path.unlink()

    def _take(self, upload) -> tuple[str, bytes] | None:
        """(name, bytes) of an upload, deleting its file below our work folder at once."""
        path = _upload_path(upload)
        if path is None:
            return None
        name = Path(upload.get("orig_name") or path.name).name if isinstance(upload, dict) else path.name
        with self._lock:
            if str(path) in self._recent and not path.is_file():
                return name, self._recent[str(path)]
            content = path.read_bytes()
            if _is_below(path, self.work_dir):
                self._recent[str(path)] = content
                while len(self._recent) > RECENT_UPLOADS:
                    self._recent.popitem(last=False)
                # the photo goes; its folder (named by the content's hash) stays, as a client
                # uploading the same photo now may be creating it (gradio's delete_cache and
                # serve's exit remove it)
                path.unlink(missing_ok=True)
        return name, content


def _is_below(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def render(shown: dict, threshold: float) -> tuple[str, list[list]]:
    """The photo with its faces boxed and labelled at ``threshold``, as HTML, and the table rows."""
    if not shown:
        return "", []
    width, height = shown["size"]
    boxes, rows = [], []
    for index, (box, probability) in enumerate(shown["faces"], start=1):
        verdict = call(probability, threshold)
        left, top, right, bottom = box
        style = (
            f"left:{100 * left / width:.2f}%;top:{100 * top / height:.2f}%;"
            f"width:{100 * (right - left) / width:.2f}%;height:{100 * (bottom - top) / height:.2f}%;"
            f"border-color:{COLOURS[verdict]}"
        )
        boxes.append(
            f'<div class="fg-face" data-face="{index}" data-label="{verdict}" data-p-male="{probability:.4f}" '
            f'style="position:absolute;border:3px solid;box-sizing:border-box;{style}">'
            f'<span style="position:absolute;left:-3px;bottom:100%;color:white;font-size:13px;padding:1px 4px;'
            f'white-space:nowrap;background:{COLOURS[verdict]}">{index}: {verdict} {probability:.2f}</span></div>'
        )
        rows.append([index, ",".join(map(str, box)), verdict, round(probability, 4)])
    page = (
        f'<div class="fg-photo" style="position:relative;display:inline-block;max-width:100%">'
        f'<img alt="your photo" style="display:block;max-width:100%;height:auto" src="{html.escape(shown["image"])}">'
        + "".join(boxes)
        + "</div>"
    )
    return page, rows


def _upload_path(upload) -> Path | None:
    """The file behind a Gradio upload: a path, or the file-data dict of an unprocessed input."""
    if upload is None:
        return None
    if isinstance(upload, dict):
        return Path(upload["path"]) if upload.get("path") else None
    return Path(getattr(upload, "name", upload))


def _data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _unzip_images(archive, folder: Path) -> list[Path]:
    """The images of a zip, written under ``folder`` with safe names (no path from the archive
    is trusted), at most :data:`MAX_ZIP_IMAGES`."""
    folder.mkdir(parents=True)
    written = []
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir() and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES]
        for index, member in enumerate(members[:MAX_ZIP_IMAGES]):
            target = folder / f"{index:05d}-{Path(member.filename).name}"
            with zipped.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
            written.append(target)
    return written


def build(
    model: str | Path,
    *,
    trusted: bool = False,
    device: str = "auto",
    work_dir: str | Path | None = None,
    concurrency: int = 1,
):
    """The Gradio Blocks of the page for ``model`` (a head ``.joblib`` or fine-tuned ``.pt``).

    The model and its backbone load once, here. ``work_dir`` is where uploads land (Gradio's
    ``GRADIO_TEMP_DIR``, which :func:`serve` sets); ``concurrency`` requests run at once,
    others queue. ``trusted``: open a model file not written on this machine.
    """
    import gradio as gr

    predictor = load(model, trusted=trusted, device=device)
    page = FacePage(predictor, work_dir or os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
    with gr.Blocks(title="featgender", analytics_enabled=False, delete_cache=(60, 120)) as blocks:
        gr.Markdown(f"# featgender: {Path(model).name}")
        gr.Markdown(RESPONSIBLE_USE, elem_id="fg-responsible-use")
        with gr.Tab("Photo"):
            with gr.Row():
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "webcam", "clipboard"])
                with gr.Column():
                    threshold = gr.Slider(
                        0.05,
                        0.95,
                        value=0.5,
                        step=0.01,
                        label="Decision threshold on P(male)",
                        info=f"faces within {UNCERTAIN_BAND} of it are called uncertain",
                    )
                    analyse = gr.Button("Find and classify faces", variant="primary", elem_id="fg-analyse")
                    message = gr.Markdown(elem_id="fg-message")
            shown = gr.State({})
            drawn = gr.HTML(elem_id="fg-result")
            table = gr.Dataframe(
                headers=["face", "box (left,top,right,bottom)", "label", "P(male)"], label="Faces", interactive=False
            )
            analyse.click(
                page.analyse,
                inputs=[photo, threshold],
                outputs=[shown, drawn, table, message],
                preprocess=False,
                api_name="analyse",
                concurrency_limit=concurrency,
            )
            threshold.change(
                render,
                inputs=[shown, threshold],
                outputs=[drawn, table],
                api_visibility="private",
                concurrency_limit=concurrency,
            )
        with gr.Tab("Batch"):
            files = gr.File(label="Images or a zip", file_count="multiple", type="filepath")
            run = gr.Button("Classify all", variant="primary")
            csv_file = gr.File(label="predictions.csv (the columns of featgender predict --csv)")
            batch_message = gr.Markdown()

            def batch(uploads, progress=gr.Progress()):
                return page.batch(uploads, progress)

            run.click(
                batch, inputs=files, outputs=[csv_file, batch_message], api_name="batch", concurrency_limit=concurrency
            )
        with gr.Tab("Model card"):
            gr.Markdown(model_card(predictor), elem_id="fg-model-card")
            gr.Markdown(RESPONSIBLE_USE)
    blocks.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return blocks


def serve(
    model: str | Path,
    *,
    host: str = SERVE_HOST,
    port: int = SERVE_PORT,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    trusted: bool = False,
    device: str = "auto",
    block: bool = True,
):
    """Serve the page: ``featgender serve``. Binds ``host`` (loopback by default); another host
    or a public ``share`` link needs ``auth`` (user, password), and warns. Uploads land in a
    folder of ours, removed when this returns. With ``block=False`` returns (blocks, url,
    folder) and the caller closes the blocks and removes the folder."""
    exposed = share or host not in LOOPBACK
    if exposed and auth is None:
        raise FeatgenderError(
            f"--host {host}{' --share' if share else ''}: the page would be reachable by others; "
            "give --auth USER:PASSWORD too"
        )
    if exposed:
        logger.warning(
            "featgender serve: reachable beyond this machine (%s); faces are personal data",
            "public share link" if share else host,
        )
    work_dir = tempfile.mkdtemp(prefix="featgender-serve-")
    atexit.register(shutil.rmtree, work_dir, True)  # also when the caller of block=False forgets
    os.environ["GRADIO_TEMP_DIR"] = work_dir  # before gradio's import: some of its modules read it then
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)  # a service manager's stop: clean up as Ctrl-C does
    try:
        blocks = build(model, trusted=trusted, device=device, work_dir=work_dir)
        _, url, _ = blocks.launch(
            server_name=host,
            server_port=port,
            share=share,
            auth=auth,
            max_file_size=MAX_UPLOAD,
            allowed_paths=[],
            show_error=True,
            quiet=not block,
            prevent_thread_lock=not block,
            footer_links=["api"],
            theme=gr.themes.Default(font=FONTS, font_mono=["ui-monospace", "monospace"]),
        )
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    if not block:
        return blocks, url, work_dir
    shutil.rmtree(work_dir, ignore_errors=True)  # launch returns once the server is stopped
    return None


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


__all__ = ["FacePage", "RESPONSIBLE_USE", "UNCERTAIN_BAND", "build", "call", "model_card", "render", "serve"]
