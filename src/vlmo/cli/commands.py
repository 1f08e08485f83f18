"""The `vlmo` command line. It parses arguments and calls the Python API; nothing else lives here.

Results go to stdout (plain text, or one JSON object with `--json`); progress, hints and errors go to stderr.
Errors are one line (see `vlmo/cli/errors.py`); `VLMO_DEBUG=1` adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer

from vlmo import __version__
from vlmo.cli.errors import CliUsageError, ErrorHandlingGroup
from vlmo.cli.options import (
    DEFAULT_MODEL,
    LOCATE,
    MAX_TOKENS,
    MODEL,
    RESIDENT,
    SAMPLING,
    Device,
    Images,
    JsonOut,
    Lang,
    MaskDecoder,
    Model,
    Revision,
    Run,
    Stream,
    config_options,
    shared_options,
    stderr,
)
from vlmo.errors import check_count, check_file
from vlmo.finetune.config import FinetuneConfig

if TYPE_CHECKING:
    from vlmo.tasks import Prompt

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


def _echo(text: str = "", nl: bool = True) -> None:
    """Write results to stdout. A write that fails names the output, standard output, and its cause ("no space left
    on device" is about where stdout goes, e.g. `> /dev/full`, not about a cache); a reader that went away (a
    broken pipe) is left to the error handler."""
    try:
        typer.echo(text, nl=nl)
    except BrokenPipeError:
        raise
    except OSError as e:
        from vlmo.fileio.atomic import write_failed

        raise write_failed("standard output", e) from e


def _emit_json(obj: dict[str, Any]) -> None:
    _echo(json.dumps(obj, ensure_ascii=False))


def _check_images(images: list[str]) -> list[str]:
    """Open every image before the model loads, so a typo costs no waiting."""
    from vlmo.images import load_image

    for image in images:
        load_image(image)
    return images


def _texts(
    run: Run, images: list[str], prompt: Prompt, json_out: bool, stream: bool | None, *, resident: bool = True
) -> None:
    """Shared body of ask/caption/ocr/generate: one prompt for every image, as a batch, streamed or as JSON."""
    from vlmo.cli.answering import answering

    _check_images(images)
    streaming = (sys.stdout.isatty() if stream is None else stream) and not json_out and len(images) == 1
    with answering(run, resident=resident) as model:
        if streaming:
            for piece in model.stream(images[0], prompt, run.options):
                _echo(piece, nl=False)
            _echo()
            return
        texts = model.texts(images, prompt, run.options)
    if json_out:
        results = [{"image": i, "prompt": prompt.text, "text": t} for i, t in zip(images, texts, strict=True)]
        _emit_json({"model": model.name, "task": prompt.task, "results": results})
    elif len(images) == 1:
        _echo(texts[0])
    else:
        for image, text in zip(images, texts, strict=True):
            _echo(f"{image}\t{text}")


# -- commands ---------------------------------------------------------------------------------------------------


@app.command(
    epilog='Examples:\n\n  vlmo ask photo.jpg "what color is the car?"\n\n  vlmo ask a.jpg b.jpg -q "how many people?"'
)
@shared_options(MODEL, RESIDENT, SAMPLING)
def ask(
    images: Annotated[
        list[str], typer.Argument(metavar="IMAGE", help="Image file(s), then the question unless -q is given.")
    ],
    run: Run,
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question (for several images).")] = None,
    lang: Lang = "en",
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Answer a question about one or more images."""
    from vlmo import tasks

    if question is None:
        if len(images) < 2:
            raise CliUsageError('give an image and a question, e.g. vlmo ask photo.jpg "what is this?"')
        *images, question = images
        if _is_image_file(question):
            raise CliUsageError(
                f"{question} looks like an image, not a question; pass the question with -q, or quote it "
                '(vlmo ask a.jpg b.jpg -q "what is this?")'
            )
    _texts(run, images, tasks.prompt("ask", question=question, lang=lang), json_out, stream)


def _is_image_file(text: str) -> bool:
    """Whether `text` names an existing file with an image extension Pillow knows (.png, .jpg, …)."""
    from PIL import Image

    path = Path(text)
    try:
        return path.suffix.lower() in Image.registered_extensions() and path.is_file()
    except (OSError, ValueError):  # a "question" too long or odd to be a path
        return False


