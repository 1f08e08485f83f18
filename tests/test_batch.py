"""`vlmo batch` on the built-in model: every task through the CLI, equal to `VLMo` called one by one; bad inputs as
error rows; manifests with per-row questions; Parquet in and out; resume after Ctrl-C and after SIGKILL; the
append log that makes a kill lose at most the batch in flight.

The data set (tests/batch_scenes.py) is 24 `vlmo/shapes` scenes and 3 files that are not images. The model runs in
float32 (`--quantize none`), the fastest mode for this tiny model; batching changes no answer in any mode
(tests/test_batching.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from batch_scenes import BAD, LABELS, MODEL, SCENES, scene_ids, write_scene_folder
from conftest import RED
from vlmo import VLMo
from vlmo.batch.inputs import BatchInput, list_inputs
from vlmo.batch.runner import BatchJob, open_results, run
from vlmo.cli.commands import app
from vlmo.errors import InputError, OptionError
from vlmo.fileio.atomic import AppendLog, OutputError, OutputPathError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def vlmo_cli(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args], prog_name="vlmo")


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    return result.stdout


def usage_error(result: Result, *fragments: str) -> str:
    """A one-line error, exit 2, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene_folder(tmp_path_factory.mktemp("batch") / "scenes")


@pytest.fixture(scope="module")
def vlm(shapes_float32: VLMo) -> VLMo:
    return shapes_float32  # conftest.py: loaded once, shared with test_batch_ray.py


