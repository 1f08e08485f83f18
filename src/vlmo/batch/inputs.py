"""What `vlmo batch` reads: a folder, a glob, a list of paths or a manifest, as `BatchInput`s with stable ids.

    inputs = list_inputs("photos/")                    # every image under photos/, sorted; ids "a.jpg", "sub/b.png"
    inputs = list_inputs("scans/**/*.tif")              # a glob (recursive with **)
    inputs = list_inputs("todo.txt")                    # one path per line (# comments), relative to the list's folder
    inputs = list_inputs("rows.jsonl")                  # a manifest: image + optional id/question/labels/prompt
    inputs = list_inputs("rows.parquet")                # the same in Parquet; images as paths, bytes or datasets'
                                                        # Image structs {bytes, path}
    len(inputs); for item in inputs: ...

An id names an input across runs, so that `--resume` can tell what is done: a manifest's `id` column, else the path
relative to the folder or glob root, the line of a path list, a manifest's `image` value, the image bytes' sha256
(first 16 hex digits), or "row N" for a Parquet row with no image at all; a second input with the same derived id
gets `#2`, a third `#3`. Listings are sorted, so a folder that is listed in another order on another machine gives
the same ids. A manifest's own `id` values must be unique.

Problems with the listing itself (no such folder, a manifest line that is not JSON, no `image` column, duplicate
ids, a URL where an image file is expected) are one-line `InputError`s before any model loads; an image that cannot
be read is not checked here: it becomes its row's error when the batch runner loads it. Hidden files and folders
(names starting with ".") are skipped in folders and globs. No torch here.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmo.errors import InputError
from vlmo.fileio import is_url
from vlmo.fileio.jsonfile import json_line

if TYPE_CHECKING:
    import pyarrow as pa

LIST_SUFFIXES = frozenset({".txt", ".lst"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_SUFFIXES = frozenset({".csv"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class BatchInput:
    """One input of a batch job.

    id: the stable name of the input (module docstring); image: what to load, an absolute path or encoded bytes;
    shown: the results' `image` column (the absolute path, a manifest's own value, None for bytes);
    question / labels / prompt: a manifest row's own, None when it has none (the job's option applies).
    """

    id: str
    image: str | bytes
    shown: str | None
    question: str | None = None
    labels: str | None = None
    prompt: str | None = None


# What a manifest row may carry besides its image and id: the values a task's prompt needs.
ROW_FIELDS = ("question", "labels", "prompt")


def carried(items: Iterable[BatchInput]) -> frozenset[str]:
    """Which of `ROW_FIELDS` at least one of `items` carries."""
    return frozenset(f for f in ROW_FIELDS if any(getattr(item, f) is not None for item in items))


class Inputs:
    """The inputs of a job: their ids (in order) known up front, and a fresh iterator over them each time.

    Iterating reads lazily where it can (a Parquet manifest's image bytes, one row group at a time). `manifest`:
    whether rows may carry their own question, labels or prompt; `fields`: which of those some row does carry (all
    three when unknown), so that a job whose task needs one that no row has is refused before any model loads."""

    def __init__(
        self,
        source: str,
        ids: list[str],
        rows: Callable[[], Iterator[BatchInput]],
        manifest: bool,
        fields: Iterable[str] | None = None,
    ) -> None:
        self.source, self.ids, self._rows, self.manifest = source, ids, rows, manifest
        self.fields = frozenset(ROW_FIELDS if fields is None and manifest else fields or ())

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[BatchInput]:
        return self._rows()


def image_suffixes() -> frozenset[str]:
    """The file extensions Pillow can open (".jpg", ".png", ".webp", …), lowercase."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def list_inputs(source: str | os.PathLike[str]) -> Inputs:
    """The inputs `source` names: a folder, a glob, a list of paths (.txt), a manifest (.jsonl, .csv, .parquet) or
    one image file. Raises `InputError` for a source that is none of these or is malformed."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_paths(text, _walk(path), path)
    if not path.exists() and _GLOB_CHARS & set(text):
        root = _glob_root(text)
        found = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)]
        images = sorted(p for p in found if p.is_file() and _is_image_name(p, root))
        return _from_paths(text, images, root)
    if not path.is_file():
        raise InputError(f"no such file or folder: {text}; pass a folder, a glob, a list of paths or a manifest")
    suffix = path.suffix.lower()
    if suffix in LIST_SUFFIXES:
        return _from_list(path)
    if suffix in JSONL_SUFFIXES:
        return _from_records(path, _jsonl_records(path))
    if suffix in CSV_SUFFIXES:
        return _from_records(path, _csv_records(path))
    if suffix in PARQUET_SUFFIXES:
        return parquet_inputs(path)
    if suffix in image_suffixes():
        return _from_paths(text, [path], path.parent)
    raise InputError(
        f"cannot tell what {text} holds from its extension {suffix or '(none)'}; pass a folder, a glob, a list of "
        "paths (.txt), a manifest (.jsonl, .csv, .parquet) or an image"
    )


def as_inputs(inputs: Inputs | str | os.PathLike[str] | Iterable[BatchInput | str | os.PathLike[str]]) -> Inputs:
    """What the Python API takes as inputs: `Inputs`, a source for `list_inputs`, or a list of image paths (ids:
    the paths as given) and `BatchInput`s (ids their own, which must be unique)."""
    if isinstance(inputs, Inputs):
        return inputs
    if isinstance(inputs, str | os.PathLike):
        return list_inputs(inputs)
    items = list(inputs)
    paths = [os.fspath(i) for i in items if not isinstance(i, BatchInput)]
    derived = iter(_unique(paths))
    made: list[BatchInput] = []
    for item in items:
        if isinstance(item, BatchInput):
            made.append(item)
        elif isinstance(item, str | os.PathLike):
            _not_url(os.fspath(item), "inputs")
            full = str(Path(item).expanduser().absolute())
            made.append(BatchInput(next(derived), full, full))
        else:
            raise InputError(f"inputs must be image paths or BatchInputs, got a {type(item).__name__}")
    if not made:
        raise InputError("no inputs given; pass image paths, a folder or a manifest")
    ids = [item.id for item in made]
    if len(set(ids)) != len(ids):
        raise InputError("two inputs have the same id; ids must be unique (resuming relies on them)")
    fields = carried(made)
    return Inputs("the given inputs", ids, lambda: iter(made), manifest=bool(fields), fields=fields)


# -- folders, globs and path lists -------------------------------------------------------------------------------


def _walk(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted by their path relative to it; hidden names skipped."""
    suffixes = image_suffixes()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _glob_root(pattern: str) -> Path:
    """The folder a glob starts from: its longest leading part without wildcards."""
    parts = Path(os.path.expanduser(pattern)).parts
    plain = list(_takewhile_plain(parts))
    return Path(*plain) if plain else Path(".")


def _takewhile_plain(parts: tuple[str, ...]) -> Iterator[str]:
    for part in parts:
        if _GLOB_CHARS & set(part):
            return
        yield part


def _is_image_name(path: Path, root: Path) -> bool:
    relative = path.relative_to(root) if path.is_relative_to(root) else path
    hidden = any(part.startswith(".") for part in relative.parts)
    return not hidden and path.suffix.lower() in image_suffixes()


def _from_paths(source: str, paths: list[Path], root: Path) -> Inputs:
    if not paths:
        kinds = ", ".join(sorted(s for s in image_suffixes() if s in {".jpg", ".jpeg", ".png", ".webp", ".tif"}))
        raise InputError(f"no images found in {source} (looked for {kinds}, …); check the path")
    ids = _unique([p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix() for p in paths])
    items = [BatchInput(i, str(p.absolute()), str(p.absolute())) for i, p in zip(ids, paths, strict=True)]
    return Inputs(source, ids, lambda: iter(items), manifest=False)


def _from_list(path: Path) -> Inputs:
    """A text file of image paths: one per line, blank lines and `#` comments skipped."""
    lines = [(f"{path}:{n}", line.strip()) for n, line in enumerate(_read_text(path).splitlines(), start=1)]
    numbered = [(where, line) for where, line in lines if line and not line.startswith("#")]
    if not numbered:
        raise InputError(f"{path} lists no image paths; write one path per line")
    ids = _unique([line for _, line in numbered])
    items = [
        BatchInput(i, str(full), str(full))
        for i, (where, entry) in zip(ids, numbered, strict=True)
        for full in [_resolve(entry, path, where)]
    ]
    return Inputs(str(path), ids, lambda: iter(items), manifest=False)


def _resolve(value: str, manifest: Path, where: str) -> Path:
    """A path from a list or manifest: relative ones are relative to the file's own folder. A URL is refused
    (`where`: the line or row, for the message)."""
    _not_url(value, where)
    image = Path(value).expanduser()
    return (image if image.is_absolute() else manifest.parent / image).absolute()


def _not_url(value: str, where: str) -> None:
    """InputError for a URL where an image file is expected: Path() would make "http:/host/a.png" of it, a file that
    is not there."""
    if is_url(value):
        raise InputError(
            f"{where}: {value} is a URL, and batch inputs are image files: download the images first "
            "(vlmo serve --allow-remote-images reads URLs)"
        )


def _unique(ids: list[str]) -> list[str]:
    """Derived ids, a repeated one numbered by its occurrence: a, a#2, a#3."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


# -- manifests ---------------------------------------------------------------------------------------------------

Record = tuple[str, dict[str, Any]]  # (where, for messages: "rows.jsonl:3"; the row's fields)


def _jsonl_records(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        records.append((where, json_line(line, where, "an image field", hint="write one JSON object per line")))
    return records


def _csv_records(path: Path) -> list[Record]:
    text = _read_text(path)
    try:
        rows = list(csv.DictReader(text.splitlines(keepends=True)))
    except csv.Error as e:
        raise InputError(f"{path} is not valid CSV ({e})") from None
    # Line numbers count the header as line 1; an empty cell is no value.
    return [
        (f"{path}:{n}", {k: v for k, v in row.items() if k is not None and v != ""}) for n, row in enumerate(rows, 2)
    ]


def _from_records(path: Path, records: list[Record]) -> Inputs:
    if not records:
        raise InputError(f"{path} has no rows; write one row per image with an image column")
    images = [_image_value(row.get("image"), where) for where, row in records]
    ids = manifest_ids(path, [(where, row, image) for (where, row), image in zip(records, images, strict=True)])
    items = [
        manifest_item(path, where, i, image, row) for (where, row), image, i in zip(records, images, ids, strict=True)
    ]
    return Inputs(str(path), ids, lambda: iter(items), manifest=True, fields=carried(items))


def _image_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} has no image; give each row an image path")
    return value.strip()


def manifest_ids(path: Path, rows: list[tuple[str, dict[str, Any], str]]) -> list[str]:
    """Each manifest row's id: (where, the row's fields, its derived id: the image value or the bytes' digest).

    The `id` column when the manifest has one (in every row, unique), else the derived ids made unique (a#2)."""
    explicit = [text_field(row, "id", where) for where, row, _ in rows]
    if all(i is None for i in explicit):
        return _unique([derived for _, _, derived in rows])
    seen: set[str] = set()
    for (where, _, _), i in zip(rows, explicit, strict=True):
        if i is None:
            raise InputError(f"{where} has no id while other rows have one; give every row an id, or none")
        if i in seen:
            raise InputError(f"{path} has the id {i!r} twice; ids must be unique (resuming relies on them)")
        seen.add(i)
    return [i for i in explicit if i is not None]


def manifest_item(path: Path, where: str, id: str, image: str | bytes, row: dict[str, Any]) -> BatchInput:
    """A manifest row as an input: `image` is its path as written (relative to the manifest's folder) or bytes
    (empty: the row has no image, which loading reports as the row's error)."""
    source = image if isinstance(image, bytes) else str(_resolve(image, path, where))
    return BatchInput(
        id,
        source,
        None if isinstance(image, bytes) else image,
        question=text_field(row, "question", where),
        labels=labels_field(row, where),
        prompt=text_field(row, "prompt", where),
    )


def bytes_id(image: bytes) -> str:
    """The id derived from an image's bytes: the first 16 hex digits of their sha256."""
    return hashlib.sha256(image).hexdigest()[:16]


def text_field(row: dict[str, Any], name: str, where: str) -> str | None:
    """A manifest's optional text column: None when missing or null; a number is taken as its text (ids)."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(f"{where}: {name} must be text, got {type(value).__name__}")
    return str(value)


def labels_field(row: dict[str, Any], where: str) -> str | None:
    """The labels column: "cat ; dog", or a list of texts (JSONL, Parquet) joined the same way."""
    value = row.get("labels")
    if isinstance(value, list | tuple):
        if not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}: labels must be text or a list of texts")
        return " ; ".join(value)
    return text_field(row, "labels", where)


def require_pyarrow() -> Any:
    """The pyarrow module, or a one-line error saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule must be importable too
    except ImportError:
        raise InputError('Parquet needs pyarrow; pip install "vlmo[parquet]"') from None
    return pyarrow


# -- Parquet manifests (pyarrow, the `parquet` extra) ------------------------------------------------------------


def parquet_inputs(path: Path) -> Inputs:
    """A Parquet manifest's inputs (module docstring). Paths are listed at once; bytes are read while iterating.

    The image column holds paths (text), bytes, or Hugging Face datasets' Image structs `{bytes, path}`: a struct's
    bytes when it has them, else the file its path names (relative to the manifest's folder, as a path column's),
    else none, which is that row's error ("has no image") and not the end of the run."""
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
        return Inputs(str(path), ids, lambda: iter(items), manifest=True, fields=carried(items))
    # Ids from the bytes need one pass over them (unless the file has ids), which also checks a struct's paths as a
    # path column's are checked; the job reads them again as it goes.
    derived = [""] * len(rows)
    if "id" not in fields or kind == "struct":
        for n, (where, image) in enumerate(zip(wheres, _images(file, kind), strict=True)):
            if isinstance(image, str):
                _not_url(image, where)
            derived[n] = _derived_id(image, n + 1)
    ids = manifest_ids(path, list(zip(wheres, rows, derived, strict=True)))

    def lazily() -> Iterator[BatchInput]:
        for where, i, image, row in zip(wheres, ids, _images(file, kind), rows, strict=True):
            yield manifest_item(path, where, i, b"" if image is None else image, row)

    given = frozenset(f for f in ROW_FIELDS if any(row.get(f) not in (None, "") for row in rows))
    return Inputs(str(path), ids, lazily, manifest=True, fields=given)


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
    """The image column's values, one row group at a time (bytes are not all held at once). A path column's as
    they are; otherwise a row's bytes, the path a struct names instead (as written), or None for neither."""
    for group in range(file.num_row_groups):
        for value in file.read_row_group(group, columns=["image"]).column("image").to_pylist():
            yield value if kind == "path" else _image_of(value)


def _image_of(value: Any) -> bytes | str | None:
    """A bytes or struct cell's image: bytes, else (a struct stored by reference: `datasets` writes
    `{bytes: None, path: "x.png"}`) the path, else None."""
    if isinstance(value, dict):
        data, named = value.get("bytes"), value.get("path")
        if isinstance(data, bytes) and data:
            return data
        return named.strip() if isinstance(named, str) and named.strip() else None
    return value if isinstance(value, bytes) and value else None


def _derived_id(image: bytes | str | None, number: int) -> str:
    """The id of a row without an id column: its bytes' digest, its path as written, or "row N" with neither (never
    the digest of no bytes, which every such row would share)."""
    if isinstance(image, bytes):
        return bytes_id(image)
    return image if image is not None else f"row {number}"


def _path_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} has no image; give each row an image path")
    return value.strip()


__all__ = [
    "BatchInput",
    "Inputs",
    "as_inputs",
    "bytes_id",
    "image_suffixes",
    "list_inputs",
    "manifest_ids",
    "manifest_item",
]
