"""The data set the batch tests run on: 24 `vlmo/shapes` scenes of several sizes (60 for the Ray tests, whose killed
worker needs a job that runs for a while), plus three inputs that are not images (a truncated PNG, a zero-byte .jpg
and a text file named .jpg), in one folder."""

from __future__ import annotations

import io
from pathlib import Path

from vlmo.demo.shapes import make_scene, render

SCENES = 24
BAD = {"corrupt.png": "truncated or corrupt", "empty.jpg": "not an image", "notes.jpg": "not an image"}
LABELS = "circle ; square"
MODEL = ["--model", "vlmo/shapes", "--quantize", "none"]  # float32: the fastest mode for this tiny model


def write_scene_folder(root: Path, scenes: int = SCENES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(scenes):
        # Every third scene at a random size (160–400 px a side), so boxes in pixels depend on each image's size.
        scene = make_scene("batch", i, size=None if i % 3 == 0 else (224, 224))
        render(scene).save(root / f"scene-{i:02d}.png")
    png = io.BytesIO()
    render(make_scene("batch", 99)).save(png, format="PNG")
    (root / "corrupt.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not a picture\n", encoding="utf-8")
    return root


def scene_ids(scenes: int = SCENES) -> list[str]:
    """Every input's id, in the order a folder listing gives them (sorted)."""
    return sorted([*BAD, *(f"scene-{i:02d}.png" for i in range(scenes))])
