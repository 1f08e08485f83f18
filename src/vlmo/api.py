"""`VLMo`: the Python entry point. Load a checkpoint, then ask it about images.

    from vlmo import VLMo
    vlm = VLMo.from_pretrained("path/to/paligemma-3b-mix-224")
    vlm.generate("photo.jpg", "caption en")             # -> "a cat sitting on a sofa"
    vlm.generate(["a.jpg", "b.jpg"], ["ocr", "ocr"])     # -> a list, run as one batch

This module ties `weights/` (checkpoint → model), `processing.py` (image/text → tensors) and `generation.py`
(tensors → token ids) together; it holds no model maths itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, overload

import torch

from vlmo.errors import InputError, VlmoError
from vlmo.generation import SamplingConfig, generate_ids, make_generator
from vlmo.nn.paligemma import PaliGemma
from vlmo.processing import (
    ImageInput,
    ImageProcessorConfig,
    TextProcessor,
    load_image,
    preprocess_images,
)
from vlmo.weights.loader import load_model, read_json

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(VlmoError, ValueError):
    """A device that is unknown or not available on this machine."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" picks cuda, then mps, then cpu. A named device that this machine lacks is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index is not None and dev.index >= torch.cuda.device_count())
    ):
        raise DeviceError(f"device {device!r} is not available here (no such CUDA GPU); use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} is not available here (no Apple MPS); use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: DTypeName | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto": float32 on CPU (CPUs without native bf16 run bf16 matmuls several times slower), bfloat16 on CUDA
    (float16 where the GPU lacks bf16), float16 on MPS."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


class VLMo:
    """A loaded PaliGemma model with its tokenizer and image settings."""

    def __init__(self, model: PaliGemma, text: TextProcessor, image_config: ImageProcessorConfig, source: Path) -> None:
        self.model = model
        self.text = text
        self.image_config = image_config
        self.source = source

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        dtype: DTypeName | torch.dtype = "auto",
    ) -> VLMo:
        """Load a checkpoint directory (`config.json`, safetensors weights, `tokenizer.json`).

        `device`: "auto" | "cpu" | "cuda[:N]" | "mps"; `dtype`: "auto" | "float32" | "bfloat16" | "float16".
        """
        path = Path(model).expanduser()
        dev = resolve_device(device)
        net = load_model(path, dtype=resolve_dtype(dtype, dev), device=dev)
        pre = path / "preprocessor_config.json"
        image_config = ImageProcessorConfig.from_hf(
            read_json(pre) if pre.is_file() else None, net.cfg.vision.image_size
        )
        text = TextProcessor.from_file(path / "tokenizer.json", net.cfg.num_image_tokens)
        if text.image_id != net.cfg.image_token_id:
            raise InputError(
                f"tokenizer.json puts <image> at id {text.image_id} but config.json says image_token_index "
                f"{net.cfg.image_token_id}; the two files come from different models"
            )
        return cls(net, text, image_config, path)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- generation ------------------------------------------------------------------------------------------

    @overload
    def generate(
        self,
        image: ImageInput,
        prompt: str,
        *,
        max_new_tokens: int = ...,
        do_sample: bool = ...,
        temperature: float = ...,
        top_p: float = ...,
        top_k: int = ...,
        seed: int | None = ...,
    ) -> str: ...

    @overload
    def generate(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int = ...,
        do_sample: bool = ...,
        temperature: float = ...,
        top_p: float = ...,
        top_k: int = ...,
        seed: int | None = ...,
    ) -> str | list[str]: ...

    def generate(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> str | list[str]:
        """Complete `prompt` (PaliGemma task syntax, e.g. "caption en", "answer en what is this?") for `image`.

        `image` is a path, encoded bytes or a PIL image. Lists of images and prompts of equal length run as one
        batch and return a list; one image with several prompts (or one prompt for several images) is broadcast,
        and the image is encoded once. Greedy by default; `do_sample` with temperature/top_k/top_p and a `seed`
        for reproducible sampling. Stops at `<eos>` or after `max_new_tokens`.
        """
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p)
        images, prompts, batched = _pair_up(image, prompt)
        rows: list[list[int]] = [[] for _ in prompts]
        for step in self._token_steps(images, prompts, cfg, seed):
            for row, token in zip(rows, step, strict=True):
                row.extend(token)
        texts = [self.text.decode(r) for r in rows]
        return texts if batched else texts[0]

    def stream(
        self,
        image: ImageInput,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like `generate` for one image and prompt, but yields pieces of text as tokens arrive.

        The pieces concatenate to exactly what `generate` returns. A piece is held back while it ends inside a
        multi-byte character (byte-fallback tokens).
        """
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p)
        ids: list[int] = []
        shown = ""
        for step in self._token_steps([image], [prompt], cfg, seed):
            ids.extend(step[0])
            text = self.text.decode(ids)
            if text.endswith("\ufffd") or not text.startswith(shown):
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = self.text.decode(ids)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]

    def _token_steps(
        self, images: Sequence[ImageInput], prompts: Sequence[str], cfg: SamplingConfig, seed: int | None
    ) -> Iterator[list[list[int]]]:
        """Per step, the new token ids of each row: `[]` once a row has ended, never `<eos>` itself."""
        batch = self.text.encode(prompts)
        features = self.encode_images(images)
        if features.shape[0] == 1 and len(prompts) > 1:
            features = features.expand(len(prompts), -1, -1)
        eos = set(self.model.cfg.eos_token_ids) | {self.text.eos_id}
        finished = [False] * len(prompts)
        for tokens in generate_ids(
            self.model,
            batch.input_ids.to(self.device),
            batch.attention_mask.to(self.device),
            features,
            cfg,
            sorted(eos),
            self.text.pad_id,
            make_generator(seed, self.device),
        ):
            step: list[list[int]] = []
            for i, tok in enumerate(tokens.tolist()):
                if finished[i] or tok in eos:
                    finished[i] = True
                    step.append([])
                else:
                    step.append([tok])
            yield step

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images → projected soft tokens dt[B, N, D] (what the decoder sees in place of `<image>`)."""
        pixels = preprocess_images([load_image(im) for im in images], self.image_config)
        return self.model.encode_images(pixels.to(self.device))


def _pair_up(
    image: ImageInput | Sequence[ImageInput], prompt: str | Sequence[str]
) -> tuple[list[ImageInput], list[str], bool]:
    """Normalise (image, prompt) into equal-length lists, or one image for many prompts; flag list inputs."""
    image_list = isinstance(image, list | tuple)
    prompt_list = not isinstance(prompt, str)
    images = list(image) if image_list else [image]  # type: ignore[arg-type]
    prompts = list(prompt) if prompt_list else [prompt]  # type: ignore[arg-type]
    if not images or not prompts:
        raise InputError("no images or no prompts given; pass at least one of each")
    if image_list and prompt_list and len(images) != len(prompts):
        raise InputError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    return images, prompts, image_list or prompt_list
