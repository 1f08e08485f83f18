"""Parquet in and out for `vlmo batch` (pyarrow, the `parquet` extra: `pip install "vlmo[parquet]"`).

In: a Parquet manifest whose `image` column holds paths (text, relative to the file's folder), encoded image bytes
(binary), or Hugging Face `datasets` images (a struct of `bytes` and `path`), with optional `id`, `question`,
`labels` and `prompt` columns. Image bytes are read one row group at a time while the job runs, never all at once.

Out: `ParquetResults`, a Parquet file with one typed column per row field (`schema`). A Parquet file cannot be
appended to, so while the job runs its rows go to a journal beside it, `RESULTS.partial.jsonl`, appended and
fsynced a batch at a time exactly like a `.jsonl` results file; when the job completes, the Parquet file is
written whole (temporary file, fsync, rename) from the previous file's rows (when resuming) and the journal's, and
the journal is removed. A run that is killed leaves the journal, which `--resume` continues.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmo.batch_inputs import BatchInput, Inputs, bytes_id, manifest_ids, manifest_item
from vlmo.batch_results import Row, done_ids, parse_row, read_done
from vlmo.errors import InputError
from vlmo.outputs import AppendLog, OutputPathError, atomic_path, check_output
from vlmo.tasks import TaskName

if TYPE_CHECKING:
    import pyarrow as pa

_ROWS_PER_CHUNK = 1024  # journal rows per Parquet write when finishing


def require_pyarrow() -> Any:
    """The pyarrow module, or a one-line error saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule must be importable too
    except ImportError:
        raise InputError('Parquet needs pyarrow; pip install "vlmo[parquet]"') from None
    return pyarrow


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


# -- in ----------------------------------------------------------------------------------------------------------


def parquet_inputs(path: Path) -> Inputs:
    """A Parquet manifest's inputs (module docstring). Paths are listed at once; bytes are read while iterating."""
    pa = require_pyarrow()
    try:
        file = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} is not a readable Parquet file ({e}); check the file") from None
    names = file.schema_arrow.names
    if "image" not in names:
        raise InputError(f"{path} has no image column; name the column of image paths or bytes `image`")
    kind = _image_kind(file.schema_arrow.field("image").type, path)
    fields = [c for c in ("id", "question", "labels", "prompt") if c in names]
    rows = file.read(columns=fields).to_pylist() if fields else [{} for _ in range(file.metadata.num_rows)]
    if not rows:
        raise InputError(f"{path} has no rows; write one row per image")
    wheres = [f"{path} row {n}" for n in range(1, len(rows) + 1)]
    if kind == "path":
        images = [_path_value(v, where) for v, where in zip(_images(file, kind), wheres, strict=True)]
        ids = manifest_ids(path, list(zip(wheres, rows, images, strict=True)))
        items = [manifest_item(path, *entry) for entry in zip(wheres, ids, images, rows, strict=True)]
        return Inputs(str(path), ids, lambda: iter(items), manifest=True)
    # Ids from the bytes need one pass over them (unless the file has ids); the job reads them again as it goes.
    derived = [bytes_id(_bytes(v)) for v in _images(file, kind)] if "id" not in fields else [""] * len(rows)
    ids = manifest_ids(path, list(zip(wheres, rows, derived, strict=True)))

    def lazily() -> Iterator[BatchInput]:
        for where, i, image, row in zip(wheres, ids, _images(file, kind), rows, strict=True):
            yield manifest_item(path, where, i, _bytes(image), row)

    return Inputs(str(path), ids, lazily, manifest=True)


def _image_kind(kind: pa.DataType, path: Path) -> str:
    pa = require_pyarrow()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"  # Hugging Face datasets' Image feature: {bytes, path}
    raise InputError(f"{path}: the image column holds {kind}; it must hold paths (text) or image bytes")


def _images(file: Any, kind: str) -> Iterator[Any]:
    """The image column's values, one row group at a time (bytes are not all held at once)."""
    for group in range(file.num_row_groups):
        for value in file.read_row_group(group, columns=["image"]).column("image").to_pylist():
            yield value["bytes"] if kind == "struct" and value is not None else value


def _path_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} has no image; give each row an image path")
    return value.strip()


def _bytes(value: Any) -> bytes:
    """A row's image bytes; a null image is no bytes, which loading then reports as that row's error."""
    return value if isinstance(value, bytes) else b""


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
        from vlmo.batch_results import row_line

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


__all__ = ["ParquetResults", "journal_path", "parquet_inputs", "read_rows", "require_pyarrow", "schema", "table"]
