"""int8 weights for the CPU: `quantize="int8"` (docs/benchmarks.md has the measurements behind every choice here).

What is quantized, and why:
- **Every linear layer of the vision tower and the decoder** (SigLIP q/k/v/o/fc1/fc2, Gemma q/k/v/o/gate/up/down)
  and **the output head**: weights int8 with one scale per output row (symmetric, absmax/127); inputs quantized on
  the fly by fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`; 8-bit on CPUs with VNNI, 7-bit
  elsewhere, see `REDUCE_RANGE`), each row over its own range (`Int8Linear`), so that a row's result never depends
  on the other rows of its batch. These layers hold > 99 % of the bytes and the FLOPs. Decode
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
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from vlmo.nn.paligemma import PaliGemma


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
_CHUNK_ELEMENTS = 1 << 22  # quantize big matrices 4 M elements (16 MB in fp32) at a time


def _quantize_rows(
    weight: torch.Tensor, release: Callable[[torch.Tensor], None] = lambda t: None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float[N, K] (any float dtype, may be mmapped) → (int8[N, K], float32[N]) with w ≈ q · scale[:, None].

    Symmetric per-row absmax: scale = max|w_row| / 127 (rows of zeros get scale 1). Works through the rows in
    chunks so that converting a bf16 or mmapped table to fp32 never needs a full-size temporary, and hands each
    chunk of `weight` to `release` once it is done (so a 2 GB mmapped embedding is never resident all at once)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for i in range(0, n, step):
        w = weight[i : i + step].float()  # may be the (mmapped) weight itself: never written to
        s = w.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[i : i + step] = (w / s[:, None]).round_().clamp_(-127, 127)
        scale[i : i + step] = s
        release(weight[i : i + step])
    return q, scale


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """fbgemm's packed form of a per-row int8 weight (its own copy: q may be freed afterwards)."""
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 flags quantized tensors as deprecated; the kernels remain
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: float[..., K] → (x' float32[M, K], lo float32[M, 1], span float32[M, 1]), M rows of K, with
    x ≈ lo + span · x': each row mapped onto [0, 1] by its own min (lo) and max − min (span), both ends hit exactly;
    a constant row (zeros included) becomes zeros, with span 1 (see `Int8Linear`).

    Exactness: x' = (x − lo) / span. For x = max the subtraction is the very operation that gave span, so x' = 1
    exactly; x = lo gives 0; and rounding is monotonic, so no element lands outside [0, 1]."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    lo, hi = torch.aminmax(x2, dim=1, keepdim=True)
    span = hi - lo
    span.masked_fill_(span == 0, 1.0)  # a constant row: x − lo is exactly 0 everywhere
    rows = torch.empty(x2.shape[0], k, dtype=torch.float32)  # one buffer, written in place: no copy, no cat
    torch.sub(x2, lo, out=rows)
    return rows.div_(span), lo, span


class Int8Linear(nn.Module):
    """y = x · (q · scale)ᵀ + b with fbgemm's dynamic int8 GEMM. x: float32[..., K] → float32[..., N]. CPU only.

    Every row of x is quantized over its own range, so that a row's result is the same, bit for bit, alone or in any
    batch. fbgemm's dynamic mode takes one quantization range per call (the min and max of the whole input), which
    would let one bright image or one outlier token coarsen the rounding of every other row. So each row is mapped
    onto exactly [0, 1] first (`normalize_rows`: x ≈ lo + span · x', its own min to 0 and max to 1, exactly), which
    makes the range fbgemm sees [0, 1] in every call: its quantization parameters never change, and each row is
    rounded on its own. Then y = span · (x' · Wᵀ) + lo · Σ_k W[:, k] + b, in float (the bias is added here, not in
    the packed op, since it must not be scaled). A row's own min..max is never wider than the whole call's, so
    int8's error stays the same or shrinks (docs/benchmarks.md: "int8 and bfloat16 rows independent of their
    batch")."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self._packed = _pack(q, scale, None)
        # Σ_k of each dequantized weight row (float64 sum, exact for int8), times each input row's lo in forward
        self._row_sums = (q.sum(dim=1, dtype=torch.float64) * scale.double()).float()
        self._bias = None if bias is None else bias.detach().float().clone()

    @classmethod
    def from_float(cls, linear: nn.Linear, release: Callable[[torch.Tensor], None] = lambda t: None) -> Int8Linear:
        q, scale = _quantize_rows(linear.weight.detach(), release)
        return cls(q, scale, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_rows(*normalize_rows(x))
        return y.view(*x.shape[:-1], self.out_features)

    def apply_rows(self, rows: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """`normalize_rows`' output → float32[M, N]."""
        y = torch.ops.quantized.linear_dynamic(rows, self._packed, REDUCE_RANGE)
        y.mul_(span).addcmul_(lo, self._row_sums)
        return y if self._bias is None else y.add_(self._bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, inputs per row"


class Int8Head(nn.Module):
    """The output head as row blocks of `Int8Linear` (logits = their outputs side by side): packing a 257216-row
    matrix at once needs several temporary copies of it, a block needs a few MB. x: float32[..., D] → [..., V]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, block: int = 16384) -> None:
        super().__init__()
        starts = range(0, q.shape[0], block)
        self.blocks = nn.ModuleList(_packed((q[i : i + block], scale[i : i + block], None) for i in starts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = normalize_rows(x)  # once for all blocks
        y = torch.cat([b.apply_rows(*rows) for b in self.blocks if isinstance(b, Int8Linear)], dim=-1)
        return y.view(*x.shape[:-1], y.shape[-1])


Job = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _packed(jobs: Iterable[Job], after: Callable[[Job], None] = lambda job: None) -> list[Int8Linear]:
    """`Int8Linear(q, scale, bias)` for each job, in order, packing on one thread per core: fbgemm's packing is
    single-threaded and most of a 3B model's load time (≈ 5 s per billion weights), and it releases the GIL. Jobs
    are drawn lazily, at most one per thread ahead, so only a few int8 matrices wait in memory at a time; `after(job)`
    runs as soon as a job's layer is built (e.g. to hand a mapped q's pages back to the OS: the layer holds a copy)."""
    workers = max(1, torch.get_num_threads())
    out: list[Int8Linear] = []

    def build(job: Job) -> Int8Linear:
        layer = Int8Linear(*job)
        after(job)
        return layer

    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[Int8Linear]] = deque()
        for job in jobs:
            pending.append(pool.submit(build, job))
            while len(pending) > workers:
                out.append(pending.popleft().result())
        out.extend(f.result() for f in pending)
    return out


class Int8Embedding(nn.Module):
    """An embedding table held as int8 rows with a per-row scale: ids int64[...] → float32[..., D]."""

    q: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.q).float() * F.embedding(ids, self.scale[:, None])


class MappedEmbedding(nn.Module):
    """Lookups straight from the checkpoint's mapped embedding table: ids int64[...] → float32[..., D].

    Only the rows a prompt or answer uses are ever read from the file (a few pages each), so the 2 GB float32
    table of PaliGemma-3B costs almost no memory. The table is a plain attribute, out of the reach of `.float()`."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).float()


def quantized_linears(model: PaliGemma) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, full name, layer) of every linear layer int8 mode quantizes (the vision tower's and the
    decoder's), in a fixed order: `quantize_int8` and the prepared-weights cache (`weights/prepared.py`) share it."""
    names = {id(m): n for n, m in model.named_modules()}
    return [
        (parent, name, f"{names[id(parent)]}.{name}", child)
        for stack in (model.vision.layers, model.text.layers)
        for parent in stack.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def quantize_int8(
    model: nn.Module, release: Callable[[torch.Tensor], None] = lambda t: None, mapped_embedding: bool = False
) -> nn.Module:
    """Quantize a loaded `PaliGemma` in place (see the module docstring for what and why); returns it.

    `release(t)` is called on each part of a float weight once its int8 form exists (`VLMo.from_pretrained` passes
    a function that returns mmapped pages to the OS). `mapped_embedding`: the embedding is an unmodified mapped
    checkpoint tensor, so lookups read it in place (`MappedEmbedding`) instead of an int8 copy (half a GB for
    PaliGemma); its pages are released too and come back a row at a time. Everything left in floating point is
    cast to float32. CPU only: fbgemm has no GPU kernels, and on a GPU 16-bit weights are the faster choice.
    """
    from vlmo.nn.paligemma import PaliGemma

    if not isinstance(model, PaliGemma):
        raise TypeError(f"quantize_int8 expects a PaliGemma model, not {type(model).__name__}")
    if model.device.type != "cpu":
        raise ValueError(f"int8 quantization runs on the CPU only (the model is on {model.device})")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("this PyTorch build lacks the fbgemm int8 kernels (x86 only); load without quantization")
    torch.backends.quantized.engine = "fbgemm"
    # The embedding and head first: their packing has the largest temporaries, best paid while little else is held.
    text = model.text
    table = text.embed.weight.detach()
    lm_head = text.lm_head
    tied = lm_head is None  # every PaliGemma checkpoint
    q, scale = _quantize_rows(table if lm_head is None else lm_head.get_parameter("weight").detach(), release)
    head = Int8Head(q, scale)
    if mapped_embedding:
        embed: nn.Module = MappedEmbedding(table)
    else:
        embed = Int8Embedding(q, scale) if tied else Int8Embedding(*_quantize_rows(table, release))
    # `Gemma.embed` is typed as the float model's nn.Embedding; quantization swaps in another module on purpose.
    text.embed, text.lm_head = embed, head  # type: ignore[assignment]
    del q, scale, table  # not held past here unless the int8 embedding keeps them (500 MB for PaliGemma)
    linears = quantized_linears(model)
    jobs = (
        (*_quantize_rows(child.weight.detach(), release), None if child.bias is None else child.bias.detach())
        for _, _, _, child in linears
    )
    for (parent, name, _, _), layer in zip(linears, _packed(jobs), strict=True):
        setattr(parent, name, layer)
    return model.float()


class Float16Linear(nn.Module):
    """A linear layer of a CPU bfloat16 model whose weight is held in float16 (same 2 bytes, 3 more mantissa bits).

    Why: on x86 CPUs PyTorch's float16 matrix-vector kernel streams weights about twice as fast as its bfloat16
    one (docs/benchmarks.md), and decode is one matrix-vector product per layer.

    The path depends on the positions per sequence (x's second-to-last dimension; a 2-D x counts as one position per
    row), never on the batch size, so that batching does not change a row's numbers: decode (one position per
    sequence, any number of sequences) multiplies by the float16 weight; prefill (several positions) converts the
    weight to bfloat16 for the bfloat16 GEMM, the fast one for many rows on CPUs with native bf16. Which rows share
    a call does not matter on the CPU measured (PyTorch's float16 and bfloat16 products gave each row the same bits
    alone and in batches of up to 300 rows; docs/benchmarks.md, "int8 and bfloat16 rows independent of their batch").
    x: bf16[..., K] → bf16[..., N]. A float16 row that overflows (|y| > 65504) is recomputed alone in float32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight16 = weight.to(torch.float16)  # a plain attribute: `model.to(bfloat16)` must not convert it
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-2] == 1:
            y16 = F.linear(x.to(torch.float16), self.weight16)
            y = y16.to(x.dtype)
            finite = torch.isfinite(y16).all(dim=-1)
            if not bool(finite.all()):
                # one row at a time: float32 GEMMs of several rows round differently from one row's
                flat, bad = y.view(-1, self.out_features), (~finite).reshape(-1).nonzero().flatten().tolist()
                w32, x2 = self.weight16.float(), x.reshape(-1, self.in_features)
                for i in bad:
                    flat[i] = F.linear(x2[i : i + 1].float(), w32)[0].to(x.dtype)
        else:
            y = F.linear(x, self.weight16.to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weight"


class Float16Embedding(nn.Module):
    """Rows of a float16 table, returned in `dtype` (the table is shared with the tied `Float16Linear` head)."""

    def __init__(self, weight16: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight16, self.dtype = weight16, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight16).to(self.dtype)


def hold_float16(model: PaliGemma, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Make a `PaliGemma` loaded in float16 a CPU `dtype` model whose decoder linear weights (and the tied
    embedding/head) stay float16 (`Float16Linear`); everything else, the vision tower included, is cast to `dtype`.
    In place; returns the model."""
    text = model.text
    table = text.embed.weight.detach()
    head = text.lm_head.get_parameter("weight").detach() if text.lm_head is not None else table
    # As in quantize_int8: `Gemma.embed` is typed as the float model's nn.Embedding, replaced here on purpose.
    text.embed, text.lm_head = Float16Embedding(table, dtype), Float16Linear(head, None)  # type: ignore[assignment]
    # Only the decoder: the vision tower always multiplies many rows (its patches), where bf16 weights are best.
    for stack in (model.text.layers,):
        for parent in stack.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Float16Linear(child.weight.detach(), child.bias))
    return model.to(dtype)


def holds_packed_weights(model: nn.Module) -> bool:
    """True when some weights live outside the state dict (int8 packed, float16-held, mapped embedding), so the
    model cannot be saved or trained as it is."""
    return any(isinstance(m, (Int8Linear, Float16Linear, Float16Embedding, MappedEmbedding)) for m in model.modules())


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
