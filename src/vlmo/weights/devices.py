"""Device and dtype choice: what "auto" means on each kind of machine, and clear errors for what is missing."""

from __future__ import annotations

from typing import Literal

import torch

from vlmo.errors import DeviceError, InputError

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" picks cuda, then mps, then cpu. A named device that this machine lacks is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index is not None and dev.index >= torch.cuda.device_count())
    ):
        raise DeviceError(
            f"device {device!r} is not available here (no such CUDA GPU); use {{device}} or auto", device="cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            f"device {device!r} is not available here (no Apple MPS); use {{device}} or auto", device="cpu"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: DTypeName | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto": float32 on CPU (CPUs without native bf16 run bf16 matmuls several times slower), bfloat16 on CUDA
    (float16 where the GPU lacks bf16), float16 on MPS."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]
