"""`vlmo app`: a local web UI (Gradio) to ask, caption, read, detect and segment, for one loaded model.

Two layers, so the logic is testable without a browser or even Gradio:

- `VlmoApp` holds the model and does the work. Its handlers take what the UI sends (an image as a path, bytes, PIL
  image or Gradio's raw file payload; plain strings and numbers) and return what the UI shows (text that grows as
  tokens arrive, a drawn image, table rows, a JSON file). They raise `VlmoError`s for bad input.
- `build_ui` wires the handlers into Gradio Blocks, turning every error into a readable message (`gr.Error` with
  the CLI's one-line text); `serve` loads the model and runs the server (what `vlmo app` calls).

Image events are registered with `preprocess=False`: Gradio's own image preprocessing opens the file with Pillow
itself and would answer a text file with a traceback-like message, so the handlers receive the uploaded file and
open it with `vlmo.images.load_image`, whose errors say what to do. Gradio still checks that the file came
from its upload folder before any handler sees it.

Several questions about one image, in any tab, reuse its encoded features: the model's `vlm.image_cache`
(`vlmo.engine.features.FeatureCache`, an LRU keyed by image content) sits under every task.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from PIL import Image, ImageDraw, ImageFont

from vlmo import tasks
from vlmo.api import VLMo
from vlmo.detection import Detection
from vlmo.errors import ImageError, InputError, OptionError, VlmoError, braced, check_count, check_file
from vlmo.fileio.atomic import atomic_path, write_output
from vlmo.generation import GenerateOptions, SamplingConfig, drain
from vlmo.images import load_image
from vlmo.segmentation import Segmentation
from vlmo.serve.launch import check_port, load_model, say, warn_if_exposed

if TYPE_CHECKING:
    import gradio

Task = Literal["ask", "caption", "ocr", "detect", "segment"]
TASKS: tuple[Task, ...] = ("ask", "caption", "ocr", "detect", "segment")
DEFAULT_MAX_UPLOAD_MB = 20
DETECTION_HEADERS = ["label", "x_min", "y_min", "x_max", "y_max"]
SEGMENTATION_HEADERS = [*DETECTION_HEADERS, "mask pixels"]
# What a raw image can be: a path, encoded bytes, a PIL image, or Gradio's file payload ({"path": …, …}).
UIImage = str | os.PathLike[str] | bytes | Image.Image | dict[str, Any] | None


class AppDependencyError(VlmoError):
    """The app's optional dependency (Gradio) is not installed."""


def import_gradio() -> Any:
    """The `gradio` module, or AppDependencyError naming the extra to install."""
    try:
        import gradio
    except ImportError as exc:
        raise AppDependencyError('the app needs Gradio, which is not installed; run: pip install "vlmo[app]"') from exc
    return gradio


# -- examples ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppExample:
    """One preloaded example: an image (a file, or a PIL image saved at startup), the tab it belongs to, and the
    question (ask) or labels (detect, segment); caption and OCR examples need no text."""

    image: str | os.PathLike[str] | Image.Image
    task: Task
    text: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"unknown example task {self.task!r}; use one of {', '.join(TASKS)}")


def default_examples() -> list[AppExample]:
    """Small pictures drawn at startup, whose answers are in the picture: the README's `examples/shapes.png` (a
    yellow circle, a red square and a blue triangle, the scene `vlmo.demo.shapes.example_scene` draws; the built-in
    `vlmo/shapes` model answers every shapes example right), and a STOP sign for OCR."""
    from vlmo.demo.shapes import example_scene, render

    shapes = render(example_scene())
    sign = Image.new("RGB", (320, 224), (250, 250, 250))
    draw = ImageDraw.Draw(sign)
    draw.rounded_rectangle((30, 42, 290, 182), radius=18, fill=(200, 20, 30))
    draw.text((160, 112), "STOP", fill=(255, 255, 255), font=ImageFont.load_default(72), anchor="mm")
    return [
        AppExample(shapes, "ask", "what color is the circle?"),
        AppExample(shapes, "ask", "how many shapes are there?"),
        AppExample(shapes, "caption"),
        AppExample(sign, "ocr"),
        AppExample(shapes, "detect", "circle ; square ; triangle"),
        AppExample(shapes, "segment", "circle"),
    ]


