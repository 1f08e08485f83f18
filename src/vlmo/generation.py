"""Generation options and their checks; the loop that uses them is `vlmo.engine.scheduler`.

`GenerateOptions` are the keyword options of every generating call, checked by `SamplingConfig.from_options`
(an unknown keyword is a TypeError naming the nearest valid one, as for any Python function). Picking the next
token with them is `vlmo.engine.sampling`'s job (top-k → temperature → top-p, from a seedable `torch.Generator`).

This module imports no torch, so that options can be checked where no model runs (the CLI before it talks to a
server, a request before it waits): every check here is plain Python.

Limits (docs/reliability.md): `check_token_budget` is the one token-budget rule, that the prompt and the new tokens
fit the model's context; `check_seed` the one seed rule, that a seed fits torch's 64-bit generator.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import SupportsIndex, TypedDict, TypeVar

from vlmo.errors import GenerationConfigError, InputError


class GenerateOptions(TypedDict, total=False):
    """The keyword options every generating call accepts (`VLMo.generate`, the task methods, `stream`).

    A missing `max_new_tokens` means the task's default (`vlmo.tasks`); either must fit the model's context with
    the prompt (`check_token_budget`). `seed` (0 to 2**64 - 1) makes sampling reproducible; row i of a batch
    samples as it would alone with seed + i. `stop`: strings that end the answer where one first appears (the
    answer excludes it; finish reason "stop").
    """

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: Sequence[str]


# The smallest sampling values the float32 sampler computes faithfully (`SamplingConfig`).
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick each next token. Greedy unless `do_sample`; the other fields apply only when sampling.

    top_k: keep the k most likely tokens (0 = all). temperature: divide logits by it (≥ `MIN_TEMPERATURE`).
    top_p: keep the smallest set of most likely tokens whose probabilities add up to at least top_p
    (`MIN_TOP_P` ≤ p ≤ 1). The lower bounds are what the float32 sampler can compute: below them every sample is the
    greedy token anyway, and values such as 1e-39 would overflow into inf/NaN probabilities.
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
        if self.temperature < MIN_TEMPERATURE:
            raise GenerationConfigError(
                f"temperature must be at least {MIN_TEMPERATURE:g}, got {self.temperature:g}; for deterministic "
                "output turn sampling off"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationConfigError(f"top_k must be an integer ≥ 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise GenerationConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_p < MIN_TOP_P:
            raise GenerationConfigError(
                f"top_p must be at least {MIN_TOP_P:g}, got {self.top_p:g}; for the most likely token alone turn "
                "sampling off"
            )

    @classmethod
    def from_options(cls, options: GenerateOptions, default_max_new_tokens: int) -> SamplingConfig:
        """The validated config for `options`, with the task's default length where none is given.

        The seed and stop strings are checked here too (`check_seed`, `check_stop`), and the keywords themselves
        (`check_option_names`), so that every option fails before any work.
        """
        check_option_names(options)
        check_seed(options.get("seed"))
        check_stop(options.get("stop", ()))
        return cls(
            max_new_tokens=options.get("max_new_tokens", default_max_new_tokens),
            do_sample=options.get("do_sample", False),
            temperature=options.get("temperature", 1.0),
            top_k=options.get("top_k", 0),
            top_p=options.get("top_p", 1.0),
        )


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def check_seed(seed: object) -> int | None:
    """`seed` as an int, or None; GenerationConfigError unless it is a whole number from 0 to 2**64 - 1."""
    if seed is None:
        return None
    value = None
    if not isinstance(seed, bool) and isinstance(seed, SupportsIndex):
        try:
            value = operator.index(seed)  # ints (numpy's too), not floats or text
        except TypeError:
            pass
    if value is None or not 0 <= value <= SEED_MAX:
        shown = repr(seed) if len(repr(seed)) <= 40 else repr(seed)[:37] + "..."
        raise GenerationConfigError(f"seed must be a whole number from 0 to 2**64 - 1 ({SEED_MAX}), got {shown}")
    return value


def check_option_names(options: object) -> None:
    """TypeError for a keyword that is not a generation option, naming the nearest one (`max_new_token` →
    `max_new_tokens`): a misspelled option must not be silently ignored."""
    if not isinstance(options, dict):
        raise InputError(f"options must be a dict of generation options, got {type(options).__name__}")
    known = GenerateOptions.__annotations__
    for name in options:
        if name not in known:
            near = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the options are {', '.join(known)}"
            raise TypeError(f"unexpected keyword argument {name!r}{hint}")


def check_stop(stop: object) -> tuple[str, ...]:
    """Stop strings as a tuple: a string or a list of non-empty strings (at most 16, each at most 256 characters)."""
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) and s for s in items):
        raise GenerationConfigError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    if len(items) > 16 or any(len(s) > 256 for s in items):
        raise GenerationConfigError("stop takes at most 16 strings of at most 256 characters each")
    return tuple(items)


def check_token_budget(prompt_length: int, max_new_tokens: int, context: int) -> None:
    """The token budget, one rule for every generating call: prompt + max_new_tokens ≤ the model's context.

    `prompt_length`: positions of the (padded) prompt, image tokens included; `context`: the text config's
    `max_position_embeddings`. A request beyond it is **refused, never clamped** (a silently shortened answer would
    look like a finished one): InputError when the prompt alone leaves no room, GenerationConfigError naming the
    largest max_new_tokens that fits otherwise. Checked before anything is allocated.
    """
    if prompt_length >= context:
        raise InputError(
            f"the prompt takes {prompt_length} of the model's {context} positions, leaving none to generate; "
            "shorten the question or prompt"
        )
    if prompt_length + max_new_tokens > context:
        raise GenerationConfigError(
            f"the prompt takes {prompt_length} of the model's {context} positions; "
            f"max_new_tokens may be at most {context - prompt_length}"
        )


R = TypeVar("R")


def drain(steps: Generator[None, None, R]) -> R:
    """Run a stepwise generator (`VLMo.detect_steps`, the app's handlers, …) to its end; its return value.

    A stepwise generator yields None after every generated token so that its caller can stop it midway (by closing
    it); a caller that wants only the result drains it."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value
