"""The `vlmo` command line through Typer's CliRunner (in process), plus one real run of the installed script.

Commands run on the taught tiny checkpoint (conftest.py), so answers are real: red, blue, "a red square", STOP
and two boxes. Hub commands talk to the fake hub on 127.0.0.1 (fake_hub.py). CliRunner keeps stdout and stderr
apart, so every test checks both: results on stdout, one `error: …` line on stderr.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from typer.testing import CliRunner, Result

import vlmo
import vlmo.api
from conftest import BLUE, RED, TAUGHT_DETECTION
from fake_hub import FakeHub, SilentServer, isolate_hf
from vlmo.cli.commands import app

SIZE = (96, 64)  # (width, height) of the images the model was taught on
QUESTION = "what color is it?"
COMMANDS = ["ask", "caption", "ocr", "generate", "detect", "segment", "finetune", "eval", "download", "info"]

runner = CliRunner()


def vlmo_cli(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], env=env, prog_name="vlmo")


def ok(result: Result) -> str:
    """stdout of a run that must have succeeded."""
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.output
    return result.stdout


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """A handled failure: exit `code`, nothing on stdout, one `error: …` line on stderr; returns that line."""
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception that escaped the table
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def expected_boxes(size: tuple[int, int]) -> list[tuple[str, tuple[float, float, float, float], list[int]]]:
    """(label, pixel box x0 y0 x1 y1, bins y0 x0 y1 x1) per object of TAUGHT_DETECTION, for a (W, H) image."""
    width, height = size
    found = []
    for bins_text, label in re.findall(r"((?:<loc\d{4}>){4}) (\w+)", TAUGHT_DETECTION):
        y0, x0, y1, x1 = (int(b) for b in re.findall(r"\d{4}", bins_text))
        box = (x0 / 1023 * width, y0 / 1023 * height, x1 / 1023 * width, y1 / 1023 * height)
        found.append((label, box, [y0, x0, y1, x1]))
    return found


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and bad inputs: red/blue PNGs, a text file, a truncated PNG, and a path that does not exist."""
    root = tmp_path_factory.mktemp("images")
    paths = {name: root / f"{name}.png" for name in ("red", "blue", "truncated", "missing")}
    Image.new("RGB", SIZE, RED).save(paths["red"])
    Image.new("RGB", SIZE, BLUE).save(paths["blue"])
    data = paths["red"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["text"] = root / "notes.txt"
    paths["text"].write_text("not an image\n")
    return paths


@pytest.fixture(scope="module")
def ckpt(taught_checkpoint: Path) -> str:
    return str(taught_checkpoint)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taught_checkpoint: Path) -> Iterator[FakeHub]:
    """The taught checkpoint served as acme/taught; the private HF cache (see `_hermetic`) points at it."""
    with FakeHub() as fake:
        fake.add_repo("acme/taught", taught_checkpoint)
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=fake.url)
        yield fake


# -- commands on the taught model -------------------------------------------------------------------------------


def test_ask_one_image(images: dict[str, Path], ckpt: str) -> None:
    result = vlmo_cli("ask", images["red"], QUESTION, "--model", ckpt)
    assert ok(result) == "red\n"
    assert result.stderr == ""  # no spinner when stderr is not a terminal


def test_ask_several_images_prints_tab_separated_lines(images: dict[str, Path], ckpt: str) -> None:
    out = ok(vlmo_cli("ask", images["red"], images["blue"], "-q", QUESTION, "--model", ckpt))
    assert out.splitlines() == [f"{images['red']}\tred", f"{images['blue']}\tblue"]


def test_ask_json(images: dict[str, Path], ckpt: str) -> None:
    out = ok(vlmo_cli("ask", images["red"], images["blue"], "-q", QUESTION, "--model", ckpt, "--json"))
    assert out.count("\n") == 1  # one object on one line
    data = json.loads(out)
    assert data == {
        "model": ckpt,
        "task": "ask",
        "results": [
            {"image": str(images["red"]), "prompt": f"answer en {QUESTION}", "text": "red"},
            {"image": str(images["blue"]), "prompt": f"answer en {QUESTION}", "text": "blue"},
        ],
    }


def test_ask_stream_prints_the_same_text(images: dict[str, Path], ckpt: str) -> None:
    # CliRunner's stdout is not a terminal, so the default is not to stream: force it both ways.
    plain = ok(vlmo_cli("ask", images["blue"], QUESTION, "--model", ckpt, "--no-stream"))
    streamed = ok(vlmo_cli("ask", images["blue"], QUESTION, "--model", ckpt, "--stream"))
    assert streamed == plain == "blue\n"


