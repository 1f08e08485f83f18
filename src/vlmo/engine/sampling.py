"""Picking the next token, per row: the engine's part of sampling.

The options themselves (`SamplingConfig`, seeds, stop strings) are checked in `vlmo.generation`, which imports no
torch so that a client can check them without it; what needs torch, applying them to a row's logits and seeding a
row's generator, is here, next to the loop that calls it (`vlmo.engine.scheduler`, once per row per step).

Sampling order is top-k → temperature → top-p, from an explicit, seedable `torch.Generator` (or torch's global RNG
when a request gives no seed).
"""

from __future__ import annotations

import math

import torch

from vlmo.generation import SamplingConfig, check_seed


def select_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits: dt[B, V] → next token ids int64[B]."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    # Shift the best score to 0 before dividing, so a small temperature makes the others -inf, never the best inf.
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        drop[:, 0] = False
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded for reproducible sampling (`check_seed`), or None to use torch's global RNG."""
    value = check_seed(seed)
    if value is None:
        return None
    return torch.Generator(device=device).manual_seed(value)


__all__ = ["make_generator", "select_next"]
