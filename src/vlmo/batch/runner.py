"""`vlmo batch`: one task over a whole data set, batched through the model, one result row per input.

    from vlmo.batch.runner import run
    for row in run("vlmo/shapes", "photos/", task="caption"):
        print(row["id"], row["text"] if row["error"] is None else row["error"])

Built on the engine's loop (`vlmo.engine.scheduler`), with continuous batching: `batch_size` rows run together,
each with its own prompt from `vlmo.tasks`, and a row that finishes hands its slot to the next input at the next
step, so a batch never waits for its longest answer. Greedy answers do not depend on what runs beside them
(tests/test_batching.py, tests/test_engine.py), so every row equals what `VLMo` answers for that input alone, and
rows come out in input order. Images are read and decoded on a background thread ahead of the model. An input that
cannot be used (not an image, a manifest row without a question, a prompt too long for the model) becomes a row
with its one-line `error`, never the end of the run.

`write_results` is what the CLI runs: rows appended to a results file a batch at a time (`vlmo.batch.results`),
a progress bar on a terminal, and Ctrl-C stopping with every finished batch on disk. Rows and files:
`vlmo.batch.results`; inputs and ids: `vlmo.batch.inputs`; the Ray path: `vlmo.batch.ray_data`.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vlmo import tasks
from vlmo.batch.inputs import BatchInput, Inputs, as_inputs
from vlmo.batch.results import (
    JsonlResults,
    Results,
    ResultsLock,
    Row,
    check_results_path,
    error_row,
    result_row,
)
from vlmo.errors import InputError, OptionError, VlmoError, braced, check_count
from vlmo.fileio.atomic import OutputPathError
from vlmo.progress import ProgressBars
from vlmo.tasks import Prompt, TaskName

if TYPE_CHECKING:
    from PIL import Image

    from vlmo.api import VLMo
    from vlmo.engine.scheduler import Collector, Request, Scheduler
    from vlmo.generation import GenerateOptions

# Every task (`vlmo.tasks`): a new task there is a new batch task, with nothing to add here.
BATCH_TASKS: tuple[TaskName, ...] = tuple(tasks.DEFAULT_MAX_NEW_TOKENS)
# Which job option (and manifest column) each task's prompt needs: `tasks.TASK_INPUT`, where the raw text of the
# generate task is called `prompt` (`--prompt`, a manifest's `prompt` column); and the tasks each option is for.
_NEEDS: dict[str, str] = {task: "prompt" if arg == "text" else arg for task, arg in tasks.TASK_INPUT.items()}
_FOR: dict[str, tuple[str, ...]] = {need: tuple(t for t, n in _NEEDS.items() if n == need) for need in _NEEDS.values()}
T = TypeVar("T")
# An input with its decoded image, or the one-line reason it has none.
Loaded = tuple[BatchInput, "Image.Image | None", "str | None"]


@dataclass(frozen=True)
class BatchJob:
    """What to ask of every input: the task, and the values of its prompt that rows do not give themselves.

    A manifest row's own question / labels / prompt wins over the job's. `max_new_tokens`: None for each task's
    default length (`tasks.DEFAULT_MAX_NEW_TOKENS`). Decoding is greedy, so results do not depend on batching.
    """

    task: TaskName
    question: str | None = None
    labels: str | None = None
    prompt: str | None = None
    lang: str = "en"
    detail: str = "short"
    mask_decoder: str | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task not in BATCH_TASKS:
            raise OptionError(f"unknown {{task}}; use {', '.join(BATCH_TASKS)}", task=self.task)
        for name, owners in _FOR.items():
            if getattr(self, name) is not None and self.task not in owners:
                which = " and ".join(owners)
                raise OptionError(f"{{{name}}} is for the {which} task, not {{task}}", task=self.task, **{name: None})
        # Check what the job itself says now, before any model loads: a typo costs no waiting.
        tasks.lang_code(self.lang)
        needed = _NEEDS.get(self.task)
        if needed is None or getattr(self, needed) is not None:
            self._prompt(None if needed is None else getattr(self, needed))
        if self.max_new_tokens is not None:  # decoding is greedy: the length is the one generation option to check
            check_count(self.max_new_tokens, "max_new_tokens")

    def check_model(self, vlm: VLMo) -> None:
        """What holds for every row once the model is known, refused before any row runs: a `max_new_tokens` that no
        prompt leaves room for in the model's context (GenerationConfigError, a usage error)."""
        if self.max_new_tokens is not None:
            from vlmo.generation import check_token_budget

            check_token_budget(vlm.prompt_length(""), self.max_new_tokens, vlm.context_length)

    @property
    def options(self) -> GenerateOptions:
        """The `VLMo` generation options of every batch: greedy, and the job's length if it sets one."""
        options: GenerateOptions = {"do_sample": False}
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        return options

    def check_inputs(self, inputs: Inputs) -> None:
        """Refuse a job whose task needs a value (a question, labels) that neither the job nor the inputs give."""
        needed = _NEEDS.get(self.task)
        if needed is not None and getattr(self, needed) is None and needed not in inputs.fields:
            why = (
                f"no row of {braced(inputs.source)} has one"
                if inputs.manifest
                else f"or a manifest with a {needed} column"
            )
            raise OptionError(f"{{task}} needs {{{needed}}} ({why})", task=self.task, **{needed: None})

    def prompt_for(self, item: BatchInput) -> Prompt:
        """The prompt for one input: its own question / labels / prompt, else the job's (`InputError` if neither)."""
        needed = _NEEDS.get(self.task)
        if needed is None:
            return self._prompt(None)
        value = getattr(item, needed) or getattr(self, needed)
        if value is None:
            raise InputError(f"this row has no {needed}; give it one in the manifest or pass one for every row")
        return self._prompt(value)

    def _prompt(self, value: str | None) -> Prompt:
        """`tasks.prompt` for this job's task, with `value` as what the task needs (its question, labels, prompt)."""
        given = {} if value is None else {tasks.TASK_INPUT[self.task]: value}
        return tasks.prompt(self.task, lang=self.lang, detail=self.detail, **given)


