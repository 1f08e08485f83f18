"""The one decode loop: requests join, take one token a step each, and leave. Every face runs on it.

    scheduler = Scheduler(vlm, max_batch_size=8)
    request = scheduler.request(image, tasks.caption(), {"max_new_tokens": 16}, sink=answers)  # checked here
    scheduler.step([request])      # the joining requests' prefill: their first token
    while scheduler.running:
        scheduler.step()           # one decode step for every running row (more requests may join each step)

Who drives it:
- `VLMo.generate` / `stream` / the task methods, in the caller's thread: all rows join at the first step, and the
  call returns when the last one leaves;
- `vlmo.engine.worker.Engine` (`vlmo serve`), from its worker thread: requests join whenever they arrive;
- `vlmo batch` (`vlmo.batch.runner`): a finished row's slot is refilled from the data set at the next step.

What it owns, so that no face repeats it: prefill and decode calls, picking each row's next token (its own sampling
options and seeded generator), end of sequence, the token budget, stop strings, and what a stream may show yet
(never half a multi-byte character, never what may turn out to begin a stop string). Rows come and go between steps:
joining rows are prefilled together (left-padded) and merged into the running batch, finished or cancelled rows
leave at once, both through `nn.paligemma.regroup`, which keeps each row's keys right-aligned with their position
ids (docs/architecture.md, "Continuous batching"). So a greedy row's answer does not depend on what runs beside it
(int8 and float32; `tests/test_engine.py`), and a seeded row samples as it does alone.

The model is used through `VLMo`'s named methods only (`Model`: `tokenize`, `detokenize`, `encode_images`,
`prefill`, `decode`, `eos_ids`, `context_length`). Results go to each request's `Sink`: `Piece`s as text becomes
certain, then one `Finished`, or one exception (an error while sampling a row fails that row alone; an error in a
decode step fails the running rows; an error while prefilling fails the joining requests only).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from vlmo.engine.sampling import make_generator, select_next
from vlmo.errors import InputError, VlmoError, check_count
from vlmo.generation import GenerateOptions, SamplingConfig, check_stop, check_token_budget
from vlmo.nn.paligemma import DecodeState, regroup
from vlmo.tasks import Prompt

if TYPE_CHECKING:
    from vlmo.images import ImageInput
    from vlmo.processing import EncodedBatch


class Model(Protocol):
    """The model as the loop sees it: what `vlmo.api.VLMo` offers by name (so the loop reads no other object's
    fields, and depends on no face or facade)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def eos_ids(self) -> frozenset[int]: ...

    @property
    def context_length(self) -> int: ...

    def prompt_length(self, prompt: str) -> int: ...

    def tokenize(self, prompts: Sequence[str]) -> EncodedBatch: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor: ...

    def prefill(self, batch: EncodedBatch, features: torch.Tensor, room: int) -> tuple[torch.Tensor, DecodeState]: ...

    def decode(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor: ...


class Cancelled(VlmoError):
    """The request was cancelled before it finished."""


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text; a request's pieces concatenate to its `Finished.text`."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a request: the whole answer and what it cost.

    finish_reason: "stop" (`<eos>` or a stop string) or "length" (`max_new_tokens` reached). `ended`: the model
    itself ended the answer with `<eos>` (a located task drops its last object otherwise, as it may be cut short).
    prompt_tokens counts the image tokens too; token_ids are the answer's tokens (without `<eos>`, and up to the
    stop string's token when one cut the text).
    """

    text: str
    finish_reason: Literal["stop", "length"]
    ended: bool
    prompt_tokens: int
    completion_tokens: int
    seconds_to_first_token: float
    seconds: float
    token_ids: tuple[int, ...] = ()


Event = Piece | Finished


class Sink(Protocol):
    """Where a request's events go: `emit` gets `Piece`s, then one `Finished` or one exception; `cancelled` is read
    before each of the request's steps (True: the request leaves and gets `Cancelled`)."""

    @property
    def cancelled(self) -> bool: ...

    def emit(self, event: Event | BaseException) -> None: ...


class Collector:
    """A `Sink` that keeps the events, for a caller that drives the scheduler itself (`VLMo`, `vlmo batch`)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.end: Finished | BaseException | None = None
        self.cancelled = False

    def emit(self, event: Event | BaseException) -> None:
        if isinstance(event, Piece):
            self.pieces.append(event.text)
        else:
            self.end = event

    def take(self) -> list[str]:
        """The pieces that arrived since the last call."""
        pieces, self.pieces = self.pieces, []
        return pieces

    def finished(self) -> Finished:
        """The request's end; its error raised if it failed."""
        if isinstance(self.end, BaseException):
            raise self.end
        assert self.end is not None, "the request has not finished"
        return self.end


@dataclass
class Request:
    """One request as the loop needs it, checked by `Scheduler.request`.

    `image` is decoded at join through `VLMo.encode_images` (so identical images are encoded once), unless
    `features` dt[1, N, D] were given. `seed` seeds this row's own generator.
    """

    image: ImageInput | None
    features: torch.Tensor | None
    prompt: Prompt
    cfg: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    prompt_tokens: int
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    """A request in the running batch: its tokens so far and what its sink has been shown."""

    req: Request
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    shown: str = ""
    first_token_at: float = 0.0
    next_token: int = 0  # the token the next decode step feeds in


class Scheduler:
    """Continuous batching over one loaded model (a `VLMo`), driven step by step by its owner (one thread at a time).

    max_batch_size: rows decoded together. More rows share each read of the weights, which is what bounds decode
    speed, but every row adds compute; the owner lets at most `free` requests join at a step. `ignore_eos`: answers
    run to their `max_new_tokens` (benchmarks that time a fixed number of tokens).
    """

    def __init__(self, vlm: Model, *, max_batch_size: int = 8, ignore_eos: bool = False) -> None:
        self.vlm = vlm
        self.max_batch_size = check_count(max_batch_size, "max_batch_size")
        self._rows: list[_Row] = []
        self._state: DecodeState | None = None
        self._eos = frozenset() if ignore_eos else vlm.eos_ids

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    @property
    def free(self) -> int:
        """How many requests may join at the next step."""
        return self.max_batch_size - len(self._rows)

    def request(
        self,
        image: ImageInput | None,
        prompt: Prompt,
        options: GenerateOptions | None,
        sink: Sink,
        *,
        features: torch.Tensor | None = None,
        seed_offset: int = 0,
    ) -> Request:
        """Check everything about a request before it waits or runs: the options (`SamplingConfig`, stop strings),
        the prompt's length and the token budget (InputError / GenerationConfigError). `seed_offset`: added to the
        options' seed (row i of a library batch samples as it would alone with seed + i)."""
        if not isinstance(prompt, Prompt):
            raise InputError(f"the engine takes a vlmo.tasks.Prompt, got {type(prompt).__name__}")
        options = options or {}
        cfg = SamplingConfig.from_options(options, prompt.max_new_tokens)
        stop = check_stop(options.get("stop", ()))
        prompt_tokens = self.vlm.prompt_length(prompt.text)
        check_token_budget(prompt_tokens, cfg.max_new_tokens, self.vlm.context_length)
        seed = options.get("seed")
        if seed is not None:
            seed = (seed + seed_offset) % 2**64
        return Request(image, features, prompt, cfg, seed, stop, prompt_tokens, sink)

    @torch.inference_mode()
    def step(self, joining: Sequence[Request] = ()) -> None:
        """One decode step for the running rows, then the joining requests' prefill (their first token).

        Errors go to the requests they concern (module docstring), never out of here: the scheduler stays usable.
        """
        if len(joining) > self.free:
            raise InputError(f"{len(joining)} requests cannot join {self.running} rows of {self.max_batch_size}")
        if self._rows:
            assert self._state is not None
            try:
                tokens = torch.tensor([r.next_token for r in self._rows], device=self.vlm.device)
                logits = self.vlm.decode(tokens, self._state)
            except Exception as error:  # noqa: BLE001 - a failed step fails its rows, never the loop
                self.fail(error)
            else:
                self._advance(self._rows, logits, self._state)
        joining = [r for r in joining if not _dropped_if_cancelled(r.sink)]
        if joining:
            try:
                logits, state = self._prefill(joining)
            except Exception as error:  # noqa: BLE001 - a failed prefill fails the joining requests only
                for r in joining:
                    r.sink.emit(error)
            else:
                self._advance([_Row(r, make_generator(r.seed, self.vlm.device)) for r in joining], logits, state, True)

    def fail(self, error: BaseException, also: Sequence[Request] = ()) -> None:
        """End every running row (and `also`) with `error`, and forget them."""
        sinks = [r.req.sink for r in self._rows] + [r.sink for r in also]
        self._rows, self._state = [], None
        for sink in sinks:
            sink.emit(error)

    def _prefill(self, joining: list[Request]) -> tuple[torch.Tensor, DecodeState]:
        """The joining requests' prompts through the decoder together: last-position logits dt[J, V] and their
        state, with cache room for the longest answer any of them may give."""
        vlm = self.vlm
        given = [r.features for r in joining]
        if all(f is not None for f in given):
            features = torch.cat([f for f in given if f is not None])
        else:
            images = [r.image for r in joining if r.features is None]
            if any(image is None for image in images):
                raise InputError("a request has neither an image nor image features")
            encoded = iter(vlm.encode_images(images))  # type: ignore[arg-type]  # None refused above
            features = torch.stack([f[0] if f is not None else next(encoded) for f in given])
        batch = vlm.tokenize([r.prompt.text for r in joining])
        return vlm.prefill(batch, features, max(r.cfg.max_new_tokens for r in joining))

    def _advance(self, rows: list[_Row], logits: torch.Tensor, state: DecodeState, joined: bool = False) -> None:
        """Pick each row's next token, send its sink what became certain, and keep the rows that go on.

        `rows` are the rows of `state` in order: the running batch after a decode step, or the joining requests
        after their prefill (`joined`), whose surviving rows are then merged into the running batch."""
        now = time.perf_counter()
        greedy = logits.argmax(dim=-1).tolist()  # one pass for every greedy row
        keep: list[int] = []
        ends: list[tuple[_Row, str, Literal["stop", "length"], bool]] = []
        for i, row in enumerate(rows):
            req = row.req
            if _dropped_if_cancelled(req.sink):
                continue
            try:
                sampled = req.cfg.do_sample
                token = int(select_next(logits[i : i + 1], req.cfg, row.generator)[0]) if sampled else greedy[i]
            except Exception as error:  # noqa: BLE001 - one row's sampling error fails that row alone
                req.sink.emit(error)
                continue
            if not row.first_token_at:
                row.first_token_at = now
            ended = token in self._eos
            if not ended:
                row.ids.append(token)
            text = self.vlm.detokenize(row.ids)
            cut = stop_at(text, req.stop)
            if ended or cut is not None or len(row.ids) >= req.cfg.max_new_tokens:
                final = text if cut is None else text[:cut]
                ends.append((row, final, "stop" if ended or cut is not None else "length", ended))
                continue
            _show(row, text)
            row.next_token = token
            keep.append(i)
        survivors = [rows[i] for i in keep]
        parts: list[tuple[DecodeState, torch.Tensor]] = []
        if joined and self._state is not None and self._rows:
            parts.append((self._state, torch.arange(len(self._rows), device=state.key_valid.device)))
        if survivors:
            parts.append((state, torch.tensor(keep, dtype=torch.long, device=state.key_valid.device)))
        running = (self._rows if joined else []) + survivors
        try:
            if not running:
                self._rows, self._state = [], None
            else:
                if joined or len(keep) < len(rows):
                    state = regroup(parts, max(r.req.cfg.max_new_tokens - len(r.ids) for r in running))
                self._rows, self._state = running, state
        finally:
            # Finished rows are told last, once they have left: whoever reads `running` after an answer (a
            # server's metrics) no longer counts them. Told even if regrouping failed: their answers are whole.
            for end in ends:
                _finish(*end)


def _dropped_if_cancelled(sink: Sink) -> bool:
    if sink.cancelled:
        sink.emit(Cancelled("the request was cancelled"))
        return True
    return False


def _show(row: _Row, text: str) -> None:
    """Send the text that is certain: not a half multi-byte character, not what may begin a stop string."""
    safe = len(text) - held_back(text, row.req.stop)
    if text.endswith("\ufffd") or not text.startswith(row.shown) or safe <= len(row.shown):
        return
    row.req.sink.emit(Piece(text[len(row.shown) : safe]))
    row.shown = text[:safe]


def _finish(row: _Row, text: str, reason: Literal["stop", "length"], ended: bool) -> None:
    if text.startswith(row.shown) and len(text) > len(row.shown):
        row.req.sink.emit(Piece(text[len(row.shown) :]))
    now, submitted = time.perf_counter(), row.req.submitted
    row.req.sink.emit(
        Finished(
            text=text,
            finish_reason=reason,
            ended=ended,
            prompt_tokens=row.req.prompt_tokens,
            completion_tokens=len(row.ids) + (1 if ended else 0),
            seconds_to_first_token=row.first_token_at - submitted,
            seconds=now - submitted,
            token_ids=tuple(row.ids),
        )
    )


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the answer ends because of a stop string: the first occurrence of any, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many final characters of `text` might begin a stop string (not shown until the next token says)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
