"""The web app: its handlers without a browser (always run), and the whole app in headless Chromium.

The handlers are checked against the taught model, so answers, boxes and masks are real. The browser test starts
the server in this process on a free loopback port, drives Debian's /usr/bin/chromium through Playwright, and
saves screenshots to $VLMO_TEST_ARTIFACTS (or tmp_path); with VLMO_UPDATE_DOCS=1 it refreshes docs/img/app-ask.png.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import BLUE, RED
from vlmo import VLMo
from vlmo.app import (
    AppDependencyError,
    AppExample,
    VlmoApp,
    build_ui,
    default_examples,
    import_gradio,
    sampling_options,
    shown_as_ui_error,
)
from vlmo.cli.commands import app as cli_app
from vlmo.engine.features import FeatureCache
from vlmo.errors import GenerationConfigError, ImageError, InputError

CHROMIUM = Path("/usr/bin/chromium")
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (96, 64), colour)


TEST_EXAMPLES = [
    AppExample(solid(RED), "ask", "what color is it?"),
    AppExample(solid(BLUE), "ask", "what color is it?"),
    AppExample(solid(RED), "caption"),
    AppExample(solid(RED), "ocr"),
    AppExample(solid(RED), "detect", "cat ; dog"),
]


@pytest.fixture(scope="module")
def vlm(taught_checkpoint: Path) -> VLMo:
    return VLMo.from_pretrained(taught_checkpoint, device="cpu", dtype="float32")


@pytest.fixture
def app(vlm: VLMo, filled_mask_decoder: Path) -> Iterator[VlmoApp]:
    vlm.image_cache.clear()
    state = VlmoApp(vlm, model_name="taught", mask_decoder=filled_mask_decoder, examples=TEST_EXAMPLES)
    yield state
    state.close()


def last(pieces: Iterator[str]) -> str:
    """The final text of a streamed answer (handlers yield the answer so far, starting with "")."""
    return list(pieces)[-1]


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- handlers, no browser -----------------------------------------------------------------------------------------


def test_text_tasks_answer_and_reuse_the_encoded_image(app: VlmoApp, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    solid(RED).save(path)
    assert last(app.ask(str(path), "what color is it?")) == "red"
    assert (app.cache.misses, app.cache.hits) == (1, 0)
    # The same pixels again, as another upload (bytes) and as Gradio's raw payload: the vision tower is skipped.
    assert last(app.caption(png_bytes(solid(RED)))) == "a red square"
    assert last(app.ocr({"path": str(path), "orig_name": "sign.png"})) == "STOP"
    assert (app.cache.misses, app.cache.hits) == (1, 2)
    assert last(app.ask(solid(BLUE), "  what color\nis it? ")) == "blue"
    assert (app.cache.misses, len(app.cache)) == (2, 2)
    # the locating tabs use the same cache
    assert [row[0] for row in app.detect(solid(RED), "cat ; dog").rows] == ["cat", "dog"]
    assert app.cache.misses == 2


def test_answers_stream_as_growing_text(app: VlmoApp) -> None:
    steps = list(app.caption(solid(RED)))
    assert steps[0] == ""  # the previous answer is cleared at once
    assert steps[-1] == "a red square" and len(steps) > 2
    assert all(b.startswith(a) for a, b in zip(steps, steps[1:], strict=False))


def test_detect_draws_boxes_lists_them_and_writes_json(app: VlmoApp) -> None:
    image = solid(RED)
    result = app.detect(image, "cat ; dog")
    assert [row[0] for row in result.rows] == ["cat", "dog"]
    assert result.rows[0][1:] == [round(c, 1) for c in result.objects[0].box]
    assert result.image.size == image.size and result.image.tobytes() != image.tobytes()
    data = json.loads(result.json_path.read_text(encoding="utf-8"))
    assert data["task"] == "detect" and data["model"] == "taught" and data["size"] == [96, 64]
    assert [d["label"] for d in data["detections"]] == ["cat", "dog"]


def test_segment_draws_masks(app: VlmoApp) -> None:
    result = app.segment(solid(RED), "cat")
    assert [row[0] for row in result.rows] == ["cat"]
    assert result.rows[0][-1] == int(result.objects[0].mask.sum()) > 0
    data = json.loads(result.json_path.read_text(encoding="utf-8"))
    assert data["mask_encoding"] == "coco_rle_uncompressed_column_major"
    assert data["segmentations"][0]["mask"]["size"] == [64, 96]


def test_sampling_controls_reach_generation(app: VlmoApp) -> None:
    options = sampling_options(max_tokens=1.0, sample=False, temperature=1.0, top_p=1.0, top_k=0.0, seed=None)
    assert options["max_new_tokens"] == 1 and options["top_k"] == 0 and options["seed"] is None
    assert len(list(app.caption(solid(RED), options=options))) == 2  # "" and one token
    sampled = sampling_options(0, True, 0.7, 0.9, 5, 3.0)
    assert "max_new_tokens" not in sampled and sampled["seed"] == 3
    assert last(app.ask(solid(RED), "what color is it?", options=sampled)) == last(
        app.ask(solid(RED), "what color is it?", options=sampled)
    )


@pytest.mark.parametrize(
    ("values", "error", "words"),
    [
        ((0, True, 0.0, 1.0, 0, None), GenerationConfigError, "temperature must be at least"),
        ((0, True, 1.0, 1.0, 2.5, None), InputError, "top-k must be a whole number"),
        ((0, False, 1.0, 1.0, 0, "abc"), InputError, "seed must be a whole number"),
        ((0, False, 1.0, 0.0, 0, None), GenerationConfigError, "top_p"),
    ],
)
def test_bad_sampling_controls_are_readable(values: tuple, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        sampling_options(*values)


def test_bad_input_gives_the_loaders_message(app: VlmoApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notes = tmp_path / "upload-7f3a" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("not a picture")
    with pytest.raises(ImageError, match=r"^notes\.txt is not an image Pillow can read") as info:
        app.check({"path": str(notes), "orig_name": "notes.txt"})
    assert "upload-7f3a" not in str(info.value)  # the user's file name, not the server's temp path
    with pytest.raises(ImageError, match="no image yet"):
        list(app.ask(None, "what color is it?"))
    with pytest.raises(InputError, match="no labels given"):
        app.detect(solid(RED), "  ")
    with pytest.raises(InputError, match="empty label"):
        app.detect(solid(RED), "cat ; ")
    with pytest.raises(InputError, match="question is empty"):
        app.ask(solid(RED), " ")
    with pytest.raises(InputError, match="one code"):
        app.caption(solid(RED), lang="e n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (200, 200)).save(huge)
    with pytest.raises(ImageError, match="too large"):
        app.check(str(huge))
    app.check(None)  # a cleared upload is fine


def test_ui_errors_carry_the_one_line_message() -> None:
    gr = pytest.importorskip("gradio")
    with pytest.raises(gr.Error) as info, shown_as_ui_error(gr):
        raise ImageError("notes.txt is not an image Pillow can read; pass a PNG, JPEG, WebP or similar file")
    assert info.value.message.startswith("notes.txt is not an image")
    with pytest.raises(gr.Error, match="out of memory"), shown_as_ui_error(gr):
        raise MemoryError


def test_examples_are_saved_and_answer_right(app: VlmoApp) -> None:
    rows = app.example_rows("ask")
    assert [r[1] for r in rows] == ["what color is it?", "what color is it?"]
    answers = [last(app.ask(image, question)) for image, question in rows]
    assert answers == ["red", "blue"]
    assert last(app.caption(app.example_rows("caption")[0][0])) == "a red square"
    assert last(app.ocr(app.example_rows("ocr")[0][0])) == "STOP"
    image, labels = app.example_rows("detect")[0]
    assert [row[0] for row in app.detect(image, labels).rows] == ["cat", "dog"]
    assert app.example_rows("segment") == []
    assert all(Path(r[0]).parent == app.work_dir / "examples" for r in rows)
    assert str(app.work_dir) in app.allowed_paths()


def test_default_examples_cover_every_task() -> None:
    examples = default_examples()
    assert {e.task for e in examples} == {"ask", "caption", "ocr", "detect", "segment"}
    assert all(isinstance(e.image, Image.Image) for e in examples)
    with pytest.raises(InputError, match="unknown example task"):
        AppExample(solid(RED), "draw")  # type: ignore[arg-type]


def test_feature_cache_is_a_small_lru() -> None:
    calls: list[int] = []

    def encode(images: Sequence[Image.Image]) -> torch.Tensor:
        calls.append(len(images))
        return torch.full((1, 2, 3), float(images[0].getpixel((0, 0))[0]))

    cache = FeatureCache(encode, capacity=2)
    a, b, c = solid((1, 0, 0)), solid((2, 0, 0)), solid((3, 0, 0))
    assert cache.get(a)[0, 0, 0] == 1 and cache.get(b)[0, 0, 0] == 2
    cache.get(a.copy())  # same pixels, another object: a hit, and `a` becomes the most recent
    cache.get(c)  # evicts b, the least recently used
    assert len(calls) == 3 and (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    cache.get(b)
    assert len(calls) == 4
    off = FeatureCache(encode, capacity=0)
    off.get(a), off.get(a)
    assert len(off) == 0 and off.misses == 2


def test_stream_reuses_given_image_features(vlm: VLMo) -> None:
    image = solid(RED)
    features = vlm.encode_images([image])
    given = "".join(vlm.stream(image, "caption en", image_features=features))
    assert given == "".join(vlm.stream(image, "caption en")) == "a red square"
    # `image` is not read again when its features are given
    assert "".join(vlm.stream(solid(BLUE), "answer en what color is it?", image_features=features)) == "red"
    with pytest.raises(InputError, match="image_features must have shape"):
        list(vlm.stream(image, "ocr", image_features=features[:, :3]))
    with pytest.raises(InputError, match="image_features hold 2 images"):
        list(vlm.stream(image, "ocr", image_features=features.expand(2, -1, -1)))


# -- a client that goes away -----------------------------------------------------------------------------------


class Recorded:
    """Counts `vlm.model.decode` calls and keeps every generator that steps the engine's loop for the library
    (`VLMo._pieces` for streams, `VLMo._finish_steps` for the rest), so a test can see them end."""

    def __init__(self, vlm: VLMo, monkeypatch: pytest.MonkeyPatch) -> None:
        from vlmo.api import VLMo

        self.decodes = 0
        self.loops: list[Any] = []
        decode, pieces, finish = vlm.model.decode, VLMo._pieces, VLMo._finish_steps

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.decodes += 1
            return decode(*args, **kwargs)

        def kept_pieces(*args: Any, **kwargs: Any) -> Any:
            self.loops.append(pieces(*args, **kwargs))
            return self.loops[-1]

        def kept_finish(owner: VLMo, *args: Any, **kwargs: Any) -> Any:
            self.loops.append(finish(owner, *args, **kwargs))
            return self.loops[-1]

        monkeypatch.setattr(vlm.model, "decode", counted)
        monkeypatch.setattr(VLMo, "_pieces", staticmethod(kept_pieces))
        monkeypatch.setattr(VLMo, "_finish_steps", kept_finish)

    def all_closed(self) -> bool:
        return bool(self.loops) and all(inspect.getgeneratorstate(g) == inspect.GEN_CLOSED for g in self.loops)


def ui_handler(app: VlmoApp, name: str) -> Callable[..., Iterator[Any]]:
    """The Gradio event handler called `name` (on_ask, on_caption, on_ocr, on_detect, on_segment)."""
    demo = build_ui(app)
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


@pytest.mark.parametrize("handler", ["on_ask", "on_caption", "on_ocr"])
def test_a_streamed_answer_stops_generating_when_its_client_goes(
    app: VlmoApp, vlm: VLMo, monkeypatch: pytest.MonkeyPatch, handler: str
) -> None:
    """Gradio closes a generator handler when its client disconnects: generation must stop at the next step."""
    pytest.importorskip("gradio")
    run = ui_handler(app, handler)
    sampling = (100, False, 1.0, 1.0, 0, None)  # max tokens 100: only the budget and <eos> would stop it
    args = {"on_ask": (solid(RED), "what color is it?", "en"), "on_caption": (solid(RED), "short", "en")}
    recorded = Recorded(vlm, monkeypatch)
    answer = run(*args.get(handler, (solid(RED),)), *sampling)
    assert next(answer) == "" and next(answer)  # two pieces: the cleared answer, then the first text
    seen = recorded.decodes
    assert seen <= 3
    answer.close()  # what Gradio does once the client has gone
    assert recorded.all_closed() and recorded.decodes == seen


@pytest.mark.parametrize("handler", ["on_detect", "on_segment"])
def test_detect_and_segment_stop_generating_when_their_client_goes(
    app: VlmoApp, vlm: VLMo, monkeypatch: pytest.MonkeyPatch, handler: str
) -> None:
    pytest.importorskip("gradio")
    run = ui_handler(app, handler)
    recorded = Recorded(vlm, monkeypatch)
    labels = "cat ; dog" if handler == "on_detect" else "cat"
    result = run(solid(RED), labels, 0, False, 1.0, 1.0, 0, None)
    for _ in range(3):
        assert all(isinstance(part, dict) for part in next(result))  # per token: "no change" to every output
    seen = recorded.decodes
    result.close()
    assert recorded.all_closed() and recorded.decodes == seen <= 3
    # Run to the end, the same handler gives the drawn image, the rows and the JSON file.
    *_, (image, rows, json_path) = run(solid(RED), labels, 0, False, 1.0, 1.0, 0, None)
    assert isinstance(image, Image.Image) and [row[0] for row in rows][:1] == ["cat"] and json_path.endswith(".json")


def test_app_steps_stop_generation_when_closed(app: VlmoApp, vlm: VLMo, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = Recorded(vlm, monkeypatch)
    steps = app.located_steps("detect", solid(RED), "cat ; dog")
    next(steps), next(steps)
    steps.close()
    assert recorded.all_closed() and recorded.decodes <= 2


def test_a_request_beyond_the_context_is_refused(app: VlmoApp) -> None:
    """A direct API call asking for 100000 tokens cannot hold the only queue slot for minutes."""
    context = app.vlm.model.cfg.text.max_position_embeddings
    with pytest.raises(GenerationConfigError, match=rf"of the model's {context} positions; max_new_tokens may be at"):
        app.ask(solid(RED), "what color is it?", options=sampling_options(100_000))
    with pytest.raises(GenerationConfigError, match="max_new_tokens may be at most"):
        app.detect(solid(RED), "cat", options=sampling_options(100_000))


# -- the command ----------------------------------------------------------------------------------------------


def test_app_command_without_gradio_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(AppDependencyError):
        import_gradio()
    result = CliRunner().invoke(cli_app, ["app", "--model", "never-loaded"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install "vlmo[app]"' in lines[0] and lines[0].startswith("error: ")


def test_app_command_checks_options_before_loading(tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    result = CliRunner().invoke(cli_app, ["app", "--model", "never-loaded", "--mask-decoder", str(tmp_path / "no")])
    assert result.exit_code == 2 and "no such file for --mask-decoder" in result.output
    result = CliRunner().invoke(cli_app, ["app", "--model", "never-loaded", "--max-upload-mb", "0"])
    assert result.exit_code == 2 and "--max-upload-mb" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["app", "--model", "never-loaded", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Loading" not in result.output


def test_app_command_help_lists_its_options() -> None:
    result = CliRunner().invoke(cli_app, ["app", "-h"])
    assert result.exit_code == 0
    for option in ("--model", "--adapter", "--host", "--port", "--share", "--device", "--dtype", "--max-upload-mb"):
        assert option in result.output
    assert "--mask-decoder" in result.output


def test_serve_loads_once_reports_on_stderr_and_always_stops(
    taught_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gradio")
    import vlmo.app

    started: list[dict] = []

    class StoppedDemo:
        is_running = False  # as if Ctrl-C came at once

        def close(self, verbose: bool = True) -> None:
            pass

    def fake_start(state: VlmoApp, **options: object) -> vlmo.app.RunningApp:
        started.append({"app": state, **options})
        return vlmo.app.RunningApp(f"http://0.0.0.0:{port}/", StoppedDemo(), state)

    monkeypatch.setattr(vlmo.app, "start", fake_start)
    port = free_port()
    args = ["app", "--model", str(taught_checkpoint), "--host", "0.0.0.0", "--port", str(port), "--max-upload-mb", "3"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert len(started) == 1 and started[0]["host"] == "0.0.0.0" and started[0]["port"] == port
    assert started[0]["max_upload_mb"] == 3 and started[0]["share"] is False
    assert f"Loaded {taught_checkpoint} on cpu (float32 + int8 weights)" in result.output
    assert "anyone who can reach this machine" in result.output
    assert f"running at http://0.0.0.0:{port}/" in result.output
    assert not started[0]["app"].work_dir.exists()  # closed: example and result files removed


# -- the browser -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VLMO_TEST_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def launch_chromium(pw: Any) -> Any:
    """Headless Debian Chromium that reaches nothing but the page it is sent to."""
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=args)


@contextmanager
def app_in_browser(state: VlmoApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """The app served on a free loopback port and open in headless Chromium: (page, Playwright's `expect`). Skips
    where Gradio, Playwright or Chromium is missing; stops the browser and the server whatever happens."""
    pytest.importorskip("gradio", reason='gradio is not installed: pip install "vlmo[app]"')
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    if not CHROMIUM.is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium")
    from vlmo.app import start

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    running = start(state, host="127.0.0.1", port=free_port(), max_upload_mb=1)
    expect = sync_api.expect
    expect.set_options(timeout=15_000)
    try:
        with sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(running.url)
                yield page, expect
            finally:
                browser.close()
    finally:
        running.close()


@pytest.mark.slow  # Chromium and a Gradio server
@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own pandas deprecations
def test_the_segment_tab_shows_the_built_in_models_masks_offline(
    shapes_int8: VLMo, tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vlmo/shapes with no mask decoder given, offline: the Segment tab draws its masks and lists the objects with
    the mask areas `VLMo.segment` gives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    expected = [(s.label, int(s.mask.sum())) for s in shapes_int8.segment(example, "circle ; square")]
    assert [label for label, _ in expected] == ["circle", "square"]
    state = VlmoApp(shapes_int8, model_name="vlmo/shapes", examples=[])
    try:
        with app_in_browser(state, tmp_path, monkeypatch) as (page, expect):
            page.locator("#vlmo-image input[type=file]").set_input_files(example)
            expect(page.locator("#vlmo-image img")).to_be_visible()
            page.get_by_role("tab", name="Segment").click()
            page.locator("#segment-labels").get_by_role("textbox").fill("circle ; square")
            page.locator("#segment-run").click()
            expect(page.locator("#segment-image img")).to_be_visible()
            table = page.locator("#segment-table")
            for label, area in expected:
                expect(table).to_contain_text(label)
                expect(table).to_contain_text(str(area))
            link = page.locator("#segment-json").get_by_role("link")
            expect(link).to_have_attribute("href", re.compile(r"segment\.json$"))
            page.screenshot(path=artifacts / "app-segment.png")
    finally:
        state.close()


@pytest.mark.slow  # Chromium and a Gradio server; the handlers it drives are tested in-process above
@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own pandas deprecations
def test_app_in_a_real_browser(app: VlmoApp, tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    red, blue, notes, fake = (tmp_path / name for name in ("red.png", "blue.png", "notes.txt", "fake.png"))
    solid(RED).save(red)
    solid(BLUE).save(blue)
    notes.write_text("this is not a picture")
    fake.write_text("nor is this")
    with app_in_browser(app, tmp_path, monkeypatch) as (page, expect):
        try:
            upload = page.locator("#vlmo-image input[type=file]")

            # Ask: upload a red image, ask, and see the streamed answer.
            upload.set_input_files(red)
            expect(page.locator("#vlmo-image img")).to_be_visible()
            page.locator("#ask-question").get_by_role("textbox").fill("what color is it?")
            page.locator("#ask-run").click()
            expect(page.locator("#ask-answer").get_by_role("textbox")).to_have_value("red")
            page.wait_for_timeout(600)  # the new answer fades in; let it settle before the picture
            page.screenshot(path=artifacts / "app-ask.png")

            # Detect: boxes drawn, a table listing cat and dog, and a JSON file to download.
            page.get_by_role("tab", name="Detect").click()
            page.locator("#detect-labels").get_by_role("textbox").fill("cat ; dog")
            page.locator("#detect-run").click()
            expect(page.locator("#detect-image img")).to_be_visible()
            table = page.locator("#detect-table")
            expect(table).to_contain_text("cat")
            expect(table).to_contain_text("dog")
            expect(page.locator("#detect-json").get_by_role("link")).to_have_attribute(
                "href", re.compile(r"detect\.json$")
            )
            page.screenshot(path=artifacts / "app-detect.png")

            # Files that are not images: the browser refuses a .txt; a .png that is not one gets the loader's
            # message from the server, and the server keeps answering.
            page.locator("#vlmo-image").get_by_role("button", name="Remove Image").click()
            upload.set_input_files(notes)
            expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible()
            page.get_by_test_id("toast-close").click()
            upload.set_input_files(fake)
            expect(page.get_by_test_id("toast-text").filter(has_text="fake.png")).to_have_text(
                "fake.png is not an image Pillow can read; pass a PNG, JPEG, WebP or similar file"
            )
            expect(page.locator("#vlmo-image img")).to_have_count(0)  # the broken upload is cleared
            page.wait_for_timeout(500)  # let the message slide in before the picture
            page.screenshot(path=artifacts / "app-error.png")

            # Still serving: a blue image, then the red one again (its features come from the cache).
            page.get_by_role("tab", name="Ask").click()
            answer = page.locator("#ask-answer").get_by_role("textbox")
            for path, colour in ((blue, "blue"), (red, "red")):
                upload.set_input_files(path)
                page.locator("#ask-run").click()
                expect(answer).to_have_value(colour)
        except Exception:
            page.screenshot(path=artifacts / "app-failure.png")  # what the browser showed when it failed
            raise
    assert app.cache.hits >= 1  # the second question about the red image skipped the vision tower
    if os.environ.get("VLMO_UPDATE_DOCS") == "1":
        shutil.copy(artifacts / "app-ask.png", DOCS_IMG / "app-ask.png")
