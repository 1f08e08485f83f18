"""Zero-copy reading of `.safetensors` files through `mmap`.

The format is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`, then raw
little-endian tensor bytes. Tensors are made with `torch.frombuffer` over a copy-on-write map of the file, so
loading a checkpoint in its stored dtype costs no second copy in memory: pages are read from disk on first touch
and stay shared with the page cache. Everything is validated (header, dtypes, each tensor's byte count against its
shape, and the byte ranges tiling the data area exactly: no overlap, no gap, no trailing bytes, as the format
requires) so a truncated or corrupt file is a clear `CheckpointError`, not a crash or two tensors on the same bytes.
Nothing is ever unpickled. Every `.safetensors` file vlmo reads comes through `open_tensors` here.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import sys
import warnings
from pathlib import Path

import torch

from vlmo.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (without `__metadata__`), validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes); download it again")
        n = int.from_bytes(raw_len, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path} has a corrupt or truncated header; download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has an unreadable header ({e}); download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has an unreadable header; download it again")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        if isinstance(info, dict) and info.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        try:
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = info["shape"]
            # JSON integers only, as the reference reader demands, and no negative dimension
            if not isinstance(shape, list) or not all(type(x) is int for x in (begin, end, *shape)):
                raise ValueError
            if any(d < 0 for d in shape):
                raise ValueError
            expected = math.prod(shape) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid entry; download the file again") from None
        if not 0 <= begin <= end or end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid offsets [{begin}, {end}) for {expected} bytes")
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated ({size} bytes, tensor {name!r} ends at byte {8 + n + end}); download it again"
            )
    _check_layout(path, header, data_size)
    return header


def _check_layout(path: Path, header: dict[str, dict], data_size: int) -> None:
    """The tensors' byte ranges, in offset order, must tile the data area exactly: none overlaps another, each
    starts where the one before it ends (the first at 0), and the last ends at the end of the file. This is what
    the format requires and what the reference reader enforces; two tensors on the same bytes would otherwise both
    load. Overlaps are looked for first: they are the reason for the check, a gap is mere damage."""
    ranges = sorted((*header[k]["data_offsets"], k) for k in header)
    reach, owner = 0, None  # the furthest byte any earlier tensor covers, and that tensor
    for begin, end, name in ranges:
        if begin < reach:
            raise CheckpointError(
                f"{path}: tensor {name!r} at data bytes [{begin}, {end}) overlaps tensor {owner!r}, which ends at "
                f"{reach}; the file is corrupt or was not written by a safetensors writer"
            )
        if end > reach:
            reach, owner = end, name
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at data byte {begin} but the tensors before it end at {position} "
                f"(a gap of {begin - position} bytes); the file is corrupt, download it again"
            )
        position = end
    if position != data_size:
        last = f"its last tensor {ranges[-1][2]!r}" if ranges else "its (empty) tensor table"
        raise CheckpointError(
            f"{path} has {data_size - position} bytes after {last}; the file is corrupt, download it again"
        )


def open_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of one file as CPU tensors backed by a copy-on-write mmap of it."""
    path = Path(path)
    header = read_header(path)
    if not header:
        return {}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + int.from_bytes(mm[:8], "little")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers; ACCESS_COPY is writable
        for name, info in header.items():
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            count = (end - begin) // dtype.itemsize
            if count == 0:
                t = torch.empty(info["shape"], dtype=dtype)
            else:
                t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin).view(info["shape"])
            out[name] = t
    return out


def release_pages(tensor: torch.Tensor) -> None:
    """Give the memory pages that lie wholly inside `tensor` back to the OS (Linux `madvise(MADV_DONTNEED)`).

    For a tensor over `open_tensors`' copy-on-write map this drops the pages from the process: its resident size
    falls, and a later read would fetch the file's bytes again (any in-place change is lost, so call it only on a
    tensor that is no longer needed, e.g. a weight that has just been quantized). Pages shared with a neighbouring
    tensor are kept. A no-op elsewhere than on Linux, and for anything not page-aligned enough to matter.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`). Quantizing a model frees hundreds of temporary
    blocks of a few MB, and glibc keeps such memory for reuse, holding the resident size about 1 GB above what the
    model needs. A no-op elsewhere than on Linux with glibc."""
    if sys.platform.startswith("linux"):
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim(0)


_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc
