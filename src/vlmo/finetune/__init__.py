"""`vlmo finetune` and `vlmo eval`: LoRA / full fine-tuning and VQAv2 evaluation.

    config.py         FinetuneConfig: every option of a run, with its help (no torch: the CLI derives its options)
    train.py          the training loop: loss, schedule, checkpoints/resume, DDP/FSDP (`finetune`)
    evaluate.py       VQA accuracy (official rules) and VQAv2 evaluation reports
    vqa_normalize.py  the official VQA answer normalisation

`finetune`, `select_trainable` and `FinetuneConfig` are imported on first use, so reading the config needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmo.finetune.config import FinetuneConfig
    from vlmo.finetune.train import finetune, select_trainable


def __getattr__(name: str) -> Any:
    if name in ("finetune", "select_trainable"):
        from vlmo.finetune import train

        return getattr(train, name)
    if name == "FinetuneConfig":
        from vlmo.finetune.config import FinetuneConfig

        return FinetuneConfig
    raise AttributeError(f"module 'vlmo.finetune' has no attribute {name!r}")


__all__ = ["FinetuneConfig", "finetune", "select_trainable"]