# -- one batch ---------------------------------------------------------------------------------------------------


def load(item: BatchInput) -> Loaded:
    """Read and decode an input's image (`images.load_image`); a failure is the input's one-line error."""
    from vlmo.images import load_image

    try:
        return item, load_image(item.image), None
    except VlmoError as e:
        return item, None, str(e)
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises for a bad file is that input's error
        return item, None, f"could not read the image ({type(e).__name__}: {e})"


def process(vlm: VLMo, job: BatchJob, batch: list[Loaded]) -> list[Row]:
    """The rows of a list of loaded inputs, in order (the Ray actors' unit of work): `answer_rows` over them."""
    return list(answer_rows(vlm, job, batch, batch_size=max(1, len(batch))))


@dataclass
class _Pending:
    """An input in flight, in input order: its row once known, else what its answer needs."""

    item: BatchInput
    row: Row | None = None
    prompt: Prompt | None = None
    size: tuple[int, int] = (0, 0)
    sink: Collector | None = None
    request: Request | None = None  # checked, waiting to join


def answer_rows(vlm: VLMo, job: BatchJob, loaded: Iterable[Loaded], *, batch_size: int = 8) -> Iterator[Row]:
    """Every input's row, in input order, through the engine's loop with continuous batching: up to `batch_size`
    rows run together, and a finished row's slot is refilled from `loaded` at the next step.

    A row waits only for the rows before it (at most `batch_size` run at once, so at most the answers that finish
    while the oldest row runs are held). A segment job loads its mask decoder before the first row.
    """
    from vlmo.engine.scheduler import Scheduler  # torch: imported when a job runs, not with the CLI

    scheduler = Scheduler(vlm, max_batch_size=batch_size)
    job.check_model(vlm)
    if job.task == "segment":
        vlm.mask_decoder(job.mask_decoder)
    options = job.options
    source = iter(loaded)
    order: deque[_Pending] = deque()
    more = True
    while more or scheduler.running:
        joining: list[Request] = []
        while more and len(joining) < scheduler.free:
            nxt = next(source, None)
            if nxt is None:
                more = False
                break
            pending = _admit(scheduler, job, options, nxt)
            order.append(pending)
            if pending.request is not None:
                joining.append(pending.request)
        if joining or scheduler.running:
            scheduler.step(joining)
        for pending in order:
            if pending.row is None and pending.sink is not None and pending.sink.end is not None:
                pending.row = _row(vlm, job, pending)
        while order and order[0].row is not None:
            yield order.popleft().row  # type: ignore[misc]  # checked by the loop condition