@app.command(epilog="Examples:\n\n  vlmo caption photo.jpg\n\n  vlmo caption photo.jpg --detail long --lang fr")
@shared_options(MODEL, RESIDENT, SAMPLING)
def caption(
    images: Images,
    run: Run,
    lang: Lang = "en",
    detail: Annotated[str, typer.Option(help="short (caption), long (describe) or raw (cap).")] = "short",
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Describe one or more images."""
    from vlmo import tasks

    if detail not in tasks.CAPTION_PREFIXES:
        raise CliUsageError(f"unknown --detail {detail!r}; use short, long or raw")
    _texts(run, images, tasks.prompt("caption", detail=detail, lang=lang), json_out, stream)


@app.command(epilog="Example:\n\n  vlmo ocr receipt.png")
@shared_options(MODEL, RESIDENT, SAMPLING)
def ocr(images: Images, run: Run, json_out: JsonOut = False, stream: Stream = None) -> None:
    """Read the text in one or more images."""
    from vlmo import tasks

    _texts(run, images, tasks.prompt("ocr"), json_out, stream)


@app.command(epilog='Example:\n\n  vlmo generate photo.jpg "answer en what is this?"')
@shared_options(MODEL, SAMPLING)
def generate(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image file.")],
    prompt: Annotated[
        str, typer.Argument(metavar="PROMPT", help='Raw PaliGemma prompt, e.g. "caption en" or "detect cat".')
    ],
    run: Run,
    json_out: JsonOut = False,
    stream: Stream = None,
) -> None:
    """Complete a raw prompt for an image (special tokens such as <loc0123> are kept)."""
    from vlmo import tasks

    # A raw prompt always runs here: a server reads a chat text without a task word as a question.
    _texts(run, [image], tasks.prompt("generate", text=prompt), json_out, stream, resident=False)


@app.command(
    epilog='Examples:\n\n  vlmo detect photo.jpg "cat ; dog"\n\n  vlmo detect photo.jpg car --out boxes.png --json'
)
@shared_options(LOCATE, MODEL, RESIDENT, SAMPLING)
def detect(run: Run, **located: Any) -> None:
    """Find objects and print their boxes (x_min y_min x_max y_max, in pixels)."""
    _locate("detect", run, **located)


@app.command(
    epilog='Examples:\n\n  vlmo segment photo.jpg "cat ; dog" --out masks.png\n\n  vlmo segment photo.jpg car --json'
)
@shared_options(LOCATE, MODEL, RESIDENT, SAMPLING)
def segment(run: Run, mask_decoder: MaskDecoder = None, **located: Any) -> None:
    """Segment objects: print boxes and mask areas; --json gives COCO RLE masks."""
    _locate("segment", run, mask_decoder=mask_decoder, **located)


def _locate(
    task: Literal["detect", "segment"],
    run: Run,
    *,
    image: str,
    labels: str,
    out: Path | None,
    force: bool,
    json_out: bool,
    mask_decoder: Path | None = None,
) -> None:
    """Shared body of detect/segment. Everything the user typed is checked before the model loads."""
    from vlmo import tasks
    from vlmo.cli.answering import answering
    from vlmo.images import load_image

    prompt = tasks.prompt(task, labels=labels)  # no empty labels, no '<' '>'
    _check_output(out, force)
    check_file(mask_decoder, "mask_decoder")
    pil = load_image(image)
    with answering(run, mask_decoder) as model:
        answer = model.run(image, prompt, run.options)
        name = model.name
    if out is not None:
        from vlmo.fileio.atomic import atomic_path, image_format

        with atomic_path(out, force=force) as tmp:  # never a half image, never a file that appeared meanwhile
            answer.draw(pil).save(tmp, format=image_format(out))
        stderr.print(f"saved {out}")
    if json_out:
        output = None if out is None else str(out)
        _emit_json({"model": name, "image": image, **answer.payload(), "output": output})
        return
    if not answer.objects:
        stderr.print("no objects found")
    for label, *numbers in answer.rows():  # label, the box (1 decimal), and for segment the mask's area
        box, area = numbers[:4], numbers[4:]
        _echo("\t".join([str(label), *(f"{float(v):.1f}" for v in box), *(str(v) for v in area)]))


def _interrupted(e: Any, out: Path) -> NoReturn:
    """What Ctrl-C during `vlmo batch` prints (one process or `--ray`): what is on disk, and how to go on."""
    s = e.summary
    stderr.print(f"interrupted: {s.rows} rows written to {out} ({s.errors} errors); rerun with --resume")
    raise typer.Exit(130) from None


def _check_output(out: Path | None, force: bool) -> None:
    if out is None:
        return
    from vlmo.fileio.atomic import check_output, image_format

    check_output(out, force, what="--out")
    image_format(out)


@app.command(
    epilog=(
        "Examples:\n\n  vlmo batch photos/ --task caption --out captions.jsonl\n\n"
        "  vlmo batch rows.jsonl --task ask --out answers.parquet --resume\n\n"
        '  vlmo batch "scans/*.png" --task detect --labels "cat ; dog" --out boxes --ray --num-workers 4'
    )
)
@shared_options(MODEL, MAX_TOKENS)
def batch(
    source: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="A folder (recursive), a glob, a text file of paths, or a manifest (.jsonl, .csv, .parquet).",
        ),
    ],
    run: Run,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Results: .jsonl or .parquet, one row per input (--ray: a folder).")
    ],
    task: Annotated[str | None, typer.Option(help="ask, caption, ocr, detect or segment (generate: --prompt).")] = None,
    question: Annotated[str | None, typer.Option("--question", "-q", help="ask: for rows without their own.")] = None,
    labels: Annotated[
        str | None, typer.Option(help='detect, segment: e.g. "cat ; dog", for rows without their own.')
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="A raw PaliGemma prompt (the generate task).")] = None,
    lang: Lang = "en",
    detail: Annotated[str, typer.Option(help="caption: short, long or raw.")] = "short",
    mask_decoder: MaskDecoder = None,
    batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 8,
    limit: Annotated[int | None, typer.Option(help="Only the first N inputs.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip inputs that have a row in --out; add the rest.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing --out.")] = False,
    use_ray: Annotated[
        bool, typer.Option("--ray", help='Run on Ray Data (pip install "vlmo[ray]"); RAY_ADDRESS names a cluster.')
    ] = False,
    num_workers: Annotated[int, typer.Option(help="--ray: model replicas.")] = 2,
    num_gpus_per_worker: Annotated[float, typer.Option(help="--ray: GPUs per replica (0: CPU).")] = 0.0,
) -> None:
    """Run one task over many images: one result row per input, in batches, resumable (docs/batch.md)."""
    from vlmo.batch.inputs import list_inputs
    from vlmo.batch.runner import (
        BatchInterrupted,
        BatchJob,
        check_counts,
        check_not_an_input,
        open_results,
        write_results,
    )

    if resume and force:
        raise CliUsageError("pass --resume or --force, not both")
    if task is None and prompt is None:
        raise CliUsageError("give --task ask, caption, ocr, detect or segment (or --prompt for a raw prompt)")
    job = BatchJob(
        task=task or "generate",  # type: ignore[arg-type]  # a str option for Typer, checked by BatchJob
        question=question,
        labels=labels,
        prompt=prompt,
        lang=lang,
        detail=detail,
        mask_decoder=None if mask_decoder is None else str(mask_decoder),
        max_new_tokens=run.max_tokens,
    )
    check_file(mask_decoder, "mask_decoder")
    check_counts(batch_size, limit)
    inputs = list_inputs(source)
    job.check_inputs(inputs)
    check_not_an_input(out, inputs)
    if use_ray:
        from vlmo.batch.ray_data import RayOptions, run_ray

        load = {f: getattr(run, f) for f in ("model", "revision", "adapter", "device", "dtype", "quantize", "cache")}
        ray_options = RayOptions(num_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker)
        try:
            summary = run_ray(
                job, inputs, out, load, ray_options, batch_size=batch_size, limit=limit, resume=resume, force=force
            )
        except BatchInterrupted as e:
            _interrupted(e, out)
    else:
        results = open_results(out, job.task, resume=resume, force=force, job=job, model=run.model, inputs=inputs)
        try:
            summary = write_results(run.load, job, inputs, results, batch_size=batch_size, limit=limit)
        except BatchInterrupted as e:
            _interrupted(e, out)
        finally:
            results.close()
    stderr.print(f"{summary.line()}; {out}")
    _echo(str(out))


@app.command(
    epilog=(
        "Examples:\n\n  vlmo finetune --model google/paligemma-3b-pt-224 --data train.jsonl --out runs/lora\n\n"
        "  torchrun --nproc-per-node 2 -m vlmo finetune --model … --data train.jsonl --out runs/ddp"
    )
)
@config_options(
    FinetuneConfig,
    annotations={
        "model": Model,
        "device": Device,
        "train": Annotated[str, typer.Option(help="What trains, comma-separated: lora, projector, attention, full.")],
    },
    defaults={"train": "lora", "model": DEFAULT_MODEL},
    skip=("progress",),
)
def finetune(
    config: dict[str, Any],
    force: Annotated[bool, typer.Option("--force", "-f", help="Write into a non-empty --out.")] = False,
) -> None:
    """Fine-tune a model (LoRA by default) on JSONL or VQAv2 data; prints the final model's path."""
    from vlmo.fileio.atomic import check_output_dir
    from vlmo.finetune.train import finetune as run_finetune

    out = check_output_dir(config["out"], what="--out")
    if out.exists() and any(out.iterdir()) and config["resume"] is None and not force:
        raise CliUsageError(f"{out} is not empty; pass --resume CHECKPOINT to continue, --force, or another --out")
    train = tuple(part.strip() for part in config.pop("train").split(",") if part.strip())
    result = run_finetune(FinetuneConfig(train=train, **config))
    if result.output is not None:
        _echo(str(result.output))


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
@shared_options(MODEL, MAX_TOKENS)
def eval_vqav2(
    run: Run,
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
    json_out: JsonOut = False,
) -> None:
    """VQA accuracy (official metric) with a table per answer type."""
    from vlmo.data.vqav2 import load_vqav2
    from vlmo.finetune.evaluate import evaluate_vqa

    if mode not in ("official", "normalize_all"):
        raise CliUsageError(f"unknown --mode {mode!r}; use official or normalize_all")
    check_count(batch_size, "batch_size")
    if limit is not None:
        check_count(limit, "limit")
    if out is not None:  # the report and the results file beside it, before the model loads
        from vlmo.fileio.atomic import check_output
        from vlmo.finetune.evaluate import results_path_for

        check_output(out, force, what="--out", make_parents=True)
        check_output(results_path_for(out), force, what="--out", make_parents=True)
    examples = load_vqav2(questions, annotations, images)[:limit]
    vlm = run.load()
    report = evaluate_vqa(
        vlm,
        examples,
        batch_size=batch_size,
        max_new_tokens=run.max_tokens or 10,
        mode=mode,  # type: ignore[arg-type]  # a str option for Typer, checked against the modes above
    )
    if out is not None:
        written = report.write(out, force=force)
        stderr.print("saved " + " and ".join(str(p) for p in written))
    if json_out:
        _emit_json(report.to_json())
    else:
        _echo(report.format_table())


cache_app = typer.Typer(
    help="List or remove prepared (int8 / float16) weights kept so a checkpoint is quantized once.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls", epilog="Examples:\n\n  vlmo cache ls\n\n  vlmo cache ls --json")
def cache_ls(json_out: JsonOut = False) -> None:
    """List the prepared-weights cache: one row per entry (model, mode, size, last used), its location and total."""
    import time

    from vlmo.weights.prepared import cache_root, entries

    found = entries()
    total = sum(e.bytes for e in found)
    if json_out:
        _emit_json({"cache": str(cache_root()), "bytes": total, "entries": [e.to_json() for e in found]})
        return
    for e in found:
        used = "?" if e.last_used is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        _echo(f"{e.source}\t{e.mode}\t{e.bytes / 1e9:.2f} GB\t{used}")
    _echo(f"cache: {cache_root()} ({len(found)} entries, {total / 1e9:.2f} GB)")


@cache_app.command("rm", epilog="Examples:\n\n  vlmo cache rm google/paligemma-3b-mix-224\n\n  vlmo cache rm --all")
def cache_rm(
    model: Annotated[
        str | None,
        typer.Argument(metavar="MODEL", help="Remove every entry of this model (as `vlmo cache ls` names it)."),
    ] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove prepared weights: all entries of MODEL, or all of them with --all."""
    from vlmo.weights.prepared import remove

    if (model is None) == (not all_entries):
        raise CliUsageError("give a MODEL or --all, e.g. vlmo cache rm google/paligemma-3b-mix-224")
    done = remove(None if all_entries else model)
    if model is not None and not done:
        raise CliUsageError(f"no prepared weights of {model} in the cache; see vlmo cache ls")
    for r in done:  # one line each: what is gone on stdout, what is not on stderr
        what = f"{r.entry.source} ({r.entry.mode}, {r.entry.bytes / 1e9:.2f} GB)"
        if r.problem is None:
            _echo(f"removed {what}")
        else:
            typer.echo(f"error: could not remove {what} at {r.entry.path}: {r.problem}", err=True)
    if any(r.problem is not None for r in done):
        raise typer.Exit(1)


@app.command("ps", epilog="Examples:\n\n  vlmo ps\n\n  vlmo ps --json")
def ps(json_out: JsonOut = False) -> None:
    """List resident models: model, options, pid, memory, idle time, time left, and their log."""
    from vlmo.cli.remote import resident
    from vlmo.cli.remote.runtime import format_duration

    folder, rows = resident.status()
    if json_out:
        _emit_json({"runtime_folder": None if folder is None else str(folder), "resident": rows})
        return
    if not rows:
        stderr.print("no resident model")
        return
    _echo("MODEL\tOPTIONS\tPID\tMEMORY\tIDLE\tLEFT\tSTATE\tLOG")
    for row in rows:
        ident = row.get("identity") or {}
        options = ",".join(
            f"{key}={ident[key]}"
            for key in ("revision", "adapter", "device", "dtype", "quantize", "mask_decoder")
            if ident.get(key) not in (None, "auto")
        )
        memory = "-" if row.get("rss_bytes") is None else f"{row['rss_bytes'] / 1e9:.2f} GB"
        idle = "-" if "idle_seconds" not in row else format_duration(row["idle_seconds"])
        left = "-" if "left_seconds" not in row else format_duration(row["left_seconds"])
        cells = [ident.get("model"), options or "-", row["pid"], memory, idle, left, row.get("state"), row["log"]]
        _echo("\t".join(str(c) for c in cells))


@app.command("stop", epilog="Examples:\n\n  vlmo stop\n\n  vlmo stop google/paligemma-3b-mix-224")
def stop_command(
    model: Annotated[
        str | None, typer.Argument(metavar="MODEL", help="Stop the resident model only if it is this model.")
    ] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Stop every resident model (the default).")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds running requests get to finish before the model stops anyway.")
    ] = 30.0,
) -> None:
    """Stop resident models (running requests finish first); prints what was stopped."""
    from vlmo.cli.remote import resident
    from vlmo.errors import check_number

    if model is not None and all_models:
        raise CliUsageError("give a MODEL or --all, not both")
    check_number(timeout, "timeout", minimum=0, below=86400)
    stopped = resident.stop(model, timeout)
    if not stopped:
        stderr.print("no resident model" + ("" if model is None else f" of {model}") + " runs; see vlmo ps")
    for info in stopped:
        _echo(f"stopped {(info.get('identity') or {}).get('model')} (pid {info.get('pid')})")


@app.command(
    "app",
    epilog=(
        'Examples (needs pip install "vlmo[app]"):\n\n  vlmo app\n\n'
        "  vlmo app --model google/paligemma-3b-mix-448 --port 8080 --mask-decoder vae-oid.npz"
    ),
)
@shared_options(MODEL)
def app_command(
    run: Run,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the app on this machine, 0.0.0.0 opens it.")
    ] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: 7860, or the next free one).")] = None,
    share: Annotated[bool, typer.Option(help="Also publish a public link through Gradio's relay.")] = False,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest upload accepted, in MB.")] = 20,
    mask_decoder: MaskDecoder = None,
) -> None:
    """Open a local web UI (Gradio) to ask, caption, read, detect and segment."""
    from vlmo.app import serve

    serve(
        run.load,
        model_name=run.model,
        host=host,
        port=port,
        share=share,
        max_upload_mb=max_upload_mb,
        mask_decoder=mask_decoder,
    )


@app.command(
    "serve",
    epilog=(
        "Examples (--allow-remote-images needs pip install 'vlmo[serve]'):\n\n  vlmo serve --model vlmo/shapes\n\n"
        "  VLMO_API_KEY=secret vlmo serve --host 0.0.0.0 --port 8000 --max-batch-size 16\n\n"
        "See docs/serve.md for the endpoints and the openai client."
    ),
)
@shared_options(MODEL)
def serve_command(
    run: Run,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the server on this machine, 0.0.0.0 opens it.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="VLMO_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health (prefer the variable: "
            "arguments show in ps).",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients see and send (default: the --model value).")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests generated together.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting for a batch slot; more get 503.")] = 64,
    max_image_mb: Annotated[float, typer.Option("--max-image-mb", help="Largest image accepted, in MB (413).")] = 20,
    allowed_local_media_path: Annotated[
        Path | None, typer.Option(help="Folder that file:// image URLs may read from (default: no files).")
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="Fetch http(s) image URLs for clients (default: off).")
    ] = False,
    allow_private_addresses: Annotated[
        bool,
        typer.Option(
            "--allow-private-addresses",
            help="With --allow-remote-images, also fetch from loopback, private and link-local addresses (off).",
        ),
    ] = False,
    mask_decoder: MaskDecoder = None,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds accepted requests get to finish after Ctrl-C or SIGTERM.")
    ] = 30.0,
    use_ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve as a Ray Serve deployment of --replicas model replicas (pip install 'vlmo[ray]'; RAY_ADDRESS "
            "names a cluster; docs/serve.md).",
        ),
    ] = False,
    replicas: Annotated[int, typer.Option(help="--ray: model replicas.")] = 1,
    min_replicas: Annotated[
        int | None, typer.Option(help="--ray: autoscale between --min-replicas and --max-replicas.")
    ] = None,
    max_replicas: Annotated[int | None, typer.Option(help="--ray: the most replicas when autoscaling.")] = None,
    replica_threads: Annotated[
        int | None, typer.Option(help="--ray: CPU threads per replica (default: the cores / the replicas).")
    ] = None,
) -> None:
    """Serve the model over HTTP: an OpenAI-compatible chat API, plus detect, segment, health and metrics."""
    from vlmo.serve.run import check_dependencies, serve

    check_dependencies(allow_remote_images)  # before importing the server, which needs them
    from vlmo.serve.routes import ServerSettings

    ray_options = None
    if use_ray:
        from vlmo.serve.ray_serve import RayServeOptions

        gpu = run.device.startswith("cuda")
        ray_options = RayServeOptions(replicas, min_replicas, max_replicas, replica_threads, gpu)
    elif (replicas, min_replicas, max_replicas, replica_threads) != (1, None, None, None):
        raise CliUsageError("--replicas, --min-replicas, --max-replicas and --replica-threads need --ray")

    settings = ServerSettings(
        model_name=served_model_name or run.model,
        api_key=api_key,
        max_image_mb=max_image_mb,
        allowed_local_media_path=allowed_local_media_path,
        allow_remote_images=allow_remote_images,
        allow_private_addresses=allow_private_addresses,
        mask_decoder=mask_decoder,
    )
    if ray_options is not None:
        from vlmo.serve.ray_serve import serve_ray

        serve_ray(
            dict(run.load_options),
            settings,
            ray_options,
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            shutdown_timeout=shutdown_timeout,
        )
        return
    serve(
        run.load,
        settings,
        host=host,
        port=port,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        shutdown_timeout=shutdown_timeout,
    )


@app.command(epilog="Example:\n\n  vlmo download google/paligemma-3b-mix-224")
def download(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Hub id, e.g. google/paligemma-3b-mix-224.")],
    revision: Revision = None,
) -> None:
    """Download a model into the Hugging Face cache (only the files vlmo needs) and print its path."""
    from vlmo.weights.hub import resolve_model

    path = resolve_model(model, revision=revision)
    _echo(str(path))


@app.command()
def info(json_out: JsonOut = False) -> None:
    """Show versions, devices, and the models in the Hugging Face cache."""
    import torch

    from vlmo.weights.devices import resolve_device, resolve_dtype
    from vlmo.weights.hub import cache_location, cached_models
    from vlmo.weights.policy import choose_quantization

    devices = ["cpu"]
    devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    auto_device = resolve_device("auto")
    auto = str(resolve_dtype("auto", auto_device)).split(".")[-1]
    auto_quantize = choose_quantization("auto", "auto", auto_device) or "none"
    models = cached_models()
    data = {
        "vlmo": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "devices": devices,
        "auto_dtype": auto,
        "auto_quantize": auto_quantize,
        "cache": str(cache_location()),
        "cached_models": [{"id": repo, "bytes": size} for repo, size in models],
        "default_model": os.environ.get("VLMO_MODEL", DEFAULT_MODEL),
    }
    if json_out:
        _emit_json(data)
        return
    for key in ("vlmo", "torch", "python", "auto_dtype", "auto_quantize", "default_model", "cache"):
        _echo(f"{key}: {data[key]}")
    _echo("devices: " + ", ".join(devices))
    _echo("cached models:" + ("" if models else " none"))
    for repo, size in models:
        _echo(f"  {repo}  {size / 1e9:.2f} GB")


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
