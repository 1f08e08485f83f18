"""Reading the JSON object of a file, with one-line errors that name the file and say what to do.

The one JSON-file reader of vlmo, for a checkpoint's own files (`config.json`, the shard index, adapter and
preprocessor configs) and for the data files users point at (VQAv2 questions/annotations, COCO instances). It
depends on nothing but `vlmo.errors`, so every layer (weights/, data/, eval, the API) may import it. `json_line`
reads one line of a JSON Lines file the same way (training examples, `vlmo batch` manifests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmo.errors import CheckpointError, InputError, VlmoError


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str = "",
    hint: str = "download it again",
    missing: str | None = None,
    error: type[VlmoError] = CheckpointError,
) -> dict[str, Any]:
    """The JSON object in the file `path`.

    what: what the file is, put before its path in messages ("VQAv2 questions file"); "" (a checkpoint's file)
        names the file by its path, or as "<directory> has no <name>" when it is missing.
    hint: what to do about a file that is missing or not a JSON object; ends every message.
    missing: what to do about a missing file instead of `hint`.
    error: the exception raised: CheckpointError (default) for a checkpoint's files, InputError for user data.
    """
    file = Path(path)
    name = f"{what} {file}" if what else str(file)
    if not file.is_file():
        where = f"{name} does not exist" if what else f"{file.parent} has no {file.name}"
        raise error(f"{where}; {missing or hint}")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{name} is not valid JSON ({err}); {hint}") from None
    if not isinstance(doc, dict):
        raise error(f"{name} is not a JSON object (it holds a {type(doc).__name__}); {hint}")
    return doc


def json_line(line: str, where: str, fields: str, hint: str = "") -> dict[str, Any]:
    """The JSON object on one line of a JSON Lines file; `where` names the line ("rows.jsonl:3") in the InputError
    for a line that is not JSON (followed by `hint`, if any) or not an object (which should hold `fields`)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where} is not valid JSON ({err.msg}){'; ' + hint if hint else ''}") from None
    if not isinstance(row, dict):
        raise InputError(f"{where} must be a JSON object with {fields}")
    return row
