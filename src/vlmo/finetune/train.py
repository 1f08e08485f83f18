"""Fine-tuning: LoRA, projector, attention-only or full training, on one process or many (torchrun).

    vlmo finetune --model google/paligemma-3b-pt-224 --data train.jsonl --out runs/x --steps 1000
    torchrun --nproc-per-node 4 -m vlmo finetune --model … --data … --out …

The loss is cross-entropy on the suffix tokens (and the final `<eos>`), summed and divided by the number of target
tokens in the whole *global* batch (all processes, all accumulation steps). So the gradient of a step does not
depend on how the global batch is split: one process with 4 accumulation steps, or 4 processes with 1, give the
same update (tested). transformers instead averages per micro-batch, which weighs short answers more.

Each step draws the global batch from a seeded permutation of the data (a new one per epoch); sample k of the
run is a pure function of (seed, k), which is what makes resuming exact: a checkpoint stores the trainable
weights, optimizer, scheduler, RNG states and step, and a resumed run reproduces the uninterrupted one's losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vlmo.data.collate import Collator, TrainBatch
from vlmo.data.examples import Dataset, JsonlDataset, VQAv2Dataset
from vlmo.errors import CheckpointError, InputError
from vlmo.fileio.atomic import atomic_dir
from vlmo.finetune.config import FinetuneConfig, data_choice_error
from vlmo.progress import progress_bar, wanted
from vlmo.weights.safetensors_io import open_tensors

if TYPE_CHECKING:
    from vlmo.api import VLMo
    from vlmo.nn.lora import LoRAConfig
    from vlmo.nn.paligemma import PaliGemma


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, global token-weighted mean
    output: Path | None = None


# -- distributed -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    from vlmo.weights.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Dist(0, 1, dev)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def shard(net: SuffixLoss, d: Dist) -> None:
    """FSDP2: shard each vision block and decoder layer, then the rest, over the processes. The root is the loss
    module, whose forward is what runs. Gradients are reduce-scattered as averages, like DDP's, so the loss scaling
    in `finetune` holds for both."""
    if d.world == 1:
        raise InputError("--fsdp shards over several processes: start the run with torchrun --nproc-per-node N")
    from torch.distributed.fsdp import fully_shard

    for layer in [*net.model.vision.layers, *net.model.text.layers]:
        fully_shard(layer)
    fully_shard(net)


def gather_full_weights(model: nn.Module) -> None:
    """After FSDP training: replace every sharded parameter by a plain one holding the whole tensor."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                module._parameters[leaf] = nn.Parameter(p.full_tensor().detach(), requires_grad=False)


def _all_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(value)
    return value


# -- what trains -------------------------------------------------------------------------------------------------


def select_trainable(model: PaliGemma, cfg: FinetuneConfig) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze (or add, for LoRA) the parts `cfg.train` names. Returns them by name."""
    model.requires_grad_(False)
    if "lora" in cfg.train:
        from vlmo.nn.lora import apply_lora, lora_parameters

        apply_lora(model, lora_config(cfg))
        for p in lora_parameters(model):
            p.requires_grad_(True)
    if "full" in cfg.train:
        model.requires_grad_(True)
    if "projector" in cfg.train or model.cfg.projector.kind != "linear":
        model.projector.requires_grad_(True)  # a new branch must train to matter
    if "attention" in cfg.train:  # the decoder's q/k/v/o projections, whole
        for name, module in model.named_modules():
            if name.startswith("text.layers.") and name.endswith(".attn"):
                module.requires_grad_(True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise InputError(f"--train {','.join(cfg.train)} selects no parameters of this model")
    return trainable


def branch_parameters(trainable: list[tuple[str, nn.Parameter]]) -> set[int]:
    """The ids of a Dense Connector projector's new-branch parameters among `trainable` (the projector's parameters
    other than its `linear`, which is PaliGemma's own projector)."""
    return {id(p) for n, p in trainable if n.startswith("projector.") and not n.startswith("projector.linear.")}


