"""What `vlmo batch` writes: one row per input, and the results file that keeps them across kills and resumes.

A row is a JSON-ready dict with the columns `columns(task)` lists, in that order:

    id, image, task, prompt, text, error                                   ask, caption, ocr, generate
    id, image, task, prompt, size, detections, error                       detect
    id, image, task, prompt, size, segmentations, mask_encoding, error     segment

`size` / `detections` / `segmentations` / `mask_encoding` are `tasks.located_payload`'s, so a row holds what
`vlmo detect --json` prints (boxes in pixels of the original image, masks as COCO RLE). An input that failed has
its one-line message in `error` and null outputs; `error` is null otherwise.

Results files (`vlmo.batch.runner.open_results`):
- `.jsonl`: one row per line, appended a batch at a time with `outputs.AppendLog` (one write, then fsync), so a
  kill loses at most the batch in flight; `resume` cuts a torn last line off and skips the ids already there.
- `.parquet`: rows go to the journal `RESULTS.partial.jsonl` as above while the job runs; when it completes, the
  Parquet file is written (atomically: `outputs.atomic_path`) from the earlier file's rows and the journal, and
  the journal removed (`vlmo.batch.parquet`). A single Parquet file cannot be appended to, so this is what makes
  it resumable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from vlmo.batch.inputs import BatchInput
from vlmo.errors import InputError, braced
from vlmo.fileio.atomic import AppendLog, OutputPathError
from vlmo.tasks import TaskName

Row = dict[str, Any]
RESULT_SUFFIXES = (".jsonl", ".parquet")


def output_columns(task: TaskName) -> tuple[str, ...]:
    """The columns that hold a task's answer."""
    if task == "detect":
        return ("size", "detections")
    if task == "segment":
        return ("size", "segmentations", "mask_encoding")
    return ("text",)


def columns(task: TaskName) -> tuple[str, ...]:
    """Every column of a task's rows, in order."""
    return ("id", "image", "task", "prompt", *output_columns(task), "error")


def result_row(item: BatchInput, task: TaskName, prompt: str | None, output: dict[str, Any]) -> Row:
    """The row of an input that was answered: `output` holds `output_columns(task)` (extra keys are ignored)."""
    row: Row = {"id": item.id, "image": item.shown, "task": task, "prompt": prompt}
    row.update({name: output[name] for name in output_columns(task)})
    row["error"] = None
    return row


def error_row(item: BatchInput, task: TaskName, prompt: str | None, message: str) -> Row:
    """The row of an input that failed: null outputs and the one-line `message`."""
    row: Row = {"id": item.id, "image": item.shown, "task": task, "prompt": prompt}
    row.update(dict.fromkeys(output_columns(task)))
    row["error"] = " ".join(message.split())
    return row


def row_line(row: Row) -> str:
    """A row as one JSON line (no newline: JSON escapes those inside strings)."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False)


class Results(Protocol):
    """A results file being written: the ids it already holds, and the rows of each finished batch."""

    path: Path
    done: set[str]

    def write(self, rows: list[Row]) -> None:
        """Make the rows durable (they survive a kill once this returns)."""

    def finish(self) -> None:
        """The job is complete: turn what was written into the final file."""

    def close(self) -> None:
        """Release the file; what was written stays (a resumed run continues from it)."""


def check_results_path(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in RESULT_SUFFIXES:
        raise OutputPathError(
            f"cannot write results as {out.suffix or 'a file without extension'}; name a .jsonl or .parquet file",
            out,
        )
    return out


class ResultsLock:
    """An exclusive lock on a results file (or `--ray` folder) for a whole run, so two jobs never write one file: a
    second job, `--resume` or `--force`, gets a one-line error naming the file instead of adding rows to it or
    truncating it under the first. The lock is an `flock` on a hidden `.NAME.lock` file beside it (not the results
    file itself, which `--force` replaces); the kernel releases it when the holder exits, killed or not. Where the
    platform has no `flock` (Windows), there is no lock."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError:
            return  # a folder we cannot write a lock into: the results file's own checks report it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputPathError(
                f"{braced(str(out))} is being written by another vlmo batch run; wait for it to end, or choose "
                "another --out",
                out,
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class JsonlResults:
    """Rows appended to a JSON Lines file, a batch per write + fsync (`outputs.AppendLog`)."""

    def __init__(self, log: AppendLog, done: set[str]) -> None:
        self.path, self.log, self.done = log.path, log, done

    @classmethod
    def open(cls, path: Path, task: TaskName, *, resume: bool, force: bool) -> JsonlResults:
        log = AppendLog.resume(path, what="--out") if resume else AppendLog.create(path, force=force, what="--out")
        try:
            done = read_done(log.lines(), path, task)
        except BaseException:
            log.close()
            raise
        return cls(log, done)

    def write(self, rows: list[Row]) -> None:
        self.log.append([row_line(row) for row in rows])
        self.done.update(row["id"] for row in rows)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.log.close()


def read_done(lines: Iterable[str], path: Path, task: TaskName) -> set[str]:
    """The ids of the rows in a results log; a line that is not a row of `task` is a one-line error."""
    return done_ids((parse_row(line, f"{path}:{n}") for n, line in enumerate(lines, start=1)), path, task)


def done_ids(rows: Iterable[Row], path: Path, task: TaskName) -> set[str]:
    """The ids of earlier rows of `task` in `path`; another task's rows are a one-line error (`--resume` would mix
    two jobs in one file)."""
    done: set[str] = set()
    for row in rows:
        if row.get("task") != task:
            raise InputError(
                f"{path} holds {row.get('task')} results, not {task}; resume it with --task {row.get('task')}, "
                "or write to another --out"
            )
        done.add(row["id"])
    return done


def parse_row(line: str, where: str) -> Row:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        row = e.msg
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise InputError(f"{where} is not a vlmo batch result row; remove that line or choose another --out")
    return row


__all__ = [
    "RESULT_SUFFIXES",
    "JsonlResults",
    "Results",
    "Row",
    "check_results_path",
    "columns",
    "done_ids",
    "error_row",
    "output_columns",
    "parse_row",
    "read_done",
    "result_row",
    "row_line",
]
