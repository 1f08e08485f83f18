"""One model, many requests: a worker thread that owns a loaded `VLMo` and batches whatever is waiting.

    engine = Engine(vlm, max_batch_size=8, max_queue=64)
    engine.start()
    job = engine.submit(image, tasks.ask("what colour is the circle?"), {"max_new_tokens": 16})
    for event in job:           # Piece(text) as tokens arrive, then Finished(text, finish_reason, usage …)
        ...

Continuous batching: every step of the worker runs one decode step for all running rows, and a request that
arrived meanwhile joins at the next step (its prompt is prefilled on its own, then its cache rows are merged into
the running batch with `nn.paligemma.regroup`); a finished or cancelled row leaves at once. Greedy answers are
the same whatever else runs beside them: each row keeps its own positions and keys, and the int8 layers scale
activations per row (`tests/test_engine.py` checks it against `VLMo.generate` one by one).

Who uses it: `vlmo serve` (`vlmo.serve.routes`). The engine builds no prompt (that is `vlmo.tasks`) and parses no
answer (`VLMo.parse_located`): it turns (image, `Prompt`, options) into text.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image

from vlmo.errors import InputError, VlmoError
from vlmo.generation import GenerateOptions, SamplingConfig, check_token_budget, make_generator, select_next
from vlmo.nn.paligemma import DecodeState, regroup
from vlmo.tasks import Prompt

if TYPE_CHECKING:
    from vlmo.api import VLMo


class QueueFull(VlmoError):
    """The engine already holds `max_queue` waiting requests (a server answers 503 and asks to retry)."""


class EngineStopped(VlmoError):
    """The engine is shutting down: it takes no new request, and a cancelling shutdown ends the running ones."""


class Cancelled(VlmoError):
    """The request was cancelled (`Job.cancel`) before it finished."""


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text; the pieces of a job concatenate to its `Finished.text`."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a job: the whole answer and what it cost.

    finish_reason: "stop" (`<eos>` or a stop string) or "length" (`max_new_tokens` reached). `ended`: the model
    itself ended the answer with `<eos>` (a located task drops its last object otherwise, as it may be cut short).
    prompt_tokens counts the image tokens too.
    """

    text: str
    finish_reason: Literal["stop", "length"]
    ended: bool
    prompt_tokens: int
    completion_tokens: int
    seconds_to_first_token: float
    seconds: float


Event = Piece | Finished


class Job:
    """A submitted request: iterate it (`for` or `async for`) for its events, or call `result()` / `aresult()`.

    Events arrive from the worker thread: through a thread-safe queue, or, when the job was submitted with an
    asyncio `loop`, through that loop (so a server's handler awaits them without blocking a thread). A failed job
    raises its error where the events are read.
    """

    _ids = itertools.count(1)

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = next(Job._ids)
        self._loop = loop
        self._queue: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        self._aqueue: asyncio.Queue[Event | BaseException] | None = asyncio.Queue() if loop is not None else None
        self._cancelled = threading.Event()
        self._done = False  # the worker has sent the last event
        self._end: Finished | BaseException | None = None  # the last event, once a reader has seen it

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop this job (thread-safe): it leaves the batch at the worker's next step, and its reader gets
        `Cancelled`. Does nothing once the job has finished."""
        self._cancelled.set()

    def _emit(self, event: Event | BaseException) -> None:
        """Called by the worker thread."""
        if self._done:
            return
        if isinstance(event, Finished | BaseException):
            self._done = True
        if self._aqueue is None:
            self._queue.put(event)
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is left to read the event
            pass

    def __iter__(self) -> Iterator[Event]:
        if self._aqueue is not None:
            raise RuntimeError("this job was submitted with an asyncio loop; read it with `async for`")
        if self._end is not None:  # read again after the end: the end again
            yield from self._seen(self._end)
            return
        while self._end is None:
            yield from self._seen(self._queue.get())

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._aqueue is None:
            raise RuntimeError("this job was submitted without an asyncio loop; read it with `for`")
        if self._end is not None:
            for event in self._seen(self._end):
                yield event
            return
        while self._end is None:
            for event in self._seen(await self._aqueue.get()):
                yield event

    def _seen(self, event: Event | BaseException) -> Iterator[Event]:
        """What a reader gets for `event`: the event, or its error raised; the end is remembered."""
        if isinstance(event, Finished | BaseException):
            self._end = event
        if isinstance(event, BaseException):
            raise event
        yield event

    def result(self) -> Finished:
        """Wait for the job's end (blocking) and return it."""
        return _last(list(self))

    async def aresult(self) -> Finished:
        """Wait for the job's end (asyncio) and return it."""
        return _last([event async for event in self])