# -- the handlers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """What detect/segment show: the drawn image, one table row per object, and the JSON file offered for download."""

    image: Image.Image
    rows: list[list[Any]]
    json_path: Path
    objects: list[Detection] | list[Segmentation] = field(repr=False)


def sampling_options(
    max_tokens: float | None = 0,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: float | None = 0,
    seed: float | str | None = None,
) -> GenerateOptions:
    """The UI's sampling controls (numbers may arrive as floats or empty) → validated `generate` keyword options.

    max_tokens 0 (or empty) keeps each task's default (`vlmo.tasks.DEFAULT_MAX_NEW_TOKENS`); an empty seed means
    a fresh random draw each time.
    """
    options: GenerateOptions = {
        "do_sample": bool(sample),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": _whole(top_k, "top-k", 0),
        "seed": None if seed in (None, "") else _whole(seed, "seed", None),
    }
    tokens = _whole(max_tokens, "max new tokens", 0)
    if tokens:
        options["max_new_tokens"] = tokens
    SamplingConfig.from_options(options, tasks.DEFAULT_MAX_NEW_TOKENS["generate"])  # validate before any work
    return options


def _whole(value: float | str | None, what: str, empty: Any) -> Any:
    if value is None or value == "":
        return empty
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise InputError(f"{what} must be a whole number, got {value!r}")
    return int(number)


