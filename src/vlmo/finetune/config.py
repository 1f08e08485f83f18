"""`FinetuneConfig`: everything a fine-tuning run needs, as one validated dataclass (no torch, so that the CLI can
derive `vlmo finetune`'s options from it without loading torch; the training itself is `vlmo.finetune.train`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlmo.errors import OptionError, braced, check_count, check_number

TrainPart = Literal["lora", "projector", "attention", "full"]
TRAIN_PARTS: tuple[TrainPart, ...] = ("lora", "projector", "attention", "full")


def _help(text: str) -> dict[str, str]:
    """A field's help text, which `vlmo finetune --help` shows (`vlmo.cli.options.config_options`)."""
    return {"help": text}


@dataclass
class FinetuneConfig:
    """Everything a run needs. Paths are strings so the config round-trips through JSON (saved with checkpoints).

    Each field is also an option of `vlmo finetune` (same name, dashes for underscores), with the help shown here.
    """

    model: str = field(metadata=_help("Base model: hub id, local checkpoint directory, or vlmo/shapes."))
    out: str = field(metadata=_help("Run directory: metrics.jsonl, checkpoint-N/, final/."))
    data: str | None = field(default=None, metadata=_help("JSONL training data: image, prefix, suffix per line."))
    vqa_questions: str | None = field(default=None, metadata=_help("VQAv2 questions JSON (instead of --data)."))
    vqa_annotations: str | None = field(default=None, metadata=_help("VQAv2 annotations JSON."))
    vqa_images: str | None = field(default=None, metadata=_help("VQAv2 image folder (COCO_*_…jpg)."))
    train: tuple[TrainPart, ...] = field(
        default=("lora",), metadata=_help("What trains, comma-separated: lora, projector, attention, full.")
    )
    projector: str = field(
        default="linear",  # a Dense Connector kind starts from the base projector and trains with it
        metadata=_help("Projector to train with: linear, or a Dense Connector kind (sti, sci, dci, seed)."),
    )
    lora_r: int = field(default=8, metadata=_help("LoRA rank."))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (scale = alpha / r)."))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA input."))
    lora_vision: bool = field(default=False, metadata=_help("Also put LoRA on the vision tower."))
    lr: float = field(default=2e-4, metadata=_help("Peak learning rate (AdamW)."))
    branch_lr_scale: float | None = field(
        default=None,
        metadata=_help(
            "A Dense Connector --projector: the new branch's learning rate as a multiple of --lr (default 0.1; "
            "docs/finetune.md, 'Projector kinds')."
        ),
    )
    branch_warmup_steps: int | None = field(
        default=None,
        metadata=_help(
            "A Dense Connector --projector: the first N steps train its new branch alone, all else frozen; part of "
            "--steps (default: a twelfth of --steps)."
        ),
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    warmup_steps: int = field(default=0, metadata=_help("Linear warm-up steps before the cosine decay."))
    steps: int = field(default=100, metadata=_help("Optimizer steps."))
    batch_size: int = field(default=4, metadata=_help("Examples per process and micro-step."))
    grad_accum: int = field(default=1, metadata=_help("Micro-steps per optimizer step."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    seed: int = field(default=0, metadata=_help("Seed for data order, initialisation and dropout."))
    save_every: int = field(default=0, metadata=_help("Save a resumable checkpoint every N steps (0: at the end)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations to save memory."))
    # FSDP2 shards weights, gradients and optimizer state over the processes, instead of DDP's full copies.
    fsdp: bool = field(
        default=False, metadata=_help("Shard the model over torchrun's processes (FSDP) instead of DDP.")
    )
    # CPUs without native bf16 would be slower, so autocast is for CUDA only.
    bf16: bool = field(default=True, metadata=_help("bf16 autocast on CUDA (ignored on CPU)."))
    device: str = field(default="auto", metadata=_help("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."))
    resume: str | None = field(default=None, metadata=_help("A checkpoint-N directory to continue from."))
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        unknown = [p for p in self.train if p not in TRAIN_PARTS]
        if not self.train or unknown:
            got = braced(", ".join(map(str, self.train)))
            raise OptionError(f"{{train}} must list some of {', '.join(TRAIN_PARTS)}; got {got}", train=None)
        for name in ("steps", "batch_size", "grad_accum", "lora_r"):
            check_count(getattr(self, name), name)
        for name in ("warmup_steps", "save_every"):
            check_count(getattr(self, name), name, minimum=0)
        # finite too: `--lr nan` would train into NaN weights
        for name in ("lr", "max_grad_norm", "lora_alpha"):
            check_number(getattr(self, name), name, above=0)
        if self.branch_lr_scale is not None:
            check_number(self.branch_lr_scale, "branch_lr_scale", above=0)
        if self.branch_warmup_steps is not None:
            check_count(self.branch_warmup_steps, "branch_warmup_steps", minimum=0)
        check_number(self.weight_decay, "weight_decay", minimum=0)
        if self.projector == "linear" and (self.branch_lr_scale is not None or self.branch_warmup_steps is not None):
            raise OptionError(
                "{branch_lr_scale} and {branch_warmup_steps} are for a Dense Connector {projector} (sti, sci, dci, "
                "seed); the linear projector has no branch",
                branch_lr_scale=None,
                branch_warmup_steps=None,
                projector=None,
            )
        if self.branch_warmup_steps is not None and self.branch_warmup_steps >= self.steps:
            raise OptionError(
                f"{{branch_warmup_steps}} must be fewer than {{steps}} ({self.steps}), so the joint run has steps",
                branch_warmup_steps=None,
                steps=None,
            )
        check_number(self.lora_dropout, "lora_dropout", minimum=0, below=1)
        if self.fsdp and (self.resume is not None or self.save_every):
            raise OptionError(
                "{fsdp} runs save the final model only: drop {resume} and {save_every}, or use DDP",
                fsdp=None,
                resume=None,
                save_every=None,
            )
        vqa = (self.vqa_questions, self.vqa_annotations, self.vqa_images)
        if any(v is not None for v in vqa) and (self.data is not None or None in vqa):
            raise data_choice_error()
        # No data at all is allowed here: `finetune(cfg, dataset=...)` may bring it; `load_dataset` checks.

    @property
    def branch_lr(self) -> float:
        """The connector branch's learning rate: `lr × branch_lr_scale`, 0.1 by default for a Dense Connector kind.

        Why the default: trained at the decoder's rate, a zero-initialised branch grows by about the rate per step
        whatever its gradient (Adam), and `sti`, `sci` and `dci` then stayed at chance on above/below questions even
        at twice the steps; at 0.1× (or 0.01×) after a warm-up of the branch alone they learned them and matched the
        linear projector (docs/finetune.md, "Projector kinds")."""
        if self.projector == "linear":
            return self.lr
        return self.lr * (0.1 if self.branch_lr_scale is None else self.branch_lr_scale)

    @property
    def branch_warmup(self) -> int:
        """Steps that train the connector branch alone: `branch_warmup_steps`, by default a twelfth of the steps
        (100 of the 1200 measured); 0 for the linear projector."""
        if self.projector == "linear":
            return 0
        return self.steps // 12 if self.branch_warmup_steps is None else self.branch_warmup_steps

    @property
    def has_data_files(self) -> bool:
        return self.data is not None or self.vqa_questions is not None


def data_choice_error() -> OptionError:
    """Training data given neither way, or both (or half the VQAv2 files)."""
    return OptionError(
        "give training data either as {data} (a JSONL file) or as all of {vqa_questions}, {vqa_annotations} and "
        "{vqa_images}",
        data=None,
        vqa_questions=None,
        vqa_annotations=None,
        vqa_images=None,
    )
