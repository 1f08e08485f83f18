"""`vlmo batch --ray`: the same job on Ray Data, on this machine or on a cluster (`pip install "vlmo[ray]"`).

    inputs ──from_items──▶ map_batches(_Worker: an actor pool, one loaded VLMo per actor) ──▶ shard sink ──▶ RESULTS/

The inputs are listed by the driver (`vlmo.batch.inputs`: the same ids as a single-process run) and become a Ray
dataset; each actor loads the model once and runs `vlmo.batch.runner.process` on its batches, the function the
single-process run uses, so the rows are the same (greedy answers do not depend on the batch). RESULTS is a folder
of shards, `part-<run>-<n>.jsonl` or `.parquet` (the folder's name says which: `*.jsonl` gives JSON Lines, anything
else Parquet), each written whole (temporary file, fsync, rename) on the driver's node, so a cluster needs no shared
file system. A block is one batch, and its shard is written as soon as the block is done, by a write task that
needs no CPU slot (so it never waits behind the model actors): an interrupted run loses at most the batches in
flight, and `--resume` finishes the rest.

The driver shows vlmo's own progress bar (rows on disk, counted from the shards) and summary line, as the
single-process run does, Ctrl-C included; Ray's own progress bars and its internal warnings stay in Ray's log folder
(`VLMO_DEBUG=1` shows them).

When an actor's process dies (killed, out of memory, a node lost), Ray restarts the actor (it loads the model again)
and retries the batch it was running (Ray Data's defaults for actor pools: `max_restarts` and `max_task_retries`
-1, without limit); the dead attempt's rows never reach the sink, so every input still gets exactly one row. A
shard's name is fixed by its write task, so a retried write replaces its own shard rather than adding a second one.
`--resume` skips the ids already in the folder's shards.

Ray starts locally unless `RAY_ADDRESS` names a running cluster (`ray start --head` on one machine, `ray start
--address=HEAD:6379` on the others; docs/batch.md).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmo.batch.inputs import BatchInput, Inputs
from vlmo.batch.results import ResultsLock, Row, done_ids, parse_row, row_line
from vlmo.batch.runner import BatchInterrupted, BatchJob, RowsProgress, Summary, check_counts, load, process
from vlmo.errors import OptionError, VlmoError, check_count, check_number
from vlmo.fileio.atomic import OutputPathError, check_output_dir, write_output
from vlmo.progress import wanted
from vlmo.tasks import TaskName


@dataclass(frozen=True)
class RayOptions:
    """How the job spreads: `num_workers` actors (model replicas), each with these CPUs and GPUs.

    `address`: the cluster to join; None: `RAY_ADDRESS` if set, else a Ray started here for this job.
    """

    num_workers: int = 2
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    address: str | None = None

    def __post_init__(self) -> None:
        check_count(self.num_workers, "num_workers")
        check_number(self.num_gpus_per_worker, "num_gpus_per_worker", minimum=0)
        check_number(self.num_cpus_per_worker, "num_cpus_per_worker", above=0)


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the `data` extra of Ray
    except ImportError:
        raise OptionError('{ray} needs Ray Data; pip install "vlmo[ray]"', ray=None) from None
    return ray


def shard_format(out: Path) -> str:
    """ "jsonl" for a folder named `*.jsonl`, else "parquet"."""
    return "jsonl" if out.suffix.lower() == ".jsonl" else "parquet"


def read_shards(out: str | os.PathLike[str], prefix: str = "") -> list[Row]:
    """Every row in a folder of shards (both formats), in shard-name order; `prefix`: one run's shards only."""
    return [row for shard in sorted(Path(out).glob(f"part-{prefix}*")) for row in read_shard(shard)]


def run_ray(
    job: BatchJob,
    inputs: Inputs,
    out: str | os.PathLike[str],
    load_options: dict[str, Any],
    options: RayOptions = RayOptions(),
    *,
    batch_size: int = 8,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
) -> Summary:
    """Run `job` over `inputs` on Ray, writing shards into the folder `out`; returns what this run wrote.

    `load_options`: `VLMo.from_pretrained`'s arguments (`model` and the rest), used by every actor. An `out` that
    holds shards is refused unless `resume` (skip the ids in them) or `force` (remove them first).
    """
    ray = require_ray()
    check_counts(batch_size, limit)
    job.check_inputs(inputs)
    lock = ResultsLock(Path(out))  # held for the whole run: no second job writes shards here meanwhile
    try:
        return _run_locked(ray, job, inputs, Path(out), load_options, options, batch_size, limit, resume, force)
    finally:
        lock.release()


