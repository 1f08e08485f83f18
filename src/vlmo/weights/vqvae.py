"""Weights of PaliGemma's VQ-VAE mask model ("vae-oid"): read the published .npz, convert once, load strictly.

Weights: `load_mask_decoder()` uses a local `vae-oid.npz` (the published NumPy archive of PyTorch-named
float32 arrays) or `.safetensors`, or, with no path, `vae-oid.safetensors` in vlmo's cache (`VLMO_CACHE`,
else the platform cache dir), which it makes once from `vae-oid.npz` downloaded from the Hugging Face Space
`big-vision/paligemma-hf` (huggingface_hub settings such as HF_HUB_OFFLINE and HF_ENDPOINT apply). The .npz
is parsed here (a zip of .npy files); nothing is ever unpickled.
"""

from __future__ import annotations

import ast
import errno
import functools
import logging
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import TypeVar

import httpx2
import platformdirs
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file
from torch import nn

from vlmo.errors import CheckpointError, braced
from vlmo.fileio.atomic import OutputError, atomic_path
from vlmo.nn.vqvae import VQVAEDecoder, VQVAEEncoder
from vlmo.progress import ProgressBars
from vlmo.weights.hub import (
    DiskFullError,
    DownloadError,
    GatedModelError,
    ModelNotFoundError,
    OfflineError,
    hub_requests,
    want_progress,
)
from vlmo.weights.loader import few_names
from vlmo.weights.safetensors_io import open_tensors

logger = logging.getLogger(__name__)

# a Space (model-notes §9.3); big_vision reads gs://big_vision/paligemma/vae-oid.npz
VAE_REPO = "big-vision/paligemma-hf"
VAE_FILENAME = "vae-oid.npz"
CONVERTED = "vae-oid.safetensors"

PathArg = str | os.PathLike[str]

M = TypeVar("M", VQVAEDecoder, VQVAEEncoder)


def mask_cache_dir() -> Path:
    """Where the converted `vae-oid.safetensors` lives: VLMO_CACHE, else the platform's user cache for vlmo."""
    return Path(os.environ.get("VLMO_CACHE") or platformdirs.user_cache_dir("vlmo")).expanduser()


def load_mask_decoder(
    path_or_none: PathArg | None = None, *, cache_dir: PathArg | None = None, device: str | torch.device = "cpu"
) -> VQVAEDecoder:
    """The vae-oid mask decoder in float32, in eval mode, without gradients.

    path_or_none: a local `vae-oid.npz` or converted `.safetensors`; None: the cached conversion, made from a
        download on first use (module docstring).
    cache_dir: folder of the converted file (default `mask_cache_dir()`); the .npz itself goes to the
        Hugging Face cache.

    Raises CheckpointError (unreadable file; missing, unexpected or mis-shaped tensors, all named),
    OfflineError, DownloadError, ModelNotFoundError, GatedModelError, DiskFullError.
    """
    return _build(VQVAEDecoder, *_vae_tensors(path_or_none, cache_dir), device)


def load_mask_encoder(
    path_or_none: PathArg | None = None, *, cache_dir: PathArg | None = None, device: str | torch.device = "cpu"
) -> VQVAEEncoder:
    """The vae-oid mask encoder (masks → codes), from the same sources as `load_mask_decoder`."""
    return _build(VQVAEEncoder, *_vae_tensors(path_or_none, cache_dir), device)


def _build(cls: type[M], tensors: dict[str, torch.Tensor], source: str, device: str | torch.device) -> M:
    with torch.device("meta"):
        model = cls()
    names = list(model.state_dict())
    missing = [n for n in names if n not in tensors]
    if missing:
        part = "encoder" if cls is VQVAEEncoder else "decoder"
        raise CheckpointError(
            f"{source} has no {part} weights ({few_names(missing)} missing): use the full vae-oid.npz"
        )
    model.load_state_dict({n: tensors[n] for n in names}, strict=True, assign=True)
    return model.to(device).requires_grad_(False).eval()


