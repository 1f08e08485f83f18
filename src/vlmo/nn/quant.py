"""int8 weights for the CPU: `quantize="int8"` (docs/benchmarks.md has the measurements behind every choice here).

What is quantized, and why:
- **Every linear layer of the vision tower and the decoder** (SigLIP q/k/v/o/fc1/fc2, Gemma q/k/v/o/gate/up/down)
  and **the output head**: weights int8 with one scale per output row (symmetric, absmax/127); inputs quantized on
  the fly, one scale per call (fbgemm's dynamic int8 linear, `torch.ops.quantized.linear_dynamic`; 8-bit on CPUs
  with VNNI, 7-bit elsewhere, see `REDUCE_RANGE`). These layers hold > 99 % of the bytes and the FLOPs. Decode
  reads every weight once per token, so a quarter of the fp32 bytes is up to 4× the tokens/s; prefill runs on the
  int8 GEMM, which is also faster than fp32 on AVX-512 VNNI.
- **The embedding table** (tied to the head): int8 rows with a per-row scale; a lookup dequantizes only the rows it
  reads. The head keeps its own packed copy: fbgemm's packed layout cannot be indexed by row.
- **Kept in floating point (fp32)**: the patch embedding (a convolution over raw pixels, < 0.1 % of the weights),
  position embeddings, norms, biases and the projector (2.4 M weights, and the one place image features meet the
  decoder's scale). Attention itself (QKᵀ, softmax, ·V) runs in fp32 over an fp32 KV cache.

Loading quantizes one weight at a time and hands the float pages back to the OS (`release` below), so peak memory
stays near the int8 model's size even for a float32 checkpoint: the float model is never whole in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("int8",)


def _has_vnni() -> bool:
    """True when the CPU has AVX-512 VNNI or AVX-VNNI (Linux `/proc/cpuinfo`), whose int8 dot products accumulate
    in int32 without saturating. Without it, fbgemm's u8·s8 pairs can overflow int16 unless activations use 7 bits
    (`reduce_range`), which doubles their rounding error; with it, vlmo uses all 8."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


REDUCE_RANGE = not _has_vnni()
_CHUNK_ELEMENTS = 1 << 24  # quantize big matrices 16 M elements (64 MB in fp32) at a time


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float[N, K] (any float dtype, may be mmapped) → (int8[N, K], float32[N]) with w ≈ q · scale[:, None].

    Symmetric per-row absmax: scale = max|w_row| / 127 (rows of zeros get scale 1). Works through the rows in
    chunks so that converting a bf16 or mmapped table to fp32 never needs a full-size temporary."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for i in range(0, n, step):
        w = weight[i : i + step].float()
        s = w.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[i : i + step] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[i : i + step] = s
    return q, scale


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """fbgemm's packed form of a per-row int8 weight (its own copy: q may be freed afterwards)."""
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 flags quantized tensors as deprecated; the kernels remain
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())


class Int8Linear(nn.Module):
    """y = x · (q · scale)ᵀ + b with fbgemm's dynamic int8 GEMM. x: float32[..., K] → float32[..., N]. CPU only."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self._packed = _pack(q, scale, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = _quantize_rows(linear.weight.detach())
        return cls(q, scale, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(x2, self._packed, REDUCE_RANGE)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, dynamic inputs"


class Int8Embedding(nn.Module):
    """An embedding table held as int8 rows with a per-row scale: ids int64[...] → float32[..., D]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.q).float() * F.embedding(ids, self.scale[:, None])


def quantize_int8(model: nn.Module, release: Callable[[torch.Tensor], None] = lambda t: None) -> nn.Module:
    """Quantize a loaded `PaliGemma` in place (see the module docstring for what and why); returns it.

    `release(t)` is called on each float weight once its int8 form exists (the loader passes a function that
    returns mmapped pages to the OS). Everything left in floating point is cast to float32. CPU only: fbgemm has
    no GPU kernels, and on a GPU 16-bit weights are the faster choice.
    """
    from vlmo.nn.paligemma import PaliGemma

    if not isinstance(model, PaliGemma):
        raise TypeError(f"quantize_int8 expects a PaliGemma model, not {type(model).__name__}")
    if model.device.type != "cpu":
        raise ValueError(f"int8 quantization runs on the CPU only (the model is on {model.device})")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("this PyTorch build lacks the fbgemm int8 kernels (x86 only); load without quantization")
    torch.backends.quantized.engine = "fbgemm"
    for stack in (model.vision.layers, model.text.layers):
        for parent in stack.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_float(child))
                    release(child.weight)
    text = model.text
    if text.lm_head is not None:  # an untied head of its own
        head = Int8Linear.from_float(text.lm_head)
        release(text.lm_head.weight)
        q, scale = _quantize_rows(text.embed.weight.detach())
    else:
        q, scale = _quantize_rows(text.embed.weight.detach())
        head = Int8Linear(q, scale, None)
    release(text.embed.weight)
    text.embed = Int8Embedding(q, scale)
    text.lm_head = head
    return model.float()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