@pytest.fixture(scope="module")
def captions(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The caption rows of the whole folder, written by the CLI (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("captions") / "captions.jsonl"
    result = vlmo_cli("batch", folder, "--task", "caption", "--out", out, *MODEL)
    assert ok(result) == f"{out}\n"
    assert result.stderr.startswith(f"done: {SCENES + 3} rows, 3 errors, ") and "images/s" in result.stderr
    return read_jsonl(out)


# -- every task, equal to VLMo one by one ------------------------------------------------------------------------


def test_caption_over_a_folder_gives_one_row_per_input_equal_to_vlmo_one_by_one(
    captions: list[dict[str, Any]], folder: Path, vlm: VLMo
) -> None:
    assert [row["id"] for row in captions] == scene_ids()
    for row in captions:
        assert list(row) == ["id", "image", "task", "prompt", "text", "error"]
        assert row["image"] == str(folder / row["id"]) and Path(row["image"]).is_absolute()
        assert row["task"] == "caption" and row["prompt"] == "caption en"
        if row["id"] in BAD:
            assert row["text"] is None and BAD[row["id"]] in row["error"] and "\n" not in row["error"]
        else:
            assert row["error"] is None
            assert row["text"] == vlm.caption(row["image"]), row["id"]
    assert len({row["text"] for row in captions}) > 10  # the answers differ per scene: a real model at work


def _expected(vlm: VLMo, task: str, image: str) -> dict[str, Any]:
    if task == "ask":
        return {"text": vlm.ask(image, "how many shapes are there?")}
    if task == "ocr":
        return {"text": vlm.ocr(image)}
    size = list(Image.open(image).size)
    return {"size": size, "detections": [d.to_dict() for d in vlm.detect(image, LABELS)]}


@pytest.mark.parametrize("task", ["ask", "ocr", "detect"])
def test_every_task_through_the_cli_equals_vlmo_one_by_one(task: str, folder: Path, vlm: VLMo, tmp_path: Path) -> None:
    """The first 12 inputs (the 3 bad files sort first) for each task; the caption test above runs all 27 and the
    segment test below runs on a model taught to segment (the shapes model was not)."""
    out = tmp_path / "rows.jsonl"
    extra = {"ask": ["-q", "how many shapes are there?"], "ocr": [], "detect": ["--labels", LABELS]}[task]
    ok(vlmo_cli("batch", folder, "--task", task, *extra, "--out", out, "--limit", 12, "--batch-size", 5, *MODEL))
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == scene_ids()[:12]
    assert [row["id"] for row in rows if row["error"] is not None] == sorted(BAD)
    for row in rows:
        if row["error"] is None:
            expected = _expected(vlm, task, row["image"])
            assert {k: row[k] for k in expected} == expected, row["id"]
    if task == "detect":
        assert sum(len(row["detections"] or []) for row in rows) > 5  # real boxes, not empty lists compared


def test_segment_through_the_cli_equals_vlmo_one_by_one(
    taught_checkpoint: Path, filled_mask_decoder: Path, tmp_path: Path
) -> None:
    """The taught tiny model (conftest.py) answers `segment cat` about red images with one object and its codes."""
    root = tmp_path / "red"
    root.mkdir()
    for i, size in enumerate([(96, 64), (200, 120), (64, 96), (96, 64)]):
        Image.new("RGB", size, RED).save(root / f"red-{i}.png")
    (root / "empty.jpg").write_bytes(b"")
    out = tmp_path / "masks.jsonl"
    model = ["--model", taught_checkpoint, "--dtype", "float32", "--mask-decoder", filled_mask_decoder]
    ok(vlmo_cli("batch", root, "--task", "segment", "--labels", "cat", "--out", out, "--batch-size", 3, *model))
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["empty.jpg", *(f"red-{i}.png" for i in range(4))]
    assert list(rows[1]) == ["id", "image", "task", "prompt", "size", "segmentations", "mask_encoding", "error"]
    assert rows[0]["segmentations"] is None and "not an image" in rows[0]["error"]
    vlm = VLMo.from_pretrained(taught_checkpoint, dtype="float32")
    for row in rows[1:]:
        found = vlm.segment(row["image"], "cat", mask_decoder=filled_mask_decoder)
        assert row["segmentations"] == [s.to_dict() for s in found] and len(found) == 1
        width, height = Image.open(row["image"]).size
        assert row["size"] == [width, height] and found[0].to_dict()["mask"]["size"] == [height, width]
        assert row["mask_encoding"] == "coco_rle_uncompressed_column_major"


def test_python_api_yields_the_same_rows(captions: list[dict[str, Any]], folder: Path, vlm: VLMo) -> None:
    rows = list(run(vlm, folder, task="caption", batch_size=16, limit=20))
    assert rows == captions[:20]
    by_model_id = list(run("vlmo/shapes", folder, task="caption", quantize="none", batch_size=3, limit=5))
    assert by_model_id == captions[:5]
    paths = [folder / "scene-07.png", str(folder / "empty.jpg")]
    listed = list(run(vlm, paths, task="caption"))
    assert [r["id"] for r in listed] == [str(p) for p in paths] and listed[1]["error"] is not None


# -- manifests ---------------------------------------------------------------------------------------------------


def test_manifest_rows_bring_their_own_questions(folder: Path, vlm: VLMo, tmp_path: Path) -> None:
    manifest = tmp_path / "data" / "rows.jsonl"
    manifest.parent.mkdir()
    relative = os.path.relpath(folder, manifest.parent)
    rows_in = [
        {"id": "a", "image": f"{relative}/scene-01.png", "question": "what color is the circle?"},
        {"id": "b", "image": str(folder / "scene-02.png"), "question": "how many shapes are there?"},
        {"id": "c", "image": f"{relative}/scene-03.png"},  # no question: the job's --question
        {"id": "d", "image": f"{relative}/scene-04.png", "question": "   "},  # an empty question: this row's error
        {"id": "e", "image": f"{relative}/scene-05.png", "question": "what " * 600},  # too long for the model
        {"id": "f", "image": f"{relative}/missing.png", "question": "is there a red square?"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows_in), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    ok(vlmo_cli("batch", manifest, "--task", "ask", "-q", "is there a blue circle?", "--out", out, *MODEL))
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list("abcdef")
    assert [r["image"] for r in rows] == [r["image"] for r in rows_in]  # the manifest's own values
    questions = ["what color is the circle?", "how many shapes are there?", "is there a blue circle?"]
    for row, question, n in zip(rows, questions, (1, 2, 3), strict=False):
        assert row["error"] is None and row["prompt"] == f"answer en {question}"
        assert row["text"] == vlm.ask(str(folder / f"scene-{n:02d}.png"), question)
    assert "question is empty" in rows[3]["error"]
    assert "positions" in rows[4]["error"] and rows[4]["text"] is None  # refused alone; its batch still ran
    assert "no image file" in rows[5]["error"]


def test_csv_manifest_and_a_list_of_paths(folder: Path, captions: list[dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text(f"image,labels\n{folder}/scene-01.png,circle\n{folder}/scene-02.png,\n")
    out = tmp_path / "boxes.jsonl"
    ok(vlmo_cli("batch", tmp_path / "rows.csv", "--task", "detect", "--labels", "square", "--out", out, *MODEL))
    assert [r["prompt"] for r in read_jsonl(out)] == ["detect circle", "detect square"]
    listing = tmp_path / "todo.txt"
    listing.write_text(f"# two scenes\n{folder}/scene-00.png\n\n{folder}/scene-01.png\n{folder}/scene-00.png\n")
    out = tmp_path / "list.jsonl"
    ok(vlmo_cli("batch", listing, "--task", "caption", "--out", out, *MODEL))
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"{folder}/scene-00.png", f"{folder}/scene-01.png", f"{folder}/scene-00.png#2"]
    reference = {r["id"]: r["text"] for r in captions}
    assert [r["text"] for r in rows] == [
        reference["scene-00.png"],
        reference["scene-01.png"],
        reference["scene-00.png"],
    ]


def test_results_never_replace_the_input_manifest(folder: Path, tmp_path: Path) -> None:
    """`--out` naming the manifest itself (directly or through a symbolic link) is refused whatever the flags, before
    the model loads, and the manifest is untouched."""
    manifest = tmp_path / "rows.jsonl"
    text = json.dumps({"image": str(folder / "scene-00.png")}) + "\n"
    manifest.write_text(text)
    (tmp_path / "link.jsonl").symlink_to(manifest)
    for out in (manifest, tmp_path / "link.jsonl"):
        for flags in ([], ["--force"], ["--resume"]):
            result = vlmo_cli("batch", manifest, "--task", "caption", "--out", out, *flags, *NO_MODEL)
            usage_error(result, "is the input", "choose another --out")
            assert manifest.read_text() == text


def test_input_listings(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    for name in ("a/x.PNG", "a/.y.png", "a/.hidden/z.png", "a/notes.txt", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert list_inputs(tmp_path).ids == ["a/x.PNG", "b.jpg"]
    assert list_inputs(str(tmp_path / "**" / "*.PNG")).ids == ["a/x.PNG"]  # relative to the glob's root
    assert list_inputs(str(tmp_path / "*.jpg")).ids == ["b.jpg"]
    assert list_inputs(folder).ids == scene_ids()
    with pytest.raises(InputError, match="no such file or folder"):
        list_inputs(tmp_path / "nope")
    with pytest.raises(InputError, match="no images found"):
        list_inputs(tmp_path / "a" / ".hidden" / "*.jpg")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 is not valid JSON"):
        list_inputs(bad)
    bad.write_text('{"id": 1, "image": "x.png"}\n{"id": 1, "image": "y.png"}\n')
    with pytest.raises(InputError, match="the id '1' twice"):
        list_inputs(bad)
    bad.write_text('{"picture": "x.png"}\n')
    with pytest.raises(InputError, match="has no image"):
        list_inputs(bad)
    with pytest.raises(InputError, match="cannot tell what"):
        list_inputs(_touch(tmp_path / "f.xyz"))


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


# -- Parquet in and out ------------------------------------------------------------------------------------------


def test_parquet_manifest_of_image_bytes_to_parquet_results(folder: Path, vlm: VLMo, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from vlmo.batch.parquet import journal_path, read_rows

    images = [(folder / f"scene-{i:02d}.png").read_bytes() for i in range(4)] + [b"not an image"]
    questions = ["what color is the circle?", None, "how many shapes are there?", None, "is there a red circle?"]
    manifest = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": images, "question": questions}), manifest, row_group_size=2)
    out = tmp_path / "answers.parquet"
    ok(vlmo_cli("batch", manifest, "--task", "ask", "-q", "is there a blue square?", "--out", out, *MODEL))
    rows = read_rows(out)
    assert not journal_path(out).exists()
    import hashlib

    assert [r["id"] for r in rows] == [hashlib.sha256(b).hexdigest()[:16] for b in images]
    for row, data, question in zip(rows[:4], images, questions, strict=False):
        asked = question or "is there a blue square?"
        assert row["image"] is None and row["error"] is None
        assert row["text"] == vlm.ask(data, asked)
    assert rows[4]["text"] is None and "not an image" in rows[4]["error"]
    assert pq.read_schema(out).field("text").type == pa.string()


def test_parquet_results_resume_from_the_journal(folder: Path, captions: list[dict[str, Any]], tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from vlmo.batch.parquet import journal_path, read_rows

    out = tmp_path / "captions.parquet"
    journal = journal_path(out)

    def killed_run(rows: list[dict[str, Any]]) -> None:
        """What a run killed mid-write leaves: its journal, whole rows and a torn last one; no Parquet file yet."""
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        journal.write_text("\n".join(lines) + "\n" + lines[0][:25], encoding="utf-8")

    killed_run(captions[:3])
    usage_error(vlmo_cli("batch", folder, "--task", "caption", "--out", out, *MODEL), "stopped", "--resume", "--force")
    ok(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--limit", 6, "--resume", *MODEL))
    assert read_rows(out) == captions[:6] and not journal.exists()
    killed_run(captions[6:9])  # a second run, resuming the finished file, killed in turn
    result = vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--limit", 12, "--resume", *MODEL)
    ok(result)
    assert "9 already done" in result.stderr
    assert read_rows(out) == captions[:12] and not journal.exists()
    usage_error(vlmo_cli("batch", folder, "--task", "caption", "--out", out, *MODEL), "already exists", "--force")
    ok(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--limit", 2, "--force", *MODEL))
    assert read_rows(out) == captions[:2]


def test_parquet_rows_equal_jsonl_rows_for_located_tasks(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from vlmo.batch.parquet import read_rows

    args = ["--task", "detect", "--labels", LABELS, "--limit", 8, *MODEL]
    ok(vlmo_cli("batch", folder, *args, "--out", tmp_path / "boxes.jsonl"))
    ok(vlmo_cli("batch", folder, *args, "--out", tmp_path / "boxes.parquet"))
    assert read_rows(tmp_path / "boxes.parquet") == read_jsonl(tmp_path / "boxes.jsonl")


# -- resume after a kill -----------------------------------------------------------------------------------------


def _start_and_kill(folder: Path, out: Path, sig: int) -> subprocess.CompletedProcess[str]:
    """`vlmo batch` in a process of its own, sent `sig` once its first batches are on disk."""
    command = [sys.executable, "-m", "vlmo", "batch", str(folder), "--task", "caption", "--out", str(out), *MODEL]
    process = subprocess.Popen(
        [*command, "--batch-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and len(out.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_resume_after_ctrl_c(folder: Path, captions: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    stopped = _start_and_kill(folder, out, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stdout == "" and "Traceback" not in stopped.stderr
    last = stopped.stderr.splitlines()[-1]
    assert last.startswith("interrupted: ") and "--resume" in last
    written = read_jsonl(out)  # every line whole: the batches that finished
    assert 4 <= len(written) < len(captions) and written == captions[: len(written)]
    assert last.startswith(f"interrupted: {len(written)} rows written")
    result = vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--resume", *MODEL)
    ok(result)
    assert f"{len(written)} already done" in result.stderr
    assert read_jsonl(out) == captions  # exactly one row per input, in order


def test_resume_after_sigkill_cuts_the_torn_line(folder: Path, captions: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    killed = _start_and_kill(folder, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    whole = read_jsonl(out)
    assert whole == captions[: len(whole)]
    with out.open("a", encoding="utf-8") as f:  # what power loss in the middle of a write leaves
        f.write(json.dumps(captions[len(whole)])[:30])
    ok(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--resume", *MODEL))
    assert read_jsonl(out) == captions


def test_resume_refuses_another_tasks_results_and_garbage(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    ok(vlmo_cli("batch", folder, "--task", "ocr", "--out", out, "--limit", 2, *MODEL))
    usage_error(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--resume", *MODEL), "holds ocr results")
    out.write_text('{"id": "a", "task": "ocr"}\nhello\n{"id": "b", "task": "ocr"}\n')
    usage_error(vlmo_cli("batch", folder, "--task", "ocr", "--out", out, "--resume", *MODEL), "rows.jsonl:2 is not")


# -- refusals before the model loads -----------------------------------------------------------------------------

NO_MODEL = ["--model", "/no/such/model"]  # had the model been loaded, the error would be about it (exit 1)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--out", "x.jsonl"], "give --task"),
        (["--task", "ask", "--out", "x.jsonl"], "--task ask needs --question"),
        (["--task", "caption", "-q", "why?", "--out", "x.jsonl"], "--question is for the ask task, not --task caption"),
        (["--task", "ask", "--labels", "cat", "--out", "x.jsonl"], "--labels is for the detect and segment task"),
        (["--task", "detect", "--labels", "a ; <b>", "--out", "x.jsonl"], "'<'"),
        (["--task", "paint", "--out", "x.jsonl"], "unknown --task paint"),
        (["--task", "caption", "--out", "x.csv"], "name a .jsonl or .parquet file"),
        (
            ["--task", "caption", "--out", "x.jsonl", "--batch-size", "0"],
            "--batch-size must be a whole number ≥ 1, got 0",
        ),
        (["--task", "caption", "--out", "x.jsonl", "--resume", "--force"], "--resume or --force"),
        (["--task", "caption", "--detail", "huge", "--out", "x.jsonl"], "unknown caption detail"),
        (["--task", "caption", "--out", "x.jsonl", "--max-tokens", "0"], "max"),
        (["--task", "caption", "--prompt", "ocr", "--out", "x.jsonl"], "--prompt is for the generate task"),
    ],
)
def test_usage_errors_come_before_the_model_loads(
    args: list[str], fragment: str, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    usage_error(vlmo_cli("batch", folder, *args, *NO_MODEL), fragment)
    assert not (tmp_path / "x.jsonl").exists()


def test_errors_that_hold_for_every_row_are_usage_errors_not_error_rows(folder: Path, tmp_path: Path) -> None:
    """A manifest without a labels column for --task detect (before the model loads), and a --max-tokens that no
    prompt leaves room for (once the model's context is known): exit 2 and no rows, so --resume counts nothing."""
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in sorted(folder.glob("scene-0*.png"))[:3]))
    out = tmp_path / "boxes.jsonl"
    usage_error(vlmo_cli("batch", manifest, "--task", "detect", "--out", out, *NO_MODEL), "no row of", "has one")
    assert not out.exists()
    result = vlmo_cli("batch", folder, "--task", "caption", "--max-tokens", 100000, "--out", out, *MODEL)
    usage_error(result, "max_new_tokens may be at most")
    assert not out.exists() or read_jsonl(out) == []


def test_two_jobs_never_write_one_results_file(folder: Path, tmp_path: Path) -> None:
    """While one job holds its results file, a second one (plain, --resume or --force) is refused before its model
    loads, and neither appends to nor truncates the first one's rows; once the first has closed it, the file is free."""
    from vlmo.batch.results import row_line

    out = tmp_path / "rows.jsonl"
    first = open_results(out, "caption", resume=False, force=False)
    row = {"id": "x", "image": "x.png", "task": "caption", "prompt": "caption en", "text": "a", "error": None}
    first.write([row])
    try:
        for flags in ([], ["--resume"], ["--force"]):
            result = vlmo_cli("batch", folder, "--task", "caption", "--out", out, *flags, *NO_MODEL)
            usage_error(result, str(out), "being written by another vlmo batch run")
            assert out.read_text() == row_line(row) + "\n"
        with pytest.raises(OutputPathError, match="being written by another"):
            open_results(out, "caption", resume=True, force=False)
    finally:
        first.close()
    again = open_results(out, "caption", resume=True, force=False)
    assert again.done == {"x"}
    again.close()


def test_an_existing_results_file_is_kept_without_force(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    usage_error(
        vlmo_cli("batch", folder, "--task", "caption", "--out", out, *NO_MODEL), "exists", "--resume", "--force"
    )
    assert out.read_text() == "precious\n"
    usage_error(vlmo_cli("batch", tmp_path / "nothing-here", "--task", "caption", "--out", tmp_path / "o.jsonl"))
    ok(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--force", "--limit", 1, *MODEL))
    assert len(read_jsonl(out)) == 1


def test_job_checks_in_the_library() -> None:
    with pytest.raises(OptionError, match='task="ask" needs question'):
        BatchJob(task="ask").check_inputs(list_inputs(str(ROOT / "examples" / "shapes.png")))
    with pytest.raises(InputError, match="no question"):
        BatchJob(task="ask").prompt_for(BatchInput("a", "a.png", "a.png"))
    assert BatchJob(task="ask", question="why?").prompt_for(BatchInput("a", "a.png", None, question="how?")).text == (
        "answer en how?"
    )


# -- the append log ----------------------------------------------------------------------------------------------


def test_append_log_cuts_a_torn_line_and_appends_whole_batches(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with AppendLog.create(path, force=False) as log:
        log.append(["one", "two"])
        log.append(["three"])
    assert path.read_bytes() == b"one\ntwo\nthree\n"
    with pytest.raises(OutputError, match="already exists"):
        AppendLog.create(path, force=False)
    with path.open("ab") as f:
        f.write(b"fou")  # torn
    with AppendLog.resume(path) as log:
        assert log.cut == 3 and list(log.lines()) == ["one", "two", "three"]
        log.append(["four"])
    assert path.read_bytes() == b"one\ntwo\nthree\nfour\n"
    path.write_bytes(b"no newline at all")
    with AppendLog.resume(path) as log:
        assert list(log.lines()) == []
    with AppendLog.resume(tmp_path / "new.jsonl") as log:  # nothing to resume: a new log
        log.append(["x"])
    assert (tmp_path / "new.jsonl").read_text() == "x\n"


def test_a_failed_append_leaves_no_partial_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log.jsonl"
    log = AppendLog.create(path, force=False)
    log.append(["kept"])
    real_write = os.write
    calls = []

    def full_disk(fd: int, data: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            return real_write(fd, bytes(data[:5]))  # half a batch goes out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OutputError, match="no space left on device"):
        log.append(["lost one", "lost two"])
    monkeypatch.undo()
    log.close()
    assert path.read_bytes() == b"kept\n"


def test_ctrl_c_during_a_write_lets_the_write_finish_first() -> None:
    from vlmo.batch.runner import _sigint_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives here, while the "write" runs
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_raw_prompts_and_the_progress_bar(
    folder: Path, captions: list[dict[str, Any]], vlm: VLMo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmo.batch.runner import open_results, write_results

    out = tmp_path / "raw.jsonl"
    results = open_results(out, "generate", resume=False, force=False)
    job = BatchJob(task="generate", prompt="caption en")
    summary = write_results(lambda: vlm, job, list_inputs(folder), results, limit=6, progress=True)
    results.close()
    assert "images/s" in capsys.readouterr().err and summary.rows == 6 and summary.errors == 3
    rows = read_jsonl(out)
    assert [r["text"] for r in rows] == [r["text"] for r in captions[:6]]
    assert {r["task"] for r in rows} == {"generate"} and {r["prompt"] for r in rows} == {"caption en"}


def test_run_answers_each_images_own_prompt_in_one_batch(folder: Path, vlm: VLMo) -> None:
    """`VLMo.run` with lists: every image its own prompt, any task, as one batch (what manifest rows need)."""
    from vlmo import tasks

    images = [str(folder / f"scene-0{n}.png") for n in (1, 2, 4)]  # a square; two circles; square, triangle, circle
    labels = ["square", "circle ; triangle", "triangle"]
    answers = vlm.run(images, [tasks.detect(lab) for lab in labels])
    assert isinstance(answers, list)
    assert [a.objects for a in answers] == [vlm.detect(im, lab) for im, lab in zip(images, labels, strict=True)]
    assert [len(a.objects or []) for a in answers] == [1, 2, 1]
    mixed = vlm.run(images[:2], [tasks.detect("circle"), tasks.prompt("caption")])
    assert isinstance(mixed, list)
    assert mixed[0].objects == vlm.detect(images[0], "circle") and mixed[1].text == vlm.caption(images[1])
    assert mixed[1].payload() == {"task": "caption", "text": mixed[1].text}
    with pytest.raises(InputError, match="3 images but 2 prompts"):
        vlm.run(images, [tasks.detect("circle")] * 2)


def test_resume_continues_only_the_same_job(folder: Path, tmp_path: Path) -> None:
    """The run's parameters are kept beside its results; a resume with another detail, question or model, or over
    inputs that do not hold the file's ids, is refused before the model loads instead of mixing two jobs."""
    out = tmp_path / "captions.jsonl"
    ok(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--limit", 2, *MODEL))
    record = json.loads((tmp_path / ".captions.jsonl.job.json").read_text())
    assert record["task"] == "caption" and record["detail"] == "short" and record["model"] == "vlmo/shapes"
    before = out.read_text()
    changed = vlmo_cli("batch", folder, "--task", "caption", "--detail", "long", "--out", out, "--resume", *MODEL)
    usage_error(changed, "was written with detail 'short' (now 'long')", "--force")
    other_model = ["--model", "/no/such/model"]
    usage_error(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--resume", *other_model), "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(folder / "scene-00.png", elsewhere / "another.png")
    foreign = vlmo_cli("batch", elsewhere, "--task", "caption", "--out", out, "--resume", *MODEL)
    usage_error(foreign, "rows whose ids are not among the inputs")
    assert out.read_text() == before
    ok(vlmo_cli("batch", folder, "--task", "caption", "--out", out, "--resume", "--limit", 3, *MODEL))
    assert len(read_jsonl(out)) == 3


def test_parquet_image_structs_by_reference_read_their_path(folder: Path, vlm: VLMo, tmp_path: Path) -> None:
    """Hugging Face datasets stores an image by reference as {bytes: None, path}: the path is read (relative to the
    manifest's folder); a struct with bytes gives its bytes; one with neither is that row's "has no image" error."""
    pa = pytest.importorskip("pyarrow")
    import hashlib

    import pyarrow.parquet as pq

    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes((folder / "scene-00.png").read_bytes())
    data = (folder / "scene-01.png").read_bytes()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": "pics/a.png"}, {"bytes": data, "path": "b.png"}, {"bytes": None, "path": None}]
    manifest = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": pa.array(cells, type=image)}), manifest)
    out = tmp_path / "captions.jsonl"
    ok(vlmo_cli("batch", manifest, "--task", "caption", "--out", out, *MODEL))
    by_path, by_bytes, neither = read_jsonl(out)
    assert by_path["id"] == "pics/a.png" and by_path["image"] == "pics/a.png" and by_path["error"] is None
    assert by_path["text"] == vlm.caption(tmp_path / "pics" / "a.png")
    assert by_bytes["id"] == hashlib.sha256(data).hexdigest()[:16] and by_bytes["text"] == vlm.caption(data)
    assert neither["id"] == "row 3" != hashlib.sha256(b"").hexdigest()[:16]
    assert neither["text"] is None and "has no image" in neither["error"]


def test_a_url_in_a_list_or_manifest_is_refused_as_a_url(tmp_path: Path) -> None:
    """Batch inputs are files: a URL is one line saying so before any model loads, never "no image file at http:/…"."""
    listed = tmp_path / "todo.txt"
    listed.write_text("# photos\nhttp://example.com/a.png\n")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text('{"image": "x.png"}\n{"image": "https://example.com/b.jpg"}\n')
    for source, where, url in [(listed, "todo.txt:2", "http://"), (manifest, "rows.jsonl:2", "https://")]:
        with pytest.raises(InputError, match=f"{where}: {url}example.com/.* is a URL") as info:
            list_inputs(source)
        assert "--allow-remote-images" in str(info.value)
    usage_error(vlmo_cli("batch", listed, "--task", "caption", "--out", tmp_path / "o.jsonl"), "is a URL")


def test_a_closed_write_fence_lets_no_shard_in(tmp_path: Path) -> None:
    """`vlmo batch --ray` after Ctrl-C: a write task that finishes after the driver closed the run's fence writes
    nothing, so the summary printed from the shards on disk stays true."""
    from vlmo.batch.ray_data import _fenced_write, _WriteFence, read_shards

    rows = [{"id": "a.png", "image": "a.png", "task": "caption", "prompt": None, "text": "a", "error": None}]
    fence = _WriteFence(tmp_path / ".part-abc.open")
    assert _fenced_write(fence.path, tmp_path / "part-abc-00000.jsonl", rows, "caption")
    fence.close()
    assert not _fenced_write(fence.path, tmp_path / "part-abc-00001.jsonl", rows, "caption")
    assert [row["id"] for row in read_shards(tmp_path)] == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-abc-00000.jsonl"]  # the fence file is gone too
    fence.close()  # closing twice is harmless


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_closing_the_write_fence_waits_for_the_shard_being_written(tmp_path: Path) -> None:
    """A write under way when Ctrl-C comes is finished (its shard counted) before the fence closes, never cut."""
    import fcntl
    import threading

    from vlmo.batch.ray_data import _WriteFence

    fence = _WriteFence(tmp_path / ".part-abc.open")
    fd = os.open(fence.path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a write task in the middle of its shard
    closer = threading.Thread(target=fence.close)
    closer.start()
    closer.join(timeout=0.5)
    assert closer.is_alive() and fence.path.exists()
    os.close(fd)
    closer.join(timeout=10)
    assert not closer.is_alive() and not fence.path.exists()