def _run_locked(
    ray: Any,
    job: BatchJob,
    inputs: Inputs,
    out: Path,
    load_options: dict[str, Any],
    options: RayOptions,
    batch_size: int,
    limit: int | None,
    resume: bool,
    force: bool,
) -> Summary:
    folder = _prepare_folder(out, resume=resume, force=force)
    done = done_ids(read_shards(folder), folder, job.task) if resume else set()
    items = [_item_row(item) for item in itertools.islice(inputs, limit) if item.id not in done]
    skipped = min(len(inputs), limit or len(inputs)) - len(items)
    if not items:
        return Summary(0, 0, skipped, 0.0)
    with _stderr_aside():
        return _run_connected(ray, job, items, skipped, folder, load_options, options, batch_size)


def _run_connected(
    ray: Any,
    job: BatchJob,
    items: list[dict[str, Any]],
    skipped: int,
    folder: Path,
    load_options: dict[str, Any],
    options: RayOptions,
    batch_size: int,
) -> Summary:
    prefix = secrets.token_hex(3)  # this run's shards, beside those of the runs it resumes
    fence = _WriteFence(folder / f".part-{prefix}.open")
    started_here = False
    try:
        started_here = _connect(ray, options)
        started = time.perf_counter()
        sink = _shard_sink(folder, job, shard_format(folder), prefix, fence.path)
        dataset = ray.data.from_items(items, override_num_blocks=_blocks(len(items), batch_size))
        # Ray Data restarts a dead actor and retries its batch by default (max_restarts and max_task_retries -1).
        mapped = dataset.map_batches(
            _worker_class(load_options, job, options.num_cpus_per_worker),
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=options.num_workers),
            num_cpus=options.num_cpus_per_worker,
            num_gpus=options.num_gpus_per_worker,
        )
        with _ShardProgress(folder, prefix, len(items), started) as progress:
            try:
                # Write tasks take no CPU slot: a finished block is written at once, not after the model actors.
                mapped.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=1)
            except KeyboardInterrupt:
                fence.close()  # the write tasks still running add nothing now: the summary is what is on disk
                raise BatchInterrupted(progress.summary(skipped)) from None
        return progress.summary(skipped)
    except Exception as e:
        cause = _vlmo_cause(e)
        if cause is not None:
            raise cause from None
        raise
    finally:
        fence.close()
        if started_here:
            ray.shutdown()