def test_stop_ends_the_answer_where_the_text_first_appears(images: dict[str, Path], ckpt: str) -> None:
    """--stop (repeatable) is the library's `stop=`: the answer ends before the first stop string, streamed or not."""
    assert ok(vlmo_cli("caption", images["red"], "--model", ckpt, "--stop", " squ", "--stop", "zzz")) == "a red\n"
    streamed = vlmo_cli("caption", images["red"], "--model", ckpt, "--stop", " squ", "--stream")
    assert ok(streamed) == "a red\n"
    assert ok(vlmo_cli("caption", images["red"], "--model", ckpt, "--stop", "zzz")) == "a red square\n"


def test_model_from_environment(images: dict[str, Path], ckpt: str) -> None:
    assert ok(vlmo_cli("ask", images["red"], QUESTION, env={"VLMO_MODEL": ckpt})) == "red\n"


def test_caption(images: dict[str, Path], ckpt: str) -> None:
    assert ok(vlmo_cli("caption", images["red"], "--model", ckpt)) == "a red square\n"
    data = json.loads(ok(vlmo_cli("caption", images["red"], "--model", ckpt, "--json")))
    assert data["task"] == "caption" and data["results"][0]["prompt"] == "caption en"
    assert data["results"][0]["text"] == "a red square"


def test_caption_long_uses_the_describe_prompt(images: dict[str, Path], ckpt: str) -> None:
    data = json.loads(ok(vlmo_cli("caption", images["red"], "--detail", "long", "--model", ckpt, "--json")))
    [row] = data["results"]
    assert row["prompt"] == "describe en" and row["image"] == str(images["red"])


def test_ocr(images: dict[str, Path], ckpt: str) -> None:
    assert ok(vlmo_cli("ocr", images["red"], "--model", ckpt)) == "STOP\n"


def test_generate_keeps_loc_tokens(images: dict[str, Path], ckpt: str) -> None:
    assert ok(vlmo_cli("generate", images["red"], "detect cat ; dog", "--model", ckpt)) == TAUGHT_DETECTION + "\n"


def test_detect_prints_one_line_per_object_in_pixels(images: dict[str, Path], ckpt: str) -> None:
    out = ok(vlmo_cli("detect", images["red"], "cat ; dog", "--model", ckpt))
    lines = [line.split("\t") for line in out.splitlines()]
    want = expected_boxes(SIZE)
    assert [line[0] for line in lines] == [label for label, _, _ in want] == ["cat", "dog"]
    for line, (_, box, _) in zip(lines, want, strict=True):
        assert line[1:] == [f"{v:.1f}" for v in box]


def test_detect_json(images: dict[str, Path], ckpt: str) -> None:
    data = json.loads(ok(vlmo_cli("detect", images["red"], "cat;dog", "--model", ckpt, "--json")))
    assert data["task"] == "detect" and data["image"] == str(images["red"])
    assert data["size"] == list(SIZE) and data["output"] is None
    want = expected_boxes(SIZE)
    assert [d["label"] for d in data["detections"]] == [label for label, _, _ in want]
    for got, (_, box, bins) in zip(data["detections"], want, strict=True):
        assert got["bins"] == bins
        assert got["box"] == pytest.approx(box)


def test_detect_out_writes_an_image_and_refuses_to_overwrite(
    images: dict[str, Path], ckpt: str, tmp_path: Path
) -> None:
    out = tmp_path / "boxes.png"
    first = vlmo_cli("detect", images["red"], "cat ; dog", "--model", ckpt, "--out", out)
    assert ok(first).count("\n") == 2
    assert str(out) in first.stderr  # "saved …" goes to stderr, not into the results
    with Image.open(out) as drawn:
        assert drawn.size == SIZE
    before = out.read_bytes()
    assert_error(vlmo_cli("detect", images["red"], "cat ; dog", "--model", ckpt, "--out", out), 2, "--force")
    assert out.read_bytes() == before
    out.write_bytes(b"")
    ok(vlmo_cli("detect", images["red"], "cat ; dog", "--model", ckpt, "--out", out, "--force"))
    with Image.open(out) as drawn:
        assert drawn.size == SIZE


