"""Detection output of PaliGemma: parse `<loc>` strings into boxes, build them back, and draw them.

The model answers a `detect cat ; dog` prompt with, per object, four location tokens, an optional block of 16
segmentation tokens (only after `segment …` prompts), and the label, objects separated by `" ; "` (model-notes §9.2):

    <loc0123><loc0045><loc0890><loc0777> cat ; <loc0001><loc0002><loc0003><loc0004> dog

The four bins are **y_min, x_min, y_max, x_max**, each 0…1023, normalised to the squashed square model
input, so scaling a normalised coordinate by the original height/width undoes the squash.

Coordinate convention (bins ↔ pixels of the original W×H image):

    encode  bin = clip(round(x / W × 1023), 0, 1023)     (x clipped to [0, W] first)
    decode  x   = bin / 1023 × W

The encoder is big_vision's training op (refcoco: `clip(round(coord01 × 1023), 0, 1023)`, model-notes §9.2), so
targets we build for fine-tuning are the ones PaliGemma was trained on. The decoder is its exact inverse, as
in big_vision's evaluator (`bin / 1023`): bin 0 is the left/top edge, bin 1023 the right/bottom edge. So
`box_to_bins(bins_to_box(b)) == b` for every ordered `b`, and pixels → bins → pixels moves a coordinate by
at most half a bin (W/2046 px). The demo's `bin / 1024` never reaches the far edge and shrinks boxes by up to
one bin (0.1 %); the "bin centre" `(bin + 0.5) / 1024` pairs with a floor encoding PaliGemma never saw.
Pixel coordinates are continuous (0 = left edge of the first pixel, W = right edge of the last), unrounded.

Parsing is tolerant; it never raises on model text, it skips what it cannot read:

* An object is 4 consecutive `<locNNNN>` tokens (whitespace between them allowed), then either no
  `<segNNN>` token or exactly 16, then the label: the text up to the next `;`, `<` or the end, stripped.
  So `<eos>`/`<pad>` remnants end a label and are ignored, and `;` with any whitespace separates objects.
* Skipped: fewer than 4 loc tokens (a truncated or garbled object), a loc bin above 1023 or a seg code
  above 127, a seg block of 1–15 or over 16 tokens (truncated or garbled), text that follows no loc tokens.
* A missing label is kept as `""`: fine-tuned referring-expression checkpoints answer with tokens only,
  and the box is still useful. Text cannot tell a finished label from one cut by `max_new_tokens`
  mid-word; the caller, which knows why generation stopped, can drop the last object in that case.
* An inverted box (y_max < y_min or x_max < x_min) is kept with its coordinates swapped into order: the
  model did point at that region, and dropping it would hide it. `Detection.bins` stays as emitted.

`parse_objects` / `format_objects` are the shared lower level (segmentation reuses them for the seg codes);
`parse_detections` / `encode_boxes` are the pixel-space API on top.
"""

from __future__ import annotations

import colorsys
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from vlmo.errors import InputError, check_count

__all__ = [
    "NUM_LOC_BINS",
    "NUM_SEG_CODES",
    "NUM_SEG_TOKENS",
    "Detection",
    "ParsedObject",
    "bins_to_box",
    "box_to_bins",
    "detect_prompt",
    "draw_detections",
    "encode_boxes",
    "format_objects",
    "label_colours",
    "parse_detections",
    "parse_objects",
]

NUM_LOC_BINS = 1024  # <loc0000>…<loc1023> (model-notes §9.2)
NUM_SEG_CODES = 128  # <seg000>…<seg127>: the vae-oid codebook size (model-notes §9.3)
NUM_SEG_TOKENS = 16  # a 4×4 grid of codes per mask (model-notes §9.3)
_MAX_BIN = NUM_LOC_BINS - 1  # big_vision scales normalised coordinates by 1023, not 1024 (module docstring)

Box = tuple[float, float, float, float]
Bins = tuple[int, int, int, int]
RGB = tuple[int, int, int]

# One object: 4 loc tokens, any run of seg tokens (validated after matching, so a short run is skipped rather
# than silently dropped), then the label up to `;`, `<` or the end. [0-9], not \d: int() accepts other digits.
_OBJECT_RE = re.compile(
    r"(?P<locs>(?:<loc[0-9]{4}>\s*){4})"
    r"(?P<segs>(?:<seg[0-9]{3}>\s*)*)"
    r"(?P<label>[^;<>]*)"
)
_LOC_RE = re.compile(r"<loc([0-9]{4})>")
_SEG_RE = re.compile(r"<seg([0-9]{3})>")
_LABEL_FORBIDDEN = frozenset(";<>")


