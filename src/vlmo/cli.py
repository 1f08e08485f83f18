"""The `vlmo` command line. It parses arguments and calls the Python API; nothing else lives here.

Results go to stdout (plain text, or one JSON object with `--json`); progress, hints and errors go to stderr.
Errors are one line (see `vlmo/cli_errors.py`); `VLMO_DEBUG=1` adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from vlmo import __version__
from vlmo.cli_errors import CliUsageError, ErrorHandlingGroup

DEFAULT_MODEL = "google/paligemma-3b-mix-224"

app = typer.Typer(
    name="vlmo",
    cls=ErrorHandlingGroup,
    help="Run PaliGemma vision-language models: ask, caption, OCR and detect, locally.",
    epilog=(
        "Examples:\n\n"
        '  vlmo ask photo.jpg "what is on the table?"\n\n'
        '  vlmo detect photo.jpg "cat ; dog" --out boxes.png\n\n'
        "  vlmo caption a.jpg b.jpg --json"
    ),
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

# -- shared options, declared once ------------------------------------------------------------------------------

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="VLMO_MODEL",
        help="Hub id, local checkpoint directory, or vlmo/shapes (built in).",
        show_envvar=True,
    ),
]
Revision = Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")]
Adapter = Annotated[
    str | None, typer.Option(help="A LoRA adapter (PEFT format): local directory or hub id, applied to --model.")
]
Device = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[
    str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA, float16 on MPS), float32, bfloat16 or float16.")
]
Quantize = Annotated[
    str,
    typer.Option(
        help="auto (int8 on CPU with --dtype auto, else none), int8 (CPU: int8 weights, a quarter of the memory) "
        "or none."
    ),
]
MaxTokens = Annotated[
    int | None, typer.Option("--max-tokens", help="Most tokens to generate (default 64; 128 for detect).")
]
Sample = Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of always taking the top token.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (> 0).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep tokens up to this probability mass.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep only the k most likely tokens (0: all).")]
Seed = Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Stream = Annotated[
    bool | None, typer.Option("--stream/--no-stream", help="Print tokens as they come (default: on a terminal).")
]
Images = Annotated[
    list[str], typer.Argument(metavar="IMAGE", help="Image file(s); several run as one batch.", show_default=False)
]
Lang = Annotated[str, typer.Option(help="Language code of the answer (en, fr, de, …).")]


class Run:
    """The options every generating command shares, turned into API calls."""

    def __init__(
        self,
        model: str,
        revision: str | None,
        device: str,
        dtype: str,
        max_tokens: int | None,
        sample: bool,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        adapter: str | None = None,
        quantize: str = "auto",
    ) -> None:
        self.model_name, self.adapter, self.quantize = model, adapter, quantize
        self.revision, self.device, self.dtype = revision, device, dtype
        self.options: dict[str, Any] = dict(
            do_sample=sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        if max_tokens is not None:
            self.options["max_new_tokens"] = max_tokens
        from vlmo.generation import SamplingConfig

        # Validate before loading anything; 0 must reach the check, so no `max_tokens or 64`.
        SamplingConfig(64 if max_tokens is None else max_tokens, sample, temperature, top_k, top_p)

    def load(self):  # noqa: ANN201 - VLMo, imported lazily so `vlmo -h` stays fast
        from vlmo.api import VLMo

        with _status(f"Loading {self.model_name}"):
            return VLMo.from_pretrained(
                self.model_name,
                device=self.device,
                dtype=self.dtype,
                revision=self.revision,
                adapter=self.adapter,
                quantize=self.quantize,
            )


@contextmanager
def _status(message: str) -> Iterator[None]:
    if sys.stderr.isatty():
        with stderr.status(message):
            yield
    else:
        yield


def _emit_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


def _check_images(images: list[str]) -> list[str]:
    """Open every image before the model loads, so a typo costs no waiting."""
    from vlmo.processing import load_image

    for image in images:
        load_image(image)
    return images


def _texts(
    run: Run,
    images: list[str],
    prompts: list[str],
    task: str,
    json_out: bool,
    stream: bool | None,
    generate: Callable[..., Any],
) -> None:
    """Shared body of ask/caption/ocr/generate: batch, stream or JSON."""
    _check_images(images)
    vlm = run.load()
    streaming = (sys.stdout.isatty() if stream is None else stream) and not json_out and len(images) == 1
    if streaming:
        for piece in vlm.stream(images[0], prompts[0], **run.options):
            typer.echo(piece, nl=False)
        typer.echo()
        return
    texts = generate(vlm)
    texts = [texts] if isinstance(texts, str) else texts
    if json_out:
        results = [{"image": i, "prompt": p, "text": t} for i, p, t in zip(images, prompts, texts, strict=True)]
        _emit_json({"model": run.model_name, "task": task, "results": results})
    elif len(images) == 1:
        typer.echo(texts[0])
    else:
        for image, text in zip(images, texts, strict=True):
            typer.echo(f"{image}\t{text}")


# -- commands ---------------------------------------------------------------------------------------------------


@app.command(
    epilog='Examples:\n\n  vlmo ask photo.jpg "what color is the car?"\n\n  vlmo ask a.jpg b.jpg -q "how many people?"'
)
def ask(
    images: Annotated[
        list[str], typer.Argument(metavar="IMAGE", help="Image file(s), then the question unless -q is given.")
    ],
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question (for several images).")] = None,
    lang: Lang = "en",
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Answer a question about one or more images."""
    if question is None:
        if len(images) < 2:
            raise CliUsageError('give an image and a question, e.g. vlmo ask photo.jpg "what is this?"')
        *images, question = images
    if not question.strip():
        raise CliUsageError("the question is empty; pass some text")
    run = Run(model, revision, device, dtype, max_tokens, sample, temperature, top_p, top_k, seed, adapter, quantize)
    prompt = f"answer {lang} {' '.join(question.split())}"
    _texts(
        run,
        images,
        [prompt] * len(images),
        "ask",
        json_out,
        stream,
        lambda v: v.generate(images, prompt, **run.options),
    )


