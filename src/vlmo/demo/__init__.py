"""The shapes demo: a synthetic world (`shapes`), the recipe that trains vlmo's built-in model on it (`train`) and
its held-out evaluation (`evaluate`). The trained model ships in `model/`; `VLMo.from_pretrained("vlmo/shapes")`
loads it, offline.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "vlmo/shapes"
MODEL_DIR = Path(__file__).resolve().parent / "model"
