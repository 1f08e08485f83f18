"""`VLMo`: the Python entry point. Load a checkpoint, then ask it about images.

    from vlmo import VLMo
    vlm = VLMo.from_pretrained("path/to/paligemma-3b-mix-224")
    vlm.generate("photo.jpg", "caption en")             # -> "a cat sitting on a sofa"
    vlm.generate(["a.jpg", "b.jpg"], ["ocr", "ocr"])     # -> a list, run as one batch

This module ties `weights/` (checkpoint → model, loading policy), `tasks.py` (prompts), `processing.py`
(image/text → tensors) and `generation.py` (tensors → token ids) together; it holds no model maths and builds no
prompt itself. Task methods also come stepwise (`detect_steps`, `segment_steps`; `stream` for text), so that a
caller can stop a request midway by closing it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Literal, TypeVar, overload

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - typing_extensions comes with torch
    from typing_extensions import Unpack

import torch
from PIL import Image

from vlmo import tasks
from vlmo.detection import Detection, parse_detections
from vlmo.engine.features import FeatureCache
from vlmo.errors import InputError
from vlmo.generation import (
    GenerateOptions,
    SamplingConfig,
    Steps,
    check_token_budget,
    drain,
    generate_steps,
    make_generator,
)
from vlmo.nn.paligemma import PaliGemma
from vlmo.nn.vqvae import VQVAEDecoder
from vlmo.processing import (
    EncodedBatch,
    ImageInput,
    ImageProcessorConfig,
    TextProcessor,
    load_image,
    preprocess_images,
)
from vlmo.segmentation import Segmentation, parse_segmentations
from vlmo.tasks import CaptionDetail, Prompt
from vlmo.weights.devices import DTypeName, resolve_device, resolve_dtype
from vlmo.weights.hub import resolve_model
from vlmo.weights.policy import choose_quantization, load_for_inference, load_processors
from vlmo.weights.prepared import source_name

T = TypeVar("T")
PromptInput = str | Prompt
# What generation yields to its caller each step (every row's new token, whether it continues the row's text).
RowSteps = Generator[tuple[list[int], list[bool]], None, None]


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
        cache: bool = True,
    ) -> VLMo:
        """Load a checkpoint: a local directory (`config.json`, safetensors weights, `tokenizer.json`) or a hub id
        such as "google/paligemma-3b-mix-224" (downloaded once into the Hugging Face cache, then used offline).

        `device`: "auto" | "cpu" | "cuda[:N]" | "mps"; `dtype`: "auto" | "float32" | "bfloat16" | "float16".
        `revision`/`token` are passed to the hub; `progress` shows download bars on stderr (None: on a terminal).
        `adapter`: a LoRA adapter in PEFT's format (directory or hub id) trained on this base model; it is merged
        into the weights, so inference runs at the base model's speed; `adapter_revision` picks its hub revision.
        `quantize`: "int8" (CPU) holds the vision tower's and decoder's linear layers and the head as int8,
        quantized while loading so the float weights are never all in memory; "none" keeps the weights in `dtype`;
        "auto" (default) is int8 on a CPU when `dtype` is "auto" too, none otherwise (`vlmo.weights.policy` says
        why). For bit-level agreement with transformers, ask for `dtype="float32"`.
        `cache`: keep int8 (and float16-held) weights in the prepared-weights cache, so a checkpoint is quantized
        on its first load only (`VLMO_CACHE`, default the user cache folder; `vlmo.weights.prepared`).
        """
        if not isinstance(model, str | os.PathLike):
            raise InputError(
                f"model must be a hub id or a local directory (text or a path), got {type(model).__name__}; "
                'e.g. "google/paligemma-3b-mix-224"'
            )
        dev = resolve_device(device)
        mode = choose_quantization(quantize, dtype, dev)
        path = resolve_model(model, revision=revision, token=token, progress=progress)
        net = load_for_inference(
            path,
            device=dev,
            dtype=resolve_dtype(dtype, dev),
            quantize=mode,
            adapter=adapter,
            adapter_revision=adapter_revision,
            token=token,
            cache=cache,
            source=source_name(model),
        )
        text, image_config = load_processors(path, net.cfg)
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
    def generate(self, image: ImageInput, prompt: PromptInput, **options: Unpack[GenerateOptions]) -> str: ...

    @overload
    def generate(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: PromptInput | Sequence[PromptInput],
        **options: Unpack[GenerateOptions],
    ) -> str | list[str]: ...

    def generate(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: PromptInput | Sequence[PromptInput],
        **options: Unpack[GenerateOptions],
    ) -> str | list[str]:
        """Complete `prompt` (PaliGemma task syntax, e.g. "caption en", "answer en what is this?", or a
        `vlmo.tasks.Prompt`) for `image`.

        `image` is a path, encoded bytes or a PIL image. Lists of images and prompts of equal length run as one
        batch and return a list; one image with several prompts (or one prompt for several images) is broadcast,
        and the image is encoded once. Greedy by default; `do_sample` with temperature/top_k/top_p and a `seed`
        for reproducible sampling. Stops at `<eos>` or after `max_new_tokens` (default: the task's, 64 for text).
        """
        images, prompts, batched = _pair_up(image, prompt)
        texts = [text for text, _ in self._run(images, prompts, options)]
        return texts if batched else texts[0]

    def stream(
        self,
        image: ImageInput,
        prompt: PromptInput,
        *,
        image_features: torch.Tensor | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Generator[str, None, None]:
        """Like `generate` for one image and prompt, but yields pieces of text as tokens arrive.

        The pieces concatenate to exactly what `generate` returns. A piece is held back while it ends inside a
        multi-byte character (byte-fallback tokens). Bad options or input raise here, before the first piece.
        `image_features`: dt[1, N, D], this image's `encode_images([image])` result, kept by a caller that asks
        several things about one image; the vision tower is then skipped (and `image` is not read again).
        Closing the generator (as a server does when its client has gone) stops generation at once.
        """
        if not isinstance(prompt, str | Prompt):
            raise InputError("stream takes one prompt; use generate for several")
        (task,) = _prompts(prompt)
        cfg = SamplingConfig.from_options(options, task.max_new_tokens)
        batch = self._encode([task.text], cfg)
        features = self._features([image], image_features, 1)
        return self._pieces(self._steps(features, batch, cfg, options.get("seed")))

    def _pieces(self, steps: RowSteps) -> Generator[str, None, None]:
        """Text pieces as tokens arrive; closing this generator closes `steps`, so generation stops at once."""
        ids: list[int] = []
        shown = ""
        with closing(steps):
            for tokens, live in steps:
                if live[0]:
                    ids.append(tokens[0])
                text = self.text.decode(ids)
                if text.endswith("\ufffd") or not text.startswith(shown):
                    continue
                if len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
        text = self.text.decode(ids)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]

    # -- tasks (prompts and payloads: `vlmo.tasks`) ----------------------------------------------------------

    def ask(
        self,
        image: ImageInput | Sequence[ImageInput],
        question: str | Sequence[str],
        *,
        lang: str = "en",
        **options: Unpack[GenerateOptions],
    ) -> str | list[str]:
        """Answer a question about the image (`answer {lang} {question}`). Lists run as a batch."""
        if isinstance(question, str):
            return self.generate(image, tasks.ask(question, lang), **options)
        if not isinstance(question, Sequence):
            raise InputError(f"the question must be text or a list of texts, got {type(question).__name__}")
        return self.generate(image, [tasks.ask(q, lang) for q in question], **options)

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
        return self.generate(image, tasks.caption(detail, lang), **options)

    def ocr(self, image: ImageInput | Sequence[ImageInput], **options: Unpack[GenerateOptions]) -> str | list[str]:
        """Read the text in the image (`ocr`)."""
        return self.generate(image, tasks.ocr(), **options)

    @overload
    def detect(
        self, image: ImageInput, labels: str | Sequence[str], **options: Unpack[GenerateOptions]
    ) -> list[Detection]: ...

    @overload
    def detect(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        **options: Unpack[GenerateOptions],
    ) -> list[Detection] | list[list[Detection]]: ...

    def detect(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        **options: Unpack[GenerateOptions],
    ) -> list[Detection] | list[list[Detection]]:
        """Find objects (`detect a ; b`). Returns boxes in pixels of each original image; a list per image for a list.

        `labels`: "cat ; dog" or ["cat", "dog"]. An object cut off by `max_new_tokens` (default 128 here) is dropped.
        """
        return drain(self.detect_steps(image, labels, **options))

    def detect_steps(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        **options: Unpack[GenerateOptions],
    ) -> Generator[None, None, list[Detection] | list[list[Detection]]]:
        """`detect` one generated token at a time: yields None after each token and returns what `detect` returns
        (as the generator's return value). For a caller that must be able to stop midway, such as a server whose
        client has gone: closing the generator stops generation at once."""
        return (yield from self._locate(image, tasks.detect(labels), options, parse_detections))

    @overload
    def segment(
        self,
        image: ImageInput,
        labels: str | Sequence[str],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> list[Segmentation]: ...

    @overload
    def segment(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> list[Segmentation] | list[list[Segmentation]]: ...

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
        return drain(self.segment_steps(image, labels, mask_decoder=mask_decoder, **options))

    def segment_steps(
        self,
        image: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Generator[None, None, list[Segmentation] | list[list[Segmentation]]]:
        """`segment` one generated token at a time, as `detect_steps` is `detect`: closing it stops generation."""
        prompt = tasks.segment(labels)
        decoder = self.mask_decoder(mask_decoder)
        parse = lambda text, size: parse_segmentations(text, size, decoder)  # noqa: E731
        return (yield from self._locate(image, prompt, options, parse))

    def mask_decoder(self, mask_decoder: str | os.PathLike[str] | None = None) -> VQVAEDecoder:
        """The VQ-VAE mask decoder `segment` uses (a local `vae-oid.npz` / .safetensors, or None for the default,
        downloaded once), loaded on first use and kept (`vlmo.weights.vqvae`). A server calls it at start-up so
        that a decoder it cannot have is one error before any generation."""
        from vlmo.weights.vqvae import load_mask_decoder  # only segment needs it (and its hub code)

        key = None if mask_decoder is None else str(mask_decoder)
        if key not in self._mask_decoders:
            self._mask_decoders[key] = load_mask_decoder(mask_decoder)
        return self._mask_decoders[key]

    def parse_located(
        self,
        task: Literal["detect", "segment"],
        text: str,
        size: tuple[int, int],
        ended: bool,
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
    ) -> list[Detection] | list[Segmentation]:
        """A `detect` / `segment` answer's objects, as `detect` and `segment` return them, for a caller that ran
        the generation itself (the server's engine): `text` is the generated answer for an image of `size`
        (w, h) in pixels, `ended` whether `<eos>` ended it. When it did not, the last object may be cut short and
        is dropped, as `detect` does."""
        if task == "detect":
            return _drop_cut(parse_detections(text, size), ended)
        if task == "segment":
            return _drop_cut(parse_segmentations(text, size, self.mask_decoder(mask_decoder)), ended)
        raise InputError(f"parse_located takes task 'detect' or 'segment', got {task!r}")

    def locate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[Prompt],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> list[list[Detection]] | list[list[Segmentation]]:
        """`detect` or `segment` for a batch in which every image has its own labels, run as one padded batch.

        `prompts`: one `tasks.detect(...)` per image, or one `tasks.segment(...)` per image (one task per call).
        Returns a list of objects per image, as `detect` / `segment` do for a list of images. For callers whose
        rows carry their own labels, such as `vlmo batch` reading a manifest.
        """
        kinds = {p.task if isinstance(p, Prompt) else None for p in prompts}
        if kinds not in ({"detect"}, {"segment"}):
            raise InputError("locate takes one task's prompts: a list of tasks.detect(...) or of tasks.segment(...)")
        if not isinstance(images, list | tuple) or len(images) != len(prompts):
            raise InputError("locate takes a list of images and a list of prompts of the same length")
        # A list of images in, so a list per image out (`_locate`'s other case, one image, cannot happen here).
        if kinds == {"detect"}:
            detections = drain(self._locate(list(images), list(prompts), options, parse_detections))
            return detections  # type: ignore[return-value]
        decoder = self.mask_decoder(mask_decoder)
        parse = lambda text, size: parse_segmentations(text, size, decoder)  # noqa: E731
        segmentations = drain(self._locate(list(images), list(prompts), options, parse))
        return segmentations  # type: ignore[return-value]

    def _locate(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: Prompt | Sequence[Prompt],
        options: GenerateOptions,
        parse: Callable[[str, tuple[int, int]], list[T]],
    ) -> Generator[None, None, list[T] | list[list[T]]]:
        """Shared by detect/segment: generate (a step per token), parse each answer against its original size."""
        images, prompts, batched = _pair_up(image, prompt)
        loaded = [load_image(im) for im in images]
        answers = yield from self._run_steps(loaded, prompts, options)
        out = [_drop_cut(parse(text, im.size), ended) for im, (text, ended) in zip(loaded, answers, strict=True)]
        return out if batched else out[0]

    # -- the loop under every task ---------------------------------------------------------------------------

    def _run(
        self, images: Sequence[ImageInput], prompts: Sequence[Prompt], options: GenerateOptions
    ) -> list[tuple[str, bool]]:
        """Generate for a batch: per row, the text and whether it ended with `<eos>` (False: cut by max tokens)."""
        return drain(self._run_steps(images, prompts, options))

    def _run_steps(
        self, images: Sequence[ImageInput], prompts: Sequence[Prompt], options: GenerateOptions
    ) -> Generator[None, None, list[tuple[str, bool]]]:
        """`_run` yielding None after every step; closing it stops generation at once."""
        cfg = SamplingConfig.from_options(options, max(p.max_new_tokens for p in prompts))
        batch = self._encode([p.text for p in prompts], cfg)
        features = self._features(images, None, len(prompts))
        rows: list[list[int]] = [[] for _ in prompts]
        live = [True] * len(prompts)
        with closing(self._steps(features, batch, cfg, options.get("seed"))) as steps:
            for tokens, live in steps:
                for row, token, alive in zip(rows, tokens, live, strict=True):
                    if alive:
                        row.append(token)
                yield
        return [(self.text.decode(r), not alive) for r, alive in zip(rows, live, strict=True)]

    def _encode(self, prompts: Sequence[str], cfg: SamplingConfig) -> EncodedBatch:
        """Tokenize the prompts and check the token budget (`generation.check_token_budget`), before any image is
        encoded or cache allocated: a prompt too long for the model costs nothing but its tokenization."""
        batch = self.text.encode(list(prompts))
        check_token_budget(batch.input_ids.shape[1], cfg.max_new_tokens, self.model.cfg.text.max_position_embeddings)
        return batch

    def _steps(self, features: torch.Tensor, batch: EncodedBatch, cfg: SamplingConfig, seed: int | None) -> RowSteps:
        """Per step: every row's new token and whether it continues the row's text (`generation.generate_steps`).

        `features`: dt[B or 1, N, D], the images' `encode_images` result (one image is broadcast to every prompt).
        Closing the returned generator closes generate_steps' own, so no further step runs.
        """
        rows = batch.input_ids.shape[0]
        if features.shape[0] == 1 and rows > 1:
            features = features.expand(rows, -1, -1)
        eos = sorted(set(self.model.cfg.eos_token_ids) | {self.text.eos_id})
        steps = generate_steps(
            self.model,
            batch.input_ids.to(self.device),
            batch.attention_mask.to(self.device),
            features,
            cfg,
            eos,
            self.text.pad_id,
            make_generator(seed, self.device),
        )
        return _as_lists(steps)

    def _features(self, images: Sequence[ImageInput], given: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The images' features dt[B or 1, N, D]: `given` checked against this model, else encoded (and cached)."""
        if given is None:
            return self.encode_images(images)
        want = (self.model.cfg.num_image_tokens, self.model.cfg.text.hidden_size)
        if not isinstance(given, torch.Tensor) or given.ndim != 3 or tuple(given.shape[1:]) != want:
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise InputError(
                f"image_features must have shape (1, {want[0]}, {want[1]}) for this model, got {got}; "
                "pass this model's encode_images([image])"
            )
        if given.shape[0] not in (1, rows):
            raise InputError(f"image_features hold {given.shape[0]} images for {rows} prompts; pass one per prompt")
        return given.to(self.device, self.dtype)

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images → projected soft tokens dt[B, N, D] (what the decoder sees in place of `<image>`).

        Results are kept in `image_cache` (the last 8 images by content), so every task about an image seen
        recently skips preprocessing and the vision tower."""
        return self.image_cache.get_many([load_image(im) for im in images])

    @torch.inference_mode()
    def _encode_pils(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(list(images), self.image_config)
        return self.model.encode_images(pixels.to(self.device))


def _drop_cut(found: list[T], ended: bool) -> list[T]:
    """A located answer's objects; without `<eos>` at its end, the last one may be cut short and is dropped."""
    return found if ended or not found else found[:-1]


def _as_lists(steps: Steps) -> RowSteps:
    """generate_steps' tensors as lists; closing this closes `steps`."""
    with closing(steps):
        for tokens, live in steps:
            yield tokens.tolist(), live.tolist()


def _prompts(prompt: PromptInput | Sequence[PromptInput]) -> list[Prompt]:
    """Prompts as `Prompt`s: a plain string is a raw prompt (`tasks.raw`)."""
    items = [prompt] if isinstance(prompt, str | Prompt) else list(prompt)
    return [p if isinstance(p, Prompt) else tasks.raw(p) for p in items]


def _pair_up(
    image: ImageInput | Sequence[ImageInput], prompt: PromptInput | Sequence[PromptInput]
) -> tuple[list[ImageInput], list[Prompt], bool]:
    """Normalise (image, prompt) into equal-length lists, or one image for many prompts; flag list inputs."""
    image_list = isinstance(image, list | tuple)
    prompt_list = not isinstance(prompt, str | Prompt)
    # Only a list or tuple is several images; anything else is one (load_image rejects what is not an image).
    images: list[ImageInput] = list(image) if isinstance(image, list | tuple) else [image]  # type: ignore[list-item]
    prompts = _prompts(prompt)
    if not images or not prompts:
        raise InputError("no images or no prompts given; pass at least one of each")
    if image_list and prompt_list and len(images) != len(prompts):
        raise InputError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    return images, prompts, image_list or prompt_list