def _last(events: list[Event]) -> Finished:
    end = events[-1]
    assert isinstance(end, Finished)
    return end


@dataclass
class _Request:
    """A job's inputs as the worker needs them (checked in `submit`)."""

    job: Job
    image: Image.Image
    prompt: Prompt
    cfg: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    prompt_tokens: int
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    """A request in the running batch: its tokens so far and what has been sent to its reader."""

    req: _Request
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    shown: str = ""
    first_token_at: float = 0.0
    next_token: int = 0  # the token the next decode step feeds in


class Engine:
    """The model worker: one thread that owns `vlm` and runs every request through continuous batching.

    max_batch_size: rows decoded together (more rows share each read of the weights, which is what bounds decode
    speed, but every row adds compute). max_queue: requests that may wait for a slot; `submit` refuses more
    (`QueueFull`) rather than let latency grow without bound.
    """

    def __init__(self, vlm: VLMo, *, max_batch_size: int = 8, max_queue: int = 64) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a whole number ≥ 1, got {value!r}")
        self.vlm = vlm
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._state: DecodeState | None = None
        self._lock = threading.Condition()
        self._accepting = True
        self._cancel_all = False
        self._thread: threading.Thread | None = None
        self._eos = sorted(set(vlm.model.cfg.eos_token_ids) | {vlm.text.eos_id})

    @property
    def waiting(self) -> int:
        """Requests queued for a batch slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vlmo-engine", daemon=True)
            self._thread.start()

    def submit(
        self,
        image: Image.Image,
        prompt: Prompt,
        options: GenerateOptions | None = None,
        *,
        stop: Sequence[str] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """Queue a request; its events come through the returned `Job`.

        Everything about the request is checked here, before it waits: the options (`SamplingConfig`), the stop
        strings and the token budget (InputError / GenerationConfigError). QueueFull when `max_queue` requests
        already wait, EngineStopped once `shutdown` has begun.
        """
        if not isinstance(image, Image.Image):
            raise InputError(f"the engine takes a decoded PIL image, got {type(image).__name__}")
        if not isinstance(prompt, Prompt):
            raise InputError(f"the engine takes a vlmo.tasks.Prompt, got {type(prompt).__name__}")
        options = options or {}
        cfg = SamplingConfig.from_options(options, prompt.max_new_tokens)
        stops = tuple(stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise InputError("stop strings must be non-empty text")
        prompt_tokens = int(self.vlm.text.encode([prompt.text]).input_ids.shape[1])
        check_token_budget(prompt_tokens, cfg.max_new_tokens, self.vlm.model.cfg.text.max_position_embeddings)
        req = _Request(Job(loop), image, prompt, cfg, options.get("seed"), stops, prompt_tokens)
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry shortly")
            self._waiting.append(req)
            self._lock.notify()
        return req.job

    def shutdown(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no new request; finish what is queued and running (or, with `cancel`, end it with EngineStopped);
        wait for the worker to end (at most `timeout` seconds)."""
        with self._lock:
            self._accepting = False
            self._cancel_all = cancel
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        elif cancel or self._waiting:  # never started: nobody will answer what waits
            self._fail_all(EngineStopped("the engine stopped before this request ran"))

    # -- the worker ------------------------------------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._rows and not self._waiting and self._accepting:
                        self._lock.wait()
                    if self._cancel_all:
                        break
                    if not self._rows and not self._waiting:
                        return  # shutting down, nothing left
                    free = self.max_batch_size - len(self._rows)
                    joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                try:
                    self._step(joining)
                except Exception as error:  # noqa: BLE001 - a failed step fails its requests, never the worker
                    failed = [r.req.job for r in self._rows] + [r.job for r in joining]
                    self._rows, self._state = [], None
                    for job in failed:
                        job._emit(_one_line(error))
        self._fail_all(EngineStopped("the server shut down before this request finished"))

    def _fail_all(self, error: VlmoError) -> None:
        with self._lock:
            jobs = [r.req.job for r in self._rows] + [r.job for r in self._waiting]
            self._rows, self._state = [], None
            self._waiting.clear()
        for job in jobs:
            job._emit(error)

    def _step(self, joining: list[_Request]) -> None:
        """One decode step for the running rows, then the joining requests' prefill (their first token)."""
        if self._rows:
            assert self._state is not None
            tokens = torch.tensor([r.next_token for r in self._rows], device=self.vlm.device)
            logits = self.vlm.model.decode(tokens, self._state)
            self._advance(self._rows, logits, self._state)
        joining = [r for r in joining if not self._drop_cancelled(r.job)]
        if joining:
            self._join(joining)

    def _join(self, joining: list[_Request]) -> None:
        """Prefill the joining requests together and merge their rows into the running batch."""
        vlm = self.vlm
        features = vlm.image_cache.get_many([r.image for r in joining])  # identical images encoded once
        batch = vlm.text.encode([r.prompt.text for r in joining])
        longest = max(r.cfg.max_new_tokens for r in joining)
        cache = vlm.model.new_cache(len(joining), batch.input_ids.shape[1] + longest)
        logits, state = vlm.model.prefill(
            batch.input_ids.to(vlm.device), features, batch.attention_mask.to(vlm.device), cache
        )
        rows = [_Row(r, make_generator(r.seed, vlm.device)) for r in joining]
        self._advance(rows, logits, state, joined=True)

    def _advance(self, rows: list[_Row], logits: torch.Tensor, state: DecodeState, joined: bool = False) -> None:
        """Pick each row's next token, send what it adds to its reader, and keep the rows that go on.

        `rows` are the rows of `state` in order: the running batch after a decode step, or the joining requests
        after their prefill (`joined`), whose surviving rows are then merged into the running batch."""
        now = time.perf_counter()
        keep: list[int] = []
        for i, row in enumerate(rows):
            cfg = row.req.cfg
            token = int(select_next(logits[i : i + 1], cfg, row.generator)[0])
            if not row.ids and not row.first_token_at:
                row.first_token_at = now
            if self._drop_cancelled(row.req.job):
                continue
            ended = token in self._eos
            if not ended:
                row.ids.append(token)
            text = self.vlm.text.decode(row.ids)
            cut = _stop_at(text, row.req.stop)
            if ended or cut is not None or len(row.ids) >= cfg.max_new_tokens:
                final = text if cut is None else text[:cut]
                self._finish(row, final, "stop" if ended or cut is not None else "length", ended)
                continue
            self._show(row, text)
            row.next_token = token
            keep.append(i)
        survivors = [rows[i] for i in keep]
        parts: list[tuple[DecodeState, torch.Tensor]] = []
        if joined and self._state is not None and self._rows:
            everyone = torch.arange(len(self._rows), device=state.key_valid.device)
            parts.append((self._state, everyone))
        if survivors:
            parts.append((state, torch.tensor(keep, dtype=torch.long, device=state.key_valid.device)))
        running = (self._rows if joined else []) + survivors
        if not running:
            self._rows, self._state = [], None
            return
        if joined or len(keep) < len(rows):
            room = max(r.req.cfg.max_new_tokens - len(r.ids) for r in running)
            state = regroup(parts, room)
        with self._lock:
            self._rows, self._state = running, state

    def _drop_cancelled(self, job: Job) -> bool:
        if job.cancelled:
            job._emit(Cancelled("the request was cancelled"))
            return True
        return False

    def _show(self, row: _Row, text: str) -> None:
        """Send the text that is certain: not a half multi-byte character, not what may begin a stop string."""
        safe = len(text) - _held_back(text, row.req.stop)
        if text.endswith("\ufffd") or not text.startswith(row.shown) or safe <= len(row.shown):
            return
        row.req.job._emit(Piece(text[len(row.shown) : safe]))
        row.shown = text[:safe]

    def _finish(self, row: _Row, text: str, reason: Literal["stop", "length"], ended: bool) -> None:
        if text.startswith(row.shown) and len(text) > len(row.shown):
            row.req.job._emit(Piece(text[len(row.shown) :]))
        now, submitted = time.perf_counter(), row.req.submitted
        row.req.job._emit(
            Finished(
                text=text,
                finish_reason=reason,
                ended=ended,
                prompt_tokens=row.req.prompt_tokens,
                completion_tokens=len(row.ids) + (1 if ended else 0),
                seconds_to_first_token=row.first_token_at - submitted,
                seconds=now - submitted,
            )
        )


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the answer ends because of a stop string: the first occurrence of any, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many final characters of `text` might begin a stop string (not streamed until the next token says)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _one_line(error: Exception) -> VlmoError:
    """A worker failure as the error its readers get: vlmo's own errors as they are, others summarised."""
    if isinstance(error, VlmoError):
        return error
    return VlmoError(f"generation failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