@contextmanager
def _stderr_aside() -> Iterator[None]:
    """Ray's C++ core writes its warnings straight to the process's stderr (file descriptor 2: an actor's restart
    policy, worker start-up, …), where they would bury vlmo's bar and summary. While Ray runs, descriptor 2 goes to
    `vlmo-batch-<pid>.log` in Ray's temp folder, and Python's `sys.stderr` (vlmo's bar and messages) to a copy of
    the original descriptor, so the user sees vlmo's lines only. `VLMO_DEBUG=1` leaves stderr alone."""
    if os.environ.get("VLMO_DEBUG"):
        yield
        return
    folder = Path(tempfile.gettempdir()) / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / f"vlmo-batch-{os.getpid()}.log", "ab")  # noqa: SIM115 - closed in the finally below
    saved = os.dup(2)
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests): it is not descriptor 2
        python_on_fd2 = False
    python_stderr = sys.stderr
    if python_on_fd2:
        sys.stderr.flush()
        sys.stderr = open(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log.close()
        if python_on_fd2:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_stderr


def _blocks(count: int, batch_size: int) -> int:
    """One block per batch: a block's shard is written when it is done, so an interrupted run loses at most the
    batches in flight, whatever the input's size (a fixed number of blocks made each shard a fraction of the job)."""
    return max(1, -(-count // batch_size))


class _ShardProgress:
    """vlmo's progress bar for a Ray run, fed by the rows this run's shards hold (polled on a thread), and the run's
    summary from them: the single-process run's bar and summary line, under `--ray` too."""

    def __init__(self, folder: Path, prefix: str, total: int, started: float) -> None:
        self.folder, self.prefix, self.started = folder, prefix, started
        self._bar = RowsProgress(total, wanted(None))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="vlmo-ray-progress", daemon=True)
        self._counted: dict[Path, tuple[int, int]] = {}  # shard → (rows, errors)

    def __enter__(self) -> _ShardProgress:
        self._bar.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._count()
        self._bar.__exit__(*exc)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._count()

    def _count(self) -> None:
        for shard in sorted(self.folder.glob(f"part-{self.prefix}-*")):
            if shard in self._counted:  # temporary files are dot-files: never matched
                continue
            try:
                rows = read_shard(shard)
            except (OSError, VlmoError):  # being renamed into place: counted at the next poll
                continue
            self._counted[shard] = (len(rows), sum(row["error"] is not None for row in rows))
            done, errors = self.totals()
            self._bar.advance(len(rows), errors, done / max(time.perf_counter() - self.started, 1e-9))

    def totals(self) -> tuple[int, int]:
        return sum(r for r, _ in self._counted.values()), sum(e for _, e in self._counted.values())

    def summary(self, skipped: int) -> Summary:
        self._count()
        rows, errors = self.totals()
        return Summary(rows, errors, skipped, time.perf_counter() - self.started)


def _prepare_folder(out: Path, *, resume: bool, force: bool) -> Path:
    folder = check_output_dir(out, what="--out")
    shards = sorted(folder.glob("part-*")) if folder.is_dir() else []
    if shards and not resume:
        if not force:
            raise OutputPathError(
                f"{out} already holds result shards; pass {{resume}} to continue or {{force}} to start over",
                out,
                resume=None,
                force=None,
            )
        for shard in shards:
            shard.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _connect(ray: Any, options: RayOptions) -> bool:
    """Join the cluster (`address` or `RAY_ADDRESS`) or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    debug = bool(os.environ.get("VLMO_DEBUG"))
    level = logging.DEBUG if debug else logging.ERROR  # Ray's warnings stay in its log folder unless VLMO_DEBUG
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    address = options.address or os.environ.get("RAY_ADDRESS")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = debug  # vlmo draws its own bar (`_ShardProgress`)
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = debug
    if address:
        ray.init(address=address, log_to_driver=debug, logging_level=level)
        return True
    # A local Ray gets room for every actor, whatever this machine has; writes take no CPU slot.
    need = options.num_workers * options.num_cpus_per_worker
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
        include_dashboard=False,
        log_to_driver=debug,
        logging_level=level,
    )
    return True


def _item_row(item: BatchInput) -> dict[str, Any]:
    """An input as a Ray dataset row: a path and image bytes in columns of their own (one type per column)."""
    path, data = (None, item.image) if isinstance(item.image, bytes) else (item.image, None)
    return {
        "id": item.id,
        "path": path,
        "data": data,
        "shown": item.shown,
        "question": item.question,
        "labels": item.labels,
        "prompt": item.prompt,
    }


class _WorkerBase:
    """One model replica (a Ray actor): loads the model once, then turns batches of inputs into result rows.

    What it loads and runs are class attributes (`_worker_class`), not constructor arguments: Ray keeps an actor's
    constructor arguments in its object store and warns, on every restart-enabled actor, that losing them would
    break the restart."""

    load_options: dict[str, Any]
    job: BatchJob
    threads: float

    def __init__(self) -> None:
        import torch

        from vlmo.api import VLMo

        torch.set_num_threads(max(1, int(self.threads)))  # the actor's CPUs, not the whole machine's
        self.vlm = VLMo.from_pretrained(**self.load_options)

    def __call__(self, batch: Any) -> Any:
        from vlmo.batch.parquet import table

        rows = batch.to_pylist()
        images = [r["data"] if r["path"] is None else r["path"] for r in rows]
        items = [
            BatchInput(r["id"], image, r["shown"], r["question"], r["labels"], r["prompt"])
            for r, image in zip(rows, images, strict=True)
        ]
        return table(process(self.vlm, self.job, [load(item) for item in items]), self.job.task)


def _worker_class(load_options: dict[str, Any], job: BatchJob, threads: float) -> type[_WorkerBase]:
    """The actor class for one run (shipped to the actors with the class itself)."""
    return type("_Worker", (_WorkerBase,), {"load_options": load_options, "job": job, "threads": threads})


class _WriteFence:
    """A file that lets this run's write tasks add shards while it exists. A write task holds a shared `flock` on it
    while it writes a shard (`_fenced_write`); `close` takes the lock exclusively and removes the file, so once it
    returns no shard appears any more, and Ctrl-C's summary counts exactly the rows on disk (a write task still
    running after Ctrl-C would otherwise add a shard that the summary and the bar did not count). The write tasks run
    on the driver's node (`supports_distributed_writes` False), so the lock is a local one. Where the platform has
    no `flock`, removing the file still stops the writes that start afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def close(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return  # closed already
        try:
            _flock(fd, exclusive=True)  # waits for the shard being written, if any
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock


def _flock(fd: int, *, exclusive: bool) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def _fenced_write(fence: Path, shard: Path, rows: list[Row], task: TaskName) -> bool:
    """Write `shard` if the run's `_WriteFence` is still open; False (nothing written) once it is closed."""
    try:
        fd = os.open(fence, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        _flock(fd, exclusive=False)
        if os.fstat(fd).st_nlink == 0:  # removed while this task waited for the lock
            return False
        _write_shard(shard, rows, task)
        return True
    finally:
        os.close(fd)


_SINK_CLASS: Any = None


def _shard_sink(folder: Path, job: BatchJob, fmt: str, prefix: str, fence: Path) -> Any:
    """A Ray Datasink that writes each write task's rows as one shard, whole, named by the task (so that a retried
    write replaces its own shard), while the run's `_WriteFence` is open. The class is made on first use, so
    importing this module does not import Ray."""
    global _SINK_CLASS
    if _SINK_CLASS is None:
        from ray.data import Datasink
        from ray.data.block import BlockAccessor

        class ShardDatasink(Datasink):
            def __init__(self, folder: Path, job: BatchJob, fmt: str, prefix: str, fence: Path) -> None:
                self.folder, self.task, self.fmt, self.prefix, self.fence = folder, job.task, fmt, prefix, fence

            @property
            def supports_distributed_writes(self) -> bool:
                return False  # shards land on the driver's node: no shared file system needed

            def write(self, blocks: Iterable[Any], ctx: Any) -> int:
                rows = [row for block in blocks for row in BlockAccessor.for_block(block).to_arrow().to_pylist()]
                shard = self.folder / f"part-{self.prefix}-{ctx.task_idx:05d}.{self.fmt}"
                if rows and not _fenced_write(self.fence, shard, rows, self.task):
                    return 0  # the run was interrupted: this batch is left to --resume
                return len(rows)

        _SINK_CLASS = ShardDatasink
    return _SINK_CLASS(folder, job, fmt, prefix, fence)


def _write_shard(shard: Path, rows: list[Row], task: TaskName) -> None:
    if shard.suffix == ".jsonl":
        write_output(shard, "".join(row_line(row) + "\n" for row in rows))
        return
    from vlmo.batch.inputs import require_pyarrow
    from vlmo.batch.parquet import table

    parquet = require_pyarrow().parquet
    write_output(shard, lambda tmp: parquet.write_table(table(rows, task), tmp))


def read_shard(shard: Path) -> list[Row]:
    """The rows of one shard (`.jsonl` or `.parquet`)."""
    if shard.suffix == ".jsonl":
        lines = shard.read_text(encoding="utf-8").splitlines()
        return [parse_row(line, f"{shard}:{n}") for n, line in enumerate(lines, 1)]
    from vlmo.batch.parquet import read_rows

    return read_rows(shard)


def _vlmo_cause(e: BaseException) -> VlmoError | None:
    """vlmo's own error behind a Ray failure (a model that an actor could not load, …), to report it in one line."""
    seen = 0
    current: BaseException | None = e
    while current is not None and seen < 8:
        if isinstance(current, VlmoError):
            return current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
        seen += 1
    return None


__all__ = ["RayOptions", "read_shards", "require_ray", "run_ray", "shard_format"]
