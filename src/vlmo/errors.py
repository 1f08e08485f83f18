"""Exceptions for problems the user can fix.

Every error a user can cause or repair derives from `VlmoError`, so callers (the CLI above all) can tell them apart
from bugs. Internal invariants use `assert`; user input never does.
"""

from __future__ import annotations


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


class DeviceError(VlmoError, ValueError):
    """A device that is unknown or not available on this machine."""
