"""Which int8 linear kernel should CPU int8 mode use? Time per call of each candidate at PaliGemma-3B's decoder
shapes, for decode (a few rows) and prefill (hundreds of rows), plus what each costs to prepare at load time.

    python benchmarks/int8_kernels.py            # prints a JSON object; docs/benchmarks.md has the results

Candidates (weights int8 with one scale per output row in every case):
- fbgemm: `torch.ops.quantized.linear_dynamic` over a prepacked weight (vlmo's int8 mode before the cache);
  activations quantized with one scale per call, so a row's result depends on the other rows of its batch.
- int8pack: `torch.ops.aten._weight_int8pack_mm`, weight-only int8 (activations stay float32): plain tensors,
  nothing to pack, and rows independent by construction.
- int_mm: activations quantized per row, `torch._int_mm` (int8 × int8 → int32), then both scales applied.
- float32: `F.linear` on the dequantized weight, the reference.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

# PaliGemma-3B's decoder (Gemma 2B): (out_features, in_features) of q, k/v, o, gate/up, down.
SHAPES = [(2048, 2048), (256, 2048), (2048, 2048), (16384, 2048), (2048, 16384)]
ROWS = (1, 4, 8, 256)


def per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def candidates(q: torch.Tensor, scale: torch.Tensor) -> dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]]]:
    """name → (seconds to prepare at load, the linear function)."""
    out: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]]] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    out["fbgemm"] = (time.perf_counter() - t0, lambda x: torch.ops.quantized.linear_dynamic(x, packed, True))
    out["int8pack"] = (0.0, lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale))
    qt = q.t()

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        xq = (x / s).round_().to(torch.int8)
        if xq.shape[0] <= 16:  # _int_mm wants more than 16 rows: pad
            xq = F.pad(xq, (0, 0, 0, 17 - xq.shape[0]))
        return torch._int_mm(xq, qt)[: x.shape[0]].float() * s * scale

    out["int_mm"] = (0.0, int_mm)
    w = q.float() * scale[:, None]
    out["float32"] = (0.0, lambda x: F.linear(x, w))
    return out


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    for rows in ROWS:
        total: dict[str, float] = {}
        prepare: dict[str, float] = {}
        for n, k in SHAPES:
            q, scale = per_row(torch.randn(n, k) * 0.02)
            x = torch.randn(rows, k)
            for name, (prep, fn) in candidates(q, scale).items():
                total[name] = total.get(name, 0.0) + timed(lambda fn=fn, x=x: fn(x), 20 if rows < 64 else 5)
                prepare[name] = prepare.get(name, 0.0) + prep
        results[f"rows={rows} ms per layer"] = {name: round(t * 1e3, 3) for name, t in total.items()}
        results["prepare ms per layer"] = {name: round(t * 1e3, 1) for name, t in prepare.items()}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **results}, indent=1))


if __name__ == "__main__":
    main()