def test_detect_out_with_unsupported_extension(images: dict[str, Path], ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "boxes.xyz"
    assert_error(vlmo_cli("detect", images["red"], "cat", "--model", ckpt, "--out", out), 2, ".xyz")
    assert not out.exists()


def test_segment_plain_json_and_out(
    images: dict[str, Path], ckpt: str, filled_mask_decoder: Path, tmp_path: Path
) -> None:
    from vlmo.segmentation import rle_to_mask

    args = ("segment", images["red"], "cat", "--model", ckpt, "--mask-decoder", filled_mask_decoder)
    (_, box, bins), _ = expected_boxes(SIZE)  # the taught segment answer has the cat box of the detection
    x0, y0, x1, y1 = (int(v) for v in box)
    line = ok(vlmo_cli(*args)).strip().split("\t")
    assert line[:5] == ["cat", *(f"{v:.1f}" for v in box)]
    assert int(line[5]) == (x1 - x0) * (y1 - y0)  # the decoder fills the box
    out = tmp_path / "masks.png"
    data = json.loads(ok(vlmo_cli(*args, "--json", "--out", out)))
    assert data["task"] == "segment" and data["mask_encoding"].startswith("coco_rle")
    (seg,) = data["segmentations"]
    assert seg["bins"] == bins and seg["seg_codes"] == list(range(16))
    mask = rle_to_mask(seg["mask"])
    assert mask.shape == (SIZE[1], SIZE[0]) and int(mask.sum()) == (x1 - x0) * (y1 - y0)
    with Image.open(out) as drawn:
        assert drawn.size == SIZE


def test_segment_with_a_missing_mask_decoder_file(images: dict[str, Path], ckpt: str, tmp_path: Path) -> None:
    result = vlmo_cli("segment", images["red"], "cat", "--model", ckpt, "--mask-decoder", tmp_path / "nope.npz")
    assert_error(result, 2, "--mask-decoder")


def test_info(tmp_path: Path) -> None:
    out = ok(vlmo_cli("info"))
    assert f"vlmo: {vlmo.__version__}" in out.splitlines()
    assert "cached models: none" in out
    data = json.loads(ok(vlmo_cli("info", "--json")))
    assert {"vlmo", "torch", "devices", "cache", "cached_models"} <= data.keys()
    assert data["vlmo"] == vlmo.__version__ and data["torch"] == torch.__version__
    assert "cpu" in data["devices"] and data["cached_models"] == []
    assert Path(data["cache"]) == tmp_path / "hf" / "hub"


# -- the hub -----------------------------------------------------------------------------------------------------


def test_download_then_run_offline_from_the_cache(
    hub: FakeHub, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(ok(vlmo_cli("download", "acme/taught")).strip())
    assert (path / "config.json").is_file()
    assert path.is_relative_to(constants.HF_HUB_CACHE)
    cached = json.loads(ok(vlmo_cli("info", "--json")))["cached_models"]
    assert [m["id"] for m in cached] == ["acme/taught"] and cached[0]["bytes"] > 0
    assert "acme/taught" in ok(vlmo_cli("info"))

    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert ok(vlmo_cli("ask", images["red"], QUESTION, "--model", "acme/taught")) == "red\n"


def test_gated_repo(hub: FakeHub, images: dict[str, Path]) -> None:
    hub.gate("acme/taught", 401)
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", "acme/taught"), 1, "hf auth login")
    assert_error(vlmo_cli("download", "acme/taught"), 1, "hf auth login")


def test_missing_repo(hub: FakeHub, images: dict[str, Path]) -> None:
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", "acme/nope"), 1, "acme/nope was not found")
    assert_error(vlmo_cli("download", "acme/nope"), 1, "acme/nope")


def test_no_network_and_no_cached_default_model_points_at_the_built_in_one(
    images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub() as gone:
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=gone.url)
    # `vlmo ask` with no --model: the default model, which is not cached, and a hub that is not there
    line = assert_error(vlmo_cli("ask", images["red"], QUESTION), 1, "could not reach", "vlmo/shapes works offline")
    assert "--model" not in line  # the library names no CLI flag
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_error(vlmo_cli("ask", images["red"], QUESTION), 1, "HF_HUB_OFFLINE", "vlmo/shapes works offline")


def test_a_hub_that_never_answers_is_one_line_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: dict[str, str | None] = {"HF_HUB_ETAG_TIMEOUT": "0.3", "HF_HUB_DOWNLOAD_TIMEOUT": "0.3"}
    results: list[Result] = []
    with SilentServer() as silent:
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=silent.url)
        run = threading.Thread(target=lambda: results.append(vlmo_cli("download", "acme/taught", env=env)), daemon=True)
        run.start()
        run.join(10)  # in a thread, so that a hang fails the test instead of blocking it
        assert results, "vlmo download still waiting for the hub after 10 s"
        assert silent.connections >= 1
    assert_error(results[0], 1, f"could not reach {silent.url} for acme/taught", "HF_HUB_ETAG_TIMEOUT")


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("missing", "no image file"), ("text", "not an image"), ("truncated", "truncated or corrupt")],
)
def test_bad_image(images: dict[str, Path], ckpt: str, name: str, fragment: str) -> None:
    line = assert_error(vlmo_cli("ask", images[name], QUESTION, "--model", ckpt), 2, fragment)
    assert str(images[name]) in line


