"""The prepared-weights cache: a checkpoint is quantized (or cast) once, and later loads read the result.

`weights.policy.load_for_inference` transforms the stored weights for two modes: int8 (the CPU default; every
linear layer and the head quantized per row) and the CPU bfloat16 mode that holds weights in float16 (a cast,
unless the checkpoint is already float16 and no adapter is merged). Both cost time on every load. Here the first
load writes the prepared weights to one safetensors file, and every later load of the same checkpoint (and
adapter, mode, vlmo, torch) maps that file instead.

Where: `prepared/` in vlmo's cache folder (`VLMO_CACHE` if set, else `platformdirs.user_cache_dir("vlmo")`, as
for the mask decoder); never inside the Hugging Face cache
or the user's checkpoint directory. One folder per entry, named by the key, holding `weights.safetensors` and
`meta.json` (model source, mode, sizes, created and last-used times; only for `vlmo cache ls/rm`).

The key is a sha256 over: FORMAT_VERSION, vlmo's and torch's versions, the mode, and the identity of every file
the loader reads (each `*.safetensors` weight file and `config.json`; for a merged adapter its config and weights,
and the Dense Connector projector's `vlmo_projector.*` files beside them when it brings one, by the same rule). A
file's identity is its name, its size and its content identity: for a Hugging Face cache snapshot, a symlink into
a `blobs/` folder whose name is 64 hex digits, that name (LFS blobs are named by the
sha256 of their content, so nothing is hashed); otherwise (st_size, st_mtime_ns, st_ctime_ns, st_ino, st_dev) plus
a sha256 of the file's safetensors header (the first 8 + N bytes; config.json is hashed whole, it is small).
Rewriting a file changes its ctime, which no user tool can set back (unlike mtime), so a local checkpoint whose
files change misses the cache, without hashing gigabytes on every load.

Entry format: tensors under the model's own parameter and buffer names. int8: for each linear layer of the vision
tower and the decoder `<name>.q` (int8[N, K]) and `<name>.scale` (float32[N]) and its bias as `<name>.bias`;
the head as `text.lm_head.q` / `.scale`; with an adapter and an untied head the embedding as `text.embed.q` /
`.scale`; every other parameter in float32. Without an adapter the embedding stays what `quantize_int8` makes it,
a `MappedEmbedding` over the checkpoint's own table (read from the checkpoint on every load: no copy in the
entry); with one it is an `Int8Embedding` (the head's q/scale when tied), exactly as without the cache. float16:
the merged model's state dict in float16. A load from the entry builds the same modules from the same numbers
as a load without it, so the logits are bit-identical.

Safety: an entry is written through `vlmo.fileio.atomic` (temporary file, fsync, rename), so an interrupted write leaves
nothing a later load trusts, and two processes preparing the same entry both succeed (the last rename wins; each
maps a complete file). It is read through the validated reader (`safetensors_io.open_tensors`) and checked
against the model's names, shapes and dtypes: a damaged entry is one line on stderr, deleted and rebuilt. A write
that fails (disk full, read-only cache) is one warning line; the model still loads.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlmo.errors import CheckpointError, VlmoError
from vlmo.fileio.atomic import OutputError, write_output
from vlmo.nn.paligemma import PaliGemma
from vlmo.progress import progress_bar
from vlmo.weights.files import CONFIG_FILE
from vlmo.weights.safetensors_io import DTYPES, open_tensors, release_pages, trim_heap

PrepMode = Literal["int8", "float16"]
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CODES = {dtype: code for code, dtype in DTYPES.items()}


def cache_root() -> Path:
    """`prepared` in vlmo's cache folder: `VLMO_CACHE`, else the user cache folder's `vlmo` (platformdirs), the
    folder that also holds the converted mask decoder (`weights/vqvae.py`)."""
    import platformdirs

    return Path(os.environ.get("VLMO_CACHE") or platformdirs.user_cache_dir("vlmo")).expanduser() / "prepared"


def source_name(model: str | os.PathLike[str]) -> str:
    """How an entry names its model: a hub id (or built-in name) as given, a local directory as an absolute path."""
    from vlmo.weights.hub import BUILT_IN_MODELS, looks_like_path

    name = os.fspath(model)
    if isinstance(model, os.PathLike) or looks_like_path(name) or (name not in BUILT_IN_MODELS and Path(name).is_dir()):
        return str(Path(name).expanduser().resolve())
    return name


# -- the key -------------------------------------------------------------------------------------------------------


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies one file's content without reading it all (see the module docstring)."""
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
            return {"name": path.name, "size": target.stat().st_size, "sha256": target.name}
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            raw = f.read(8)
            digest.update(raw)
            if len(raw) == 8:
                digest.update(f.read(min(int.from_bytes(raw, "little"), 100 * 2**20)))
        else:
            digest.update(f.read())
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return {"name": path.name, "size": st.st_size, "stat": stat, "head_sha256": digest.hexdigest()}