def _admit(scheduler: Scheduler, job: BatchJob, options: GenerateOptions, loaded: Loaded) -> _Pending:
    """An input's pending entry: its error row at once when its prompt or image cannot be used, or (checked by
    `Scheduler.request`, so that a prompt too long for the model is this row's error only) ready to join."""
    item, image, error = loaded
    pending = _Pending(item)
    try:
        pending.prompt = job.prompt_for(item)
    except VlmoError as e:
        pending.row = error_row(item, job.task, None, str(e))
        return pending
    if image is None:
        pending.row = error_row(item, job.task, pending.prompt.text, error or "no image")
        return pending
    from vlmo.engine.scheduler import Collector

    pending.size, pending.sink = image.size, Collector()
    try:
        pending.request = scheduler.request(image, pending.prompt, options, pending.sink)
    except VlmoError as e:
        pending.row = error_row(item, job.task, pending.prompt.text, str(e))
    return pending


def _row(vlm: VLMo, job: BatchJob, pending: _Pending) -> Row:
    """A finished input's row: its answer's payload, or its one-line error (an error that is not vlmo's own, such
    as running out of memory, ends the run instead)."""
    assert pending.sink is not None and pending.prompt is not None
    try:
        end = pending.sink.finished()
        answer = vlm.answer(pending.prompt, end, pending.size, mask_decoder=job.mask_decoder)
    except VlmoError as e:
        return error_row(pending.item, job.task, pending.prompt.text, str(e))
    return result_row(pending.item, job.task, pending.prompt.text, answer.payload())


# -- a whole job -------------------------------------------------------------------------------------------------


class _Loader:
    """Loads the next batches' images on a background thread while the model runs the current one.

    At most `depth` loaded batches wait, so memory stays bounded; closing stops the thread at its next batch."""

    _DONE = object()

    def __init__(self, batches: Iterator[list[BatchInput]], depth: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(batches,), name="vlmo-batch-loader", daemon=True)
        self._thread.start()

    def _work(self, batches: Iterator[list[BatchInput]]) -> None:
        try:
            for batch in batches:
                if not self._put([load(item) for item in batch]):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[list[Loaded]]:
        while True:
            got = self._queue.get()
            if got is self._DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_batches(
    vlm: VLMo,
    job: BatchJob,
    inputs: Inputs,
    *,
    batch_size: int = 8,
    skip: Iterable[str] = (),
    limit: int | None = None,
) -> Iterator[list[Row]]:
    """The rows in input order, `batch_size` at a time (what a results file writes at once): the first `limit`
    inputs, less those whose id is in `skip`, through `answer_rows`. The counts and the job against the inputs are
    checked by the callers (`run`, `write_results`), before any model loads."""
    done = set(skip)
    pending = (item for item in itertools.islice(inputs, limit) if item.id not in done)
    loader = _Loader(_chunks(pending, batch_size))
    try:
        loaded = (one for chunk in loader for one in chunk)
        yield from _chunks(answer_rows(vlm, job, loaded, batch_size=batch_size), batch_size)
    finally:
        loader.close()


def check_counts(batch_size: int, limit: int | None) -> None:
    """OptionError unless `batch_size` and `limit` (None: all inputs) are whole numbers ≥ 1 (`check_count`)."""
    check_count(batch_size, "batch_size")
    if limit is not None:
        check_count(limit, "limit")


def _chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def run(
    vlm_or_model_id: VLMo | str | os.PathLike[str],
    inputs: Inputs | str | os.PathLike[str] | Iterable[BatchInput | str | os.PathLike[str]],
    *,
    task: TaskName,
    question: str | None = None,
    labels: str | None = None,
    prompt: str | None = None,
    lang: str = "en",
    detail: str = "short",
    mask_decoder: str | os.PathLike[str] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    skip: Iterable[str] = (),
    limit: int | None = None,
    **load_options: Any,
) -> Iterator[Row]:
    """Run `task` over `inputs` and yield one result row per input, in input order (`vlmo.batch.results`).

    `vlm_or_model_id`: a loaded `VLMo`, or what `VLMo.from_pretrained` takes (with `load_options`, e.g. device).
    `inputs`: a folder, glob, list of paths or manifest (`vlmo.batch.inputs.list_inputs`), or a list of image paths
    or `BatchInput`s. `question` / `labels` / `prompt`: the task's value for rows that do not carry their own.
    `skip`: ids already done (what `--resume` passes); `limit`: only the first N inputs. Everything is checked
    before the model loads; the rows come as the batches finish.
    """
    job = BatchJob(
        task=task,
        question=question,
        labels=labels,
        prompt=prompt,
        lang=lang,
        detail=detail,
        mask_decoder=None if mask_decoder is None else os.fspath(mask_decoder),
        max_new_tokens=max_new_tokens,
    )
    source = as_inputs(inputs)
    job.check_inputs(source)
    check_counts(batch_size, limit)
    vlm = _as_vlm(vlm_or_model_id, load_options)
    batches = run_batches(vlm, job, source, batch_size=batch_size, skip=skip, limit=limit)
    return (row for rows in batches for row in rows)


