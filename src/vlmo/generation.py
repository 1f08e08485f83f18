"""Token generation: prefill once, then decode one token at a time over the preallocated cache.

This module knows nothing about text: it takes token-id tensors and yields token ids. `api.py` builds strings on top.
Sampling order is top-k → temperature → top-p, from an explicit, seedable `torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from vlmo.errors import GenerationConfigError
from vlmo.nn.paligemma import PaliGemma


class GenerateOptions(TypedDict, total=False):
    """The keyword options every generating call accepts (`VLMo.generate`, the task methods, `stream`).

    A missing `max_new_tokens` means the task's default (`vlmo.tasks`); `seed` makes sampling reproducible.
    """

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick each next token. Greedy unless `do_sample`; the other fields apply only when sampling.

    top_k: keep the k most likely tokens (0 = all). temperature: divide logits by it (> 0).
    top_p: keep the smallest set of most likely tokens whose probabilities add up to at least top_p (0 < p ≤ 1).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise GenerationConfigError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise GenerationConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise GenerationConfigError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature <= 0:
            raise GenerationConfigError(
                f"temperature must be > 0, got {self.temperature}; for deterministic output turn sampling off"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationConfigError(f"top_k must be an integer ≥ 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise GenerationConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @classmethod
    def from_options(cls, options: GenerateOptions, default_max_new_tokens: int) -> SamplingConfig:
        """The validated config for `options`, with the task's default length where none is given."""
        return cls(
            max_new_tokens=options.get("max_new_tokens", default_max_new_tokens),
            do_sample=options.get("do_sample", False),
            temperature=options.get("temperature", 1.0),
            top_k=options.get("top_k", 0),
            top_p=options.get("top_p", 1.0),
        )


def select_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits: dt[B, V] → next token ids int64[B]."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    scores = scores / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded for reproducible sampling, or None to use torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.inference_mode()
def generate_steps(
    model: PaliGemma,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_features: torch.Tensor,
    cfg: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield, step by step, every row's next token int64[B] and whether it continues the row's text, bool[B].

    input_ids/attention_mask: int64[B, T], left-padded prompts; image_features: dt[B, N, D] from
    `model.encode_images` (computed once by the caller, so one image can serve several prompts). A row's
    end-of-sequence token is yielded with `live` False, and so is every step after it, whose token is `pad_id`.
    The loop stops when every row is done or after `cfg.max_new_tokens` steps. So a row ended with `<eos>` exactly
    when its last `live` is False, and was cut short by `max_new_tokens` otherwise: this is the one place that
    tracks finished rows.
    """
    b, t = input_ids.shape
    cache = model.new_cache(b, t + cfg.max_new_tokens)
    logits, state = model.prefill(input_ids, image_features, attention_mask, cache)
    eos = torch.tensor(list(eos_ids), device=input_ids.device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for step in range(cfg.max_new_tokens):
        token = select_next(logits, cfg, generator).masked_fill(done, pad_id)
        done = done | torch.isin(token, eos)
        yield token, ~done
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            return
        logits = model.decode(token, state)
