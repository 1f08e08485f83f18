"""Parquet results for `vlmo batch` (pyarrow, the `parquet` extra: `pip install "vlmo[parquet]"`). Parquet
manifests (paths, image bytes or Hugging Face `datasets` images) are read by `batch_inputs.parquet_inputs`.

Out: `ParquetResults`, a Parquet file with one typed column per row field (`schema`). A Parquet file cannot be
appended to, so while the job runs its rows go to a journal beside it, `RESULTS.partial.jsonl`, appended and
fsynced a batch at a time exactly like a `.jsonl` results file; when the job completes, the Parquet file is
written whole (temporary file, fsync, rename) from the previous file's rows (when resuming) and the journal's, and
the journal is removed. A run that is killed leaves the journal, which `--resume` continues.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from vlmo.batch.inputs import require_pyarrow
from vlmo.batch.results import Row, done_ids, parse_row, read_done
from vlmo.errors import InputError
from vlmo.fileio.atomic import AppendLog, OutputPathError, atomic_path, check_output
from vlmo.tasks import TaskName

if TYPE_CHECKING:
    import pyarrow as pa

_ROWS_PER_CHUNK = 1024  # journal rows per Parquet write when finishing


def schema(task: TaskName) -> pa.Schema:
    """The Parquet schema of a task's rows (`batch_results.columns`): nested lists and structs for objects."""
    pa = require_pyarrow()
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float64())
    fields = [("id", pa.string()), ("image", pa.string()), ("task", pa.string()), ("prompt", pa.string())]
    located = [("label", pa.string()), ("box", floats), ("bins", ints)]
    if task == "detect":
        fields += [("size", ints), ("detections", pa.list_(pa.struct(located)))]
    elif task == "segment":
        mask = pa.struct([("size", ints), ("counts", ints)])
        segmentation = pa.struct([*located, ("seg_codes", ints), ("mask", mask)])
        fields += [("size", ints), ("segmentations", pa.list_(segmentation)), ("mask_encoding", pa.string())]
    else:
        fields += [("text", pa.string())]
    return pa.schema([*fields, ("error", pa.string())])


def table(rows: list[Row], task: TaskName) -> pa.Table:
    """Rows as a pyarrow Table of `schema(task)`."""
    pa = require_pyarrow()
    return pa.Table.from_pylist(rows, schema=schema(task))


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """Every row of a results Parquet file (or a folder of shards), as dicts."""
    pa = require_pyarrow()
    rows: list[Row] = pa.parquet.read_table(path).to_pylist()
    return rows


# -- out ---------------------------------------------------------------------------------------------------------


def journal_path(path: Path) -> Path:
    """Where a Parquet results file's rows wait while the job runs."""
    return path.with_name(path.name + ".partial.jsonl")


class ParquetResults:
    """A Parquet results file, written when the job completes from a JSON Lines journal (module docstring)."""

    def __init__(self, path: Path, task: TaskName, log: AppendLog, done: set[str], replace: bool) -> None:
        self.path, self.task, self.log, self.done = path, task, log, done
        self._replace = replace  # whether `path` may be replaced at the end (it is ours: resumed, or --force)
        self._new = 0

    @classmethod
    def open(cls, path: Path, task: TaskName, *, resume: bool, force: bool) -> ParquetResults:
        require_pyarrow()
        journal = journal_path(path)
        if not resume:
            check_output(path, force, what="--out")
            if journal.exists() and not force:
                raise OutputPathError(
                    f"{journal} holds the rows of a run that was stopped; pass {{resume}} to continue it or "
                    "{force} to start over",
                    journal,
                    resume=None,
                    force=None,
                )
            if force and path.is_file():
                path.unlink()  # so that a journal never sits beside another job's results
            return cls(path, task, AppendLog.create(journal, force=force, what="--out"), set(), replace=force)
        check_output(path, True, what="--out")
        done = _parquet_ids(path, task) if path.exists() else set()
        log = AppendLog.resume(journal, what="--out")
        try:
            done |= read_done(log.lines(), journal, task)
        except BaseException:
            log.close()
            raise
        return cls(path, task, log, done, replace=True)

    def write(self, rows: list[Row]) -> None:
        from vlmo.batch.results import row_line

        self.log.append([row_line(row) for row in rows])
        self.done.update(row["id"] for row in rows)
        self._new += len(rows)

    def finish(self) -> None:
        """Write the Parquet file (previous rows, then the journal's) and remove the journal."""
        pa = require_pyarrow()
        journal = self.log.path
        has_rows = os.path.getsize(journal) > 0
        if self.path.exists() and not has_rows:
            self._remove_journal()
            return
        with atomic_path(self.path, force=self._replace) as tmp:
            with pa.parquet.ParquetWriter(tmp, schema(self.task)) as writer:
                if self.path.exists():
                    for batch in pa.parquet.ParquetFile(self.path).iter_batches():
                        writer.write_table(pa.Table.from_batches([batch]).cast(schema(self.task)))
                chunk: list[Row] = []
                for number, line in enumerate(self.log.lines(), start=1):
                    chunk.append(parse_row(line, f"{journal}:{number}"))
                    if len(chunk) == _ROWS_PER_CHUNK:
                        writer.write_table(table(chunk, self.task))
                        chunk = []
                if chunk or not self.path.exists():
                    writer.write_table(table(chunk, self.task))
        self._remove_journal()

    def _remove_journal(self) -> None:
        self.log.close()
        self.log.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.log.close()


def _parquet_ids(path: Path, task: TaskName) -> set[str]:
    """The ids in an earlier Parquet results file of this task (another task's file is refused)."""
    pa = require_pyarrow()
    try:
        found = pa.parquet.read_table(path, columns=["id", "task"]).to_pylist()
    except (pa.ArrowException, OSError, KeyError) as e:
        raise InputError(f"{path} is not a vlmo batch results file ({e}); choose another --out") from None
    return done_ids(found, path, task)


__all__ = ["ParquetResults", "journal_path", "read_rows", "schema", "table"]
