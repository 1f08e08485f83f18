"""`vlmo batch --ray` on a local Ray with 2 workers: the same rows as the single-process run, and every input still
gets exactly one row when a worker's process is killed in the middle of a batch (Ray restarts it and retries)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batch_scenes import LABELS, MODEL, scene_ids, write_scene_folder
from vlmo import VLMo
from vlmo.batch.inputs import list_inputs
from vlmo.batch.ray_data import RayOptions, read_shards, run_ray
from vlmo.batch.runner import BatchJob, run
from vlmo.cli.commands import app

# Each test starts a local Ray (seconds) and runs the whole folder on it: both are slow (`make test-slow`).
pytestmark = pytest.mark.slow

WORKER_TITLE = b"ray::MapWorker(MapBatches(_Worker))"  # what Ray names an actor's process
SCENES = 60  # enough batches that a worker killed a second into the job dies in the middle of it


@pytest.fixture(scope="module", autouse=True)
def ray() -> Any:
    """Ray with Ray Data, and pyarrow: imported when these tests run, not when the default run collects them."""
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene_folder(tmp_path_factory.mktemp("batch") / "scenes", SCENES)


@pytest.fixture(scope="module")
def vlm(shapes_float32: VLMo) -> VLMo:
    return shapes_float32  # conftest.py: loaded once, shared with test_batch.py


def by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row["id"])


def test_ray_rows_equal_the_single_process_rows(folder: Path, vlm: VLMo, ray: Any, tmp_path: Path) -> None:
    """The CLI starts (and stops) a local Ray itself: 2 workers, JSON Lines shards in a folder."""
    out = tmp_path / "captions.jsonl"
    args = ["batch", str(folder), "--task", "caption", "--out", str(out), "--ray", "--num-workers", "2", *MODEL]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4"], prog_name="vlmo")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == f"{out}\n" and "done: 63 rows, 3 errors" in result.stderr
    assert not ray.is_initialized()
    assert out.is_dir() and {p.suffix for p in out.iterdir()} == {".jsonl"}
    rows = read_shards(out)
    assert sorted(row["id"] for row in rows) == scene_ids(SCENES)  # exactly one row per input
    assert by_id(rows) == list(run(vlm, folder, task="caption"))
    again = CliRunner().invoke(app, args, prog_name="vlmo")
    assert again.exit_code == 2 and "--resume" in again.stderr  # shards are not mixed with another run's
    resumed = CliRunner().invoke(app, [*args, "--resume"], prog_name="vlmo")
    assert resumed.exit_code == 0 and "done: 0 rows, 0 errors, 63 already done" in resumed.stderr
    assert read_shards(out) == rows


def _worker_pids() -> list[tuple[int, bytes]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(WORKER_TITLE):
                found.append((int(entry), title))
    return found


def test_a_killed_worker_still_gives_every_input_exactly_one_row(folder: Path, vlm: VLMo, tmp_path: Path) -> None:
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds Ray's worker processes through /proc")
    out = tmp_path / "boxes"  # Parquet shards
    finished = threading.Event()
    killed: dict[str, Any] = {}

    def kill_a_busy_worker() -> None:
        """A second after the workers start, SIGKILL one that is running a batch (its title ends in .submit)."""
        first_busy = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not finished.is_set():
            busy = [pid for pid, title in _worker_pids() if b".submit" in title]
            if busy:
                first_busy = first_busy or time.monotonic()
                if time.monotonic() - first_busy > 1.0:  # some batches are done by now, most are not
                    os.kill(busy[0], signal.SIGKILL)
                    killed.update(pid=busy[0], during_run=not finished.is_set())
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    job = BatchJob(task="detect", labels=LABELS)
    load = {"model": "vlmo/shapes", "quantize": "none"}
    try:
        summary = run_ray(job, list_inputs(folder), out, load, RayOptions(num_workers=2), batch_size=2)
    finally:
        finished.set()
        killer.join(timeout=5)
    assert killed.get("during_run"), "no worker was killed while the job ran"
    rows = read_shards(out)
    ids, expected = [row["id"] for row in rows], scene_ids(SCENES)
    assert len(ids) == len(expected) and sorted(ids) == expected  # counted: no duplicates, none missing
    assert summary.rows == len(rows) and summary.errors == 3
    reference = list(run(vlm, folder, task="detect", labels=LABELS))
    assert by_id(rows) == reference
    assert json.dumps(reference)  # rows are plain JSON data, as the single-process run writes them


def test_ctrl_c_keeps_finished_blocks_and_says_what_is_on_disk(folder: Path, tmp_path: Path) -> None:
    """A local Ray whose CPUs are all taken by the model actors (2 workers, 1 CPU each, on a machine of 2 or more
    CPUs the actors fill): each finished batch's shard is on disk as it finishes (writes take no CPU slot), so Ctrl-C
    mid-run leaves them, prints the single-process run's summary, and --resume finishes the rest."""
    out = tmp_path / "captions.jsonl"
    workers = max(2, os.cpu_count() or 2)
    command = [sys.executable, "-m", "vlmo", "batch", str(folder), "--task", "caption", "--out", str(out), "--ray",
               "--num-workers", str(workers), "--batch-size", "2", *MODEL]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None and not list(out.glob("part-*")):
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    written = read_shards(out)
    last = stderr.strip().splitlines()[-1]
    assert process.returncode == 130, stderr
    errors = sum(row["error"] is not None for row in written)
    assert last == f"interrupted: {len(written)} rows written to {out} ({errors} errors); rerun with --resume", last
    assert 0 < len(written) < len(scene_ids(SCENES)), len(written)
    assert "core_worker" not in stderr and "raylet" not in stderr and stdout == ""
    resumed = CliRunner().invoke(app, [*command[3:], "--resume"], prog_name="vlmo")
    assert resumed.exit_code == 0, (resumed.stderr, resumed.exception)
    assert f"{len(written)} already done" in resumed.stderr
    assert sorted(row["id"] for row in read_shards(out)) == scene_ids(SCENES)  # exactly one row per input
