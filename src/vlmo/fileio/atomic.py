"""Writing output files so that nothing the user had is lost: the one mechanism every writer of vlmo uses.

A file is written to a temporary file in the same folder, flushed, fsynced and renamed into place, and the temporary
file is removed on any failure: the old file (if any) stays intact until the new one is complete. With `force=False`
the file is created exclusively (`os.link` of the finished temporary file), so a file that appeared while vlmo was
working (a second run, another program) is never replaced.

    check_output(out, force=False, what="--out")        # before the slow work: one-line errors for what was typed
    write_output(out, text_or_bytes, force=False)        # or a callable that writes the temporary path
    with atomic_path(out, force=True) as tmp:            # for libraries that write by file name
        image.save(tmp, format=image_format(out))
    with atomic_dir(run / "checkpoint-10") as tmp:       # a folder produced fresh, renamed into place whole
        ...
    log = AppendLog.resume(results)                      # a file that grows by whole lines (`vlmo batch`)

Failures raise `OutputError` (the environment: disk full, read-only, permissions; exit 1 in the CLI) or
`OutputPathError` (the path itself: it exists, is a folder, a broken symbolic link, has no folder; exit 2), both
naming the output path and the real cause. No torch here.
"""

from __future__ import annotations

import errno as errnos
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmo.errors import OptionError, VlmoError, braced

PathArg = str | os.PathLike[str]
Content = bytes | str | Callable[[Path], None]

# What to do about a failed write, by errno (the message is "could not write PATH: <reason>; <advice>").
_ADVICE = {
    errnos.ENOSPC: ("no space left on device", "free some space"),
    errnos.EDQUOT: ("disk quota exceeded", "free some space"),
    errnos.EROFS: ("read-only file system", "choose a writable place"),
    errnos.EACCES: ("permission denied", "check the folder's permissions or choose another place"),
    errnos.EPERM: ("operation not permitted", "check the folder's permissions or choose another place"),
    errnos.ENAMETOOLONG: ("file name too long", "choose a shorter name"),
}
# link() failures that mean "this file system has no hard links", not "the file exists".
_NO_LINKS = {errnos.EPERM, errnos.EXDEV, errnos.EMLINK, errnos.ENOSYS, getattr(errnos, "EOPNOTSUPP", -1)}


