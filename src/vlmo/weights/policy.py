"""Loading policy for inference: which weight format a device and dtype get, and loading a model in it.

`weights.loader.load_model` loads a checkpoint as stored or cast to one dtype. For inference vlmo may hold the
weights in another form, chosen here:

- CPU + `quantize="int8"` (the CPU default): the vision tower's and decoder's linear layers and the head as int8,
  quantized while loading, each float weight's mapped pages released as soon as it is packed, so the float weights
  are never all in memory (`vlmo.nn.quant`).
- CPU + bfloat16: linear weights held in float16 (`nn.quant.hold_float16`: fp16 GEMV streams about twice as fast).
- Otherwise the weights in the requested dtype.

An adapter is merged into the float weights before any of that, so inference runs at the base model's speed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from vlmo.config import PaliGemmaConfig
from vlmo.errors import InputError, OptionError
from vlmo.fileio.jsonfile import read_json
from vlmo.nn.paligemma import PaliGemma
from vlmo.processing import ImageProcessorConfig, TextProcessor
from vlmo.weights.devices import DTypeName
from vlmo.weights.files import PREPROCESSOR_FILE, TOKENIZER_FILE
from vlmo.weights.loader import load_model

QuantMode = Literal["int8"]


def cpu_int8_available() -> bool:
    """Whether this PyTorch build has the int8 kernels (fbgemm, x86 CPUs) that `quantize="int8"` runs on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def choose_quantization(quantize: str | None, dtype: DTypeName | torch.dtype, device: torch.device) -> QuantMode | None:
    """None (weights stay float) or "int8", after checking that the mode fits the device and dtype.

    "auto" is int8 on a CPU with int8 kernels when `dtype` is "auto" too: the mode that answers fastest in a quarter
    of float32's memory (docs/benchmarks.md). An explicit dtype keeps float weights.
    """
    if quantize in (None, "none"):
        return None
    if quantize == "auto":
        return "int8" if device.type == "cpu" and cpu_int8_available() and dtype == "auto" else None
    if quantize != "int8":
        raise OptionError(f"unknown quantize mode {quantize!r}; use auto, int8 or none")
    if device.type != "cpu":
        raise OptionError(
            f"{{quantize}} runs on the CPU only, not {device.type}; use 16-bit weights there", quantize=quantize
        )
    if dtype not in ("auto", "float32", torch.float32):
        raise OptionError(
            "{quantize} computes in float32; drop {dtype}",
            quantize=quantize,
            dtype=str(dtype).removeprefix("torch."),
        )
    if not cpu_int8_available():
        raise OptionError(
            "{quantize} needs PyTorch's fbgemm kernels (x86 CPUs); use {dtype} here",
            quantize=quantize,
            dtype="bfloat16",
        )
    return "int8"


def load_for_inference(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantize: QuantMode | None,
    adapter: str | os.PathLike[str] | None = None,
    adapter_revision: str | None = None,
    token: str | bool | None = None,
    cache: bool = True,
    source: str | None = None,
) -> PaliGemma:
    """The checkpoint in `path` on `device`, with `adapter` merged, in the weight format the policy chooses.

    `dtype` is the compute dtype (float32 for int8); `quantize` comes from `choose_quantization`. `cache`: the
    modes that transform the weights (int8; float16-held when the checkpoint is not float16 already) read them
    from the prepared-weights cache, writing it on the first load (`weights/prepared.py`); `source` names the
    model in the cache's listing (default: `path`).
    """
    # bfloat16 on a CPU holds its linear weights in float16 (nn/quant.py, Float16Linear: faster decode).
    half_weights = quantize is None and device.type == "cpu" and dtype == torch.bfloat16
    # Quantizing starts from the stored (mmapped) weights: casting first would put a float copy in memory.
    load_dtype = None if quantize else torch.float16 if half_weights else dtype
    adapter_dir = None
    if adapter is not None:
        from vlmo.weights.adapters import resolve_adapter

        adapter_dir = resolve_adapter(adapter, revision=adapter_revision, token=token)

    def base() -> PaliGemma:
        net = load_model(path, dtype=load_dtype, device=device)
        if adapter_dir is not None:
            from vlmo.nn.lora import remove_lora
            from vlmo.weights.adapters import load_adapter

            load_adapter(net, adapter_dir)
            remove_lora(net, merge=True)
        return net

    def finish(net: PaliGemma) -> PaliGemma:
        if quantize == "int8":
            _quantize_int8(net, mapped_embedding=adapter_dir is None)
        elif half_weights:
            from vlmo.nn.quant import hold_float16

            hold_float16(net, torch.bfloat16)
        return net

    mode: Literal["int8", "float16"] | None = "int8" if quantize == "int8" else "float16" if half_weights else None
    if cache and mode is not None and (mode == "int8" or adapter_dir is not None or not _stored_float16(path)):
        from vlmo.weights.prepared import load_cached

        return load_cached(
            path, mode, adapter_dir=adapter_dir, source=source or str(path.resolve()), base=base, finish=finish
        )
    return finish(base())


def _stored_float16(path: Path) -> bool:
    """Whether every floating-point tensor of the checkpoint is stored in float16 (from the headers alone)."""
    from vlmo.weights.loader import weight_files
    from vlmo.weights.safetensors_io import read_header

    dtypes = {info["dtype"] for file in weight_files(path) for info in read_header(file).values()}
    return not dtypes & {"F32", "F64", "BF16"}


def load_processors(path: Path, cfg: PaliGemmaConfig) -> tuple[TextProcessor, ImageProcessorConfig]:
    """The checkpoint's tokenizer and image settings (defaults where `preprocessor_config.json` is absent), checked
    against its config."""
    pre = path / PREPROCESSOR_FILE
    image_config = ImageProcessorConfig.from_hf(read_json(pre) if pre.is_file() else None, cfg.vision.image_size)
    text = TextProcessor.from_file(path / TOKENIZER_FILE, cfg.num_image_tokens)
    if text.image_id != cfg.image_token_id:
        raise InputError(
            f"{TOKENIZER_FILE} puts <image> at id {text.image_id} but config.json says image_token_index "
            f"{cfg.image_token_id}; the two files come from different models"
        )
    return text, image_config


def _quantize_int8(net: PaliGemma, mapped_embedding: bool) -> None:
    """Quantize in place, handing each float weight's mapped pages back to the OS as soon as it is packed."""
    from vlmo.nn.quant import quantize_int8
    from vlmo.weights.safetensors_io import release_pages, trim_heap

    released = [0]

    def release(weight: torch.Tensor) -> None:
        release_pages(weight)
        released[0] += weight.nbytes
        if released[0] > 256 * 2**20:  # now and then, not per chunk: a trim walks the whole heap
            trim_heap()
            released[0] = 0

    # Without an adapter the embedding is the checkpoint's own mapped table: read it in place.
    quantize_int8(net, release=release, mapped_embedding=mapped_embedding)
    trim_heap()
