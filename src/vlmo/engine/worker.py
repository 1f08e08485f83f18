"""One model, many requests: a worker thread that owns a loaded `VLMo` and runs the engine's loop for whatever
is waiting.

    engine = Engine(vlm, max_batch_size=8, max_queue=64)
    engine.start()
    job = engine.submit(image, tasks.ask("what colour is the circle?"), {"max_new_tokens": 16})
    for event in job:           # Piece(text) as tokens arrive, then Finished(text, finish_reason, usage …)
        ...

The loop itself (prefill, decode, sampling, stop strings, rows joining and leaving) is `vlmo.engine.scheduler`;
this module adds what a server needs around it: a bounded queue that requests wait in, a thread that owns the model
(each turn: one step, with as many waiting requests joining as there are free rows), `Job`s that a handler reads
from any thread or asyncio loop, cancellation, and shutdown that ends every accepted request.

Who uses it: `vlmo serve` (`vlmo.serve.routes`). The engine builds no prompt (that is `vlmo.tasks`) and parses no
answer (`VLMo.answer`): it turns (image, `Prompt`, options) into text.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmo.engine.scheduler import Cancelled, Event, Finished, Piece, Request, Scheduler
from vlmo.errors import InputError, VlmoError, check_count
from vlmo.generation import GenerateOptions, check_stop
from vlmo.tasks import Prompt

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vlmo.api import VLMo


class QueueFull(VlmoError):
    """The engine already holds `max_queue` waiting requests (a server answers 503 and asks to retry)."""


class EngineStopped(VlmoError):
    """The engine is shutting down: it takes no new request, and a cancelling shutdown ends the running ones."""


class Job:
    """A submitted request: iterate it (`for` or `async for`) for its events, or call `result()` / `aresult()`.

    Events arrive from the worker thread: through a thread-safe queue, or, when the job was submitted with an
    asyncio `loop`, through that loop (so a server's handler awaits them without blocking a thread). A failed job
    raises its error where the events are read. A job is the request's `scheduler.Sink`.
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

    def emit(self, event: Event | BaseException) -> None:
        """Called by the worker thread (the scheduler). An error that is not vlmo's own reaches the reader as one
        line (`VlmoError("generation failed: …")`)."""
        if self._done:
            return
        if isinstance(event, Finished | BaseException):
            self._done = True
        if isinstance(event, Exception):
            event = _one_line(event)
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


class Engine:
    """The model worker: one thread that owns `vlm` and drives the engine's `Scheduler` for every request.

    max_batch_size: rows decoded together (`Scheduler`). max_queue: requests that may wait for a slot; `submit`
    refuses more (`QueueFull`) rather than let latency grow without bound.
    """

    def __init__(self, vlm: VLMo, *, max_batch_size: int = 8, max_queue: int = 64) -> None:
        self.vlm = vlm
        self.scheduler = Scheduler(vlm, max_batch_size=max_batch_size)
        self.max_batch_size = self.scheduler.max_batch_size
        self.max_queue = check_count(max_queue, "max_queue")
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._cancel_all = False
        self._thread: threading.Thread | None = None
        self._step_began: float | None = None  # monotonic time the running step began; None between steps

    @property
    def waiting(self) -> int:
        """Requests queued for a batch slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return self.scheduler.running

    def step_seconds(self) -> float:
        """How long the step now running has run (0 between steps): a health check's view of a wedged engine."""
        began = self._step_began
        return 0.0 if began is None else time.monotonic() - began

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

        Everything about the request is checked here, before it waits (`Scheduler.request`: options, stop strings
        — `stop` here or in `options` —, the token budget). QueueFull when `max_queue` requests already wait,
        EngineStopped once `shutdown` has begun.
        """
        if not isinstance(image, Image.Image):
            raise InputError(f"the engine takes a decoded PIL image, got {type(image).__name__}")
        merged: GenerateOptions = {**(options or {})}
        if stop:
            merged["stop"] = (*check_stop(merged.get("stop", ())), *check_stop(list(stop)))
        job = Job(loop)
        req = self.scheduler.request(image, prompt, merged, job)
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry shortly")
            self._waiting.append(req)
            self._lock.notify()
        return job

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
                    while not self.scheduler.running and not self._waiting and self._accepting:
                        self._lock.wait()
                    if self._cancel_all:
                        break
                    if not self.scheduler.running and not self._waiting:
                        return  # shutting down, nothing left
                    free = self.scheduler.free
                    joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                self._step_began = time.monotonic()
                try:
                    self.scheduler.step(joining)
                except Exception as error:  # noqa: BLE001 - the scheduler reports errors to its rows; a safety net
                    self.scheduler.fail(error, also=joining)
                finally:
                    self._step_began = None
        self._fail_all(EngineStopped("the server shut down before this request finished"))

    def _fail_all(self, error: VlmoError) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        self.scheduler.fail(error, also=waiting)


def _one_line(error: Exception) -> VlmoError:
    """A worker failure as the error its readers get: vlmo's own errors as they are, others summarised."""
    if isinstance(error, VlmoError):
        return error
    return VlmoError(f"generation failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


__all__ = ["Cancelled", "Engine", "EngineStopped", "Finished", "Job", "Piece", "QueueFull"]