@app.command(epilog="Examples:\n\n  vlmo caption photo.jpg\n\n  vlmo caption photo.jpg --detail long --lang fr")
def caption(
    images: Images,
    lang: Lang = "en",
    detail: Annotated[str, typer.Option(help="short (caption), long (describe) or raw (cap).")] = "short",
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Describe one or more images."""
    from vlmo.api import CAPTION_TASKS

    if detail not in CAPTION_TASKS:
        raise CliUsageError(f"unknown --detail {detail!r}; use short, long or raw")
    run = Run(model, revision, device, dtype, max_tokens, sample, temperature, top_p, top_k, seed, adapter, quantize)
    prompt = f"{CAPTION_TASKS[detail]} {lang}"
    _texts(
        run,
        images,
        [prompt] * len(images),
        "caption",
        json_out,
        stream,
        lambda v: v.generate(images, prompt, **run.options),
    )


@app.command(epilog="Example:\n\n  vlmo ocr receipt.png")
def ocr(
    images: Images,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Read the text in one or more images."""
    run = Run(model, revision, device, dtype, max_tokens, sample, temperature, top_p, top_k, seed, adapter, quantize)
    _texts(
        run, images, ["ocr"] * len(images), "ocr", json_out, stream, lambda v: v.generate(images, "ocr", **run.options)
    )


@app.command(epilog='Example:\n\n  vlmo generate photo.jpg "answer en what is this?"')
def generate(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image file.")],
    prompt: Annotated[
        str, typer.Argument(metavar="PROMPT", help='Raw PaliGemma prompt, e.g. "caption en" or "detect cat".')
    ],
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Complete a raw prompt for an image (special tokens such as <loc0123> are kept)."""
    run = Run(model, revision, device, dtype, max_tokens, sample, temperature, top_p, top_k, seed, adapter, quantize)
    _texts(run, [image], [prompt], "generate", json_out, stream, lambda v: v.generate(image, prompt, **run.options))


@app.command(
    epilog='Examples:\n\n  vlmo detect photo.jpg "cat ; dog"\n\n  vlmo detect photo.jpg car --out boxes.png --json'
)
def detect(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image file.")],
    labels: Annotated[str, typer.Argument(metavar="LABELS", help='What to find, separated by ";", e.g. "cat ; dog".')],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Save a copy of the image with boxes drawn.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite --out if it exists.")] = False,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    json_out: JsonOut = False,
) -> None:
    """Find objects and print their boxes (x_min y_min x_max y_max, in pixels)."""
    run = Run(model, revision, device, dtype, max_tokens, sample, temperature, top_p, top_k, seed, adapter, quantize)
    _locate("detect", image, labels, out, force, run, json_out)


@app.command(
    epilog='Examples:\n\n  vlmo segment photo.jpg "cat ; dog" --out masks.png\n\n  vlmo segment photo.jpg car --json'
)
def segment(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image file.")],
    labels: Annotated[str, typer.Argument(metavar="LABELS", help='What to segment, separated by ";".')],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Save a copy with masks and boxes drawn.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite --out if it exists.")] = False,
    mask_decoder: Annotated[
        Path | None,
        typer.Option(help="Local vae-oid.npz (or converted .safetensors); default: downloaded once and cached."),
    ] = None,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    json_out: JsonOut = False,
) -> None:
    """Segment objects: print boxes and mask areas; --json gives COCO RLE masks."""
    run = Run(model, revision, device, dtype, max_tokens, sample, temperature, top_p, top_k, seed, adapter, quantize)
    _locate("segment", image, labels, out, force, run, json_out, mask_decoder)


def _locate(
    task: Literal["detect", "segment"],
    image: str,
    labels: str,
    out: Path | None,
    force: bool,
    run: Run,
    json_out: bool,
    mask_decoder: Path | None = None,
) -> None:
    """Shared body of detect/segment. Everything the user typed is checked before the model loads."""
    from vlmo.detection import detect_prompt, draw_detections
    from vlmo.processing import load_image

    label_list = labels.split(";")
    detect_prompt(label_list, task)  # no empty labels, no '<' '>'
    _check_output(out, force)
    if mask_decoder is not None and not mask_decoder.is_file():
        raise CliUsageError(f"no such file for --mask-decoder: {mask_decoder}")
    pil = load_image(image)
    vlm = run.load()
    if task == "detect":
        found: list[Any] = vlm.detect(pil, label_list, **run.options)
        boxes = found
    else:
        found = vlm.segment(pil, label_list, mask_decoder=mask_decoder, **run.options)
        boxes = [s.to_detection() for s in found]
    if out is not None:
        from vlmo.segmentation import draw_segmentations

        (draw_detections(pil, found) if task == "detect" else draw_segmentations(pil, found)).save(out)
        stderr.print(f"saved {out}")
    if json_out:
        key = "detections" if task == "detect" else "segmentations"
        _emit_json(
            {
                "model": run.model_name,
                "task": task,
                "image": image,
                "size": list(pil.size),
                key: [d.to_dict() for d in found],
                "output": None if out is None else str(out),
                **({"mask_encoding": "coco_rle_uncompressed_column_major"} if task == "segment" else {}),
            }
        )
        return
    if not found:
        stderr.print("no objects found")
    for i, d in enumerate(boxes):
        area = f"\t{int(found[i].mask.sum())}" if task == "segment" else ""
        typer.echo(f"{d.label}\t" + "\t".join(f"{v:.1f}" for v in d.box) + area)


def _check_output(out: Path | None, force: bool) -> None:
    if out is None:
        return
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        raise CliUsageError(f"cannot save images as {out.suffix or 'a file without extension'}; use .png or .jpg")
    if out.exists() and not force:
        raise CliUsageError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    if not out.parent.is_dir():
        raise CliUsageError(f"no such directory for --out: {out.parent}")


@app.command(
    epilog=(
        "Examples:\n\n  vlmo finetune --model google/paligemma-3b-pt-224 --data train.jsonl --out runs/lora\n\n"
        "  torchrun --nproc-per-node 2 -m vlmo.finetune --model … --data train.jsonl --out runs/ddp"
    )
)
def finetune(
    out: Annotated[Path, typer.Option(help="Run directory: metrics.jsonl, checkpoint-N/, final/.")],
    model: Model = DEFAULT_MODEL,
    data: Annotated[Path | None, typer.Option(help="JSONL training data: image, prefix, suffix per line.")] = None,
    vqa_questions: Annotated[Path | None, typer.Option(help="VQAv2 questions JSON (instead of --data).")] = None,
    vqa_annotations: Annotated[Path | None, typer.Option(help="VQAv2 annotations JSON.")] = None,
    vqa_images: Annotated[Path | None, typer.Option(help="VQAv2 image folder (COCO_*_…jpg).")] = None,
    train: Annotated[
        str, typer.Option(help="What trains, comma-separated: lora, projector, attention, full.")
    ] = "lora",
    projector: Annotated[
        str, typer.Option(help="Projector to train with: linear, or a Dense Connector kind (sti, sci, dci, seed).")
    ] = "linear",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / r).")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA input.")] = 0.0,
    lora_vision: Annotated[bool, typer.Option(help="Also put LoRA on the vision tower.")] = False,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps before the cosine decay.")] = 0,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Examples per process and micro-step.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimizer step.")] = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for data order, initialisation and dropout.")] = 0,
    save_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (0: at the end).")] = 0,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = False,
    fsdp: Annotated[
        bool, typer.Option(help="Shard the model over torchrun's processes (FSDP) instead of DDP.")
    ] = False,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast on CUDA (ignored on CPU).")] = True,
    device: Device = "auto",
    resume: Annotated[Path | None, typer.Option(help="A checkpoint-N directory to continue from.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Write into a non-empty --out.")] = False,
) -> None:
    """Fine-tune a model (LoRA by default) on JSONL or VQAv2 data; prints the final model's path."""
    from vlmo.finetune import FinetuneConfig
    from vlmo.finetune import finetune as run_finetune

    if out.exists() and any(out.iterdir()) and resume is None and not force:
        raise CliUsageError(f"{out} is not empty; pass --resume CHECKPOINT to continue, --force, or another --out")
    cfg = FinetuneConfig(
        model=model,
        out=str(out),
        data=None if data is None else str(data),
        vqa_questions=None if vqa_questions is None else str(vqa_questions),
        vqa_annotations=None if vqa_annotations is None else str(vqa_annotations),
        vqa_images=None if vqa_images is None else str(vqa_images),
        train=tuple(part.strip() for part in train.split(",") if part.strip()),  # type: ignore[arg-type]
        projector=projector,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_vision=lora_vision,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        seed=seed,
        save_every=save_every,
        gradient_checkpointing=gradient_checkpointing,
        fsdp=fsdp,
        bf16=bf16,
        device=device,
        resume=None if resume is None else str(resume),
    )
    result = run_finetune(cfg)
    if result.output is not None:
        typer.echo(str(result.output))


eval_app = typer.Typer(
    help="Evaluate a model on a benchmark.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(eval_app, name="eval")


@eval_app.command(
    "vqav2",
    epilog=(
        "Example:\n\n  vlmo eval vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json "
        "--annotations v2_mscoco_val2014_annotations.json --images val2014 --out scores.json"
    ),
)
def eval_vqav2(
    questions: Annotated[Path, typer.Option(help="VQAv2 questions JSON.")],
    annotations: Annotated[Path, typer.Option(help="VQAv2 annotations JSON.")],
    images: Annotated[Path, typer.Option(help="Folder of the COCO images the questions refer to.")],
    out: Annotated[Path | None, typer.Option(help="Write scores (and FILE_results.json predictions) here.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite --out if it exists.")] = False,
    mode: Annotated[
        str, typer.Option(help="official (the VQA script's normalisation rules) or normalize_all.")
    ] = "official",
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions per batch.")] = 8,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    max_tokens: MaxTokens = None,
    json_out: JsonOut = False,
) -> None:
    """VQA accuracy (official metric) with a table per answer type."""
    from vlmo.eval import evaluate_vqa, load_vqav2

    if mode not in ("official", "normalize_all"):
        raise CliUsageError(f"unknown --mode {mode!r}; use official or normalize_all")
    if out is not None and out.exists() and not force:
        raise CliUsageError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise CliUsageError("--batch-size and --limit must be at least 1")
    examples = load_vqav2(questions, annotations, images)[:limit]
    run = Run(model, revision, device, dtype, max_tokens, False, 1.0, 1.0, 0, None, adapter, quantize)
    vlm = run.load()
    report = evaluate_vqa(
        vlm,
        examples,
        batch_size=batch_size,
        max_new_tokens=max_tokens or 10,
        mode=mode,  # type: ignore[arg-type]
    )
    if out is not None:
        written = report.write(out)
        stderr.print("saved " + " and ".join(str(p) for p in written))
    if json_out:
        _emit_json(report.to_json())
    else:
        typer.echo(report.format_table())


@app.command(
    "app",
    epilog=(
        'Examples (needs pip install "vlmo[app]"):\n\n  vlmo app\n\n'
        "  vlmo app --model google/paligemma-3b-mix-448 --port 8080 --mask-decoder vae-oid.npz"
    ),
)
def app_command(
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    adapter: Adapter = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = "auto",
    host: Annotated[
        str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the app on this machine, 0.0.0.0 opens it.")
    ] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: 7860, or the next free one).")] = None,
    share: Annotated[bool, typer.Option(help="Also publish a public link through Gradio's relay.")] = False,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest upload accepted, in MB.")] = 20,
    mask_decoder: Annotated[
        Path | None,
        typer.Option(help="Local vae-oid.npz (or converted .safetensors) for segment; default: downloaded once."),
    ] = None,
) -> None:
    """Open a local web UI (Gradio) to ask, caption, read, detect and segment."""
    from vlmo.app import serve

    serve(
        model,
        revision=revision,
        adapter=adapter,
        device=device,
        dtype=dtype,
        quantize=quantize,
        host=host,
        port=port,
        share=share,
        max_upload_mb=max_upload_mb,
        mask_decoder=mask_decoder,
    )


@app.command(epilog="Example:\n\n  vlmo download google/paligemma-3b-mix-224")
def download(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Hub id, e.g. google/paligemma-3b-mix-224.")],
    revision: Revision = None,
) -> None:
    """Download a model into the Hugging Face cache (only the files vlmo needs) and print its path."""
    from vlmo.weights.hub import resolve_model

    path = resolve_model(model, revision=revision)
    typer.echo(str(path))


@app.command()
def info(json_out: JsonOut = False) -> None:
    """Show versions, devices, and the models in the Hugging Face cache."""
    import torch

    from vlmo.devices import resolve_device, resolve_dtype
    from vlmo.weights.hub import cache_location, cached_models

    devices = ["cpu"]
    devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    auto_device = resolve_device("auto")
    auto = str(resolve_dtype("auto", auto_device)).split(".")[-1]
    cpu_int8 = auto_device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
    models = cached_models()
    data = {
        "vlmo": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "devices": devices,
        "auto_dtype": auto,
        "auto_quantize": "int8" if cpu_int8 else "none",
        "cache": str(cache_location()),
        "cached_models": [{"id": repo, "bytes": size} for repo, size in models],
        "default_model": os.environ.get("VLMO_MODEL", DEFAULT_MODEL),
    }
    if json_out:
        _emit_json(data)
        return
    for key in ("vlmo", "torch", "python", "auto_dtype", "auto_quantize", "default_model", "cache"):
        typer.echo(f"{key}: {data[key]}")
    typer.echo("devices: " + ", ".join(devices))
    typer.echo("cached models:" + ("" if models else " none"))
    for repo, size in models:
        typer.echo(f"  {repo}  {size / 1e9:.2f} GB")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vlmo {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Run PaliGemma vision-language models: ask, caption, OCR and detect, locally."""
    if ctx.invoked_subcommand is None:  # plain `vlmo`: the help, on stdout, as a success
        typer.echo(ctx.get_help())


def main() -> None:
    """Console-script entry point."""
    app(prog_name="vlmo")


__all__ = ["app", "main"]