def entry_key(model_dir: Path, mode: PrepMode, adapter_dir: Path | None = None) -> str:
    """The hex digest naming the entry of this checkpoint (+ adapter) in this mode."""
    import vlmo
    from vlmo.weights.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR_CONFIG, PROJECTOR_WEIGHTS
    from vlmo.weights.loader import weight_files

    files = [model_dir / CONFIG_FILE, *weight_files(model_dir)]
    adapter_files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    if adapter_dir is not None:  # a Dense Connector projector's files, when present (a missing one: load_adapter says)
        adapter_files += [n for n in (PROJECTOR_CONFIG, PROJECTOR_WEIGHTS) if (adapter_dir / n).is_file()]
    ident: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "vlmo": vlmo.__version__,
        "torch": torch.__version__,
        "mode": mode,
        "model": [file_identity(p) for p in files],
        "adapter": None if adapter_dir is None else [file_identity(adapter_dir / name) for name in adapter_files],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# -- loading -------------------------------------------------------------------------------------------------------


def load_cached(
    model_dir: Path,
    mode: PrepMode,
    *,
    adapter_dir: Path | None,
    source: str,
    base: Callable[[], PaliGemma],
    finish: Callable[[PaliGemma], PaliGemma],
) -> PaliGemma:
    """The model prepared in `mode`, from the cache entry, or prepared now (and the entry written).

    `base()` loads the checkpoint with the adapter merged, as the policy loads it without the cache; `finish(net)`
    prepares such a model in memory (the fallback when the entry cannot be written).
    """
    key = entry_key(model_dir, mode, adapter_dir)
    entry = cache_root() / key
    mapped = adapter_dir is None
    if (entry / WEIGHTS_FILE).is_file():
        try:
            net = _load_entry(entry / WEIGHTS_FILE, model_dir, mode, adapter_dir)
        except (VlmoError, ValueError, RuntimeError, KeyError, OSError) as e:
            _say(f"the prepared-weights cache entry {entry} was damaged ({_one_line(e)}); rebuilding it")
            shutil.rmtree(entry, ignore_errors=True)
        else:
            _touch(entry)
            return net
    net = base()
    try:
        written = _write_entry(entry, net, mode, mapped, source)
    except (OutputError, OSError) as e:
        _say(f"could not save prepared weights in the cache ({_one_line(e)}); loading without it")
        return finish(net)
    try:
        return _load_entry(written, model_dir, mode, adapter_dir)
    except (VlmoError, ValueError, RuntimeError, KeyError, OSError) as e:  # e.g. removed meanwhile
        _say(f"could not read back the prepared-weights cache entry {entry} ({_one_line(e)}); loading without it")
        return finish(net)


