"""Exceptions for problems the user can fix.

Every error a user can cause or repair derives from `VlmoError`, so callers (the CLI above all) can tell them apart
from bugs. Internal invariants use `assert`; user input never does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable


class VlmoError(Exception):
    """Base class of vlmo's user-facing errors. The message is one line and says what to do next.

    A message that tells the user to pass an option names it as a `{name}` field, so that each face spells it its
    own way: the library as a Python keyword (`mask_decoder="vae-oid.npz"`), the CLI as a flag
    (`--mask-decoder vae-oid.npz`, see `cli/errors.py`). An option given as None is named without a value.
    """

    def __init__(self, template: str = "", **options: object) -> None:
        self.template, self.options = template, options
        super().__init__(self.spelled(python_option))

    def spelled(self, spell: Callable[[str, object], str]) -> str:
        """The message with every option named by `spell(name, value)`."""
        options = getattr(self, "options", None)  # None: a subclass that did not call this __init__
        if options is None:
            return str(self)
        if not options:
            return self.template
        return self.template.format(**{name: spell(name, value) for name, value in options.items()})


class ConfigError(VlmoError, ValueError):
    """A `config.json` that vlmo cannot run: wrong model type, missing or contradictory fields."""


class CheckpointError(VlmoError):
    """A checkpoint directory or file that is missing, truncated, or does not match the config."""


class ImageError(VlmoError, ValueError):
    """An input that is not a readable image (missing file, not an image, truncated, too large)."""


class GenerationConfigError(VlmoError, ValueError):
    """Invalid sampling or generation settings (temperature, top-k, top-p, max tokens)."""


class InputError(VlmoError, ValueError):
    """Inputs that do not fit together, e.g. a list of 3 images with a list of 2 prompts."""


class OptionError(InputError):
    """A bad option value, or options that do not fit together.

    The message names options as `{name}` fields (`VlmoError`): the library as Python keywords (`quantize="int8"`),
    the CLI as flags (`--quantize int8`). An option given as None is named without a value (`dtype`, `--dtype`).
    """

    def __init__(self, template: str, **options: object) -> None:
        super().__init__(template, **options)


class DeviceError(OptionError):
    """A device that is unknown or not available on this machine."""


def python_option(name: str, value: object) -> str:
    """How the library names an option in messages: `quantize="int8"`, or `quantize` without a value."""
    return name if value is None else f'{name}="{value}"'


def cli_option(name: str, value: object) -> str:
    """How the command line names an option in messages: `--max-tokens 8`, or `--dtype` without a value."""
    flag = "--" + {"max_new_tokens": "max_tokens", "do_sample": "sample"}.get(name, name).replace("_", "-")
    return flag if value is None else f"{flag} {value}"


# The errors a command line user fixes by changing what they typed (exit code 2; any other vlmo error: 1).
USAGE_ERRORS: tuple[type[VlmoError], ...] = (InputError, GenerationConfigError, ImageError)


def command_line(error: VlmoError) -> tuple[str, int]:
    """`error` as the command line reports it: one line, options spelled as flags, and the exit code. The server
    sends this too (`vlmo.serve.errors`), so a command answered by a server fails with the same words."""
    return " ".join(error.spelled(cli_option).split()), 2 if isinstance(error, USAGE_ERRORS) else 1


def braced(text: object) -> str:
    """`text` for an `OptionError` template, which is `str.format`ted: its braces doubled (a path, a value)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _got(value: object) -> str:
    """The value a check refused, as the message shows it: its repr, cut short, ready for a template."""
    shown = repr(value)
    return braced(shown if len(shown) <= 40 else shown[:37] + "...")


# The shared checks of options, one per kind of value, called where an option enters (the CLI's options, a job's or
# a server's settings, a public function's arguments) and trusted below. Each names the option as a `{name}` field.


def check_count(value: object, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` as an int, or OptionError naming the option `name` (spelled by each face) unless it is a whole number
    ≥ `minimum` (and ≤ `maximum`, where given). The one check for counts and sizes (batch sizes, queue lengths,
    workers, steps, ports, …)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        wanted = f"≥ {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise OptionError(f"{{{name}}} must be a whole number {wanted}, got {_got(value)}", **{name: None})
    return value


def check_number(
    value: object, name: str, *, above: float | None = None, minimum: float | None = None, below: float | None = None
) -> float:
    """`value` as a float, or OptionError naming the option `name` unless it is a finite number (int or float,
    not bool) > `above` (or ≥ `minimum`) and < `below`, where given. The one check for amounts: seconds,
    megabytes, learning rates, GPUs per worker, …

        check_number(0, "max_image_mb", above=0)  # OptionError: max_image_mb must be a number > 0, got 0
    """
    bounds = [f"> {_bound(above)}"] if above is not None else []
    bounds += [f"≥ {_bound(minimum)}"] if minimum is not None else []
    bounds += [f"< {_bound(below)}"] if below is not None else []
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not (
        math.isfinite(number)
        and (above is None or number > above)
        and (minimum is None or number >= minimum)
        and (below is None or number < below)
    ):
        wanted = "a number " + " and ".join(bounds) if bounds else "a finite number"
        raise OptionError(f"{{{name}}} must be {wanted}, got {_got(value)}", **{name: None})
    return number


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_file(path: str | os.PathLike[str] | None, name: str) -> None:
    """OptionError naming the option `name` unless `path` is None or an existing file (checked before a model loads,
    where the file is read only later: a mask decoder, …)."""
    if path is not None and not os.path.isfile(path):
        raise OptionError(f"no such file for {{{name}}}: {braced(os.fspath(path))}", **{name: None})