def _vae_tensors(path: PathArg | None, cache_dir: PathArg | None) -> tuple[dict[str, torch.Tensor], str]:
    """Validated float32 tensors (codebook, decoder, maybe encoder) and a description of where they came from."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise CheckpointError(f"no such file: {file} (pass vae-oid.npz or its converted .safetensors)")
        if file.suffix == ".npz":
            return _validated(read_npz(file), str(file)), str(file)
        if file.suffix == ".safetensors":
            return _validated(open_tensors(file), str(file)), str(file)
        raise CheckpointError(f"{file} is neither .npz nor .safetensors: pass vae-oid.npz or its converted form")
    converted = Path(cache_dir).expanduser() if cache_dir is not None else mask_cache_dir()
    converted = converted / CONVERTED
    if converted.is_file():
        try:
            return _validated(open_tensors(converted), str(converted)), str(converted)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (delete {converted} to convert it again)") from e
    npz = _download_vae()
    tensors = _validated(read_npz(npz), str(npz))
    _save_converted(tensors, converted)
    return tensors, str(npz)


def _save_converted(tensors: dict[str, torch.Tensor], target: Path) -> None:
    """Write atomically (vlmo.fileio.atomic: temp file, fsync, rename), so a crash never leaves a half file that looks
    converted."""
    try:
        with atomic_path(target, make_parents=True) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "source": f"{VAE_REPO} (space) {VAE_FILENAME}"})
    except (OSError, OutputError) as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left to write {target}: free some space or set VLMO_CACHE") from e
        logger.warning("could not cache the converted mask decoder at %s (%s); it will be converted again", target, e)
        return
    logger.info("converted %s to %s", VAE_FILENAME, target)


# Key checks. The names and shapes are the modules' own; the .npz may also hold the EMA state of AiT's
# quantizer (training-only) and the encoder, which the decoder does not need.
def _shapes(cls: type[nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in cls().state_dict().items()}


@functools.cache
def _expected() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The decoder's and the encoder's tensor shapes, worked out on first use: building the modules (even on the
    meta device) makes torch import sympy, over half a second that `import vlmo` should not pay."""
    return _shapes(VQVAEDecoder), _shapes(VQVAEEncoder)


_IGNORED = ("_vq_vae._ema_cluster_size", "_vq_vae._ema_w")


