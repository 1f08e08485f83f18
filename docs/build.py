"""Build the generated parts of the docs: the README's CLI reference and the pictures.

    python docs/build.py    # rewrite README.md's CLI reference, docs/img/output-formats.png, shapes-boxes.png and
                            # shapes-masks.png

output-formats.png comes from the same stand-ins the tests use (`vlmo.demo.standins.blob_mask_decoder`), applied to a
model answer written by hand, so it shows exactly what vlmo's parsing, mask placement and drawing do. The shapes
pictures are what the built-in model finds in examples/shapes.png, drawn as `vlmo detect --out` / `vlmo segment
--out` draw them (tests compare the commands' pictures with these).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from vlmo.cli import reference as cli_reference
from vlmo.demo.standins import blob_mask_decoder
from vlmo.detection import ParsedObject, box_to_bins, draw_detections, format_objects, parse_detections
from vlmo.segmentation import draw_segmentations, parse_segmentations

ROOT = Path(__file__).resolve().parents[1]
SIZE = (360, 240)
CIRCLE = (40, 50, 160, 170)  # x_min, y_min, x_max, y_max
SQUARE = (210, 70, 320, 180)
# 4×4 seg-code grids, row-major: ≥ 64 is "inside" for the stand-in decoder
ROUND = (0, 64, 64, 0, 64, 64, 64, 64, 64, 64, 64, 64, 0, 64, 64, 0)
FULL = (64,) * 16


def scene() -> Image.Image:
    image = Image.new("RGB", SIZE, (236, 232, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse(CIRCLE, fill=(205, 45, 40))
    draw.rectangle(SQUARE, fill=(40, 70, 200))
    return image


def model_answer() -> str:
    """What PaliGemma would answer to `segment circle ; square` for `scene()` (a `detect` answer lacks the segs)."""
    objects = [
        ParsedObject(box_to_bins(CIRCLE, SIZE), ROUND, "circle"),
        ParsedObject(box_to_bins(SQUARE, SIZE), FULL, "square"),
    ]
    return format_objects(objects)


def render_output_formats(path: Path) -> Path:
    """Side by side: the detection boxes, and the segmentation masks with their boxes."""
    image, text = scene(), model_answer()
    detections = parse_detections(text, SIZE)
    segmentations = parse_segmentations(text, SIZE, blob_mask_decoder())
    left, right = draw_detections(image, detections), draw_segmentations(image, segmentations)
    canvas = Image.new("RGB", (SIZE[0] * 2 + 10, SIZE[1]), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (SIZE[0] + 10, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


# The README's quick start: what `vlmo detect` and `vlmo segment` draw with `--out` (tests compare them).
SHAPES_LABELS = "circle ; square ; triangle"
SEGMENT_LABELS = "circle ; square"


def render_shapes_boxes(path: Path) -> Path:
    """The built-in model's boxes for all three kinds in examples/shapes.png, drawn as `vlmo detect --out` draws."""
    from vlmo import VLMo

    image = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    found = VLMo.from_pretrained("vlmo/shapes").detect(image, SHAPES_LABELS)
    draw_detections(image, found).save(path, optimize=True)
    return path


def render_shapes_masks(path: Path) -> Path:
    """The built-in model's masks for the circle and the square in examples/shapes.png, as `vlmo segment --out`
    draws them (decoded by the model's own mask decoder)."""
    from vlmo import VLMo

    image = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    found = VLMo.from_pretrained("vlmo/shapes").segment(image, SEGMENT_LABELS)
    draw_segmentations(image, found).save(path, optimize=True)
    return path


def main() -> int:
    cli_reference.main(["--write", str(ROOT / "README.md")])
    print(render_output_formats(ROOT / "docs" / "img" / "output-formats.png"))
    print(render_shapes_boxes(ROOT / "docs" / "img" / "shapes-boxes.png"))
    print(render_shapes_masks(ROOT / "docs" / "img" / "shapes-masks.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