class VlmoApp:
    """The app's state and handlers, free of Gradio: one loaded model, a feature cache, examples, and a folder for
    the JSON files it offers for download (removed by `close`)."""

    def __init__(
        self,
        vlm: VLMo,
        *,
        model_name: str | None = None,
        mask_decoder: str | os.PathLike[str] | None = None,
        examples: Sequence[AppExample] | None = None,
        cache_size: int = 8,
    ) -> None:
        self.vlm = vlm
        self.model_name = model_name or vlm.source.name
        self.mask_decoder = mask_decoder
        self.cache = vlm.image_cache  # several questions about one image (any task) encode it once
        self.cache.capacity = cache_size
        self._work = tempfile.TemporaryDirectory(prefix="vlmo-app-")
        self.work_dir = Path(self._work.name)
        self._written = 0
        self.examples = [self._saved(e, i) for i, e in enumerate(default_examples() if examples is None else examples)]

    def close(self) -> None:
        """Remove the example and download files."""
        self._work.cleanup()

    def _saved(self, example: AppExample, index: int) -> AppExample:
        """The example with its image as a file (Gradio serves examples from files)."""
        if not isinstance(example.image, Image.Image):
            load_image(example.image)  # a broken example fails at startup, not on click
            return example
        path = self.work_dir / "examples" / f"{index:02d}-{example.task}.png"
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as tmp:
            example.image.convert("RGB").save(tmp, format="PNG")
        return AppExample(path, example.task, example.text)

    def example_rows(self, task: Task) -> list[list[str]]:
        """[[image path, text]] for the task's examples (the text only for ask, detect and segment)."""
        rows = [[str(e.image), e.text] for e in self.examples if e.task == task]
        return rows if task in ("ask", "detect", "segment") else [r[:1] for r in rows]

    def allowed_paths(self) -> list[str]:
        """Folders Gradio may serve files from: our work folder and those of file examples."""
        # `_saved` left no PIL image among the examples: each is a file by now.
        folders = {str(Path(e.image).resolve().parent) for e in self.examples if not isinstance(e.image, Image.Image)}
        return sorted({str(self.work_dir)} | folders)

    # -- inputs

    def load(self, image: UIImage) -> tuple[Image.Image, str]:
        """The image as RGB and a name for messages; ImageError for no image, a non-image or a too large one."""
        if image is None:
            raise ImageError("no image yet; upload one or pick an example")
        name = None
        if isinstance(image, dict):  # Gradio's raw FileData: {"path": …, "orig_name": …, "url": …}
            name = image.get("orig_name")
            image = image.get("path") or _data_url_bytes(image.get("url"))
            if image is None:
                raise ImageError("the upload carried no file; upload the image again")
        try:
            return load_image(image), name or _display_name(image)
        except ImageError as exc:
            if name is None or not isinstance(image, str | os.PathLike):
                raise
            raise ImageError(str(exc).replace(str(image), name)) from None  # the user's file name, not a temp path

    def check(self, image: UIImage) -> None:
        """Open an upload at once, so a bad file is reported when it arrives rather than on the first question."""
        if image is not None:
            self.load(image)

    # -- text tasks (streamed)

    def ask(
        self, image: UIImage, question: str, *, lang: str = "en", options: GenerateOptions | None = None
    ) -> Iterator[str]:
        """Answer a question (`answer {lang} …`); yields the answer so far after every new piece of text."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty; type a question about the image")
        return self._stream(image, tasks.ask(question, lang), options)

    def caption(
        self, image: UIImage, *, detail: str = "short", lang: str = "en", options: GenerateOptions | None = None
    ) -> Iterator[str]:
        """Describe the image (detail: short, long or raw); yields the caption so far."""
        return self._stream(image, tasks.caption(detail, lang), options)

    def ocr(self, image: UIImage, *, options: GenerateOptions | None = None) -> Iterator[str]:
        """Read the text in the image; yields the text so far."""
        return self._stream(image, tasks.ocr(), options)

    def _stream(self, image: UIImage, prompt: tasks.Prompt, options: GenerateOptions | None) -> Iterator[str]:
        # Load, encode and check the options before the first yield, so bad input fails when the handler is called.
        pil, _ = self.load(image)
        features = self.cache.get(pil)
        return self._accumulate(self.vlm.stream(pil, prompt, image_features=features, **(options or {})))

    def _accumulate(self, pieces: Generator[str, None, None]) -> Iterator[str]:
        """The answer so far after every piece. Closing this (Gradio does when the client has gone) closes `pieces`
        and with it the generation loop, so no further token is computed."""
        with closing(pieces):
            text = ""
            yield text  # clears the previous answer at once
            for piece in pieces:
                text += piece
                yield text

    # -- locating tasks

    def detect(self, image: UIImage, labels: str, *, options: GenerateOptions | None = None) -> Located:
        """Find objects ("cat ; dog"): boxes drawn, one row per object, and a JSON file like `vlmo detect --json`."""
        return drain(self.located_steps("detect", image, labels, options))

    def segment(self, image: UIImage, labels: str, *, options: GenerateOptions | None = None) -> Located:
        """Segment objects: masks drawn, one row per object (with its mask area), a JSON file with COCO RLE masks."""
        return drain(self.located_steps("segment", image, labels, options))

    def located_steps(
        self, task: Literal["detect", "segment"], image: UIImage, labels: str, options: GenerateOptions | None = None
    ) -> Generator[None, None, Located]:
        """`detect` / `segment` yielding None after every generated token (`VLMo.run_steps`) and returning the
        `Located` result; closing it stops generation at the next step (what the UI does when its client goes)."""
        pil, name = self.load(image)
        prompt = tasks.prompt(task, labels=_labels(labels))
        steps = self.vlm.run_steps(pil, prompt, mask_decoder=self.mask_decoder, **(options or {}))
        answer = cast(tasks.Answer, (yield from steps))
        rows = [[label, *(round(c, 1) for c in box), *rest] for label, box, rest in _split_rows(answer)]
        return Located(answer.draw(pil), rows, self._json(answer.payload(), name), answer.objects or [])

    def _json(self, payload: dict[str, Any], name: str) -> Path:
        """Write a download file shaped like the CLI's `--json` output; each result gets its own folder."""
        self._written += 1
        folder = self.work_dir / f"result-{self._written}"
        folder.mkdir()
        path = folder / f"{payload['task']}.json"
        data = {"model": self.model_name, "image": name, **payload}
        return write_output(path, json.dumps(data, ensure_ascii=False, indent=1), force=False)


