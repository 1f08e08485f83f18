"""Segmentation output of PaliGemma: `<seg>` codes → masks in the original image, COCO RLE, drawing, weights.

A `segment cat` answer holds, per object, the 4 `<loc>` tokens of its box, 16 `<segNNN>` codes (a 4×4 grid,
row-major) and the label (model-notes §9.3; parsing is `detection.parse_objects`). The codes go through the VQ-VAE
decoder "vae-oid" (`nn/vqvae.py`) into a 64×64 map of logits, which is resized into the box:

    box      x = bin / 1023 × W (as detection), then the pixel rectangle [int(x_min), int(x_max)) × [int(y_min),
             int(y_max)): `int()` truncates, exactly as big_vision's evaluator (`map(int, (y1 * h, …))` on
             `tokens / 1023`). Bin 1023 is the far edge (x = W), so boxes reach the image border; a box
             narrower than one pixel after truncation gives an empty mask; inverted bins are swapped.
    resize   the 64×64 logits to the rectangle's size, bilinear with half-pixel centres
             (`align_corners=False`) and **antialias=True**, then threshold > 0 and paste into an all-False
             H×W canvas. big_vision resizes with PIL BILINEAR on a float "F" image, which widens the filter
             when it shrinks; torch's antialiased bilinear is the same algorithm (a port of Pillow's) and
             agrees within 2e-5 for 1…300 px boxes, whereas antialias=False differs by up to ~2.0 when
             shrinking and flips hundreds of pixels. Enlarging, both torch modes equal PIL.

The official demo instead maps the logits to [0, 1], resizes an 8-bit image and uses bin/1024; we follow the
evaluator, whose numbers PaliGemma's paper reports.

Masks are `torch.bool[H, W]` (numpy is not a dependency). `mask_to_rle` writes COCO's *uncompressed* RLE:
`{"size": [H, W], "counts": [...]}`, counts of alternating runs over the mask in column-major (Fortran)
order, starting with a run of False that may be 0 (pycocotools' `frPyObjects` reads it).

Weights are loaded by `vlmo.weights.vqvae.load_mask_decoder` (a local file, or a one-time download and conversion).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vlmo.detection import (
    NUM_SEG_CODES,
    NUM_SEG_TOKENS,
    Bins,
    Box,
    Detection,
    bins_to_box,
    draw_detections,
    label_colours,
    parse_objects,
)
from vlmo.errors import InputError
from vlmo.nn.vqvae import MASK_SIZE, VQVAEDecoder, VQVAEEncoder

__all__ = [
    "Segmentation",
    "crop_mask",
    "decode_masks",
    "draw_segmentations",
    "encode_mask",
    "mask_to_rle",
    "parse_segmentations",
    "place_mask",
    "rle_to_mask",
]

logger = logging.getLogger(__name__)


PathArg = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class Segmentation:
    """A segmented object in the original image (equality is identity: it holds a tensor).

    label: the label text (`""` if the model wrote none).
    box: (x_min, y_min, x_max, y_max) in pixels, ordered, unrounded, as `Detection.box`.
    bins: the raw loc bins (y_min, x_min, y_max, x_max), 0…1023, as emitted.
    seg_codes: the 16 codes, 0…127, 4×4 row-major.
    mask: bool[H, W] on the CPU, True inside the object; empty when the box is under a pixel.
    """

    label: str
    box: Box
    bins: Bins
    seg_codes: tuple[int, ...]
    mask: torch.Tensor

    def to_detection(self) -> Detection:
        return Detection(self.label, self.box, self.bins)

    def to_dict(self, rle: bool = True) -> dict[str, Any]:
        """JSON-ready: label, box, bins, seg_codes and `mask` as COCO RLE (or rows of 0/1 with `rle=False`)."""
        mask = mask_to_rle(self.mask) if rle else self.mask.to(torch.uint8).tolist()
        return {
            "label": self.label,
            "box": list(self.box),
            "bins": list(self.bins),
            "seg_codes": list(self.seg_codes),
            "mask": mask,
        }

    @classmethod
    def from_dict(cls, data: object) -> Segmentation:
        """The segmentation `to_dict` wrote (read back from JSON, e.g. a server's answer), the mask as COCO RLE or
        rows of 0/1: its `to_dict` is `data` again, and its mask is the original's pixel for pixel. Label, box and
        bins are read as `Detection.from_dict` reads them. InputError for anything `to_dict` cannot have written."""
        if not isinstance(data, dict):
            raise InputError(
                f"a segmentation must be a dict with label, box, bins, seg_codes and mask, got {type(data).__name__}"
            )
        found = Detection.from_dict(data)
        codes, mask = data.get("seg_codes"), data.get("mask")
        if (
            not isinstance(codes, list | tuple)
            or len(codes) != NUM_SEG_TOKENS
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_SEG_CODES for c in codes)
        ):
            raise InputError(
                f"a segmentation's seg_codes must be {NUM_SEG_TOKENS} integers in 0..{NUM_SEG_CODES - 1}, got {codes!r}"
            )
        return cls(found.label, found.box, found.bins, tuple(codes), _read_mask(mask))


# ------------------------------------------------------------------------------------------------------------
# COCO run-length encoding


def mask_to_rle(mask: torch.Tensor) -> dict[str, Any]:
    """bool[H, W] → `{"size": [H, W], "counts": [...]}`, COCO's uncompressed RLE.

    Runs are counted over the column-major (Fortran) flattening and alternate False/True, starting with
    False; so an all-True 2×2 mask is `[0, 4]` and `[[0, 1], [1, 1]]` is `[1, 3]`.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise InputError(f"mask must be a 2-D tensor (H, W), got {getattr(mask, 'shape', type(mask).__name__)}")
    height, width = mask.shape
    flat = mask.detach().to("cpu", torch.bool).t().reshape(-1)
    if flat.numel() == 0:
        return {"size": [height, width], "counts": [0]}  # what pycocotools writes for no pixels
    starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), starts, torch.tensor([flat.numel()])])
    counts = (bounds[1:] - bounds[:-1]).tolist()
    return {"size": [height, width], "counts": [0, *counts] if bool(flat[0]) else counts}


