"""Progress bars on stderr: the one helper behind every long task (downloads, the prepared-weights cache, batch
runs, evaluation, fine-tuning).

    with progress_bar(len(items), "VQAv2") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

A bar shows only when stderr is a terminal, unless told otherwise (`enabled=True` or False: a `progress=` argument,
tests); stdout stays for results. rich draws it, imported only when a bar shows. huggingface_hub draws its
downloads through a tqdm class: `ProgressBars.tqdm_class` gives one that draws here, a bar per file.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from tqdm.std import tqdm

# What a bar counts, which says how its count and speed read: "items" (12/40), "bytes" (1.2/3.4 GB, 5.6 MB/s), or
# "percent" (a share of a total in units too small to name, e.g. weights' elements: 42%).
Unit = Literal["items", "bytes", "percent"]


def wanted(enabled: bool | None) -> bool:
    """Whether to draw: `enabled` when given, else whether stderr is a terminal."""
    if enabled is not None:
        return enabled
    return sys.stderr is not None and sys.stderr.isatty()


class Bar:
    """One bar of a `ProgressBars`; every method does nothing when the bars are not shown."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def update(self, *, completed: float | None = None, total: float | None = None) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, total=total)

    def set_postfix(self, text: str) -> None:
        """Text shown after the count (speed, loss, errors so far)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, postfix=text)


class ProgressBars:
    """Bars drawn together on stderr while the context is open (a bar per file of a download), or nothing.

    transient: remove the bars when done (for a one-time step that leaves nothing to read, such as the cache).
    """

    def __init__(self, *, unit: Unit = "items", enabled: bool | None = None, transient: bool = False) -> None:
        self.unit, self.shown, self.transient = unit, wanted(enabled), transient
        self._progress: Progress | None = None

    def __enter__(self) -> ProgressBars:
        if self.shown:
            self._progress = _rich_progress(self.unit, self.transient)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def add(self, description: str, total: float | None, *, completed: int = 0) -> Bar:
        """A new bar; `total` None while unknown (a download before its size arrives)."""
        if self._progress is None:
            return Bar(None, None)
        return Bar(self._progress, self._progress.add_task(description, total=total, completed=completed, postfix=""))

    def tqdm_class(self, description: str) -> type[tqdm]:
        """A tqdm class that draws its counts as a bar here, named `description` (huggingface_hub's `tqdm_class=`,
        which makes one instance per file), or nothing when the bars are not shown."""
        return type("Bar", (_tqdm_bar(),), {"bars": self, "label": description})


@contextmanager
def progress_bar(
    total: float | None,
    description: str,
    *,
    unit: Unit = "items",
    enabled: bool | None = None,
    transient: bool = False,
    completed: int = 0,
) -> Iterator[Bar]:
    """One bar on stderr while the context is open (see the module docstring); `completed`: where it starts (a
    resumed run)."""
    with ProgressBars(unit=unit, enabled=enabled, transient=transient) as bars:
        yield bars.add(description, total, completed=completed)


def _rich_progress(unit: Unit, transient: bool) -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    count: tuple[ProgressColumn, ...] = {
        "items": (MofNCompleteColumn(),),
        "bytes": (DownloadColumn(), TransferSpeedColumn()),
        "percent": (TaskProgressColumn(),),
    }[unit]
    columns = (TextColumn("{task.description}"), BarColumn(), *count, TextColumn("{task.fields[postfix]}"))
    return Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=transient)


class _Discard(io.TextIOBase):
    """Where tqdm's own text goes: rich draws the bars."""

    def write(self, s: str) -> int:
        return len(s)


@functools.cache
def _tqdm_bar() -> type[tqdm]:
    """The base of `ProgressBars.tqdm_class`, defined on first use so that tqdm is imported only then."""
    from tqdm.std import tqdm

    class TqdmBar(tqdm):
        """A tqdm that keeps tqdm's bookkeeping (n, total, a resumed download's offset) but draws into `bars`."""

        monitor_interval = 0  # no tqdm monitor thread
        bars: ProgressBars
        label: str

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._bar: Bar | None = None
            kwargs.pop("name", None)
            kwargs.update(file=_Discard(), disable=False)
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if self._bar is None:  # the first draw: the total is known by now, when there is one
                self._bar = self.bars.add(self.label or self.desc, self.total, completed=self.n)
            else:
                self._bar.update(completed=self.n, total=self.total)
            return True

        def close(self) -> None:
            super().close()
            if self._bar is not None:
                self._bar.update(completed=self.n, total=self.total)

        # With these two methods, huggingface_hub's Xet downloads report their network bytes here instead of
        # opening a second bar per file; the bar shows the bytes written to disk (`update`).
        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_transfer_postfix_str(self, s: str = "", refresh: bool = False) -> None:
            pass

    return TqdmBar


__all__ = ["Bar", "ProgressBars", "Unit", "progress_bar", "wanted"]