class OutputError(VlmoError):
    """An output that could not be written (disk full, read-only file system, permissions); names path and cause.

    `path` is the output, `errno` the cause's error number (None when there is none).
    """

    def __init__(self, message: str, path: PathArg, errno: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = Path(path), errno


class OutputPathError(OutputError, OptionError):
    """An output path that cannot be used as given: it exists (without force), is a folder, a broken symbolic
    link, or its folder is missing. Something the user typed, so a usage error."""

    def __init__(self, template: str, path: PathArg, **options: object) -> None:
        OptionError.__init__(self, template, **options)
        self.path, self.errno = Path(path), None


def _exists_error(path: Path, what: str = "") -> OutputPathError:
    where = f"another {what}" if what else "another name"
    template = f"{braced(path)} already exists; pass {{force}} to overwrite it or choose {where}"
    return OutputPathError(template, path, force=None)


def _cause(e: BaseException) -> OSError | None:
    """The operating-system error behind `e`: itself, its cause, or the `os error N` of a Rust library's message
    (safetensors reports a full disk as `SafetensorError: … Os { code: 28, … }`)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(e))
        if found:
            number = int(found.group(1) or found.group(2))
            return OSError(number, os.strerror(number))
        e, seen = e.__cause__ or e.__context__, seen + 1  # type: ignore[assignment]
    return None


def write_failed(path: PathArg, e: BaseException) -> OutputError:
    """The one-line error for a failed write of `path` (`e`: what went wrong), naming the path and the cause."""
    cause = _cause(e)
    number = cause.errno if cause is not None else None
    if number in _ADVICE:
        reason, advice = _ADVICE[number]
        return OutputError(f"could not write {path}: {reason}; {advice}", path, number)
    reason = (cause.strerror or str(cause)) if cause is not None else f"{type(e).__name__}: {e}"
    return OutputError(f"could not write {path}: {reason}", path, number)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows), or the folder vanished
        return False


def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_folder(path: Path, folder: Path, what: str, make_parents: bool) -> None:
    """The folder `path` goes into: it exists (or can be made), is a folder, and can be written."""
    label = f"{what} " if what else ""
    if not folder.is_dir():
        existing = _nearest_existing(folder)
        if not make_parents or (os.path.lexists(folder) or not existing.is_dir()):
            what_for = f" for {what}" if what else ""
            raise OutputPathError(f"no such directory{what_for}: {braced(folder)}", path)
        folder = existing
    if _read_only(folder):
        raise OutputError(
            f"cannot write {label}{path}: {folder} is on a read-only file system; choose a writable place",
            path,
            errnos.EROFS,
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {label}{path}: permission denied in {folder}; check its permissions or choose another place",
            path,
            errnos.EACCES,
        )


def check_output(path: PathArg, force: bool, *, what: str = "", make_parents: bool = False) -> Path:
    """Check an output file before the slow work, so a mistake costs no waiting; returns it as a Path.

    Refuses a folder, a broken symbolic link, an existing file without `force`, a missing folder (unless
    `make_parents`) and a folder that cannot be written. `what` names the path in messages (e.g. "--out").
    Writing still checks again (`write_output`): a file that appears in between is not replaced without `force`.
    """
    out = Path(path)
    label = f"{what} " if what else ""
    if out.is_dir():
        raise OutputPathError(f"{label}{braced(out)} is a directory; name a file", out)
    if out.is_symlink() and not out.exists():
        raise OutputPathError(
            f"{label}{braced(out)} is a broken symbolic link (to {braced(os.readlink(out))}); remove it or "
            "choose another name",
            out,
        )
    if out.exists() and not force:
        raise _exists_error(out, what)
    _check_folder(out, out.parent, what, make_parents)
    return out


def check_output_dir(path: PathArg, *, what: str = "") -> Path:
    """Check an output folder (made if missing) before the slow work: not a file, not a broken link, writable."""
    out = Path(path)
    label = f"{what} " if what else ""
    if out.is_symlink() and not out.exists():
        raise OutputPathError(f"{label}{braced(out)} is a broken symbolic link; remove it or choose another name", out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{label}{braced(out)} is a file, not a folder; choose a folder name", out)
    if out.is_dir():
        _check_folder(out, out, what, make_parents=False)
    else:
        _check_folder(out, out.parent, what, make_parents=True)
    return out


def _target(path: Path, force: bool) -> Path:
    """The file to write for `path`: a symbolic link to a file is written through (its target replaced)."""
    if path.is_symlink():
        if not path.exists():
            raise OutputPathError(f"{braced(path)} is a broken symbolic link; remove it or choose another name", path)
        if not force:
            raise _exists_error(path)
        return Path(os.path.realpath(path))
    if path.is_dir():
        raise OutputPathError(f"{braced(path)} is a directory; name a file", path)
    return path


def _temp_name(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.{kind}")


def _new_temp(final: Path) -> Path:
    """An empty temporary file beside `final`, created exclusively (the umask applies, as to any new file)."""
    for _ in range(100):
        tmp = _temp_name(final, "tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errnos.EEXIST, "no free temporary name", str(final))


def _fsync(path: Path, directory: bool = False) -> None:
    if directory:
        try:  # the rename itself; not possible everywhere (Windows), so best effort
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path, force: bool, shown: Path) -> None:
    """Put the finished `tmp` at `final`: replace with `force`, otherwise create exclusively."""
    if force:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # fails if `final` appeared meanwhile: nothing is replaced
    except FileExistsError:
        raise _exists_error(shown) from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        try:  # no hard links here: reserve the name exclusively, then move the file onto our own placeholder
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise _exists_error(shown) from None
        try:
            os.replace(tmp, final)
        except BaseException:
            os.unlink(final)
            raise
        return
    os.unlink(tmp)


@contextmanager
def atomic_path(path: PathArg, *, force: bool = True, make_parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on leaving, it is fsynced and renamed to `path`.

    `force=False` never replaces an existing `path` (`OutputPathError`, the file untouched). On any failure the
    temporary file is removed; OS errors (and a library's `os error N`) become `OutputError` naming `path`, other
    exceptions pass through. The temporary name has another suffix: tell a library the format (`image_format`).
    """
    shown = Path(path)
    final = _target(shown, force)
    tmp: Path | None = None
    try:
        with _failures_named(shown):
            if make_parents:
                final.parent.mkdir(parents=True, exist_ok=True)
            tmp = _new_temp(final)
            yield tmp
            _fsync(tmp)
            _commit(tmp, final, force, shown)
            tmp = None
            _fsync(final.parent, directory=True)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


@contextmanager
def _failures_named(path: Path) -> Iterator[None]:
    """Turn a failure to write (disk full, permissions, …) inside the block into an OutputError naming `path`;
    anything else (a bug, Ctrl-C, vlmo's own errors) passes through unchanged."""
    try:
        yield
    except BaseException as e:
        if _cause(e) is None or isinstance(e, VlmoError):
            raise
        raise write_failed(path, e) from e


def write_output(path: PathArg, content: Content, *, force: bool = True, make_parents: bool = False) -> Path:
    """Write `content` to `path` atomically (see `atomic_path`); returns `path` as a Path.

    `content`: bytes, text (UTF-8), or a callable that writes the temporary path it is given.
    """
    with atomic_path(path, force=force, make_parents=make_parents) as tmp:
        if isinstance(content, bytes):
            with open(tmp, "wb") as f:
                f.write(content)
        elif isinstance(content, str):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(content)
        else:
            content(tmp)
    return Path(path)


class AppendLog:
    """A file that grows by whole lines, a batch at a time: results that must survive a kill (`vlmo batch`).

    Each `append` writes its lines at the end of the file, then fsyncs: once it returns, they are on disk. A kill
    (SIGKILL, power loss) during an append can leave only a torn last line, one without its newline; `resume` cuts
    it off before anything else is written, so the lines kept are exactly the lines that were written whole. An
    append that fails (disk full) or is interrupted is cut back to where it started, leaving no partial batch.

        log = AppendLog.create(out, force=False, what="--out")   # refuses an existing file unless force
        log = AppendLog.resume(out, what="--out")                 # or continue one: torn last line cut off
        done = list(log.lines())                                  # what earlier runs wrote
        log.append(['{"id": "a"}', '{"id": "b"}'])               # one write, one fsync
    """

    def __init__(self, path: Path, fd: int, cut: int = 0) -> None:
        self.path, self._fd = path, fd
        self.cut = cut  # bytes of a torn last line that `resume` removed (0: none)

    @classmethod
    def create(cls, path: PathArg, *, force: bool, what: str = "", make_parents: bool = False) -> AppendLog:
        """A new, empty log at `path`. An existing file is refused unless `force`, and then emptied; the file is
        created exclusively otherwise, so one that appears after the check is never emptied."""
        out = check_output(path, force, what=what, make_parents=make_parents)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if force else os.O_EXCL)
        with _failures_named(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(out, flags, 0o666)
            except FileExistsError:
                raise _exists_error(out, what) from None
            _fsync(out.parent, directory=True)
        return cls(out, fd)

    @classmethod
    def resume(cls, path: PathArg, *, what: str = "", make_parents: bool = False) -> AppendLog:
        """The log at `path` ready to append to, its torn last line (if any) cut off; a new one if there is none."""
        out = Path(path)
        if not os.path.lexists(out):
            return cls.create(out, force=False, what=what, make_parents=make_parents)
        check_output(out, True, what=what)  # a folder or a broken link is refused as for any output
        with _failures_named(out):
            fd = os.open(_target(out, True), os.O_RDWR | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                keep = _whole_lines_end(fd, size)
                if keep < size:
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
        return cls(out, fd, cut=size - keep)

    def lines(self) -> Iterator[str]:
        """The log's lines as they are on disk now (without newlines; bytes that are not UTF-8 replaced)."""
        with open(self.path, "rb") as f:
            for raw in f:
                yield raw.rstrip(b"\n").decode("utf-8", errors="replace")

    def append(self, lines: list[str]) -> None:
        """Write `lines` (each without a newline) at the end in one go and fsync; on any failure, none of them stay."""
        assert all("\n" not in line for line in lines), "a log line holds a newline"
        data = memoryview("".join(f"{line}\n" for line in lines).encode("utf-8"))
        start = os.fstat(self._fd).st_size
        try:
            with _failures_named(self.path):
                while data:
                    data = data[os.write(self._fd, data) :]
                os.fsync(self._fd)
        except BaseException:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _whole_lines_end(fd: int, size: int) -> int:
    """The offset just past the last newline in the first `size` bytes of `fd` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        chunk = os.pread(fd, end - start, start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def image_format(path: PathArg) -> str:
    """PIL's format name for an image file name (`boxes.png` → "PNG"), for saving under a temporary name."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if suffix not in formats:
        raise OutputPathError(f"cannot save images as {suffix or 'a file without extension'}; use .png or .jpg", path)
    return formats[suffix]


@contextmanager
def atomic_dir(path: PathArg, *, force: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to fill; on leaving, it replaces `path` whole.

    A folder that is produced fresh (a fine-tuning checkpoint, an exported model) thus appears complete or not at
    all. An existing `path` is replaced only with `force` (it is moved aside, then removed once the new one is in
    place). On failure the temporary folder is removed.
    """
    final = Path(path)
    if final.is_symlink() and not final.exists():
        raise OutputPathError(f"{braced(final)} is a broken symbolic link; remove it or choose another name", final)
    if final.exists() and not final.is_dir():
        raise OutputPathError(f"{braced(final)} is a file, not a folder; choose a folder name", final)
    tmp: Path | None = None
    try:
        with _failures_named(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_name(final, "tmp")
            tmp.mkdir()
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    _fsync(file)
            _fsync(tmp, directory=True)
            old: Path | None = None
            if final.exists():
                if not force:
                    raise _exists_error(final)
                old = _temp_name(final, "old")
                os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                if old is not None:
                    os.rename(old, final)
                raise
            tmp = None
            _fsync(final.parent, directory=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "AppendLog",
    "OutputError",
    "OutputPathError",
    "atomic_dir",
    "atomic_path",
    "check_output",
    "check_output_dir",
    "image_format",
    "write_failed",
    "write_output",
]