def _split_rows(answer: tasks.Answer) -> list[tuple[str, list[float], list[int]]]:
    """Each object's row as (label, box, the rest: the mask area for segment)."""
    return [(str(row[0]), [float(c) for c in row[1:5]], [int(v) for v in row[5:]]) for row in answer.rows()]


def _labels(labels: str) -> list[str]:
    if not isinstance(labels, str) or not labels.strip():
        raise InputError('no labels given; name what to find, e.g. "cat ; dog"')
    return labels.split(";")


def _display_name(image: Any) -> str:
    return Path(image).name if isinstance(image, str | os.PathLike) else "the image"


def _data_url_bytes(url: str | None) -> bytes | None:
    """The bytes of a `data:…;base64,…` URL (pasted or webcam images may arrive so), else None."""
    if not url or not url.startswith("data:") or "," not in url:
        return None
    import base64
    import binascii

    try:
        return base64.b64decode(url.split(",", 1)[1], validate=False)
    except (binascii.Error, ValueError):
        raise ImageError("the pasted image could not be decoded; save it as a file and upload that") from None


# -- the Gradio layer ---------------------------------------------------------------------------------------------


@contextmanager
def shown_as_ui_error(gr: Any) -> Iterator[None]:
    """Turn any error into `gr.Error` carrying the CLI's one-line message (e.g. an ImageError's own text)."""
    from vlmo.cli.errors import describe

    try:
        yield
    except gr.Error:
        raise
    except Exception as exc:  # noqa: BLE001 - the UI shows every failure as a message and keeps serving
        message, code = describe(exc)
        raise gr.Error(message, print_exception=code != 2) from exc