@dataclass(frozen=True)
class ParsedObject:
    """One object as the model wrote it, before any mapping to pixels.

    bins: (y_min, x_min, y_max, x_max), each 0…1023, in the model's order and unsorted.
    seg_codes: the 16 `<segNNN>` codes (0…127, 4×4 row-major) or None when the object has no mask.
    label: the stripped label text, `""` when the model wrote none.
    """

    bins: Bins
    seg_codes: tuple[int, ...] | None
    label: str


@dataclass(frozen=True)
class Detection:
    """A detected object in the original image.

    label: the label text (`""` if the model wrote none).
    box: (x_min, y_min, x_max, y_max) in pixels of the original image, ordered (min ≤ max), not rounded.
    bins: the raw loc bins in the model's order (y_min, x_min, y_max, x_max), 0…1023.
    """

    label: str
    box: Box
    bins: Bins

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: `{"label": str, "box": [x0, y0, x1, y1], "bins": [y0, x0, y1, x1]}`."""
        return {"label": self.label, "box": list(self.box), "bins": list(self.bins)}

    @classmethod
    def from_dict(cls, data: object) -> Detection:
        """The detection `to_dict` wrote (read back from JSON, e.g. a server's answer): `from_dict(d.to_dict())`
        equals `d`. The box's numbers are kept as they are, not recomputed from the bins, so that the detection's
        `to_dict` is `data` again. InputError, naming the object, for anything `to_dict` cannot have written."""
        if not isinstance(data, dict):
            raise InputError(f"a detection must be a dict with label, box and bins, got {type(data).__name__}")
        label, box, bins = data.get("label"), data.get("box"), data.get("bins")
        if not isinstance(label, str):
            raise InputError(f"a detection's label must be text, got {label!r}")
        if not isinstance(box, list | tuple) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise InputError(f"a detection's box must be 4 numbers (x_min, y_min, x_max, y_max), got {box!r}")
        _check_box(box)  # finite and ordered, as every box vlmo writes
        if not isinstance(bins, list | tuple):
            raise InputError(f"a detection's bins must be a list of 4 integers, got {bins!r}")
        return cls(label, (box[0], box[1], box[2], box[3]), _check_bins(bins))


# ------------------------------------------------------------------------------------------------------------
# Token level


def parse_objects(text: str) -> list[ParsedObject]:
    """Every well-formed object in `text`, in order; never raises (rules in the module docstring).

    >>> parse_objects("<loc0010><loc0020><loc0030><loc0040> red car ; <loc0001>")
    [ParsedObject(bins=(10, 20, 30, 40), seg_codes=None, label='red car')]
    """
    if not isinstance(text, str):
        return []
    objects: list[ParsedObject] = []
    for match in _OBJECT_RE.finditer(text):
        y0, x0, y1, x1 = (int(b) for b in _LOC_RE.findall(match["locs"]))  # the regex matched exactly 4
        bins = (y0, x0, y1, x1)
        if max(bins) > _MAX_BIN:
            continue
        codes = tuple(int(c) for c in _SEG_RE.findall(match["segs"]))
        if codes and (len(codes) != NUM_SEG_TOKENS or max(codes) >= NUM_SEG_CODES):
            continue
        objects.append(ParsedObject(bins=bins, seg_codes=codes or None, label=match["label"].strip()))
    return objects


def format_objects(objects: Iterable[ParsedObject]) -> str:
    """The model's text for `objects`, the inverse of `parse_objects` (for building fine-tuning targets).

    `<loc…>×4[<seg…>×16] label` per object, joined by `" ; "`; an empty label leaves just the tokens.
    Raises InputError on bins or codes out of range, a seg block that is not 16 long, or a label containing
    `;`, `<` or `>` (the parser could not read it back).
    """
    parts = []
    for i, obj in enumerate(objects):
        bins = _check_bins(obj.bins)
        tokens = "".join(f"<loc{b:04d}>" for b in bins)
        if obj.seg_codes is not None:
            codes = tuple(obj.seg_codes)
            if len(codes) != NUM_SEG_TOKENS or not all(_is_int(c) and 0 <= c < NUM_SEG_CODES for c in codes):
                raise InputError(
                    f"object {i}: seg_codes must be {NUM_SEG_TOKENS} integers in 0..{NUM_SEG_CODES - 1}, got {codes!r}"
                )
            tokens += "".join(f"<seg{c:03d}>" for c in codes)
        label = _clean_label(obj.label, allow_empty=True)
        parts.append(f"{tokens} {label}" if label else tokens)
    return " ; ".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Pixel level


def box_to_bins(box: Sequence[float], image_size: tuple[int, int]) -> Bins:
    """Pixel box (x_min, y_min, x_max, y_max) in a (width, height) image → bins (y_min, x_min, y_max, x_max).

    Coordinates outside the image are clipped to it. Raises InputError on a non-finite or inverted box (an
    inverted box often means (x, y, w, h) was passed instead of corners).
    """
    width, height = _check_size(image_size)
    x0, y0, x1, y1 = _check_box(box)
    return (_to_bin(y0, height), _to_bin(x0, width), _to_bin(y1, height), _to_bin(x1, width))


def bins_to_box(bins: Sequence[int], image_size: tuple[int, int]) -> Box:
    """Bins (y_min, x_min, y_max, x_max) → pixel box (x_min, y_min, x_max, y_max) in a (width, height) image.

    `x = bin / 1023 × W` (module docstring). Inverted bins are swapped into order. Raises InputError on
    bins out of 0…1023. For ordered bins, `box_to_bins(bins_to_box(bins, size), size) == bins` exactly.
    """
    width, height = _check_size(image_size)
    b_y0, b_x0, b_y1, b_x1 = _check_bins(bins)
    y0, y1 = sorted((b_y0 / _MAX_BIN * height, b_y1 / _MAX_BIN * height))
    x0, x1 = sorted((b_x0 / _MAX_BIN * width, b_x1 / _MAX_BIN * width))
    return (x0, y0, x1, y1)


def parse_detections(text: str, image_size: tuple[int, int]) -> list[Detection]:
    """The detections in a model answer, with boxes in pixels of the original (width, height) image.

    Never raises on `text` (seg tokens are read but ignored here; see `parse_objects`); raises InputError
    only on an invalid `image_size`.
    """
    size = _check_size(image_size)
    return [Detection(obj.label, bins_to_box(obj.bins, size), obj.bins) for obj in parse_objects(text)]


def encode_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[str], image_size: tuple[int, int]) -> str:
    """Pixel boxes (x_min, y_min, x_max, y_max) and their labels → the model's detection text.

    The exact format PaliGemma emits, e.g. `"<loc0001><loc0002><loc0003><loc0004> cat ; <loc…> dog"`, so
    it can serve as a fine-tuning target; `parse_detections` reads it back within half a bin. Boxes are
    clipped to the image; labels are stripped with inner whitespace collapsed. Raises InputError (a
    ValueError) on different numbers of boxes and labels, inverted or non-finite boxes, and labels
    containing `;`, `<` or `>`.
    """
    if isinstance(labels, str):
        raise InputError("labels must be a sequence of strings, one per box, not a single string")
    if len(boxes) != len(labels):
        raise InputError(
            f"encode_boxes got {len(boxes)} boxes but {len(labels)} labels; pass exactly one label per box"
        )
    size = _check_size(image_size)
    objects = []
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        try:
            bins = box_to_bins(box, size)
        except InputError as err:
            raise InputError(f"box {i}: {err}") from None
        objects.append(ParsedObject(bins=bins, seg_codes=None, label=label))
    return format_objects(objects)


def detect_prompt(labels: str | Sequence[str], task: Literal["detect", "segment"] = "detect") -> str:
    """The detection (or segmentation) prompt for one label or several: `detect cat`, `segment cat ; red car`.

    Labels are stripped (inner whitespace collapsed). Raises InputError on no labels, an empty label, or a
    label containing `;` (pass a list instead), `<` or `>` (the answer's label could not be parsed back).
    """
    items = [labels] if isinstance(labels, str) else list(labels)
    if not items:
        raise InputError('no labels given; name what to find, e.g. "cat ; dog"')
    return f"{task} " + " ; ".join(_clean_label(label, allow_empty=False) for label in items)


# ------------------------------------------------------------------------------------------------------------
# Drawing


def label_colours(labels: Iterable[str]) -> dict[str, RGB]:
    """A distinct, stable colour per distinct label, in order of first appearance.

    Hues step by the golden ratio, so any number of labels gets well-separated colours and a label list always
    maps the same way. Shared with mask drawing so a label's mask and box match.
    """
    colours: dict[str, RGB] = {}
    for label in labels:
        if label not in colours:
            hue = (0.1 + len(colours) * 0.618033988749895) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
            colours[label] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def draw_detections(image: Image.Image, detections: Sequence[Detection], *, width: int | None = None) -> Image.Image:
    """A new RGB image with each detection's box and label drawn on it; `image` is not modified.

    image: any PIL mode (RGB, RGBA, L, …); the result is RGB and the same size.
    width: box line width in pixels; by default it grows with the image (1 px up to ~375 px, then +1 per
    250 px of the longer side).

    Seam for masks: segmentation composites its masks on an RGB copy first, coloured with
    `label_colours(...)` over the same labels, then draws the boxes on top with this function, so boxes and
    labels stay visible.
    """
    canvas = _to_rgb(image)
    if not detections:
        return canvas
    img_w, img_h = canvas.size
    line = check_count(width, "width") if width is not None else max(1, round(max(img_w, img_h) / 250))
    font = _font(max(10, round(min(img_w, img_h) / 32)))
    colours = label_colours(d.label for d in detections)
    draw = ImageDraw.Draw(canvas)
    for det in detections:
        _draw_box(draw, det.box, det.label, colours[det.label], line, font, canvas.size)
    return canvas


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy; transparent areas of RGBA/LA/P images go over white rather than black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # convert() always returns a new image, even for RGB input


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType (Pillow ≥ 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _draw_box(
    draw: ImageDraw.ImageDraw,
    box: Box,
    label: str,
    colour: RGB,
    line: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    size: tuple[int, int],
) -> None:
    img_w, img_h = size
    # Continuous box corners → the inclusive pixel rectangle PIL draws, kept inside the image.
    x0 = min(max(math.floor(box[0]), 0), img_w - 1)
    y0 = min(max(math.floor(box[1]), 0), img_h - 1)
    x1 = min(max(math.ceil(box[2]) - 1, x0), img_w - 1)
    y1 = min(max(math.ceil(box[3]) - 1, y0), img_h - 1)
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
    if not label:
        return
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = max(1, line)
    text_w, text_h = right - left + 2 * pad, bottom - top + 2 * pad
    # Above the box when there is room, else just inside its top edge.
    ty = y0 - text_h if y0 - text_h >= 0 else y0
    tx = min(x0, max(0, img_w - text_w))
    draw.rectangle((tx, ty, tx + text_w - 1, ty + text_h - 1), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((tx + pad - left, ty + pad - top), label, fill=ink, font=font)


# ------------------------------------------------------------------------------------------------------------
# Validation helpers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise InputError(f"image_size must be (width, height), got {image_size!r}") from None
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        raise InputError(f"image_size must be two positive integers (width, height), got {image_size!r}")
    return width, height


def _check_bins(bins: Sequence[int]) -> Bins:
    values = tuple(bins)
    if len(values) != 4 or not all(_is_int(b) and 0 <= b <= _MAX_BIN for b in values):
        raise InputError(f"bins must be 4 integers (y_min, x_min, y_max, x_max) in 0..{_MAX_BIN}, got {bins!r}")
    return values


def _check_box(box: Sequence[float]) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"box must be 4 numbers (x_min, y_min, x_max, y_max), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"box coordinates must be finite, got {box!r}")
    if x1 < x0 or y1 < y0:
        raise InputError(
            f"box must be (x_min, y_min, x_max, y_max) with min <= max, got {box!r}; "
            "convert (x, y, width, height) boxes to corners first"
        )
    return x0, y0, x1, y1


def _to_bin(coord: float, extent: int) -> int:
    # big_vision's training encoding (model-notes §9.2); Python's round() is half-to-even like tf.round / np.round.
    return min(max(round(min(max(coord, 0.0), extent) / extent * _MAX_BIN), 0), _MAX_BIN)


def _clean_label(label: object, *, allow_empty: bool) -> str:
    if not isinstance(label, str):
        raise InputError(f"labels must be strings, got {type(label).__name__}: {label!r}")
    clean = " ".join(label.split())
    if not clean and not allow_empty:
        raise InputError('empty label; separate labels with ";" and leave none blank, e.g. "cat ; red car"')
    bad = sorted(_LABEL_FORBIDDEN.intersection(clean))
    if bad:
        raise InputError(
            f"label {label!r} contains {' '.join(bad)}; ';' separates labels and '<' '>' mark model tokens, "
            "so remove those characters"
        )
    return clean