def _validated(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    decoder, encoder = _expected()
    known = {**decoder, **encoder}
    unexpected = sorted(k for k in tensors if k not in known and k not in _IGNORED)
    missing = [k for k in decoder if k not in tensors]
    encoder_only = [k for k in encoder if k not in decoder]
    if any(k in tensors for k in encoder_only):  # the encoder is optional, but then complete
        missing += [k for k in encoder_only if k not in tensors]
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (expected {known[k]})"
        for k in known
        if k in tensors and tuple(tensors[k].shape) != known[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {few_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {few_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {few_names(wrong)}")
    if problems:
        raise CheckpointError(f"{source} is not the vae-oid mask VQ-VAE: {'; '.join(problems)}")
    not_float = sorted(k for k in tensors if k in known and not tensors[k].is_floating_point())
    if not_float:
        raise CheckpointError(
            f"{source}: {few_names(not_float)} must be floating point, got {tensors[not_float[0]].dtype}"
        )
    return {k: tensors[k].to(torch.float32).contiguous() for k in known if k in tensors}


# The .npz reader: a zip of `<name>.npy` members; each .npy is the magic b"\x93NUMPY", a version (major,
# minor), a header length (2 bytes for 1.x, 4 for 2.x/3.x, little-endian), a Python dict literal
# {'descr', 'fortran_order', 'shape'} and the raw C-order data (numpy's `format.py`, NEP 1).
_NPY_MAGIC = b"\x93NUMPY"
_NPY_DTYPES = {"<f4": torch.float32, "<f2": torch.float16}


def read_npz(path: PathArg) -> dict[str, torch.Tensor]:
    """Every array of a .npz as a CPU tensor; little-endian float32/float16 in C order only, never unpickled.

    Raises CheckpointError on a file that is not a zip of .npy files, an unsupported or object (pickled)
    dtype, or a truncated member.
    """
    file = Path(path)
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{file} is not a readable .npz archive ({e}); download it again") from None
    tensors: dict[str, torch.Tensor] = {}
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{file} holds {info.filename!r}, not a .npy array: is it a NumPy .npz?")
            try:
                raw = archive.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise CheckpointError(f"{file}: member {info.filename!r} is corrupt ({e}); download it again") from None
            tensors[info.filename[: -len(".npy")]] = _parse_npy(raw, f"{file}:{info.filename}")
    return tensors


def _parse_npy(raw: bytes, where: str) -> torch.Tensor:
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        raise CheckpointError(f"{where} is not a .npy array")
    major = raw[6]
    if major not in (1, 2, 3):
        raise CheckpointError(f"{where} has .npy format version {major}, which vlmo cannot read")
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    end = start + int.from_bytes(raw[8:start], "little")
    try:
        header = ast.literal_eval(raw[start:end].decode("utf-8" if major == 3 else "latin-1"))  # literals only
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        header = None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= header.keys():
        raise CheckpointError(f"{where} has an unreadable .npy header")
    descr, shape = header["descr"], header["shape"]
    if not isinstance(descr, str) or descr not in _NPY_DTYPES:
        if isinstance(descr, str) and descr.endswith("O"):
            raise CheckpointError(f"{where} holds Python objects, which only unpickling could read; vlmo refuses it")
        raise CheckpointError(f"{where} has dtype {descr!r}; vlmo reads little-endian float32/float16 ('<f4', '<f2')")
    if header["fortran_order"] is not False:
        raise CheckpointError(f"{where} is stored in Fortran order; save it in C order")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has an invalid shape {shape!r}")
    dtype = _NPY_DTYPES[descr]
    data = raw[end:]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise CheckpointError(
            f"{where} has {len(data)} data bytes for shape {shape} (expected {expected}); download again"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def _download_vae() -> Path:
    """`vae-oid.npz` from the Space, via the Hugging Face cache (found there offline once downloaded)."""
    where = f"{VAE_FILENAME} from the Space {VAE_REPO}"
    # `{mask_decoder}`: each face names its own option (`mask_decoder="vae-oid.npz"`, `--mask-decoder vae-oid.npz`).
    local = "or get vae-oid.npz and pass {mask_decoder}"
    unreachable = f"could not reach {braced(constants.ENDPOINT)} for {where}: check your connection, {local}"
    named = {"mask_decoder": VAE_FILENAME}
    try:
        # Timeouts and quiet retries, and a bar on a terminal, as for models.
        with hub_requests() as timeouts, ProgressBars(unit="bytes", enabled=want_progress(None)) as bars:
            path = hf_hub_download(
                repo_id=VAE_REPO,
                filename=VAE_FILENAME,
                repo_type="space",
                etag_timeout=timeouts.metadata,
                tqdm_class=bars.tqdm_class(VAE_FILENAME),
            )
        return Path(path)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        if constants.is_offline_mode():
            raise OfflineError(
                f"{where} is not in the cache and HF_HUB_OFFLINE is set: run once online to cache it, {local}", **named
            ) from e
        raise DownloadError(unreachable, **named) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as e:
        raise ModelNotFoundError(
            f"{where} was not found on {braced(constants.ENDPOINT)}: get vae-oid.npz elsewhere (big_vision: "
            "gs://big_vision/paligemma/vae-oid.npz) and pass {mask_decoder}",
            **named,
        ) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status == 404:
            endpoint = braced(constants.ENDPOINT)
            raise ModelNotFoundError(f"{where} was not found (HTTP 404) on {endpoint}: {local}", **named) from e
        if status in (401, 403):
            raise GatedModelError(f"the hub refused {where} (HTTP {status}): check your token (HF_TOKEN)") from e
        raise DownloadError(f"the hub answered HTTP {status} for {where}: wait, then run it again") from e
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:  # no answer within hub_timeouts(), retries included
        raise DownloadError(unreachable, **named) from e
    except httpx2.TransportError as e:
        raise DownloadError(f"the connection dropped while fetching {where}: run it again to resume") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left in the Hugging Face cache for {where}: free some space") from e
        raise