def build_ui(app: VlmoApp) -> gradio.Blocks:
    """The Gradio Blocks: one image shared by five tabs, generation settings, and examples per tab.

    Every event that runs the model shares one concurrency slot ("model"), so requests from several browsers
    queue up instead of interleaving on the one model.
    """
    gr = import_gradio()
    model_events: dict[str, Any] = dict(preprocess=False, concurrency_id="model", concurrency_limit=1)

    # delete_cache: every hour, drop uploads and results older than a day from Gradio's cache folder.
    with gr.Blocks(title=f"vlmo · {app.model_name}", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"### vlmo · `{app.model_name}`")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                image = gr.Image(
                    label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="vlmo-image", height=300
                )
                with gr.Accordion("Generation settings", open=False):
                    max_tokens = gr.Slider(0, 1024, value=0, step=1, label="Max new tokens (0: the task's default)")
                    sample = gr.Checkbox(value=False, label="Sample (off: always the most likely token)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    top_k = gr.Number(value=0, precision=0, minimum=0, label="Top-k (0: all tokens)")
                    seed = gr.Number(value=None, precision=0, label="Seed (empty: random)")
                    lang = gr.Textbox(value="en", label="Answer language (ask, caption)", max_lines=1)
            with gr.Column(scale=3, min_width=320):
                with gr.Tabs():
                    with gr.Tab("Ask", id="ask"):
                        question = gr.Textbox(
                            label="Question", placeholder="what is on the table?", elem_id="ask-question", max_lines=1
                        )
                        ask_run = gr.Button("Ask", variant="primary", elem_id="ask-run")
                        answer = gr.Textbox(label="Answer", interactive=False, elem_id="ask-answer")
                        _examples(gr, app, "ask", [image, question])
                    with gr.Tab("Caption", id="caption"):
                        detail = gr.Radio(["short", "long", "raw"], value="short", label="Detail")
                        caption_run = gr.Button("Caption", variant="primary", elem_id="caption-run")
                        caption_out = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")
                        _examples(gr, app, "caption", [image])
                    with gr.Tab("OCR", id="ocr"):
                        ocr_run = gr.Button("Read text", variant="primary", elem_id="ocr-run")
                        ocr_out = gr.Textbox(label="Text", interactive=False, elem_id="ocr-text")
                        _examples(gr, app, "ocr", [image])
                    with gr.Tab("Detect", id="detect"):
                        det_labels = gr.Textbox(
                            label="Labels", placeholder="cat ; dog", elem_id="detect-labels", max_lines=1
                        )
                        det_run = gr.Button("Detect", variant="primary", elem_id="detect-run")
                        det_image = gr.Image(label="Boxes", type="pil", interactive=False, elem_id="detect-image")
                        det_table = gr.Dataframe(headers=DETECTION_HEADERS, interactive=False, elem_id="detect-table")
                        det_json = gr.File(label="JSON", interactive=False, elem_id="detect-json")
                        _examples(gr, app, "detect", [image, det_labels])
                    with gr.Tab("Segment", id="segment"):
                        seg_labels = gr.Textbox(
                            label="Labels", placeholder="cat", elem_id="segment-labels", max_lines=1
                        )
                        seg_run = gr.Button("Segment", variant="primary", elem_id="segment-run")
                        seg_image = gr.Image(label="Masks", type="pil", interactive=False, elem_id="segment-image")
                        seg_table = gr.Dataframe(
                            headers=SEGMENTATION_HEADERS, interactive=False, elem_id="segment-table"
                        )
                        seg_json = gr.File(label="JSON", interactive=False, elem_id="segment-json")
                        _examples(gr, app, "segment", [image, seg_labels])
        sampling = [max_tokens, sample, temperature, top_p, top_k, seed]

        def on_upload(img: UIImage) -> Any:
            try:
                app.check(img)
            except VlmoError as exc:
                gr.Warning(str(exc))
                return None  # clear the broken upload
            return gr.skip()

        def on_ask(img: UIImage, q: str, lg: str, *s: Any) -> Iterator[str]:
            with shown_as_ui_error(gr):
                yield from app.ask(img, q, lang=lg, options=sampling_options(*s))

        def on_caption(img: UIImage, d: str, lg: str, *s: Any) -> Iterator[str]:
            with shown_as_ui_error(gr):
                yield from app.caption(img, detail=d, lang=lg, options=sampling_options(*s))

        def on_ocr(img: UIImage, *s: Any) -> Iterator[str]:
            with shown_as_ui_error(gr):
                yield from app.ocr(img, options=sampling_options(*s))

        def located(task: Literal["detect", "segment"]) -> Callable[..., Iterator[tuple[Any, ...]]]:
            # A generator that yields "no change" after every generated token: Gradio stops iterating (and closes
            # it, which stops generation) once the client has gone, instead of finishing a request nobody awaits.
            def handler(img: UIImage, labels: str, *s: Any) -> Iterator[tuple[Any, ...]]:
                with shown_as_ui_error(gr):
                    steps = app.located_steps(task, img, labels, sampling_options(*s))
                    result = yield from _unchanged_per_step(steps, (gr.skip(), gr.skip(), gr.skip()))
                if not result.rows:
                    gr.Info("no objects found")
                yield result.image, result.rows, str(result.json_path)

            handler.__name__ = f"on_{task}"
            return handler

        image.upload(on_upload, [image], [image], preprocess=False, concurrency_limit=None, concurrency_id="check")
        for trigger in (ask_run.click, question.submit):
            trigger(on_ask, [image, question, lang, *sampling], answer, **model_events)
        caption_run.click(on_caption, [image, detail, lang, *sampling], caption_out, **model_events)
        ocr_run.click(on_ocr, [image, *sampling], ocr_out, **model_events)
        for trigger in (det_run.click, det_labels.submit):
            trigger(
                located("detect"),
                [image, det_labels, *sampling],
                [det_image, det_table, det_json],
                **model_events,
            )
        for trigger in (seg_run.click, seg_labels.submit):
            trigger(
                located("segment"),
                [image, seg_labels, *sampling],
                [seg_image, seg_table, seg_json],
                **model_events,
            )
    return demo


def _unchanged_per_step(
    steps: Generator[None, None, Located], unchanged: tuple[Any, ...]
) -> Generator[tuple[Any, ...], None, Located]:
    """Yield `unchanged` for every step of `steps` and return its result; closing this closes `steps`."""
    with closing(steps):
        while True:
            try:
                next(steps)
            except StopIteration as end:
                return end.value
            yield unchanged


def _examples(gr: Any, app: VlmoApp, task: Task, inputs: list[Any]) -> None:
    rows = app.example_rows(task)
    if rows:
        gr.Examples(examples=rows, inputs=inputs, cache_examples=False, label="Examples")


def _theme(gr: Any) -> Any:
    """Gradio's default look with local fonts: a local app should not fetch fonts from the internet."""
    return gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


@dataclass
class RunningApp:
    """A started server: its URL, and `close()` to stop it and remove the app's files."""

    url: str
    demo: Any
    app: VlmoApp

    def close(self) -> None:
        self.demo.close(verbose=False)
        self.app.close()


def start(
    app: VlmoApp,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
) -> RunningApp:
    """Build the UI and start serving it in background threads; returns once the server accepts requests."""
    check_count(max_upload_mb, "max_upload_mb")
    gr = import_gradio()
    demo = build_ui(app)
    demo.queue(default_concurrency_limit=1)
    try:
        _, url, share_url = demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            max_file_size=max_upload_mb * 1024 * 1024,
            allowed_paths=app.allowed_paths(),
            prevent_thread_lock=True,
            quiet=True,
            show_error=True,
            ssr_mode=False,
            theme=_theme(gr),
        )
    except OSError as exc:
        if "empty port" not in str(exc):  # Gradio's words when the port is taken
            raise
        busy = f"port {port} is in use" if port else "no free port from 7860 on"
        raise OptionError(f"{busy} on {braced(host)}; pass another {{port}}", port=None) from exc
    return RunningApp(share_url or url, demo, app)