def param_groups(trainable: list[tuple[str, nn.Parameter]], cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the connector's branch at `cfg.branch_lr` (0.1 × `lr` unless set), everything else
    at `lr`.

    Why a separate rate (docs/finetune.md, "Projector kinds"): the branch starts at zero, and Adam moves each weight
    by about the learning rate per step whatever its gradient, so at the decoder's rate the earlier layers' features
    arrive at full strength within a few hundred steps."""
    branch = branch_parameters(trainable)
    rest = [p for _, p in trainable if id(p) not in branch]
    own = [p for _, p in trainable if id(p) in branch]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": cfg.lr}]
    if own:
        groups.append({"params": own, "lr": cfg.branch_lr})
    return [g for g in groups if g["params"]]


def lora_config(cfg: FinetuneConfig) -> LoRAConfig:
    from vlmo.nn.lora import LoRAConfig

    return LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, include_vision=cfg.lora_vision)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear from 1/(warmup+1) up to 1 over `warmup` steps, then cosine down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- data order --------------------------------------------------------------------------------------------------


def sample_indices(n: int, seed: int, start: int, count: int) -> list[tuple[int, int]]:
    """(epoch, index) of run samples [start, start + count): epoch e visits a permutation seeded by (seed, e)."""
    out: list[tuple[int, int]] = []
    perms: dict[int, list[int]] = {}
    for k in range(start, start + count):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append((epoch, perms[epoch][pos]))
    return out


def micro_batches(data: Dataset, cfg: FinetuneConfig, d: Dist, step: int) -> Iterator[list]:
    """This process's micro-batches of global step `step` (sample j of the global batch goes to rank j // B % W)."""
    per_micro = cfg.batch_size * d.world
    picks = sample_indices(len(data), cfg.seed, step * per_micro * cfg.grad_accum, per_micro * cfg.grad_accum)
    for a in range(cfg.grad_accum):
        mine = picks[a * per_micro + d.rank * cfg.batch_size : a * per_micro + (d.rank + 1) * cfg.batch_size]
        yield [data.get(index, epoch) for epoch, index in mine]


def load_dataset(cfg: FinetuneConfig) -> Dataset:
    if not cfg.has_data_files:
        raise data_choice_error()
    if cfg.data is not None:
        return JsonlDataset(cfg.data)
    from vlmo.data.vqav2 import load_vqav2

    assert cfg.vqa_questions and cfg.vqa_annotations and cfg.vqa_images
    return VQAv2Dataset(load_vqav2(cfg.vqa_questions, cfg.vqa_annotations, cfg.vqa_images), seed=cfg.seed)


# -- the loop ----------------------------------------------------------------------------------------------------


class SuffixLoss(nn.Module):
    """The training objective as a module, so DistributedDataParallel can wrap it (its hooks run in forward)."""

    def __init__(self, model: PaliGemma) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        """Summed fp32 cross-entropy of every target token (labels shifted left by one); logits only there."""
        h = self.model.hidden_states(batch.input_ids, batch.pixel_values, batch.attention_mask, batch.token_type_ids)
        targets = batch.labels[:, 1:]
        keep = targets != -100
        logits = self.model.text.logits(h[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")


def finetune(cfg: FinetuneConfig, dataset: Dataset | None = None) -> FinetuneResult:
    """Run the training loop described by `cfg`; see the module docstring for the loss and data order.

    `dataset`: train on this object (`len()` and `get(index, epoch) -> Example`, e.g. data generated on the fly)
    instead of the files `cfg` names; `cfg` must then name none. A resumed run needs the same dataset again.
    """
    from vlmo.api import VLMo

    if dataset is not None and cfg.has_data_files:
        raise InputError("pass training data either as a dataset object or as files in the config, not both")
    data = dataset if dataset is not None else load_dataset(cfg)  # data errors come before the model loads
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    vlm = VLMo.from_pretrained(cfg.model, device=d.device, dtype="float32")
    model = vlm.model.train()
    model.text.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.projector != model.cfg.projector.kind:
        model.use_projector(cfg.projector)
    trainable = select_trainable(model, cfg)
    objective = SuffixLoss(model)
    net: nn.Module = objective  # DistributedDataParallel may wrap it below
    if cfg.fsdp:
        with torch.no_grad():  # FSDP frees and re-allocates parameter storage: it cannot own a file mapping
            for p in model.parameters():
                p.data = p.data.clone()
        shard(objective, d)  # parameters become sharded DTensors: collect them again for the optimizer
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    branch = branch_parameters(trainable)
    optimizer = torch.optim.AdamW(param_groups(trainable, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    collate = Collator(vlm.text, vlm.image_config)
    out = Path(cfg.out)
    step = 0
    if cfg.resume is not None:
        step = load_checkpoint(Path(cfg.resume), model, optimizer, scheduler)
    if d.world > 1 and not cfg.fsdp:
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and d.device.type == "cuda" else nullcontext()
    result = FinetuneResult(steps=step)
    shown = d.main and wanted(cfg.progress)  # rank 0 only: one bar per run
    with progress_bar(cfg.steps, "finetune", enabled=shown, completed=step) as bar:
        while step < cfg.steps:
            started = time.perf_counter()
            batches = [collate(examples).to(d.device) for examples in micro_batches(data, cfg, d, step)]
            total = _all_sum(torch.tensor(float(sum(b.num_targets for b in batches)), device=d.device), d)
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=d.device)
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                sync = (
                    net.no_sync()
                    if isinstance(net, nn.parallel.DistributedDataParallel) and not last
                    else nullcontext()
                )
                with sync, autocast:
                    loss_sum = net(batch)
                # DDP averages gradients over processes; × world turns that back into a sum over the global batch.
                (loss_sum * d.world / total.clamp(min=1)).backward()
                step_loss += loss_sum.detach()
            if step < cfg.branch_warmup:  # the branch alone: AdamW leaves a parameter without a gradient as it is
                for p in params:
                    if id(p) not in branch:
                        p.grad = None
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            loss = float(_all_sum(step_loss, d) / total.clamp(min=1))
            result.losses.append(loss)
            samples = cfg.batch_size * d.world * cfg.grad_accum
            lr = float(scheduler.get_last_lr()[0])  # typed float | Tensor; a Python float for our AdamW
            bar.update(completed=step)
            bar.set_postfix(f"loss {loss:.4f}  lr {lr:.2e}  {samples / (time.perf_counter() - started):.1f} samples/s")
            if d.main:
                _log(out, step, loss, lr)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save_checkpoint(out / f"checkpoint-{step}", model, trainable, optimizer, scheduler, step, cfg)
    result.steps = step
    if cfg.fsdp:
        gather_full_weights(model)  # a collective: every process takes part, then rank 0 writes
    if d.main:
        if not cfg.fsdp:
            save_checkpoint(out / f"checkpoint-{step}", model, trainable, optimizer, scheduler, step, cfg)
        result.output = export(model, vlm, cfg, out / "final")
    if d.world > 1:
        dist.barrier()
    return result


def _log(out: Path, step: int, loss: float, lr: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")


# -- checkpoints -------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    model: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    cfg: Any,
) -> None:
    """Trainable weights (safetensors) + optimizer, scheduler and RNG state (tensors only) + the run config (`cfg`, a
    dataclass: the `FinetuneConfig`, or another loop's settings such as `vlmo.demo.masks.MaskRecipe`).

    The folder is filled under a temporary name and renamed into place (`vlmo.fileio.atomic.atomic_dir`): a checkpoint
    is complete or absent, never half written, and a failed write leaves an earlier checkpoint of that name intact.
    """
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_dir(path) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable}, str(tmp / "trainable.safetensors"))
        with open(tmp / "training_state.pt", "wb") as f:  # a file object: a full disk is an OSError, not a RuntimeError
            torch.save(state, f)
        (tmp / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The `checkpoint-<step>` folder of `run_dir` with the highest step, and that step; None when there is none."""
    found = [
        (int(p.name[len("checkpoint-") :]), p)
        for p in run_dir.glob("checkpoint-*")
        if p.name[len("checkpoint-") :].isdigit() and p.is_dir()
    ]
    if not found:
        return None
    step, path = max(found)
    return path, step


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Restore a `save_checkpoint` directory into an identically configured run; returns the step to go on from."""
    weights, state_file = path / "trainable.safetensors", path / "training_state.pt"
    if not weights.is_file() or not state_file.is_file():
        raise InputError(f"{path} is not a vlmo training checkpoint (no trainable.safetensors/training_state.pt)")
    tensors = open_tensors(weights)  # validated, like every safetensors file vlmo reads
    params = dict(model.named_parameters())
    wrong = [n for n in tensors if n not in params or not params[n].requires_grad]
    if wrong:
        raise InputError(f"{path} trains other parameters ({', '.join(wrong[:3])}); resume with the same --train")
    reshaped = [n for n, t in tensors.items() if t.shape != params[n].shape]
    if reshaped:
        raise InputError(f"{path} holds {reshaped[0]} with another shape than this model's; resume the same model")
    state = _read_training_state(state_file)  # before any weight is touched: a refused state changes nothing
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


_STATE_KEYS = ("step", "optimizer", "scheduler", "rng_cpu", "rng_cuda")


def _read_training_state(state_file: Path) -> dict[str, Any]:
    """`training_state.pt` as `save_checkpoint` wrote it: tensors and plain data only (`weights_only=True`); anything
    else, a pickle that would run code above all, is a one-line `CheckpointError`, never unpickled."""
    import pickle
    import re

    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        message = " ".join(str(e).split())
        if "Weights only load failed" in message:  # the restricted unpickler met a global: code, or a class
            found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
            what = f"it names {found.group(1)}" if found else "it holds more than tensors and plain data"
            raise CheckpointError(
                f"{state_file} is not a vlmo training state (refused to unpickle it: {what}); resume only from "
                "checkpoints vlmo wrote"
            ) from None
        reason = message.split(". ")[0] or "empty or truncated"  # not a torch file at all: garbage, cut short
        raise CheckpointError(
            f"{state_file} is not a vlmo training state (unreadable: {reason}); resume from another checkpoint"
        ) from None
    if not isinstance(state, dict) or not all(k in state for k in _STATE_KEYS):
        raise CheckpointError(
            f"{state_file} is not a vlmo training state (it lacks {', '.join(_STATE_KEYS)}); resume from another "
            "checkpoint"
        )
    return state


def export(model: PaliGemma, vlm: VLMo, cfg: FinetuneConfig, path: Path) -> Path:
    """The trained model in a loadable form. LoRA (with or without the projector) gives a PEFT-format adapter; a
    linear projector travels in it as PEFT's `modules_to_save`, a Dense Connector one in vlmo's files beside it.
    Anything else gives a full checkpoint (LoRA merged) that `VLMo.from_pretrained` loads."""
    from dataclasses import replace

    from vlmo.weights.writer import save_checkpoint

    if "lora" in cfg.train and set(cfg.train) <= {"lora", "projector"}:
        from vlmo.weights.adapters import save_adapter

        lora = lora_config(cfg)
        if "projector" in cfg.train and model.cfg.projector.kind == "linear":
            lora = replace(lora, modules_to_save=("multi_modal_projector",))
        with atomic_dir(path) as tmp:  # the folder appears whole or not at all
            save_adapter(model, tmp, lora, base_model=cfg.model)
        return path
    if "lora" in cfg.train:
        from vlmo.nn.lora import remove_lora

        remove_lora(model, merge=True)
    with atomic_dir(path) as tmp:
        save_checkpoint(model, tmp, vlm.source)
    return path
