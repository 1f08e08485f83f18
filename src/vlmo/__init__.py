"""vlmo: run, fine-tune and serve PaliGemma vision-language models in plain PyTorch."""

from vlmo.api import VLMo
from vlmo.config import PaliGemmaConfig, ProjectorConfig, TextConfig, VisionConfig
from vlmo.detection import Detection
from vlmo.errors import VlmoError
from vlmo.generation import SamplingConfig

__version__ = "0.1.0.dev0"

__all__ = [
    "Detection",
    "PaliGemmaConfig",
    "ProjectorConfig",
    "SamplingConfig",
    "TextConfig",
    "VLMo",
    "VisionConfig",
    "VlmoError",
    "__version__",
]