def rle_to_mask(rle: dict[str, Any]) -> torch.Tensor:
    """COCO uncompressed RLE → bool[H, W]; the inverse of `mask_to_rle`.

    Raises InputError on a malformed dict, negative counts, counts that do not sum to H·W, or compressed
    (string) counts, which need pycocotools.
    """
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (TypeError, KeyError, ValueError):
        raise InputError('rle must be {"size": [H, W], "counts": [...]}') from None
    if isinstance(counts, (str, bytes)):
        raise InputError("compressed RLE (string counts) is not supported: decode it with pycocotools")
    if height < 0 or width < 0 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise InputError("rle size and counts must be non-negative integers")
    if sum(counts) != height * width:
        raise InputError(f"rle counts sum to {sum(counts)}, but size {height}×{width} has {height * width} pixels")
    values = torch.arange(len(counts)) % 2 == 1
    flat = torch.repeat_interleave(values, torch.tensor(counts, dtype=torch.long))
    return flat.view(width, height).t().contiguous()


def _read_mask(mask: object) -> torch.Tensor:
    """bool[H, W] for a mask as `Segmentation.to_dict` writes it: COCO RLE (a dict) or rows of 0/1."""
    if isinstance(mask, dict):
        return rle_to_mask(mask)
    rows: list[Any] = mask if isinstance(mask, list) else []
    if (
        rows
        and all(isinstance(row, list) and len(row) == len(rows[0]) for row in rows)
        and all(type(v) is int and v in (0, 1) for row in rows for v in row)
    ):
        return torch.tensor(rows, dtype=torch.bool)
    raise InputError('a mask must be COCO RLE {"size": [H, W], "counts": [...]} or rows of 0/1 of one length')


# ------------------------------------------------------------------------------------------------------------
# Codes → masks


def decode_masks(codes: torch.Tensor, decoder: VQVAEDecoder) -> torch.Tensor:
    """codes: int[B, 16] in 0…127 → float32[B, 64, 64] logits (> 0 inside), on the decoder's device."""
    with torch.no_grad():
        return decoder(codes)[:, 0].float()


