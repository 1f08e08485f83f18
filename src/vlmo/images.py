"""The one image reader: a path, encoded bytes or a PIL image in, a fully loaded RGB PIL image out.

Every face reads its images here (the library, the CLI, the app, the server, `vlmo batch`), so a bad image is the
same one-line `ImageError` everywhere. Three deliberate differences from transformers: EXIF orientation is applied
by default, any Pillow mode is converted to RGB (transparency over white), and 16-bit and 32-bit images are scaled
to 8 bits by their range where transformers clips them.

This module imports no torch (only `_to_8bit` does, and only for 16-bit and 32-bit images), so a client that only
reads and checks images (the CLI talking to a server) starts without paying for it. Turning the image into model
tensors is `vlmo.processing`'s job.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmo.errors import ImageError
from vlmo.fileio import is_url

ImageInput = str | os.PathLike[str] | bytes | Image.Image


def load_image(image: ImageInput, exif_transpose: bool = True) -> Image.Image:
    """Open `image` (a path, encoded bytes, or a PIL image) as a fully loaded RGB image.

    EXIF orientation is applied first (a phone photo comes out upright); transformers does not do this, so
    pass `exif_transpose=False` to feed the model exactly what transformers would. Transparency is composited
    onto white. 16-bit and 32-bit images are scaled to 8 bits by their range (`_to_8bit`), where Pillow's and
    transformers' conversion clips them (mostly white). Pixels are decoded here, so a truncated file fails now
    and not halfway through a batch.
    """
    if isinstance(image, Image.Image):
        name, opened = "the given PIL image", image
        _decode(opened, name)
    elif isinstance(image, bytes):
        if not image:  # e.g. a manifest row with no image: say so, not "not an image"
            raise ImageError("the input has no image (its bytes are empty); pass an image file or its bytes")
        name = "the given image bytes"
        opened = _decode(io.BytesIO(image), name)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name = str(path)
        if not path.is_file():
            if is_url(os.fspath(image)):  # Path() would show "http:/host/a.png", a file that is not there
                raise ImageError(
                    f"{os.fspath(image)} is a URL, and images are read from files here: download it first "
                    "(vlmo serve --allow-remote-images reads URLs)"
                )
            raise ImageError(f"no image file at {name}; check the path")
        opened = _decode(path, name)
    else:
        raise ImageError(f"cannot read an image from a {type(image).__name__}; pass a path, bytes or a PIL image")
    if exif_transpose:
        opened = ImageOps.exif_transpose(opened)
    return _to_rgb(opened, name)


def _decode(source: Image.Image | io.BytesIO | Path, name: str) -> Image.Image:
    """Open `source` unless it is already an image, and force Pillow to decode its pixels."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse such an image all the same.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                source.load()  # a lazily opened image decodes here; a loaded one returns at once
                return source
            with Image.open(source) as image:  # closes the file even for multi-frame formats
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{name} is too large (over Pillow's decompression-bomb limit of {limit} pixels); "
            "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image Pillow can read; pass a PNG, JPEG, WebP or similar file") from exc
    except OSError as exc:
        if exc.errno is None:  # Pillow's decoding errors carry no errno ("image file is truncated")
            raise ImageError(f"{name} is truncated or corrupt ({exc}); re-export or re-download the image") from exc
        # The operating system refused or failed the read (permissions, I/O): the file itself may be fine.
        reason = (exc.strerror or str(exc)).lower()
        denied = exc.errno in (errno.EACCES, errno.EPERM)
        advice = "check its permissions" if denied else "check the file and the disk it is on"
        raise ImageError(f"cannot read {name}: {reason}; {advice}") from exc
    except (SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is truncated or corrupt ({exc}); re-export or re-download the image") from exc
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """An "L" image for a 16-bit or 32-bit one (modes I;16, I;16B, I;16L, I;16N, I, F); others unchanged.

    Scaled by range, as image viewers show such images, never clipped (Pillow's `convert` clips to 0–255, so a
    16-bit image comes out nearly all white): 16-bit integers by their full range (v / 257, rounded); 32-bit
    integers and floats by their own min..max (NaN and ±inf count as the ends; a constant image keeps its value,
    clipped to 0–255). Transparency of such images (a tRNS value) is not kept.
    """
    full_range = image.mode.startswith("I;16")
    if not full_range and image.mode not in ("I", "F"):
        return image
    if image.width == 0 or image.height == 0:
        return Image.new("L", image.size)
    import torch  # here, not at the top: reading 8-bit images (nearly all of them) must not load torch

    if full_range:
        # Read the 16-bit words ourselves: Pillow's convert("I") clips I;16N to 0–255.
        big = image.mode == "I;16B" or (image.mode == "I;16N" and sys.byteorder == "big")
        pairs = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(-1, 2).to(torch.float64)
        values = pairs[:, 1] + 256 * pairs[:, 0] if big else pairs[:, 0] + 256 * pairs[:, 1]
    else:
        dtype = torch.int32 if image.mode == "I" else torch.float32
        values = torch.frombuffer(bytearray(image.tobytes()), dtype=dtype).to(torch.float64)
    finite = values.isfinite()
    if full_range:
        low, high = 0.0, 65535.0
    elif bool(finite.any()):
        low, high = float(values[finite].min()), float(values[finite].max())
    else:
        low = high = 0.0
    values = values.nan_to_num(nan=low, posinf=high, neginf=low)
    if high > low:
        values = (values - low) * (255.0 / (high - low))
    pixels = bytearray(values.numel())
    torch.frombuffer(pixels, dtype=torch.uint8).copy_(values.round().clamp(0, 255))
    return Image.frombytes("L", image.size, bytes(pixels))


def _to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """RGB copy of `image`, compositing any transparency onto white, as transformers' `convert_to_rgb` does.

    "Transparency" means an alpha band, or a `transparency` entry in `image.info` (palette or tRNS colour).
    16-bit and 32-bit images are first scaled to 8 bits by their range (`_to_8bit`).
    """
    image = _to_8bit(image)
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"cannot convert {name} from mode {image.mode!r} to RGB; save it as RGB or RGBA") from exc


__all__ = ["ImageInput", "load_image"]
