"""Reading the JSON files users hand to training and evaluation, with one-line errors that say what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmo.errors import InputError


def read_json_object(path: str | os.PathLike[str], what: str, hint: str) -> dict[str, Any]:
    """The JSON object in `path`; `what` names the file in messages ("VQAv2 questions file"), `hint` says where to
    get a good one."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} {file} does not exist; {hint}")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {file} is not valid JSON ({err}); {hint}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{what} {file} must hold a JSON object, got {type(doc).__name__}")
    return doc