def place_mask(mask64: torch.Tensor, bins: Sequence[int], image_size: tuple[int, int]) -> torch.Tensor:
    """The mask in the whole (width, height) image: bool[H, W] on mask64's device.

    mask64: float[h, w] logits (64×64 from the decoder). bins: (y_min, x_min, y_max, x_max), 0…1023.
    Box rounding and resizing as in the module docstring. Raises InputError on bad bins or image_size.
    """
    if not isinstance(mask64, torch.Tensor) or mask64.ndim != 2 or not mask64.is_floating_point():
        raise InputError(f"mask64 must be a float tensor (h, w), got {getattr(mask64, 'shape', mask64)!r}")
    x0, y0, x1, y1 = bins_to_box(bins, image_size)  # validates; swaps inverted bins
    width, height = image_size
    left, top, right, bottom = int(x0), int(y0), int(x1), int(y1)  # truncation, as big_vision (module docstring)
    canvas = torch.zeros(height, width, dtype=torch.bool, device=mask64.device)
    if right <= left or bottom <= top:
        return canvas
    resized = F.interpolate(
        mask64[None, None].float(),
        size=(bottom - top, right - left),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    canvas[top:bottom, left:right] = resized[0, 0] > 0.0
    return canvas


def parse_segmentations(text: str, image_size: tuple[int, int], decoder: VQVAEDecoder) -> list[Segmentation]:
    """The segmented objects of a model answer, masks placed in the original (width, height) image.

    Objects without 16 seg codes (a `detect` answer, output cut short) are skipped, so this never raises on
    `text`; it raises InputError only on an invalid `image_size`. All masks are decoded in one batch.
    """
    size = _image_size(image_size)
    found = [(obj, obj.seg_codes) for obj in parse_objects(text) if obj.seg_codes is not None]
    if not found:
        return []
    masks64 = decode_masks(torch.tensor([codes for _, codes in found]), decoder).cpu()
    return [
        Segmentation(obj.label, bins_to_box(obj.bins, size), obj.bins, codes, place_mask(m64, obj.bins, size))
        for (obj, codes), m64 in zip(found, masks64, strict=True)
    ]


def encode_mask(mask: torch.Tensor, box: Sequence[float], encoder: VQVAEEncoder) -> tuple[int, ...]:
    """A ground-truth object → its 16 seg codes, for fine-tuning targets (`detection.format_objects`).

    mask: bool[H, W] of the whole image. box: (x_min, y_min, x_max, y_max) pixels, rounded half-to-even and
    clipped to the image. As big_vision's `refcoco_mask2str`: crop, bilinear antialiased resize to 64×64 in
    [0, 1], encode (TF's and torch's antialiased resize can differ slightly at the crop's scale factor).
    """
    with torch.no_grad():
        return tuple(int(c) for c in encoder(crop_mask(mask, box))[0])


def crop_mask(mask: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """What the mask tokenizer sees of an object: float32[1, 1, 64, 64] in [0, 1], the box's part of `mask`
    (bool[H, W]) resized to 64×64 (`encode_mask` says how; a mask tokenizer's training data is made the same way)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise InputError(f"mask must be a 2-D bool tensor (H, W), got {getattr(mask, 'shape', mask)!r}")
    height, width = mask.shape
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
    y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {tuple(box)!r} covers no pixel of the {width}×{height} mask")
    crop = mask[y0:y1, x0:x1].float()[None, None]
    m64 = F.interpolate(crop, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return m64.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------
# Drawing


def draw_segmentations(
    image: Image.Image, segmentations: Sequence[Segmentation], *, alpha: float = 0.45
) -> Image.Image:
    """A new RGB image with each mask tinted in its label's colour, then boxes and labels on top.

    Colours come from `label_colours` over the same labels as `draw_detections`, so a mask and its box match.
    alpha: the tint's opacity in [0, 1]. `image` is not modified. Raises InputError on a mask whose shape is
    not the image's (H, W).
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    canvas = draw_detections(image, [])  # an RGB copy (transparency over white)
    if not segmentations:
        return canvas
    width, height = canvas.size
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width, 3).float()
    colours = label_colours(s.label for s in segmentations)
    for seg in segmentations:
        if tuple(seg.mask.shape) != (height, width):
            raise InputError(f"a mask of shape {tuple(seg.mask.shape)} does not fit a {width}×{height} image")
        inside = seg.mask.to("cpu", torch.bool)
        colour = torch.tensor(colours[seg.label], dtype=torch.float32)
        pixels[inside] = (1.0 - alpha) * pixels[inside] + alpha * colour
    out = bytearray(width * height * 3)  # filled through a tensor view: no numpy needed
    torch.frombuffer(out, dtype=torch.uint8).copy_(pixels.round().clamp(0, 255).to(torch.uint8).flatten())
    tinted = Image.frombytes("RGB", (width, height), bytes(out))
    return draw_detections(tinted, [s.to_detection() for s in segmentations])


def _image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise InputError(f"image_size must be (width, height), got {image_size!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise InputError(f"image_size must be two positive integers (width, height), got {image_size!r}")
    return width, height
