"""The cache's schema is defined once (featgender.cache.schema): every cache written holds
exactly what it lists, and docs/cache.md shows it as the code renders it."""

from pathlib import Path

import h5py

from featgender.backbones import build_backbone
from featgender.cache import DATASETS, ROOT_ATTRIBUTES, schema_markdown
from featgender.data import load_dataset
from featgender.extract import build_cache

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cache.md"


def test_docs_show_the_schema_the_code_defines():
    assert schema_markdown() in DOCS.read_text()


def test_a_written_cache_holds_the_schema_and_nothing_else(csv_dataset, tmp_path):
    (csv_dataset / "images" / "007.jpg").write_bytes(b"not an image")  # so that failed/ is written too
    out = tmp_path / "c.h5"
    build_cache(
        load_dataset(csv_dataset),
        build_backbone("mobilenet_v3_small", weights="none"),
        out,
        batch_size=8,
        workers=0,
        progress=False,
    )
    with h5py.File(out, "r") as h5:
        written = set()
        h5.visititems(lambda name, item: written.add(name) if isinstance(item, h5py.Dataset) else None)
        attributes = set(h5.attrs)
    assert written == {entry.name for entry in DATASETS}  # a CSV with extra columns, one failed image
    assert attributes == {entry.name for entry in ROOT_ATTRIBUTES} - {"shards"}  # shards: torchrun joins only
