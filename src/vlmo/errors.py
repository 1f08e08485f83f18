"""Exceptions for problems the user can fix.

Every error a user can cause or repair derives from `VlmoError`, so callers (the CLI above all) can tell them apart
from bugs. Internal invariants use `assert`; user input never does.
"""

from __future__ import annotations

from collections.abc import Callable


class VlmoError(Exception):
    """Base class of vlmo's user-facing errors. The message is one line and says what to do next."""


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

    The message names options as `{name}` fields so that each face spells them its own way: the library as Python
    keywords (`quantize="int8"`), the CLI as flags (`--quantize int8`, see `cli/errors.py`). An option given as None
    is named without a value (`dtype`, `--dtype`).
    """

    def __init__(self, template: str, **options: object) -> None:
        self.template, self.options = template, options
        super().__init__(self.spelled(python_option))

    def spelled(self, spell: Callable[[str, object], str]) -> str:
        """The message with every option named by `spell(name, value)`."""
        if not self.options:
            return self.template
        return self.template.format(**{name: spell(name, value) for name, value in self.options.items()})


class DeviceError(OptionError):
    """A device that is unknown or not available on this machine."""


def python_option(name: str, value: object) -> str:
    """How the library names an option in messages: `quantize="int8"`, or `quantize` without a value."""
    return name if value is None else f'{name}="{value}"'
