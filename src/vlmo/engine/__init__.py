"""The engine: one loop that turns (image, prompt, options) into text for every face.

worker.py    Engine: a worker thread that owns the model and batches requests continuously
features.py  FeatureCache: encoded images by content, so one image is encoded once
sampling.py  select_next, make_generator: picking each row's next token (the options are `vlmo.generation`'s)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmo.engine.worker import Cancelled, Engine, EngineStopped, Finished, Job, Piece, QueueFull


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlmo.engine import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'vlmo.engine' has no attribute {name!r}")


__all__ = ["Cancelled", "Engine", "EngineStopped", "Finished", "Job", "Piece", "QueueFull"]