def _as_vlm(vlm_or_model_id: Any, load_options: dict[str, Any]) -> VLMo:
    from vlmo.api import VLMo

    if isinstance(vlm_or_model_id, VLMo):
        if load_options:
            raise InputError(f"loading options ({', '.join(load_options)}) need a model id, not a loaded VLMo")
        return vlm_or_model_id
    return VLMo.from_pretrained(vlm_or_model_id, **load_options)


# -- the CLI's job: rows into a results file ---------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """What a run did: rows written (errors among them), inputs skipped as already done, seconds of model time."""

    rows: int
    errors: int
    skipped: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        skipped = f", {self.skipped} already done" if self.skipped else ""
        return f"done: {self.rows} rows, {self.errors} errors{skipped}, {self.seconds:.1f} s, {self.rate:.2f} images/s"


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; `summary` says what had been written (every finished batch)."""

    def __init__(self, summary: Summary) -> None:
        super().__init__(summary.line())
        self.summary = summary


def check_not_an_input(path: str | os.PathLike[str], inputs: Inputs) -> None:
    """OutputPathError when the results file `path` is the job's input file (a manifest or a list of paths; the same
    file, also through a symbolic link or another name for it), whatever `--force` or `--resume` say: the results
    would replace what the job reads."""
    source = Path(inputs.source)
    out = Path(path)
    try:
        same = source.is_file() and out.exists() and os.path.samefile(out, source)
    except OSError:
        same = False
    if same:
        raise OutputPathError(
            f"--out {braced(str(out))} is the input {braced(str(source))}; the results would replace it, so choose "
            "another --out",
            out,
        )


def open_results(
    path: str | os.PathLike[str],
    task: TaskName,
    *,
    resume: bool,
    force: bool,
    job: BatchJob | None = None,
    model: str | None = None,
    inputs: Inputs | None = None,
) -> Results:
    """The results file `path` for a job of `task` (`.jsonl`, or `.parquet` through a journal, `batch_parquet`):
    new (an existing one refused unless `force`), or with `resume` the existing one, whose ids are then `done` (a
    file of another task's rows is refused).

    With the `job` (and the `model` name and `inputs`, as the CLI passes them), a new file's run parameters are kept
    beside it (`JobRecord`), and a resume is refused when they differ or when the file holds rows of ids that are not
    among the inputs: a resumed run never mixes prompts, models or data sets in one file."""
    out = check_results_path(path)
    lock = ResultsLock(out)  # before anything touches the file: a second job neither appends to nor truncates it
    try:
        results = _open_results(out, task, resume=resume, force=force)
        try:
            if job is not None:
                record = JobRecord.of(job, model)
                if resume:
                    record.check_resume(out, results.done, inputs)
                else:
                    record.write(out)
        except BaseException:
            results.close()
            raise
        return _LockedResults(results, lock)
    except BaseException:
        lock.release()
        raise


@dataclass(frozen=True)
class JobRecord:
    """A run's parameters, kept beside its results file (hidden `.RESULTS.job.json`) so that `--resume` can check
    that it continues the same job: task, question, labels, prompt, language, detail, max tokens and model."""

    fields: dict[str, Any]

    @classmethod
    def of(cls, job: BatchJob, model: str | None) -> JobRecord:
        keep = ("task", "question", "labels", "prompt", "lang", "detail", "max_new_tokens")
        return cls({**{k: getattr(job, k) for k in keep}, "model": model})

    @staticmethod
    def path(out: Path) -> Path:
        return out.parent / f".{out.name}.job.json"

    def write(self, out: Path) -> None:
        import json

        from vlmo.fileio.atomic import write_output

        write_output(self.path(out), json.dumps(self.fields, ensure_ascii=False, indent=1) + "\n", force=True)

    def check_resume(self, out: Path, done: set[str], inputs: Inputs | None) -> None:
        """OptionError when the run that wrote `out` had other parameters (as far as its record says; results
        from before records were kept are checked by task only) or when `out` holds ids that are not inputs."""
        import json

        record = self.path(out)
        if record.is_file():
            try:
                before = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                before = None
            if not isinstance(before, dict):
                raise OptionError(f"cannot read {braced(str(record))}; start over with {{force}}", force=None)
            changed = [k for k, v in self.fields.items() if k in before and before[k] != v]
            if changed:
                said = ", ".join(f"{k} {before[k]!r} (now {self.fields[k]!r})" for k in changed)
                raise OptionError(
                    f"{braced(str(out))} was written with {braced(said)}; resume with the same options, or start "
                    "over with {force}",
                    force=None,
                )
        if inputs is not None:
            foreign = sorted(done - set(inputs.ids))
            if foreign:
                raise OptionError(
                    f"{braced(str(out))} holds {len(foreign)} rows whose ids are not among the inputs (e.g. "
                    f"{braced(repr(foreign[0]))}); resume with the same INPUT, or start over with {{force}}",
                    force=None,
                )


def _open_results(out: Path, task: TaskName, *, resume: bool, force: bool) -> Results:
    if not resume and not force and out.is_file():
        raise OutputPathError(
            f"{braced(str(out))} already exists; pass {{resume}} to continue it, {{force}} to replace it, or choose "
            "another --out",
            out,
            resume=None,
            force=None,
        )
    if out.suffix.lower() == ".parquet":
        from vlmo.batch.parquet import ParquetResults

        return ParquetResults.open(out, task, resume=resume, force=force)
    return JsonlResults.open(out, task, resume=resume, force=force)


class _LockedResults:
    """A results file and the run's lock on it (`ResultsLock`), released when the file is closed."""

    def __init__(self, results: Results, lock: ResultsLock) -> None:
        self.results, self.lock = results, lock
        self.path, self.done = results.path, results.done  # the same set: writes update it

    def write(self, rows: list[Row]) -> None:
        self.results.write(rows)

    def finish(self) -> None:
        self.results.finish()

    def close(self) -> None:
        try:
            self.results.close()
        finally:
            self.lock.release()


def write_results(
    load_model: Callable[[], VLMo],
    job: BatchJob,
    inputs: Inputs,
    results: Results,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool | None = None,
) -> Summary:
    """Run the job over the inputs that `results` does not hold yet, writing each batch's rows as it finishes.

    The model loads only when there is something to do. `progress`: a bar on stderr (None: on a terminal). Ctrl-C
    stops at once; the batch in flight is dropped, every finished one is on disk (a write under way completes
    first), and `BatchInterrupted` carries the summary. When every input has its row, `results.finish()` runs.
    """
    check_counts(batch_size, limit)
    job.check_inputs(inputs)
    todo = sum(1 for i in inputs.ids[:limit] if i not in results.done)
    skipped = len(inputs.ids[:limit]) - todo
    if todo == 0:
        results.finish()
        return Summary(0, 0, skipped, 0.0)
    vlm = load_model()
    rows = errors = 0
    started = time.perf_counter()
    shown = sys.stderr.isatty() if progress is None else progress
    try:
        with RowsProgress(todo, shown) as bar:
            for batch in run_batches(vlm, job, inputs, batch_size=batch_size, skip=results.done, limit=limit):
                with _sigint_deferred():  # a Ctrl-C during the write stops the run after it, counted
                    results.write(batch)
                    rows += len(batch)
                    errors += sum(row["error"] is not None for row in batch)
                bar.advance(len(batch), errors, rows / (time.perf_counter() - started))
    except KeyboardInterrupt:
        raise BatchInterrupted(Summary(rows, errors, skipped, time.perf_counter() - started)) from None
    results.finish()
    return Summary(rows, errors, skipped, time.perf_counter() - started)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Let a write under way finish before Ctrl-C stops the run (main thread only: where signals arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class RowsProgress(ProgressBars):
    """The batch bar on stderr (`vlmo.progress`): rows done, images/s, errors so far, ETA; or nothing."""

    def __init__(self, total: int, shown: bool) -> None:
        super().__init__(enabled=shown)
        self._total = total

    def __enter__(self) -> RowsProgress:
        super().__enter__()
        self._bar = self.add("batch", self._total)
        return self

    def advance(self, n: int, errors: int, rate: float) -> None:
        self._bar.advance(n)
        self._bar.set_postfix(f"{rate:.2f} images/s, {errors} errors")


__all__ = [
    "open_results",
    "JobRecord",
    "check_not_an_input",
    "BATCH_TASKS",
    "BatchInterrupted",
    "BatchJob",
    "Summary",
    "load",
    "process",
    "answer_rows",
    "run",
    "run_batches",
    "write_results",
]