def serve(
    load: Callable[[], VLMo],
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
    mask_decoder: str | os.PathLike[str] | None = None,
) -> None:
    """`vlmo app`: check the options and Gradio, load the model once with `load` (progress on stderr), serve until
    Ctrl-C. `model_name` is what the page and messages call the model."""
    import_gradio()  # before the (slow) model load
    check_file(mask_decoder, "mask_decoder")
    check_count(max_upload_mb, "max_upload_mb")
    check_port(host, port)
    vlm = load_model(load, model_name)
    app = VlmoApp(vlm, model_name=model_name, mask_decoder=mask_decoder)
    with _sigterm_as_interrupt():
        try:
            running = start(app, host=host, port=port, share=share, max_upload_mb=max_upload_mb)
        except BaseException:
            app.close()
            raise
        try:
            warn_if_exposed(host, "the app (no login)")
            if share:
                say("warning: --share makes the app public through Gradio's relay; anyone with the link can use it")
            say(f"vlmo app running at {running.url} (Ctrl-C to stop)")
            while running.demo.is_running:
                time.sleep(0.2)
        finally:
            running.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let `kill` (systemd, docker stop) end the server like Ctrl-C does, so it closes and cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = [
    "AppDependencyError",
    "AppExample",
    "Located",
    "RunningApp",
    "VlmoApp",
    "build_ui",
    "default_examples",
    "sampling_options",
    "serve",
    "start",
]