def test_too_large_image(images: dict[str, Path], ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    assert_error(vlmo_cli("caption", images["red"], "--model", ckpt), 2, "too large", "MAX_IMAGE_PIXELS")


def test_bad_image_is_caught_before_the_model_loads(images: dict[str, Path], tmp_path: Path) -> None:
    assert_error(vlmo_cli("ocr", images["missing"], "--model", tmp_path / "no-model"), 2, "no image file")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--sample", "--temperature", "0"], "temperature"),
        (["--top-p", "2"], "top_p"),
        (["--top-k", "-1"], "top_k"),
        (["--max-tokens", "0"], "--max-tokens must be a whole number ≥ 1, got 0"),
        (["--stop", ""], "stop must be a non-empty string"),
        (["--sample", "--temperature", "1e-39"], "temperature must be at least"),
        (["--sample", "--top-p", "1e-320"], "top_p must be at least"),
    ],
)
def test_invalid_sampling_is_a_usage_error_before_loading(
    images: dict[str, Path], tmp_path: Path, options: list[str], fragment: str
) -> None:
    # The model does not exist: a sampling error must come first, without loading (or looking for) anything.
    result = vlmo_cli("ask", images["red"], QUESTION, "--model", tmp_path / "no-model", *options)
    assert_error(result, 2, fragment)


@pytest.mark.parametrize("labels", [" ; dog", "cat ;", ";", "  "])
def test_detect_empty_label(images: dict[str, Path], ckpt: str, labels: str) -> None:
    line = assert_error(vlmo_cli("detect", images["red"], labels, "--model", ckpt), 2, "empty label")
    assert "detect_prompt" not in line  # a CLI message, not the Python API's


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["ask", "{red}"], "give an image and a question"),
        (["ask", "{red}", "   "], "question is empty"),
        (["caption", "{red}", "--detail", "huge"], "--detail"),
    ],
)
def test_command_usage_errors(images: dict[str, Path], ckpt: str, args: list[str], fragment: str) -> None:
    args = [a.format(red=images["red"]) for a in args]
    assert_error(vlmo_cli(*args, "--model", ckpt), 2, fragment)


def test_ask_with_an_image_where_the_question_should_be(images: dict[str, Path], tmp_path: Path) -> None:
    """`vlmo ask a.png b.png` would ask the model "b.png"; the model is not even loaded."""
    result = vlmo_cli("ask", images["red"], images["blue"], "--model", tmp_path / "no-model")
    line = assert_error(result, 2, str(images["blue"]), "pass the question with -q, or quote it")
    assert "no-model" not in line
    assert_error(vlmo_cli("ask", images["red"], images["blue"], "--model", tmp_path / "no-model", "-q", ""), 2)


def test_ask_with_a_question_that_is_not_a_file_still_works(images: dict[str, Path], ckpt: str) -> None:
    assert ok(vlmo_cli("ask", images["red"], QUESTION, "--model", ckpt)) == "red\n"


@pytest.mark.parametrize("lang", ["e n", "", "  "])
def test_bad_lang_is_one_line(images: dict[str, Path], tmp_path: Path, lang: str) -> None:
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", tmp_path / "no-model", "--lang", lang), 2)


@pytest.mark.parametrize("seed", ["99999999999999999999999", "18446744073709551616", "-1"])
def test_a_seed_beyond_64_bits_is_a_usage_error_before_loading(
    images: dict[str, Path], tmp_path: Path, seed: str
) -> None:
    result = vlmo_cli("ask", images["red"], QUESTION, "--model", tmp_path / "no-model", "--sample", "--seed", seed)
    assert_error(result, 2, "seed must be a whole number from 0 to 2**64 - 1")