def _say(message: str) -> None:
    print(f"vlmo: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _load_entry(file: Path, model_dir: Path, mode: PrepMode, adapter_dir: Path | None) -> PaliGemma:
    from vlmo.weights.adapters import use_saved_projector
    from vlmo.weights.loader import load_config

    cfg = load_config(model_dir)  # part of the key: the same config the entry was made from
    mapped = adapter_dir is None
    table = _checkpoint_embedding(model_dir, cfg) if mode == "int8" and mapped else None
    tensors = open_tensors(file)
    with torch.device("meta"):
        net = PaliGemma(cfg)
    if adapter_dir is not None:
        use_saved_projector(net, adapter_dir)  # the adapter's Dense Connector projector, if it brings one
    used: set[str] = set()

    def take(name: str, dtype: torch.dtype | None, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"tensor {name!r} is missing")
        t = tensors[name]
        if (dtype is not None and t.dtype != dtype) or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, not {dtype} {tuple(shape)}")
        used.add(name)
        return t

    if mode == "int8":
        _build_int8(net, take, table)
    elif "text.lm_head.weight" in tensors:  # an untied head (loader._resolve_lm_head kept it)
        with torch.device("meta"):
            net.text.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
    want = torch.float32 if mode == "int8" else torch.float16
    state = {
        name: take(name, want if ref.is_floating_point() else ref.dtype, tuple(ref.shape)) if ref.is_meta else ref
        for name, ref in net.state_dict().items()
    }
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r}")
    net.load_state_dict(state, strict=True, assign=True)
    net = net.eval().requires_grad_(False)
    if mode == "float16":
        from vlmo.nn.quant import hold_float16

        hold_float16(net, torch.bfloat16)
    return net


def _checkpoint_embedding(model_dir: Path, cfg: Any) -> torch.Tensor:
    """The checkpoint's own (mapped) embedding table, for `MappedEmbedding`."""
    from vlmo.weights.keys import KeyMap
    from vlmo.weights.loader import read_state_dict

    state, sources = read_state_dict(model_dir, cfg, KeyMap(cfg.text.arch))
    table = state.get("text.embed.weight")
    shape = (cfg.text.vocab_size, cfg.text.hidden_size)
    if table is None or tuple(table.shape) != shape:
        raise CheckpointError(f"{model_dir} has no embedding table of shape {shape}")
    return table


