"""The shapes demo: a synthetic world (`shapes`), the recipe that trains vlmo's built-in model on it (`train`) and
its held-out evaluation (`evaluate`). The trained model ships in `model/`; `VLMo.from_pretrained("vlmo/shapes")`
loads it, offline. `standins` holds the small self-made stand-ins (tokenizer, mask decoder) that the demo model,
the tests, the benchmarks and the docs use where the real ones are gated.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "vlmo/shapes"
MODEL_DIR = Path(__file__).resolve().parent / "model"
