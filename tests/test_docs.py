"""The docs build runs, and its picture shows what the parsing and drawing code produce."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image

from vlmo.testing import blob_mask_decoder

DOCS = Path(__file__).resolve().parents[1] / "docs"


def load_build():  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location("docs_build", DOCS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_format_picture_is_generated(tmp_path: Path) -> None:
    build = load_build()
    path = build.render_output_formats(tmp_path / "out.png")
    with Image.open(path) as picture:
        w, h = build.SIZE
        assert picture.size == (2 * w + 10, h)
        scene = build.scene()
        cx, cy = (build.CIRCLE[0] + build.CIRCLE[2]) // 2, (build.CIRCLE[1] + build.CIRCLE[3]) // 2
        assert picture.getpixel((cx, cy)) == scene.getpixel((cx, cy))  # left: boxes only, inside untouched
        assert picture.getpixel((w + 10 + cx, cy)) != scene.getpixel((cx, cy))  # right: the mask tints it
    assert (DOCS / "img" / "output-formats.png").is_file(), "run: python docs/build.py"


def test_blob_decoder_draws_its_code_grid() -> None:
    on, off = 64, 0
    grid = torch.tensor([[off] * 4 + [on] * 8 + [off] * 4])  # rows 1 and 2 inside
    mask = blob_mask_decoder()(grid)[0, 0] > 0
    rows = mask.any(dim=1).nonzero().flatten()
    assert (rows.min(), rows.max()) == (16, 47)  # grid rows 1–2 of 4 → mask rows 16–47 of 64
    assert mask[20:44, 8:56].all()
