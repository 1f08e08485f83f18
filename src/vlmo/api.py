"""`VLMo`: the Python entry point. Load a checkpoint, then ask it about images.

    from vlmo import VLMo
    vlm = VLMo.from_pretrained("path/to/paligemma-3b-mix-224")
    vlm.generate("photo.jpg", "caption en")             # -> "a cat sitting on a sofa"
    vlm.generate(["a.jpg", "b.jpg"], ["ocr", "ocr"])     # -> a list, run as one batch

This module ties `weights/` (checkpoint → model, loading policy), `tasks.py` (prompts and answers),
`processing.py` (image/text → tensors) and the engine's loop (`engine.scheduler`: tensors → tokens → text)
together; it holds no model maths, builds no prompt and runs no decode loop of its own. It gives the loop the
model through named methods (`tokenize`, `prefill`, `decode`, …) and steps it in the caller's thread. Task methods
also come stepwise (`run_steps`, `detect_steps`, `segment_steps`; `stream` for text), so that a caller can stop a
request midway by closing it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - typing_extensions comes with torch
    from typing_extensions import Unpack

import torch
from PIL import Image

from vlmo import tasks
from vlmo.detection import Detection, parse_detections
from vlmo.engine.features import FeatureCache
from vlmo.engine.scheduler import Collector, Finished, Request, Scheduler
from vlmo.errors import InputError
from vlmo.generation import GenerateOptions, drain
from vlmo.nn.paligemma import DecodeState, PaliGemma
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
from vlmo.tasks import Answer, CaptionDetail, Prompt
from vlmo.weights.devices import DTypeName, resolve_device, resolve_dtype
from vlmo.weights.files import MASK_DECODER_FILE
from vlmo.weights.hub import resolve_model
from vlmo.weights.policy import choose_quantization, load_for_inference, load_processors
from vlmo.weights.prepared import source_name

T = TypeVar("T")
PromptInput = str | Prompt


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

    # -- what the engine's loop uses (`vlmo.engine.scheduler`) ---------------------------------------------------

    @property
    def eos_ids(self) -> frozenset[int]:
        """The token ids that end an answer: the config's and the tokenizer's `<eos>`."""
        return frozenset(self.model.cfg.eos_token_ids) | {self.text.eos_id}

    @property
    def context_length(self) -> int:
        """Positions the decoder can attend over: prompt (image tokens included) + new tokens must fit."""
        return self.model.cfg.text.max_position_embeddings

    def prompt_length(self, prompt: str) -> int:
        """Positions `prompt` takes, its image tokens included (what the token budget counts).

        A text too long to fit the context whatever its tokens (more characters than the longest token holds times
        the context) is refused before it is tokenized: a huge question costs nothing, and holds up nobody."""
        most = self.text.max_token_chars * self.context_length
        if len(prompt) > most:
            raise InputError(
                f"the prompt has {len(prompt)} characters, more than the model's {self.context_length} positions "
                "can hold; shorten the question or prompt"
            )
        return int(self.text.encode([prompt]).input_ids.shape[1])

    def tokenize(self, prompts: Sequence[str]) -> EncodedBatch:
        """Prompts → left-padded token ids with their `<image>` slots (`processing.TextProcessor.encode`)."""
        return self.text.encode(list(prompts))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Generated token ids → text, special tokens skipped."""
        return self.text.decode(ids)

    def prefill(self, batch: EncodedBatch, features: torch.Tensor, room: int) -> tuple[torch.Tensor, DecodeState]:
        """The prompts through the decoder into a new cache with `room` slots to spare: the last position's logits
        dt[B, V] and the state `decode` continues from. `features`: dt[B, N, D] (`encode_images`)."""
        cache = self.model.new_cache(batch.input_ids.shape[0], batch.input_ids.shape[1] + room)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        return self.model.prefill(ids, features, mask, cache)

    def decode(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One token per row int64[B] → next logits dt[B, V]; the cache in `state` grows by one slot."""
        return self.model.decode(tokens, state)

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
        for reproducible sampling (row i of a batch samples as it would alone with seed + i). Stops at `<eos>`, at
        the first of the `stop` strings, or after `max_new_tokens` (default: each prompt's task's, 64 for text).
        """
        images, prompts, batched = _pair_up(image, prompt)
        texts = [end.text for end in drain(self._finish_steps(images, prompts, options))]
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
        multi-byte character (byte-fallback tokens) or may begin a `stop` string. Bad options or input raise here,
        before the first piece. `image_features`: dt[1, N, D], this image's `encode_images([image])` result, kept by
        a caller that asks several things about one image; the vision tower is then skipped (and `image` is not
        read again). Closing the generator (as a server does when its client has gone) stops generation at once.
        """
        if not isinstance(prompt, str | Prompt):
            raise InputError("stream takes one prompt; use generate for several")
        (task,) = _prompts(prompt)
        scheduler = Scheduler(self, max_batch_size=1)
        sink = Collector()
        features = None if image_features is None else self._check_features(image_features)
        request = scheduler.request(None, task, options, sink, features=features)
        if features is None:
            request.image = load_image(image)
        return self._pieces(scheduler, request, sink)

    @staticmethod
    def _pieces(scheduler: Scheduler, request: Request, sink: Collector) -> Generator[str, None, None]:
        """The engine's loop for one request, in this thread: its pieces as they arrive. Closing this generator
        simply stops stepping, so no further token is computed."""
        scheduler.step([request])
        yield from sink.take()
        while scheduler.running:
            scheduler.step()
            yield from sink.take()
        sink.finished()  # raises the request's error, if it failed

    # -- any task (prompts and payloads: `vlmo.tasks`) -------------------------------------------------------

    @overload
    def run(
        self,
        image: ImageInput,
        prompt: Prompt,
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Answer: ...

    @overload
    def run(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: Prompt | Sequence[Prompt],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Answer | list[Answer]: ...

    def run(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: Prompt | Sequence[Prompt],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Answer | list[Answer]:
        """Answer any task's prompt (`tasks.prompt(task, …)`, `tasks.ask(…)`, …) about an image: the text, and for
        detect / segment the objects in the image's pixels (`tasks.Answer`; `.payload()` is its JSON). The one
        method every face calls, whatever the task.

        Lists run as one batch, each image with its own prompt (of any task: a manifest whose rows carry their own
        labels), and return a list; one image with several prompts is encoded once, as in `generate`.
        """
        return drain(self.run_steps(image, prompt, mask_decoder=mask_decoder, **options))

    def run_steps(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: Prompt | Sequence[Prompt],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Generator[None, None, Answer | list[Answer]]:
        """`run` one generated token at a time: yields None after each step and returns what `run` returns (as the
        generator's return value). For a caller that must be able to stop midway (the app, a server whose client
        has gone): closing the generator stops generation at once."""
        images, prompts, batched = _pair_up(image, prompt)
        if not all(isinstance(p, Prompt) for p in (prompt if isinstance(prompt, list | tuple) else [prompt])):
            raise InputError("run takes vlmo.tasks.Prompt objects (tasks.prompt(task, ...)); use generate for text")
        if any(p.task == "segment" for p in prompts):
            self.mask_decoder(mask_decoder)  # a decoder it cannot have is an error before any generation
        loaded = [load_image(im) for im in images]
        loaded = loaded * len(prompts) if len(loaded) == 1 else loaded
        ends = yield from self._finish_steps(loaded, prompts, options)
        answers = [
            self.answer(p, end, im.size, mask_decoder=mask_decoder)
            for im, p, end in zip(loaded, prompts, ends, strict=True)
        ]
        return answers if batched else answers[0]

    def answer(
        self,
        prompt: Prompt,
        end: Finished,
        size: tuple[int, int],
        *,
        mask_decoder: str | os.PathLike[str] | None = None,
    ) -> Answer:
        """The `Answer` to `prompt` from the engine's `Finished` event, for an image of `size` (w, h): a located
        task's objects parsed in its pixels (when `<eos>` did not end the answer, the last object may be cut short
        and is dropped). For callers that drive the engine themselves (the server, `vlmo batch`)."""
        objects: list[Detection] | list[Segmentation] | None = None
        if prompt.task == "detect":
            objects = _drop_cut(parse_detections(end.text, size), end.ended)
        elif prompt.task == "segment":
            objects = _drop_cut(parse_segmentations(end.text, size, self.mask_decoder(mask_decoder)), end.ended)
        return Answer(prompt, end.text, size, end.finish_reason, objects)

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
        found = yield from self._locate(image, tasks.detect(labels), None, options)
        return found

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
        self.mask_decoder(mask_decoder)
        found = yield from self._locate(image, prompt, mask_decoder, options)
        return found

    def mask_decoder(self, mask_decoder: str | os.PathLike[str] | None = None) -> VQVAEDecoder:
        """The VQ-VAE mask decoder `segment` uses, loaded on first use and kept (`vlmo.weights.vqvae`): a local
        `vae-oid.npz` / .safetensors, or None for the model's own: its checkpoint's `mask_decoder.safetensors` where
        it has one (the built-in `vlmo/shapes` does: its codes are its own), else PaliGemma's vae-oid, downloaded
        once. A server calls it at start-up so that a decoder it cannot have is one error before any generation."""
        from vlmo.weights.vqvae import load_mask_decoder  # only segment needs it (and its hub code)

        key = None if mask_decoder is None else str(mask_decoder)
        if key not in self._mask_decoders:
            own = self.source / MASK_DECODER_FILE
            path = mask_decoder if mask_decoder is not None else own if own.is_file() else None
            self._mask_decoders[key] = load_mask_decoder(path)
        return self._mask_decoders[key]

    def _locate(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: Prompt,
        mask_decoder: str | os.PathLike[str] | None,
        options: GenerateOptions,
    ) -> Generator[None, None, list[Any] | list[list[Any]]]:
        """Shared by detect/segment: `run_steps`, keeping each answer's objects."""
        answers = yield from self.run_steps(image, prompt, mask_decoder=mask_decoder, **options)
        if isinstance(answers, list):
            return [a.objects or [] for a in answers]
        return answers.objects or []

    # -- the engine's loop, in the caller's thread -----------------------------------------------------------

    def _finish_steps(
        self, images: Sequence[ImageInput], prompts: Sequence[Prompt], options: GenerateOptions
    ) -> Generator[None, None, list[Finished]]:
        """Every row through the engine's loop (`Scheduler`), all joining at the first step; yields None after every
        step and returns each row's `Finished`. Every row is checked (options, token budget) before any image is
        read or encoded. Closing it stops generation at once; a row's error is raised."""
        scheduler = Scheduler(self, max_batch_size=len(prompts))
        sinks = [Collector() for _ in prompts]
        requests = [
            scheduler.request(None, p, options, sink, seed_offset=i)
            for i, (p, sink) in enumerate(zip(prompts, sinks, strict=True))
        ]
        loaded = [load_image(im) for im in images]
        for request, image in zip(requests, loaded * len(prompts) if len(loaded) == 1 else loaded, strict=True):
            request.image = image  # one image for several prompts: decoded once, encoded once (`image_cache`)
        scheduler.step(requests)
        while True:
            for sink in sinks:
                if isinstance(sink.end, BaseException):
                    raise sink.end
            if not scheduler.running:
                break
            yield
            scheduler.step()
        return [sink.finished() for sink in sinks]

    def _check_features(self, given: torch.Tensor) -> torch.Tensor:
        """`stream`'s `image_features`, checked against this model: dt[1, N, D]."""
        want = (self.model.cfg.num_image_tokens, self.model.cfg.text.hidden_size)
        if isinstance(given, torch.Tensor) and given.ndim == 3 and tuple(given.shape[1:]) == want and len(given) != 1:
            raise InputError(f"image_features hold {len(given)} images for 1 prompt; pass one image's features")
        if not isinstance(given, torch.Tensor) or given.ndim != 3 or tuple(given.shape) != (1, *want):
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise InputError(
                f"image_features must have shape (1, {want[0]}, {want[1]}) for this model, got {got}; "
                "pass this model's encode_images([image])"
            )
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
