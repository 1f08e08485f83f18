"""One table from exceptions to one-line messages and exit codes, for the CLI.

Exit codes: 2 for usage errors (something typed can be fixed: arguments, options, input files, an output path that
exists, is a folder or a broken link: `vlmo.fileio.atomic.OutputPathError`), 1 for runtime failures (model, hub, disk,
memory, an output that could not be written: `vlmo.fileio.atomic.OutputError`), 130 for Ctrl-C. The traceback is shown
only with VLMO_DEBUG=1. Messages of `VlmoError`s already end with what to do next; the table adds hints for the others.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from vlmo.errors import USAGE_ERRORS, VlmoError, cli_option, command_line


class CliUsageError(VlmoError):
    """A command-line usage problem found by a command itself (exit code 2)."""


def _spelled(e: BaseException) -> str:
    """A vlmo error's message with the options it names spelled as the CLI's flags (`--mask-decoder vae-oid.npz`)."""
    assert isinstance(e, VlmoError)
    return command_line(e)[0]


def _oom(e: BaseException) -> str:
    return "out of memory; try --dtype bfloat16, fewer images at once, or --device cpu"


def _disk(e: BaseException) -> str:
    """A full disk: the file it hit when known, and the Hugging Face cache advice only for the cache."""
    name = getattr(e, "filename", None)
    if name is not None and not _in_hf_cache(str(name)):
        return f"could not write {name}: no space left on device; free some space"
    return f"no space left on device ({e}); free some space or point HF_HUB_CACHE at a larger disk"


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import constants

    try:
        return os.path.realpath(name).startswith(os.path.realpath(constants.HF_HUB_CACHE) + os.sep)
    except (OSError, ValueError):
        return False


def _permission(e: BaseException) -> str:
    name = getattr(e, "filename", None) or e
    return f"permission denied: {name}; check the file's permissions or choose another path"


def _unexpected(e: BaseException) -> str:
    return f"unexpected {type(e).__name__}: {e}; rerun with VLMO_DEBUG=1 for the traceback and report it"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def _is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno == errno.ENOSPC


# (matches, exit code, message). First match wins; order matters.
ERROR_TABLE: list[tuple[Any, int, Any]] = [
    # The library's option names as the CLI's flags, in every vlmo error (`VlmoError.spelled`).
    ((CliUsageError, *USAGE_ERRORS), 2, _spelled),
    (VlmoError, 1, _spelled),  # or the error's own `exit_code` (an error a server answered with)
    (_is_oom, 1, _oom),
    (_is_disk_full, 1, _disk),
    (PermissionError, 1, _permission),
    (Exception, 1, _unexpected),
]


def describe(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception."""
    for match, code, message in ERROR_TABLE:
        hit = isinstance(e, match) if isinstance(match, type | tuple) else match(e)
        if hit:
            return " ".join(message(e).split()), getattr(e, "exit_code", code) if isinstance(e, VlmoError) else code
    return _unexpected(e), 1


def report(e: BaseException) -> int:
    message, code = describe(e)
    if os.environ.get("VLMO_DEBUG") == "1":
        traceback.print_exception(e, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return code


def _cli_control_flow() -> tuple[type[BaseException], ...]:
    """Exceptions the CLI framework uses for help, usage errors and exit codes: let them through untouched.

    Typer ≥ 0.29 has its own (vendored) click; older Typer uses click itself. Cover both.
    """
    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    typer_base = getattr(typer.exceptions, "TyperException", None)
    if typer_base is not None:
        kinds.append(typer_base)
    try:
        import click
    except ImportError:
        pass
    else:
        kinds += [click.exceptions.Exit, click.exceptions.Abort, click.ClickException]
    return tuple(kinds)


_CONTROL_FLOW = _cli_control_flow()


class ErrorHandlingGroup(TyperGroup):
    """Runs commands with the error table applied, in the console script and under CliRunner alike."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _CONTROL_FLOW:
            raise
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`vlmo info | head -3`): nothing to report, as for any Unix filter. stdout goes to
            # /dev/null so that flushing it at exit does not fail again; 141 is the shell's code for SIGPIPE.
            _stdout_to_devnull()
            raise typer.Exit(141) from None
        except Exception as e:  # noqa: BLE001 - this is the one place that turns errors into messages
            raise typer.Exit(report(e)) from None


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (CliRunner's is a buffer): nothing is flushed to a pipe then
        pass


__all__ = ["CliUsageError", "ErrorHandlingGroup", "cli_option", "describe", "report"]
