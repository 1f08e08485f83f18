"""vlmo: run, fine-tune and serve PaliGemma vision-language models in plain PyTorch.

The names below are imported on first use, so `import vlmo` (and `vlmo --help`) stays fast: torch loads only when a
model does.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# torch warns "Failed to initialize NumPy" on import when numpy is not installed. vlmo never hands tensors to numpy,
# so on a clean install (no numpy) that warning is noise before every answer; only this one message is hidden.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

_EXPORTS = {
    "VLMo": "vlmo.api",
    "Detection": "vlmo.detection",
    "Segmentation": "vlmo.segmentation",
    "PaliGemmaConfig": "vlmo.config",
    "ProjectorConfig": "vlmo.config",
    "TextConfig": "vlmo.config",
    "VisionConfig": "vlmo.config",
    "SamplingConfig": "vlmo.generation",
    "VlmoError": "vlmo.errors",
}

if TYPE_CHECKING:
    from vlmo.api import VLMo
    from vlmo.config import PaliGemmaConfig, ProjectorConfig, TextConfig, VisionConfig
    from vlmo.detection import Detection
    from vlmo.errors import VlmoError
    from vlmo.generation import SamplingConfig
    from vlmo.segmentation import Segmentation


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmo' has no attribute {name!r}")


__all__ = [
    "Detection",
    "PaliGemmaConfig",
    "ProjectorConfig",
    "SamplingConfig",
    "Segmentation",
    "TextConfig",
    "VLMo",
    "VisionConfig",
    "VlmoError",
    "__version__",
]