def test_max_tokens_beyond_the_context_is_refused(images: dict[str, Path], ckpt: str) -> None:
    line = assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", ckpt, "--max-tokens", "100000"), 2)
    assert "of the model's 8192 positions; max_new_tokens may be at most" in line


def test_model_directory_missing_files(images: dict[str, Path], ckpt: str, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(Path(ckpt) / "config.json", partial)
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", partial), 1, "model.safetensors")


@pytest.mark.parametrize(
    ("tower", "key", "value"),
    [("vision_config", "patch_size", 0), ("text_config", "num_attention_heads", 0)],
)
def test_impossible_config_size_is_one_line_naming_the_field(
    images: dict[str, Path], ckpt: str, tmp_path: Path, tower: str, key: str, value: int
) -> None:
    # Once "unexpected ZeroDivisionError … report it", after a torch UserWarning on stderr; now only the error line.
    broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
    config = json.loads((broken / "config.json").read_text())
    config[tower][key] = value
    (broken / "config.json").write_text(json.dumps(config))
    line = assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", broken), 1, f"'{tower}.{key}'")
    assert "unexpected" not in line and "positive" in line


def test_index_pointing_outside_the_model_directory(images: dict[str, Path], ckpt: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
    tensors = load_file(broken / "model.safetensors")
    (broken / "model.safetensors").unlink()
    save_file(tensors, tmp_path / "outside.safetensors")
    index = {"weight_map": dict.fromkeys(tensors, "../outside.safetensors")}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", broken), 1, "'../outside.safetensors'", "inside")


def test_model_directory_missing(images: dict[str, Path], tmp_path: Path) -> None:
    # A typed path that does not exist is a runtime "not found" (exit 1), like a hub id that does not exist.
    result = vlmo_cli("ask", images["red"], QUESTION, "--model", tmp_path / "no-model")
    assert_error(result, 1, "no such directory", str(tmp_path / "no-model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(images: dict[str, Path], ckpt: str) -> None:
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", ckpt, "--device", "cuda"), 2, "--device cpu")


def test_unexpected_exception(images: dict[str, Path], ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(vlmo.api.VLMo, "generate", boom)
    assert_error(vlmo_cli("ask", images["red"], QUESTION, "--model", ckpt), 1, "RuntimeError", "boom", "VLMO_DEBUG=1")


def test_debug_shows_the_traceback(images: dict[str, Path], ckpt: str, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(Path(ckpt) / "config.json", partial)
    result = vlmo_cli("ask", images["red"], QUESTION, "--model", partial, env={"VLMO_DEBUG": "1"})
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "CheckpointError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")


# -- help and version --------------------------------------------------------------------------------------------


def test_no_arguments_prints_help() -> None:
    result = vlmo_cli()
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: vlmo")
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help(command: list[str]) -> None:
    short, long = vlmo_cli(*command, "-h"), vlmo_cli(*command, "--help")
    assert ok(short) == ok(long)
    assert short.stdout.startswith(f"Usage: vlmo {' '.join(command)}".rstrip() + " ")
    assert short.stderr == ""


def test_version() -> None:
    assert ok(vlmo_cli("--version")) == f"vlmo {vlmo.__version__}\n"
    assert ok(vlmo_cli("-V")) == f"vlmo {vlmo.__version__}\n"


# -- the installed console script --------------------------------------------------------------------------------


def installed_vlmo() -> str:
    script = Path(sys.executable).parent / "vlmo"
    found = str(script) if script.is_file() else shutil.which("vlmo", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the vlmo console script is not installed next to this Python")
    return found


def test_console_script(images: dict[str, Path], ckpt: str) -> None:
    # One real process: stdout and stderr are pipes, not terminals, so no spinner or progress bar may appear.
    script = installed_vlmo()
    good = subprocess.run(
        [script, "ask", str(images["red"]), QUESTION, "--model", ckpt], capture_output=True, text=True, timeout=120
    )
    assert (good.returncode, good.stdout, good.stderr) == (0, "red\n", "")
    bad = subprocess.run(
        [script, "ask", str(images["text"]), QUESTION, "--model", ckpt], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


# -- eval --------------------------------------------------------------------------------------------------------


def test_eval_vqav2_prints_a_table_and_writes_scores(ckpt: str, tmp_path: Path) -> None:
    from test_eval import COLOUR_QA, write_vqav2

    q, a, image_dir = write_vqav2(tmp_path / "vqa", COLOUR_QA)
    args = ("eval", "vqav2", "--questions", q, "--annotations", a, "--images", image_dir, "--model", ckpt)
    table = ok(vlmo_cli(*args, "--out", tmp_path / "scores.json", "--batch-size", "2"))
    assert table.splitlines()[-1].split() == ["overall", "3", "53.33%"]
    assert json.loads((tmp_path / "scores.json").read_text())["count"] == 3
    assert (tmp_path / "scores_results.json").is_file()
    assert_error(vlmo_cli(*args, "--out", tmp_path / "scores.json"), 2, "--force")
    data = json.loads(ok(vlmo_cli(*args, "--json", "--limit", "1")))
    assert data["count"] == 1 and data["accuracy"] == 1.0
    assert_error(vlmo_cli(*args, "--mode", "fuzzy"), 2, "--mode")


def test_help_does_not_import_torch() -> None:
    """`vlmo -h` must be instant: the CLI module and `import vlmo` leave torch for when a model loads."""
    code = "import sys, vlmo, vlmo.cli.commands; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_no_numpy_warning_on_a_clean_install() -> None:
    """Without numpy (not one of vlmo's dependencies) torch warns on import; vlmo's users must not see it."""
    hide_numpy = "import sys; sys.modules['numpy'] = None; "
    bare = subprocess.run([sys.executable, "-c", hide_numpy + "import torch"], capture_output=True, text=True)
    assert "Failed to initialize NumPy" in bare.stderr  # the warning this test is about, as torch gives it
    code = (
        hide_numpy + "import vlmo, vlmo.cli.commands; from vlmo import VLMo; import torch; print(torch.ones(1).sum())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # and a whole answer, the first (writing the prepared-weights cache) and the second (reading it), without numpy
    answer = hide_numpy + "from vlmo.cli.commands import main; main()"
    example = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    args = ["ask", str(example), "what color is the circle?", "--model", "vlmo/shapes"]
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", answer, *args], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (0, "yellow\n", "")


def test_an_answer_does_not_import_torch_compiler_or_sympy() -> None:
    """Loading a model and answering needs neither torch's compiler nor sympy (each costs a second of start-up):
    meta-device construction must not initialise weights, and `import vlmo.api` must not build the mask decoder."""
    code = (
        "import sys; from vlmo import VLMo\n"
        "vlm = VLMo.from_pretrained('vlmo/shapes', device='cpu')\n"
        "from PIL import Image; vlm.ask(Image.new('RGB', (224, 224), 'white'), 'how many shapes?')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_closed_pipe_is_not_an_error() -> None:
    """`vlmo info | head -1`: when the reader goes away, vlmo stops quietly (exit 141, as for SIGPIPE)."""
    code = "import sys; sys.argv = ['vlmo', 'info']; from vlmo.cli.commands import main; main()"
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.close()  # before vlmo prints anything: `vlmo info` imports torch first
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141 and stderr == "", stderr


# -- messages that name the real cause ---------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_output_names_the_output_not_the_hub_cache(images: dict[str, Path], ckpt: str) -> None:
    """`vlmo caption IMG --json > /dev/full`: the write that fails is stdout's, so the hint is about the output."""
    code = "from vlmo.cli.commands import main; main()"
    args = ["caption", str(images["red"]), "--model", ckpt, "--quantize", "none", "--json"]
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", code, *args], stdout=full, stderr=subprocess.PIPE, timeout=120)
    stderr = done.stderr.decode()
    assert done.returncode == 1 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: could not write standard output: no space left on device"), stderr
    assert "HF_HUB_CACHE" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://example.com/photos/b.jpg"])
def test_an_image_url_says_urls_are_not_read_here(images: dict[str, Path], tmp_path: Path, url: str) -> None:
    line = assert_error(vlmo_cli("ask", url, QUESTION, "--model", tmp_path / "no-model"), 2, url, "is a URL")
    assert "--allow-remote-images" in line and "no image file" not in line


def test_segment_offline_without_a_mask_decoder_names_the_cli_option(
    images: dict[str, Path], ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --mask-decoder, none converted in VLMO_CACHE (private per test) and the hub offline: the hint is the flag,
    not the library's `load_mask_decoder()`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = assert_error(vlmo_cli("segment", images["red"], "cat", "--model", ckpt), 1, "HF_HUB_OFFLINE")
    assert "--mask-decoder vae-oid.npz" in line and "load_mask_decoder" not in line
