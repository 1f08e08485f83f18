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
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypedDict, TypeVar, overload

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - typing_extensions comes with torch
    from typing_extensions import Unpack

import torch
from PIL import Image

from vlmo.detection import Detection, detect_prompt, parse_detections
from vlmo.devices import DTypeName, resolve_device, resolve_dtype
from vlmo.errors import InputError
from vlmo.features import FeatureCache
from vlmo.generation import SamplingConfig, generate_ids, make_generator
from vlmo.nn.paligemma import PaliGemma
from vlmo.nn.vqvae import VQVAEDecoder
from vlmo.processing import (
    ImageInput,
    ImageProcessorConfig,
    TextProcessor,
    load_image,
    preprocess_images,
)
from vlmo.segmentation import Segmentation, parse_segmentations
from vlmo.weights.hub import resolve_model
from vlmo.weights.loader import load_model, read_json
from vlmo.weights.vqvae import load_mask_decoder

T = TypeVar("T")
CaptionDetail = Literal["short", "long", "raw"]
CAPTION_TASKS = {"short": "caption", "long": "describe", "raw": "cap"}


class GenerateOptions(TypedDict, total=False):
    """Keyword options every task method accepts; see `VLMo.generate`."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


class VLMo:
    """A loaded PaliGemma model with its tokenizer and image settings."""

    def __init__(self, model: PaliGemma, text: TextProcessor, image_config: ImageProcessorConfig, source: Path) -> None:
        self.model = model
        self.text = text
        self.image_config = image_config
        # Encoded images by content: asking several things about one image runs the vision tower once.
        self.image_cache = FeatureCache(self._encode_pils, capacity=8)
        self.source = source
        self._mask_decoders: dict[str | None, VQVAEDecoder] = {}  # loaded on first `segment`, by source

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        dtype: DTypeName | torch.dtype = "auto",
        revision: str | None = None,
        token: str | bool | None = None,
        progress: bool | None = None,
        adapter: str | os.PathLike[str] | None = None,
        adapter_revision: str | None = None,
        quantize: str | None = "auto",
    ) -> VLMo:
        """Load a checkpoint: a local directory (`config.json`, safetensors weights, `tokenizer.json`) or a hub id
        such as "google/paligemma-3b-mix-224" (downloaded once into the Hugging Face cache, then used offline).

        `device`: "auto" | "cpu" | "cuda[:N]" | "mps"; `dtype`: "auto" | "float32" | "bfloat16" | "float16".
        `revision`/`token` are passed to the hub; `progress` shows download bars on stderr (None: on a terminal).
        `adapter`: a LoRA adapter in PEFT's format (directory or hub id) trained on this base model; it is merged
        into the weights, so inference runs at the base model's speed; `adapter_revision` picks its hub revision.
        `quantize`: "int8" (CPU) holds the vision tower's and decoder's linear layers and the head as int8,
        quantized while loading so the float weights are never all in memory (`vlmo.nn.quant`); "none" keeps the
        weights in `dtype`; "auto" (default) is int8 on a CPU when `dtype` is "auto" too, the mode that answers
        fastest in a quarter of float32's memory (docs/benchmarks.md), and none otherwise. For bit-level agreement
        with transformers, ask for `dtype="float32"`.
        """
        dev = resolve_device(device)
        mode = _quant_mode(quantize, dtype, dev)
        path = resolve_model(model, revision=revision, token=token, progress=progress)
        want = resolve_dtype(dtype, dev)
        # bfloat16 on a CPU holds its linear weights in float16 (nn/quant.py, Float16Linear: faster decode).
        half_weights = mode is None and dev.type == "cpu" and want == torch.bfloat16
        # Quantizing starts from the stored (mmapped) weights: casting first would put a float copy in memory.
        load_dtype = None if mode else torch.float16 if half_weights else want
        net = load_model(path, dtype=load_dtype, device=dev)
        if adapter is not None:
            from vlmo.nn.lora import remove_lora
            from vlmo.weights.adapters import load_adapter

            load_adapter(net, adapter, revision=adapter_revision, token=token)
            remove_lora(net, merge=True)
        if mode == "int8":
            from vlmo.nn.quant import quantize_int8
            from vlmo.weights.safetensors_io import release_pages, trim_heap

            released = [0]

            def release(weight: torch.Tensor) -> None:
                release_pages(weight)
                released[0] += weight.nbytes
                if released[0] > 256 * 2**20:  # now and then, not per chunk: a trim walks the whole heap
                    trim_heap()
                    released[0] = 0

            # Without an adapter the embedding is the checkpoint's own mapped table: read it in place.
            quantize_int8(net, release=release, mapped_embedding=adapter is None)
            trim_heap()
        elif half_weights:
            from vlmo.nn.quant import hold_float16

            hold_float16(net, torch.bfloat16)
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
        """The activation dtype (float32 for an int8 model)."""
        return self.model.dtype

    @property
    def quantized(self) -> bool:
        """True when the weights are held as int8 (`quantize="int8"`)."""
        from vlmo.nn.quant import is_quantized

        return is_quantized(self.model)

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
        texts = [text for text, _ in self._run(images, prompts, cfg, seed)]
        return texts if batched else texts[0]

    # -- tasks -----------------------------------------------------------------------------------------------

    def ask(
        self,
        image: ImageInput | Sequence[ImageInput],
        question: str | Sequence[str],
        *,
        lang: str = "en",
        **options: Unpack[GenerateOptions],
    ) -> str | list[str]:
        """Answer a question about the image (`answer {lang} {question}`). Lists run as a batch."""
        questions = [question] if isinstance(question, str) else list(question)
        prompts = [f"answer {lang} {_one_line(q, 'question')}" for q in questions]
        return self.generate(image, prompts if not isinstance(question, str) else prompts[0], **options)

    def caption(
        self,
        image: ImageInput | Sequence[ImageInput],
        *,
        lang: str = "en",
        detail: CaptionDetail = "short",
        **options: Unpack[GenerateOptions],
    ) -> str | list[str]:
        """Describe the image: "short" (`caption`, COCO-like), "long" (`describe`), "raw" (`cap`, alt-text style;
        pretrained checkpoints only)."""
        if detail not in CAPTION_TASKS:
            raise InputError(f"unknown caption detail {detail!r}; use short, long or raw")
        return self.generate(image, f"{CAPTION_TASKS[detail]} {lang}", **options)

    def ocr(self, image: ImageInput | Sequence[ImageInput], **options: Unpack[GenerateOptions]) -> str | list[str]:
        """Read the text in the image (`ocr`)."""
        return self.generate(image, "ocr", **options)

    def detect(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        **options: Unpack[GenerateOptions],
    ) -> list[Detection] | list[list[Detection]]:
        """Find objects (`detect a ; b`). Returns boxes in pixels of each original image; a list per image for a list.

        `labels`: "cat ; dog" or ["cat", "dog"]. An object cut off by `max_new_tokens` (default 128 here) is dropped.
        """
        options.setdefault("max_new_tokens", 128)
        return self._locate(image, labels, "detect", options, parse_detections)

    def segment(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> list[Segmentation] | list[list[Segmentation]]:
        """Segment objects (`segment a ; b`): label, box and a boolean mask of each original image's size.

        The `<seg>` codes are decoded by PaliGemma's VQ-VAE mask decoder: `mask_decoder` is a local `vae-oid.npz`
        (or its converted .safetensors); by default it is downloaded once and cached (`vlmo.weights.vqvae`).
        An object cut off by `max_new_tokens` (default 256 here) is dropped.
        """
        key = None if mask_decoder is None else str(mask_decoder)
        if key not in self._mask_decoders:
            self._mask_decoders[key] = load_mask_decoder(mask_decoder)
        decoder = self._mask_decoders[key]
        options.setdefault("max_new_tokens", 256)
        return self._locate(
            image, labels, "segment", options, lambda text, size: parse_segmentations(text, size, decoder)
        )

    def _locate(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        task: Literal["detect", "segment"],
        options: GenerateOptions,
        parse: Callable[[str, tuple[int, int]], list[T]],
    ) -> list[T] | list[list[T]]:
        """Shared by detect/segment: prompt, generate, parse each answer against its original image size."""
        prompt = detect_prompt(labels.split(";") if isinstance(labels, str) else labels, task)
        images, _, batched = _pair_up(image, prompt)
        loaded = [load_image(im) for im in images]
        results = self._run(loaded, [prompt] * len(loaded), _sampling(options), options.get("seed"))
        out = []
        for im, (text, ended) in zip(loaded, results, strict=True):
            found = parse(text, im.size)
            out.append(found if ended or not found else found[:-1])  # the last object may be cut short
        return out if batched else out[0]

    def _run(
        self, images: Sequence[ImageInput], prompts: Sequence[str], cfg: SamplingConfig, seed: int | None
    ) -> list[tuple[str, bool]]:
        """Generate for a batch: per row, the text and whether it ended with `<eos>` (False: cut by max tokens)."""
        rows: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        for step in self._token_steps(images, prompts, cfg, seed):
            for i, token in enumerate(step):
                if token is None:
                    ended[i] = True
                elif token >= 0:
                    rows[i].append(token)
        return [(self.text.decode(r), e) for r, e in zip(rows, ended, strict=True)]

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
        image_features: torch.Tensor | None = None,
    ) -> Iterator[str]:
        """Like `generate` for one image and prompt, but yields pieces of text as tokens arrive.

        The pieces concatenate to exactly what `generate` returns. A piece is held back while it ends inside a
        multi-byte character (byte-fallback tokens).
        `image_features`: dt[1, N, D], this image's `encode_images([image])` result, kept by a caller that asks
        several things about one image; the vision tower is then skipped (and `image` is not read again).
        """
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p)
        ids: list[int] = []
        shown = ""
        for step in self._token_steps([image], [prompt], cfg, seed, image_features):
            if step[0] is not None and step[0] >= 0:
                ids.append(step[0])
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
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        cfg: SamplingConfig,
        seed: int | None,
        features: torch.Tensor | None = None,
    ) -> Iterator[list[int | None]]:
        """Per step and row: the new token id; None at the row's end-of-sequence; -1 after that.

        `features`: precomputed `encode_images(images)` (dt[B or 1, N, D]); None encodes the images here.
        """
        batch = self.text.encode(prompts)
        if features is None:
            features = self.encode_images(images)
        else:
            features = self._check_features(features, len(prompts))
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
            step: list[int | None] = []
            for i, tok in enumerate(tokens.tolist()):
                if finished[i]:
                    step.append(-1)
                elif tok in eos:
                    finished[i] = True
                    step.append(None)
                else:
                    step.append(tok)
            yield step

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images → projected soft tokens dt[B, N, D] (what the decoder sees in place of `<image>`).

        Results are kept in `image_cache` (the last 8 images by content), so every task about an image seen
        recently skips preprocessing and the vision tower."""
        return self.image_cache.get_many([load_image(im) for im in images])

    @torch.inference_mode()
    def _encode_pils(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(list(images), self.image_config)
        return self.model.encode_images(pixels.to(self.device))

    def _check_features(self, features: torch.Tensor, rows: int) -> torch.Tensor:
        """Given image features, on this model's device and dtype; InputError if they cannot be this model's."""
        want = (self.model.cfg.num_image_tokens, self.model.cfg.text.hidden_size)
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or tuple(features.shape[1:]) != want:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InputError(
                f"image_features must have shape (1, {want[0]}, {want[1]}) for this model, got {got}; "
                "pass this model's encode_images([image])"
            )
        if features.shape[0] not in (1, rows):
            raise InputError(f"image_features hold {features.shape[0]} images for {rows} prompts; pass one per prompt")
        return features.to(self.device, self.dtype)


def _quant_mode(quantize: str | None, dtype: DTypeName | torch.dtype, device: torch.device) -> str | None:
    """None (no quantization) or "int8", after checking that it fits the device and dtype."""
    if quantize in (None, "none"):
        return None
    if quantize == "auto":
        cpu_int8 = device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
        return "int8" if cpu_int8 and dtype == "auto" else None
    if quantize != "int8":
        raise InputError(f"unknown quantize mode {quantize!r}; use auto, int8 or none")
    if device.type != "cpu":
        raise InputError(f"--quantize int8 runs on the CPU only, not {device.type}; use 16-bit weights there")
    if dtype not in ("auto", "float32", torch.float32):
        raise InputError(f"--quantize int8 computes in float32; drop --dtype {str(dtype).removeprefix('torch.')}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InputError("--quantize int8 needs PyTorch's fbgemm kernels (x86 CPUs); use --dtype bfloat16 here")
    return quantize


def _sampling(options: GenerateOptions) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=options.get("max_new_tokens", 64),
        do_sample=options.get("do_sample", False),
        temperature=options.get("temperature", 1.0),
        top_k=options.get("top_k", 0),
        top_p=options.get("top_p", 1.0),
    )


def _one_line(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"the {what} is empty; pass some text")
    return " ".join(text.split())


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
