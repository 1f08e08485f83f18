"""Images and text in, model tensors out (model-notes §2 and §3).

Both halves reproduce transformers 5.24 bit for bit: `preprocess_images` matches `SiglipImageProcessorPil`
(the PIL backend; the torchvision backend's bicubic differs slightly), and `TextProcessor.encode` builds the
same ids as `PaliGemmaProcessor`. Reading the image comes before, in `vlmo.images` (`load_image`, re-exported
here), which differs from transformers on purpose in three ways: EXIF orientation is applied by default, any
Pillow mode is converted to RGB (the hub `preprocessor_config.json` says `do_convert_rgb: null`, which makes
transformers fail on grayscale and RGBA inputs), and 16-bit and 32-bit images are scaled to 8 bits by their range
where transformers clips them. It is a module of its own so that reading an image does not import torch.

Axes: B batch, T tokens, N image tokens per image, H/W image height/width in pixels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tokenizers import Tokenizer

from vlmo.errors import CheckpointError, ConfigError, InputError

# Re-exported: `load_image` and `ImageInput` were defined here, and much code imports them from here still.
from vlmo.images import ImageInput as ImageInput
from vlmo.images import _to_rgb
from vlmo.images import load_image as load_image


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How images become `pixel_values`: resize to exactly `height`×`width`, then `(x·rescale − mean) / std`.

    The aspect ratio is not kept and nothing is cropped or padded, as in SigLIP's processor (model-notes §2).
    `resample` is a Pillow filter id (3 = bicubic, the hub value).
    """

    height: int
    width: int
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"image size must be positive, got {self.height}x{self.width}; fix `size`")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std need 3 values (R, G, B); fix preprocessor_config.json")

    @classmethod
    def from_hf(cls, preprocessor_config: dict[str, Any] | None, image_size: int) -> ImageProcessorConfig:
        """Read a Hugging Face `preprocessor_config.json` dict; `None` (no file): defaults at `image_size`.

        `size` may be `{"height", "width"}`, `{"shortest_edge"}` or an int; the latter two mean a square. Keys
        vlmo does not use (`do_convert_rgb`, `image_seq_length`, `processor_class`, ...) are ignored.
        """
        if preprocessor_config is None:
            return cls(height=image_size, width=image_size)
        cfg = {k: v for k, v in preprocessor_config.items() if v is not None}
        size = cfg.get("size", image_size)
        if isinstance(size, int):
            height = width = size
        elif "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        elif "shortest_edge" in size:
            height = width = int(size["shortest_edge"])
        else:
            raise ConfigError(f"unsupported `size` {size!r} in preprocessor_config.json; use height and width")
        defaults = cls(height=height, width=width)
        return cls(
            height=height,
            width=width,
            resample=int(cfg.get("resample", defaults.resample)),
            rescale_factor=float(cfg.get("rescale_factor", defaults.rescale_factor)),
            image_mean=_three_floats(cfg.get("image_mean", defaults.image_mean)),
            image_std=_three_floats(cfg.get("image_std", defaults.image_std)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
        )


def _three_floats(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ConfigError(f"expected 3 values (R, G, B), got {values}; fix preprocessor_config.json")
    return values[0], values[1], values[2]


def preprocess_images(images: Sequence[Image.Image], config: ImageProcessorConfig) -> torch.Tensor:
    """Turn PIL images into `pixel_values: float32[B, 3, H, W]` (in [-1, 1] with the PaliGemma config).

    Images that are not RGB are converted as in `load_image` (no EXIF handling here: use `load_image` for
    files). The float ops follow transformers' PIL backend so results are bit-identical: resize the uint8
    image with Pillow, rescale in float64 then cast to float32, normalise in float32.
    """
    if len(images) == 0:
        raise InputError("no images given; pass at least one image")
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
    batch = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise InputError(f"preprocess_images takes PIL images, got {type(image).__name__}; use load_image first")
        if image.mode != "RGB" or image.info.get("transparency") is not None:
            image = _to_rgb(image)
        if config.do_resize:
            image = image.resize((config.width, config.height), resample=config.resample)
        w, h = image.size
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = data.view(h, w, 3).permute(2, 0, 1)
        if config.do_rescale:
            x = (pixels.to(torch.float64) * config.rescale_factor).to(torch.float32)
        else:
            x = pixels.to(torch.float32)
        if config.do_normalize:
            x = (x - mean) / std
        batch.append(x)
    if len({tuple(x.shape) for x in batch}) > 1:
        raise InputError("images have different sizes and do_resize is off; resize them to one size first")
    return torch.stack(batch)


# -- text ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedBatch:
    """Token tensors for a batch of prompts (and optional suffixes), padded to a common length T.

    input_ids:      int64[B, T]  `<image>`×N `<bos>` prompt `\\n` [suffix `<eos>`], padded with `<pad>`
    attention_mask: int64[B, T]  1 for real tokens, 0 for padding
    token_type_ids: int64[B, T]  0 for the prefix (image, bos, prompt, "\\n") and padding, 1 for the suffix
    labels:         int64[B, T] | None  suffix ids (with the final `<eos>`), -100 elsewhere; None without
                    suffixes
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor | None = None


class TextProcessor:
    """Builds PaliGemma prompts and token ids exactly as transformers' `PaliGemmaProcessor` (model-notes §3.2).

    A prompt becomes `<image>`×N `<bos>` prompt `\\n`; a suffix (training target) becomes suffix `<eos>`,
    tokenized as a separate sequence and appended. The tokenizer must already contain `<image>` and the
    loc/seg tokens (the PaliGemma tokenizer.json does); vlmo never adds tokens, since that would shift ids.
    """

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int, image_token: str = "<image>") -> None:
        if num_image_tokens <= 0:
            raise ConfigError(f"num_image_tokens must be positive, got {num_image_tokens}; check image_seq_length")
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            # We pad ourselves and truncation would cut image tokens; change a copy, not the caller's.
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_padding()
            tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.pad_id = self._token_id("<pad>")
        self.bos_id = self._token_id("<bos>")
        self.eos_id = self._token_id("<eos>")
        self.image_id = self._token_id(image_token)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token of this vocabulary stands for (its longest entry, at least 1): a text
        longer than this × a number of positions cannot fit in them, which is known without tokenizing it."""
        return max(1, max((len(piece) for piece in self.tokenizer.get_vocab(with_added_tokens=True)), default=1))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], num_image_tokens: int, image_token: str = "<image>"
    ) -> TextProcessor:
        """Load a `tokenizer.json`."""
        if not Path(path).is_file():
            raise CheckpointError(f"no tokenizer file at {path}; download the model's tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for every bad file
            reason = " ".join(str(e).split())
            raise CheckpointError(
                f"{path} is not a valid tokenizer.json ({reason}); download the model's tokenizer.json again"
            ) from None
        if tokenizer.get_vocab_size() == 0:
            raise CheckpointError(f"{path} has no vocabulary; download the model's tokenizer.json again")
        try:
            return cls(tokenizer, num_image_tokens, image_token)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer has no {token!r} token; use the PaliGemma tokenizer.json")
        return token_id

    def _token_text(self, token_id: int) -> str:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            raise CheckpointError(f"tokenizer has no token with id {token_id}; use the PaliGemma tokenizer.json")
        return token

    def prompt_text(self, prompt: str) -> str:
        """The prefix string before tokenization, e.g. `"<image>"×N + "<bos>caption en\\n"`.

        If `prompt` already holds `<image>`, `<bos>` goes right after the last one and each `<image>` is
        expanded, as in transformers (a prompt with k of them needs k images).
        """
        if not isinstance(prompt, str):
            raise InputError(f"prompts must be strings, got {type(prompt).__name__}")
        bos = self._token_text(self.bos_id)
        if self.image_token not in prompt:
            text = self.image_token + bos + prompt + "\n"
        else:
            end = prompt.rfind(self.image_token) + len(self.image_token)
            text = prompt[:end] + bos + prompt[end:] + "\n"
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def encode(
        self,
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] = "left",
    ) -> EncodedBatch:
        """Tokenize prompts (and training suffixes) into a padded batch; see `EncodedBatch` for the layout.

        Left padding (the default, as in transformers) keeps every row's last prompt token in the last column,
        which batched generation needs.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompts given; pass one prompt per image")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if suffixes is not None:
            suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
            if len(suffixes) != len(prompts):
                raise InputError(f"got {len(prompts)} prompts but {len(suffixes)} suffixes; pass one suffix per prompt")
            if not all(isinstance(s, str) for s in suffixes):
                raise InputError("suffixes must be strings")
        eos = self._token_text(self.eos_id)
        rows: list[tuple[list[int], list[int]]] = []
        for i, prompt in enumerate(prompts):
            # Prefix and suffix are tokenized separately, as transformers does with `text_pair`.
            prefix = self._ids(self.prompt_text(prompt))
            suffix = self._ids(suffixes[i] + eos) if suffixes is not None else []
            rows.append((prefix, suffix))

        length = max(len(p) + len(s) for p, s in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.int64)
        for row, (prefix, suffix) in enumerate(rows):
            n = len(prefix) + len(suffix)
            start = length - n if padding_side == "left" else 0
            input_ids[row, start : start + n] = torch.tensor(prefix + suffix, dtype=torch.int64)
            attention_mask[row, start : start + n] = 1
            token_type_ids[row, start + len(prefix) : start + n] = 1
        labels = None
        if suffixes is not None:
            labels = input_ids.masked_fill(token_type_ids == 0, -100)
        return EncodedBatch(input_ids, attention_mask, token_type_ids, labels)

    def _ids(self, text: str) -> list[int]:
        # Special tokens written in the text (<image>, <bos>, <eos>) are still parsed; this only keeps the
        # post-processor from adding its own <bos>.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text for `ids`; loc/seg tokens survive `skip_special_tokens` since they are ordinary vocabulary."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
