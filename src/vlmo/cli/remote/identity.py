"""What a resident model is, so that a command never gets its answer from the wrong one.

A command uses a resident model only when every field of its identity equals the command's own: the model and
its revision, the adapter, the mask decoder, device, dtype, quantize mode and cache use, vlmo's and torch's
versions. Names are resolved first, so two spellings of one model are one identity, and edits are seen:

- a local checkpoint or adapter folder is its absolute path plus the name, size and modification time of each file
  in it (retrained weights written over the old ones make a new identity);
- a hub id is the id plus the commit its revision points at in the local Hugging Face cache (`vlmo download`
  of a newer revision makes a new identity); not cached yet: the id and revision alone;
- a built-in model (`vlmo/shapes`) is its folder inside the installed package.

Everything here reads a few small files and imports no torch (a command computes this before each request).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

from vlmo import __version__

Identity = dict[str, str | None]
LOAD_FIELDS = ("model", "revision", "adapter", "device", "dtype", "quantize", "cache", "mask_decoder")


def identity(load: dict[str, object]) -> Identity:
    """The identity of the model that the load options `load` (`LOAD_FIELDS`) would load."""
    model = str(load["model"])
    revision = _optional(load.get("revision"))
    adapter = _optional(load.get("adapter"))
    decoder = _optional(load.get("mask_decoder"))
    return {
        "model": model,
        "model_source": _source(model, revision),
        "revision": revision,
        "adapter": adapter,
        "adapter_source": None if adapter is None else _source(adapter, None),
        "mask_decoder": None if decoder is None else _file(Path(decoder)),
        "device": str(load.get("device", "auto")),
        "dtype": str(load.get("dtype", "auto")),
        "quantize": str(load.get("quantize", "auto")),
        "cache": str(bool(load.get("cache", True))).lower(),
        "vlmo": __version__,
        "torch": _version("torch"),
    }


def differences(mine: Identity, theirs: object) -> list[str]:
    """The fields in which `theirs` (a resident's, as JSON) differs from `mine`; every field when it is no dict."""
    if not isinstance(theirs, dict):
        return list(mine)
    return [key for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def _optional(value: object) -> str | None:
    return None if value is None else str(value)


def _source(name: str, revision: str | None) -> str:
    """What `name` resolves to, and a fingerprint of its files (module docstring)."""
    from vlmo.demo import MODEL_DIR, MODEL_NAME

    if name == MODEL_NAME:
        return _folder(MODEL_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder(path)
    return f"hub:{name}@{_hub_commit(name, revision) or revision or 'main'}"


def _folder(path: Path) -> str:
    """A folder's absolute path and a digest of its files' names, sizes and modification times."""
    digest = hashlib.sha256()
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        for entry in entries:
            if entry.is_file():
                info = entry.stat()
                digest.update(f"{entry.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    except OSError:
        pass  # unreadable: the load says why
    return f"{path.resolve()}#{digest.hexdigest()[:16]}"


def _file(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return str(path.resolve())
    return f"{path.resolve()}#{info.st_size}:{info.st_mtime_ns}"


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` (default: main) of `repo_id` points at in the Hugging Face cache, if it is there."""
    from huggingface_hub import constants

    if revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text().strip() or None
    except (OSError, ValueError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["LOAD_FIELDS", "Identity", "differences", "identity"]
