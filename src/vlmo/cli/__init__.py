"""The `vlmo` command line: one Typer app (`commands`), its shared options (`options`), the one table from
exceptions to messages and exit codes (`errors`) and the README's generated reference (`reference`).

`main` is the console script's entry point; it is imported on first use, so `import vlmo.cli.options` does not
build the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmo.cli.commands import app, main


def __getattr__(name: str) -> Any:
    if name in ("app", "main"):
        from vlmo.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'vlmo.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