def _build_int8(
    net: PaliGemma,
    take: Callable[[str, torch.dtype | None, tuple[int, ...]], torch.Tensor],
    table: torch.Tensor | None,
) -> None:
    """Replace the meta model's layers by int8 ones built from the entry's q/scale (as `quantize_int8` builds them)."""
    from vlmo.nn.quant import Int8Embedding, Int8Head, MappedEmbedding, _packed, quantized_linears

    torch.backends.quantized.engine = "fbgemm"
    text = net.text
    vocab, hidden = text.embed.weight.shape
    q = take("text.lm_head.q", torch.int8, (vocab, hidden))
    scale = take("text.lm_head.scale", torch.float32, (vocab,))
    head = Int8Head(q, scale)
    if table is not None:
        embed: nn.Module = MappedEmbedding(table)
    elif text.lm_head is None:
        embed = Int8Embedding(q, scale)
    else:
        embed = Int8Embedding(
            take("text.embed.q", torch.int8, (vocab, hidden)), take("text.embed.scale", torch.float32, (vocab,))
        )
    text.embed, text.lm_head = embed, head  # type: ignore[assignment]  # as in quantize_int8
    if not isinstance(embed, Int8Embedding):
        release_pages(q)  # the head is packed (a copy), and no embedding reads these pages: before the linears
    linears = quantized_linears(net)
    jobs = []
    for _, _, full, layer in linears:
        n, k = layer.weight.shape
        bias = None if layer.bias is None else take(f"{full}.bias", torch.float32, (n,))
        jobs.append((take(f"{full}.q", torch.int8, (n, k)), take(f"{full}.scale", torch.float32, (n,)), bias))
    # Each mapped q's pages go back to the OS as soon as its layer is packed (the packed layer holds a copy): held
    # until the end, they would double the peak (6.6 GB instead of 3.5 GB at PaliGemma-3B). Packing's temporaries go
    # back too, now and then (glibc keeps freed heap memory for reuse, which raised the peak by ≈ 0.4 GB).
    released = [0]

    def release(job: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> None:
        release_pages(job[0])
        released[0] += job[0].nbytes
        if released[0] > 256 * 2**20:  # now and then: a trim walks the whole heap
            trim_heap()
            released[0] = 0

    for (parent, name, _, _), built in zip(linears, _packed(jobs, after=release), strict=True):
        setattr(parent, name, built)
    trim_heap()


# -- writing -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _int8_plan(
    net: PaliGemma, mapped: bool
) -> tuple[list[_Spec], Callable[[Callable[[torch.Tensor], None]], Iterator[torch.Tensor]], int]:
    """What an int8 entry holds (names, dtypes, shapes, in file order), a generator of the tensors in that order
    (quantizing one weight at a time), and how many float weights it quantizes (for the progress bar)."""
    from vlmo.nn.quant import _quantize_rows, quantized_linears

    text = net.text
    table = text.embed.weight.detach()
    untied = text.lm_head is not None
    head_w = text.lm_head.get_parameter("weight").detach() if text.lm_head is not None else table
    vocab, hidden = table.shape
    specs = [_Spec("text.lm_head.q", torch.int8, (vocab, hidden)), _Spec("text.lm_head.scale", torch.float32, (vocab,))]
    quantized = [head_w]
    if untied and not mapped:
        specs += [
            _Spec("text.embed.q", torch.int8, (vocab, hidden)),
            _Spec("text.embed.scale", torch.float32, (vocab,)),
        ]
        quantized.append(table)
    covered = {"text.embed.weight", "text.lm_head.weight"}
    linears = quantized_linears(net)
    for _, _, full, layer in linears:
        n, k = layer.weight.shape
        specs += [_Spec(f"{full}.q", torch.int8, (n, k)), _Spec(f"{full}.scale", torch.float32, (n,))]
        if layer.bias is not None:
            specs.append(_Spec(f"{full}.bias", torch.float32, (n,)))
        covered |= {f"{full}.weight", f"{full}.bias"}
    rest = {k: v for k, v in net.state_dict().items() if k not in covered}
    specs += [_Spec(k, torch.float32 if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in rest.items()]

    # Mapped checkpoint pages can be handed back (they come back from the file); merged adapter weights live in
    # ordinary memory, where releasing would lose them, and the fallback after a failed write still needs them.
    release = release_pages if mapped else (lambda t: None)

    def tensors(advance: Callable[[torch.Tensor], None]) -> Iterator[torch.Tensor]:
        for w in quantized:
            yield from _quantize_rows(w)
            advance(w)
            release(w)
        for _, _, _, layer in linears:
            q, scale = _quantize_rows(layer.weight.detach())
            yield q
            yield scale
            if layer.bias is not None:
                yield layer.bias.detach().float()
            advance(layer.weight)
            release(layer.weight.detach())
        for v in rest.values():
            yield v.float() if v.is_floating_point() else v

    total = sum(w.numel() for w in quantized) + sum(layer.weight.numel() for *_, layer in linears)
    return specs, tensors, total


def _float16_plan(
    net: PaliGemma,
) -> tuple[list[_Spec], Callable[[Callable[[torch.Tensor], None]], Iterator[torch.Tensor]], int]:
    state = net.state_dict()
    specs = [_Spec(k, torch.float16 if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in state.items()]

    def tensors(advance: Callable[[torch.Tensor], None]) -> Iterator[torch.Tensor]:
        for v in state.values():
            yield v.half() if v.is_floating_point() else v
            advance(v)

    return specs, tensors, sum(v.numel() for v in state.values())


def _write_entry(entry: Path, net: PaliGemma, mode: PrepMode, mapped: bool, source: str) -> Path:
    """Write the entry for `net` (float weights, adapter merged); returns its weights file."""
    from vlmo.weights.hub import want_progress  # not at import: `vlmo cache ls` needs no huggingface_hub

    if mode == "int8":
        specs, tensors, total = _int8_plan(net, mapped)
    else:
        specs, tensors, total = _float16_plan(net)
    entry.mkdir(parents=True, exist_ok=True)
    file = entry / WEIGHTS_FILE
    try:
        # A one-time step that leaves nothing to read: the bar goes when done. On a terminal only, as for downloads.
        description = f"Preparing {mode} weights (once for this checkpoint)"
        with progress_bar(total, description, unit="percent", enabled=want_progress(None), transient=True) as bar:

            def advance(t: torch.Tensor) -> None:
                bar.advance(t.numel())

            write_output(file, lambda tmp: _write_safetensors(tmp, specs, tensors(advance)))
    except BaseException:
        try:
            entry.rmdir()  # only if empty: another process may have finished the same entry meanwhile
        except OSError:
            pass
        raise
    now = time.time()
    meta = {
        "source": source,
        "mode": mode,
        "format": FORMAT_VERSION,
        "bytes": file.stat().st_size,
        "tensors": len(specs),
        "created": now,
        "last_used": now,
    }
    write_output(entry / META_FILE, json.dumps(meta, indent=1) + "\n")
    return file


def _write_safetensors(path: Path, specs: list[_Spec], tensors: Iterator[torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (the header first: every size is known from the specs)."""
    header: dict[str, Any] = {"__metadata__": {"format": "vlmo-prepared"}}
    offset = 0
    for s in specs:
        size = s.dtype.itemsize
        for d in s.shape:
            size *= d
        header[s.name] = {"dtype": _CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for s, t in zip(specs, tensors, strict=True):
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise RuntimeError(f"prepared tensor {s.name} is {t.dtype} {tuple(t.shape)}, planned {s}")
            f.write(_raw_bytes(t.detach().contiguous()))


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy and without numpy (not one of vlmo's dependencies).
    The view is valid while `t` lives; the caller writes it at once."""
    return memoryview((ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr())).cast("B") if t.nbytes else memoryview(b"")


def _touch(entry: Path) -> None:
    """Record the use in meta.json (best effort: a read-only cache still loads)."""
    meta = _read_meta(entry)
    if meta is None:
        return
    meta["last_used"] = time.time()
    try:
        write_output(entry / META_FILE, json.dumps(meta, indent=1) + "\n")
    except (OutputError, OSError):
        pass


# -- listing and removing (vlmo cache) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: Path
    source: str
    mode: str
    bytes: int
    last_used: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.path.name,
            "source": self.source,
            "mode": self.mode,
            "bytes": self.bytes,
            "last_used": self.last_used,
            "path": str(self.path),
        }


def _read_meta(entry: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


def entries() -> list[Entry]:
    """Every entry in the cache (folders named by a key), most recently used first."""
    root = cache_root()
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if not _HEX64.fullmatch(entry.name) or not (entry / WEIGHTS_FILE).is_file():
            continue
        meta = _read_meta(entry) or {}
        last = meta.get("last_used")
        found.append(
            Entry(
                entry,
                str(meta.get("source", "?")),
                str(meta.get("mode", "?")),
                _size(entry),
                float(last) if isinstance(last, int | float) else None,
            )
        )
    return sorted(found, key=lambda e: -(e.last_used or 0.0))


@dataclass(frozen=True)
class Removal:
    """What `remove` did with one entry: `problem` is None when the entry is gone, else why it is still there."""

    entry: Entry
    problem: str | None = None


def remove(model: str | None) -> list[Removal]:
    """Remove the entries of `model` (its source name, as `vlmo cache ls` shows it), or all with None; each says
    whether it is gone. An entry that is a symbolic link is skipped: what it points at is not vlmo's to delete."""
    wanted = None if model is None else {model, source_name(model)}
    return [Removal(e, _remove_entry(e.path)) for e in entries() if wanted is None or e.source in wanted]


def _remove_entry(entry: Path) -> str | None:
    """Delete one entry folder: None when it is gone, else the reason it is not (one line)."""
    if entry.is_symlink():
        return f"skipped: it is a symbolic link to {os.readlink(entry)}, not a folder of the cache; remove the link"
    try:
        shutil.rmtree(entry)
    except OSError as e:
        if not os.path.lexists(entry):  # removed meanwhile (another `vlmo cache rm`)
            return None
        where = f" ({e.filename})" if e.filename else ""
        return f"{(e.strerror or str(e)).lower()}{where}; check the cache folder's permissions"
    return None


__all__ = [
    "FORMAT_VERSION",
    "Entry",
    "Removal",
    "cache_root",
    "entries",
    "entry_key",
    "file_identity",
    "load_cached",
    "remove",
    "source_name",
]
