"""The recipe that trains the built-in `vlmo/shapes` model from scratch on the CPU, with vlmo's own training loop.

    python -m vlmo.demo.train --out runs/shapes            # ≈ 6 h on 2 CPU cores; see docs/demo-model.md
    python -m vlmo.demo.train --out runs/shapes --install  # … and copy the result into the package

Steps: (1) write a freshly initialised small PaliGemma-architecture checkpoint (`init/`) with a tokenizer from
`standins.build_tokenizer` over the shapes vocabulary; (2) pre-train the vision tower alone on per-patch labels
(`pretrain_vision`, `vision/`); (3) `vlmo.finetune.train.finetune` with `train=("full",)` on `ShapesDataset` (scenes
drawn on the fly), in six stages: all tasks (`run/`), a focus on yes/no and boxes (`focus/`), detection on a
zoomed input (`zoom_input`, `detect/`), then a polish (`polish/`), a refinement (`refine/`) and a last stage
(`sizes/`) with ever more scenes of other sizes; (4) train the shapes world's mask tokenizer (`vlmo.demo.masks`,
`masks/`), (5) teach the model `segment` with its codes (`segment/`) and blend every task once more at a low rate
(`blend/`); (6) store the result in float16 (`model/`:
weights, config, tokenizer, preprocessor config and the mask decoder; loading casts to float32 on the CPU); (7)
evaluate on held-out scenes (`vlmo.demo.evaluate`) and write `metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmo.config import PaliGemmaConfig
from vlmo.demo import MODEL_DIR
from vlmo.demo.masks import TOKENIZER_FILE, MaskRecipe, ShapeCodes, train_mask_tokenizer
from vlmo.demo.shapes import (
    ANY_KINDS,
    BLEND_MIX,
    DETECT_MIX,
    FOCUS_MIX,
    PATCH_CLASSES,
    SEGMENT_MIX,
    SHAPES,
    VOCABULARY,
    ShapesDataset,
    draw_scene,
    patch_targets,
    random_size,
    render,
)
from vlmo.demo.standins import LOC_TOKENS, build_tokenizer, preprocessor_config
from vlmo.nn.paligemma import PaliGemma
from vlmo.weights.files import MASK_DECODER_FILE
from vlmo.weights.writer import save_weights

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json")


@dataclass(frozen=True)
class DemoSpec:
    """The demo model's shapes: SigLIP-style tower → linear projector → Gemma decoder with multi-query attention."""

    image_size: int = 112
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    vision_mlp: int = 768
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 3
    text_kv_heads: int = 1
    head_dim: int = 64
    text_mlp: int = 512


@dataclass(frozen=True)
class Recipe:
    """Training settings; the defaults are the shipped model's (docs/demo-model.md)."""

    vision_steps: int = 1500  # stage 1: the vision tower alone learns per-patch labels (`pretrain_vision`)
    vision_batch_size: int = 64
    vision_lr: float = 1e-3
    steps: int = 6000  # stage 2: the whole model learns the tasks (`TRAIN_MIX`)
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 300
    weight_decay: float = 0.0
    focus_steps: int = 3000  # stage 3: `FOCUS_MIX` with hard yes/no negatives, from stage 2's model
    focus_lr: float = 1e-4
    focus_hard_negatives: float = 0.75
    detect_steps: int = 6000  # stage 4: `DETECT_MIX`, prompts of 1, 2 or 3 kinds in any order, from stage 3's model
    detect_lr: float = 1e-4
    detect_square: float = 0.5  # the share of 224×224 scenes in stage 4 (the rest: random sizes)
    detect_zoom: int = 2  # stage 4 sees images this many times larger, in as many patches (`zoom_input`)
    polish_steps: int = 4000  # stage 5: stage 4's data again, more of it at random sizes, at a lower rate
    polish_lr: float = 5e-5
    polish_square: float = 1 / 3
    refine_steps: int = 6000  # stage 6: the same again, three quarters at random sizes (where boxes lag behind)
    refine_lr: float = 5e-5
    refine_square: float = 1 / 4
    sizes_steps: int = 3000  # stage 7: the same, nine tenths at other sizes (squashed shapes' boxes lag behind)
    sizes_lr: float = 5e-5
    sizes_square: float = 1 / 10
    mask_steps: int = 2000  # stage 8: the mask tokenizer (`vlmo.demo.masks.MaskRecipe`), on masks alone
    mask_lr: float = 1e-3
    mask_batch_size: int = 64
    segment_steps: int = 4000  # stage 9: `SEGMENT_MIX`, the `segment` targets in the stage-8 tokenizer's codes
    segment_lr: float = 1e-4
    segment_square: float = 1 / 4
    blend_steps: int = 1500  # stage 10: `BLEND_MIX` at a low rate, from stage 9's model (captions had slipped)
    blend_lr: float = 3e-5
    blend_square: float = 1 / 4
    seed: int = 0
    save_every: int = 1000  # resumable checkpoints in run/ (weights, optimizer, data position)
    processes: int = 2  # data-parallel CPU processes (gloo), one thread each; batch_size is the global batch
    device: str = "cpu"  # "cuda" trains in one process on the GPU (bf16 autocast), for longer recipes
    threads: int = 1  # torch threads per process
    eval_images: int = 500


def hf_config(spec: DemoSpec, vocab_size: int, image_token_id: int) -> dict[str, Any]:
    """config.json in the layout of the hub's PaliGemma checkpoints (transformers reads it too)."""
    return {
        "model_type": "paligemma",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "torch_dtype": "float16",
        "image_token_index": image_token_id,
        "projection_dim": spec.text_width,
        "hidden_size": spec.text_width,
        "vocab_size": vocab_size,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": spec.vision_width,
            "intermediate_size": spec.vision_mlp,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "projection_dim": spec.text_width,
            "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
        },
        "text_config": {
            "model_type": "gemma",
            "vocab_size": vocab_size,
            "hidden_size": spec.text_width,
            "intermediate_size": spec.text_mlp,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 512,
        },
    }


def init_weights(model: PaliGemma, loc_ids: list[int], std: float = 0.02) -> None:
    """Gemma-style initialisation: N(0, 0.02) for linear, convolution and embedding weights, zero biases, LayerNorm
    scale 1 and RMSNorm weight 0 (Gemma stores the offset: scale 1 + w). Residual output projections are scaled by
    1/√(2·layers) (GPT-2), so the residual stream's variance does not grow with depth.

    The `<locNNNN>` rows get sinusoidal codes of the bin instead of noise: neighbouring bins start similar, so the
    tied head scores near-misses close to hits and detection learns coordinates instead of 1024 unrelated classes.
    The vision tower's position embeddings start as 2-D sinusoidal codes of the patch centre (`grid_codes`).
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            bias = getattr(module, "bias", None)  # nn.Embedding has none
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("text.") and name.endswith("norm.weight"):
                p.zero_()
            if name.endswith(("o_proj.weight", "down_proj.weight", "fc2.weight")):
                layers = model.cfg.text.num_layers if name.startswith("text.") else model.cfg.vision.num_layers
                p.mul_(1 / math.sqrt(2 * layers))
        model.text.embed.weight[loc_ids] = loc_codes(len(loc_ids), model.cfg.text.hidden_size, std)
        vision = model.cfg.vision
        model.vision.pos_embed.weight.copy_(grid_codes(vision.grid, vision.hidden_size, POSITION_STD))


# The patch embedding's output has a standard deviation of about 0.9 at initialisation (N(0, 0.02) over 3072 inputs
# of a light image); positions this strong are visible from the first step instead of having to grow out of 0.02.
POSITION_STD = 0.5


def grid_codes(grid: int, width: int, std: float) -> torch.Tensor:
    """float32[grid², width], row-major patches: fixed 2-D sin/cos codes (half the width for the row, half for the
    column; MAE/ViT's "sincos" position embeddings) of each patch centre, scaled to standard deviation `std`. ViTs
    trained from scratch on little data learn space faster from these than from random positions."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    quarter = width // 4
    freqs = 2 * math.pi * torch.logspace(math.log10(0.25), math.log10(grid / 2), quarter, dtype=torch.float64)

    def code(t: torch.Tensor) -> torch.Tensor:  # [grid] → [grid, width / 2]
        angles = t[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    rows, cols = code(centres), code(centres)
    codes = torch.cat([rows[:, None].expand(grid, grid, -1), cols[None].expand(grid, grid, -1)], dim=-1)
    codes = codes.reshape(grid * grid, -1)
    codes = torch.cat([codes, codes.new_zeros(grid * grid, width - codes.shape[1])], dim=-1)  # width % 4 ≠ 0
    return (codes / codes.std() * std).float()


def loc_codes(bins: int, width: int, std: float) -> torch.Tensor:
    """float32[bins, width]: sin/cos of the bin position at `width/2` frequencies spaced geometrically from one
    period over the whole range to one every 4 bins, scaled to standard deviation `std`."""
    t = torch.arange(bins, dtype=torch.float64) / (bins - 1)
    freqs = 2 * math.pi * torch.logspace(0, math.log10((bins - 1) / 4), width // 2, dtype=torch.float64)
    angles = t[:, None] * freqs[None]
    codes = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return (codes / codes.std() * std).float()


def write_initial_checkpoint(out: Path, spec: DemoSpec = DemoSpec(), seed: int = 0) -> Path:
    """A freshly initialised checkpoint directory (config.json, model.safetensors, tokenizer.json,
    preprocessor_config.json) that `VLMo.from_pretrained` and `finetune` load."""
    tok = build_tokenizer(VOCABULARY)

    def token_id(token: str) -> int:
        found = tok.token_to_id(token)
        if found is None:
            raise ValueError(f"the demo tokenizer has no {token!r} token")
        return found

    vocab = (tok.get_vocab_size() + 63) // 64 * 64  # padded like the real 257216-row table
    config = hf_config(spec, vocab, token_id("<image>"))
    torch.manual_seed(seed)
    model = PaliGemma(PaliGemmaConfig.from_hf(config))
    init_weights(model, [token_id(t) for t in LOC_TOKENS])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(spec.image_size, (spec.image_size // spec.patch_size) ** 2), indent=2) + "\n"
    )
    tok.save(str(out / "tokenizer.json"))
    save_weights(model, out)
    return out


def pretrain_vision(src: Path, out: Path, recipe: Recipe = Recipe(), log: bool = True) -> dict[str, float]:
    """Stage 1: train the vision tower of checkpoint `src` alone, with a throw-away linear head, to tell every
    patch's class (`patch_targets`: background or one of the 12 colour-kind pairs, as covered fractions; soft
    cross-entropy), and write the whole checkpoint to `out`, then the returned metrics (`pretraining.json`).

    Why: from scratch, the vision-language stage learns *which kind* a shape is last and slowest (colours and
    counts come first; after 7000 steps without this stage 73 % of captions were still wrong, mostly in the
    kinds), because a handful of answer tokens per image is all the signal the tower gets. Dense labels give it a
    target at every patch: the kinds, colours and outlines that captions, questions and boxes need, in minutes.

    AdamW at `vision_lr` with a 100-step warm-up and cosine decay, scenes from the seed `"vision:{seed}"` (never
    the held-out one). Returns held-out patch accuracy (256 scenes from `"heldout-vision"`; patches a shape covers
    at least half of: exact class, and kind alone) and the stage's seconds.
    """
    import random

    from vlmo.processing import ImageProcessorConfig, preprocess_images
    from vlmo.weights.loader import load_model

    model = load_model(src, dtype=torch.float32)
    tower = model.vision.train().requires_grad_(True)
    vision = model.cfg.vision
    head = nn.Linear(vision.hidden_size, len(PATCH_CLASSES))
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=0.0)
    processor = ImageProcessorConfig(height=vision.image_size, width=vision.image_size)

    def batch(stream: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        for i in range(n):
            rng = random.Random(f"{stream}:{i}")
            scene = draw_scene(rng, *random_size(rng, square=2 / 3))
            images.append(render(scene))
            targets.append(patch_targets(scene, vision.image_size, vision.patch_size))
        return preprocess_images(images, processor), torch.stack(targets)

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.processes * recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    try:
        for step in range(1, recipe.vision_steps + 1):
            scale = min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / recipe.vision_steps))
            for group in optimizer.param_groups:
                group["lr"] = recipe.vision_lr * scale
            pixels, targets = batch(f"vision:{recipe.seed}:{step}", recipe.vision_batch_size)
            loss = -(targets * head(tower(pixels)[0]).log_softmax(-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if log and (step % 100 == 0 or step == recipe.vision_steps):
                elapsed = time.perf_counter() - started
                print(f"vision {step}/{recipe.vision_steps} loss {loss.item():.3f} {elapsed:.0f}s", file=sys.stderr)
        tower.eval()
        with torch.no_grad():
            pixels, targets = batch("heldout-vision", 256)
            predicted, truth = head(tower(pixels)[0]).argmax(-1), targets.argmax(-1)
            shape = targets[..., 0] < 0.5
            kinds = len(SHAPES)  # classes are 1 + 3·colour + kind
            metrics = {
                "patch_class_accuracy": (predicted == truth)[shape].float().mean().item(),
                "patch_kind_accuracy": ((predicted - 1) % kinds == (truth - 1) % kinds)[shape].float().mean().item(),
                "seconds": round(time.perf_counter() - started, 1),
            }
    finally:
        torch.set_num_threads(threads)
    if log:
        print(f"vision held-out: {json.dumps(metrics)}", file=sys.stderr)
    _copy_side_files(src, out)
    save_weights(model.requires_grad_(False), out)
    (out / "pretraining.json").write_text(json.dumps(metrics) + "\n", encoding="utf-8")  # written last: "done"
    return metrics


def _copy_side_files(src: Path, dst: Path) -> None:
    """Every checkpoint file but the weights (config, tokenizer, preprocessor config), from `src` into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if name != "model.safetensors":
            shutil.copy(src / name, dst / name)


def zoom_input(src: Path, dst: Path, factor: int) -> Path:
    """Copy checkpoint `src` to `dst` with an input `factor`× larger on each side and patches `factor`× larger, so
    the patch grid, the image tokens and everything after the patch embedding stay as they are.

    The new patch kernel is the old one spread over factor×factor pixels and divided by factor²: on a large image it
    computes what the old kernel computed on the image shrunk by averaging factor×factor blocks (the processor
    shrinks with a bicubic filter instead, a small difference the next stage trains away). So the model starts
    where it was, but its input keeps the detail of each edge that the smaller resize blurred away: box corners to
    within a pixel of the 224-px scene rather than of a 112-px copy (docs/demo-model.md, "How the recipe got here").
    """
    from vlmo.weights.loader import load_model

    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    vision = config["vision_config"]
    vision["image_size"] *= factor
    vision["patch_size"] *= factor
    model = load_model(src, dtype=torch.float32)
    zoomed = PaliGemma(PaliGemmaConfig.from_hf(config))
    state = model.state_dict()
    kernel = state["vision.patch_embed.weight"]  # [width, 3, patch, patch]
    state["vision.patch_embed.weight"] = kernel.repeat_interleave(factor, 2).repeat_interleave(factor, 3) / factor**2
    zoomed.load_state_dict(state)
    _copy_side_files(src, dst)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    processor = preprocessor_config(vision["image_size"], tokens)
    (dst / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    save_weights(zoomed, dst)
    return dst


def store_half(src: Path, dst: Path, mask_tokenizer: Path | None = None) -> Path:
    """Copy a float32 checkpoint as float16 (half the bytes; `load_model` casts back to the requested dtype), with
    the decoder half of `mask_tokenizer` as the model's own mask decoder (`MASK_DECODER_FILE`), float16 too."""
    from safetensors.torch import save_file

    from vlmo.weights.safetensors_io import open_tensors

    def half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.half() if v.is_floating_point() else v.clone()) for k, v in tensors.items()}

    _copy_side_files(src, dst)
    save_file(half(open_tensors(src / "model.safetensors")), str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / MASK_DECODER_FILE).unlink(missing_ok=True)
    if mask_tokenizer is not None:
        decoder = {k: v for k, v in open_tensors(mask_tokenizer).items() if not k.startswith("encoder.")}
        save_file(half(decoder), str(dst / MASK_DECODER_FILE), metadata={"format": "pt"})
    return dst


def train(
    out: Path,
    recipe: Recipe = Recipe(),
    spec: DemoSpec = DemoSpec(),
    progress: bool | None = None,
    resume: bool = False,
) -> Path:
    """Run the whole recipe into `out` (init/, vision/, run/, focus/, detect/, polish/, refine/, sizes/, masks/,
    segment/, blend/, model/, metrics.json); returns `out/model`.

    `resume`: go on from the last stage whose output is in `out` (the stages before it are not needed), so an
    interrupted run finishes, and a run whose recipe gained a stage continues from the stage before."""
    if recipe.device != "cpu" and recipe.processes != 1:
        raise ValueError(f"--device {recipe.device} trains in one process: add --processes 1")
    if recipe.batch_size % recipe.processes:
        raise ValueError(f"batch size {recipe.batch_size} does not split over {recipe.processes} processes")
    Stage = tuple[str, int, float, int, dict[str, Any]]  # name, steps, lr, warmup, ShapesDataset arguments
    stages: list[Stage] = [("run", recipe.steps, recipe.lr, recipe.warmup_steps, {})]
    if recipe.focus_steps:
        focus = {"mix": FOCUS_MIX, "hard_negatives": recipe.focus_hard_negatives, "stream": "focus"}
        stages.append(("focus", recipe.focus_steps, recipe.focus_lr, min(100, recipe.focus_steps // 10), focus))
    detect = {
        "mix": DETECT_MIX,
        "hard_negatives": recipe.focus_hard_negatives,
        "stream": "detect",
        "kinds_weights": ANY_KINDS,
        "square": recipe.detect_square,
    }
    if recipe.detect_steps:
        stages.append(("detect", recipe.detect_steps, recipe.detect_lr, min(100, recipe.detect_steps // 10), detect))
    for name in ("polish", "refine", "sizes"):  # stage 4's data from a new stream, ever more of other sizes
        steps, lr, square = (getattr(recipe, f"{name}_{field}") for field in ("steps", "lr", "square"))
        if steps:
            stages.append((name, steps, lr, min(100, steps // 10), {**detect, "stream": name, "square": square}))
    tokenizer = out / "masks" / "final" / TOKENIZER_FILE  # stage 8's output; its codes are stage 9's targets
    if recipe.blend_steps and not recipe.segment_steps:
        raise ValueError("the blend stage goes on from the segment stage: leave --segment-steps above 0")
    if recipe.segment_steps:
        if not recipe.mask_steps:
            raise ValueError("the segment stage needs the mask tokenizer's stage: leave --mask-steps above 0")
        segment = {**detect, "mix": SEGMENT_MIX, "stream": "segment", "square": recipe.segment_square}
        segment["codes"] = ShapeCodes(tokenizer)  # sent to each training process, which loads the encoder
        steps = recipe.segment_steps
        stages.append(("segment", steps, recipe.segment_lr, min(100, steps // 10), segment))
        if recipe.blend_steps:  # stage 10: every task again at a low rate, captions and yes/no more often
            blend = {**segment, "mix": BLEND_MIX, "stream": "blend", "square": recipe.blend_square}
            steps = recipe.blend_steps
            stages.append(("blend", steps, recipe.blend_lr, min(100, steps // 10), blend))
    lm_order = [stage[0] for stage in stages]
    order = ["init", "vision", *lm_order]
    if recipe.mask_steps:  # the tokenizer trains just before the stage that needs its codes
        order.insert(order.index("segment") if "segment" in order else len(order), "masks")
    finished = _finished(out, order) if resume else set()
    last = max((order.index(name) for name in finished), default=-1)
    done = set(order[: last + 1])  # everything up to the last finished stage: skipped
    started = time.perf_counter()
    start, vision_report = out / "init", None
    if "init" not in done:
        write_initial_checkpoint(start, spec, recipe.seed)
    if recipe.vision_steps:
        report_file = out / "vision" / "pretraining.json"
        if "vision" not in done:
            vision_report = pretrain_vision(start, out / "vision", recipe)
        elif report_file.is_file():
            vision_report = json.loads(report_file.read_text(encoding="utf-8"))
        start = out / "vision"
    masks = MaskRecipe(recipe.mask_steps, recipe.mask_batch_size, recipe.mask_lr, seed=recipe.seed)
    for name, steps, lr, warmup, data in stages:
        if name == "segment" and "masks" not in done:
            with _threads(recipe.processes * recipe.threads):
                train_mask_tokenizer(out / "masks", masks)
        if name not in done:
            if name == "detect" and recipe.detect_zoom > 1:
                start = zoom_input(start, out / "detect" / "zoomed", recipe.detect_zoom)
            _finetune_stage(start, out / name, steps, lr, warmup, data, recipe, progress)
        start = out / name / "final"
    if "segment" not in lm_order and recipe.mask_steps and "masks" not in done:
        with _threads(recipe.processes * recipe.threads):
            train_mask_tokenizer(out / "masks", masks)  # the tokenizer alone, for a later segment stage
    losses = [json.loads(line)["loss"] for line in (start.parent / "metrics.jsonl").read_text().splitlines()]
    train_seconds = time.perf_counter() - started
    model_dir = store_half(start, out / "model", tokenizer if "segment" in lm_order else None)
    report: dict[str, Any] = {
        "recipe": asdict(recipe),
        "spec": asdict(spec),
        "train_seconds": round(train_seconds, 1),
        "resumed_stages": [name for name in order if name in done],
        "vision_pretraining": vision_report,
        "mask_tokenizer": _read_json(out / "masks" / "final" / "report.json"),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "weights_bytes": (model_dir / "model.safetensors").stat().st_size,
    }
    if recipe.eval_images:
        from vlmo.demo.evaluate import evaluate_model

        threads = recipe.processes * recipe.threads  # the CPUs the training processes had
        report["heldout"] = evaluate_model(model_dir, recipe.eval_images, threads=threads)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return model_dir


def _finished(out: Path, order: list[str]) -> set[str]:
    """The stages of `order` whose complete output is in `out`."""
    outputs = {
        "init": out / "init" / "model.safetensors",
        "vision": out / "vision" / "pretraining.json",
        "masks": out / "masks" / "final" / "report.json",  # written after the weights
    }
    return {name for name in order if outputs.get(name, out / name / "final" / "model.safetensors").is_file()}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's thread count set to `count` for a stage that trains in this process (the CPU processes' total)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finetune_stage(
    start: Path,
    run_dir: Path,
    steps: int,
    lr: float,
    warmup: int,
    data: dict[str, Any],
    recipe: Recipe,
    progress: bool | None,
) -> None:
    """Train the whole model of checkpoint `start` with `finetune` on `ShapesDataset(**data)` into `run_dir`."""
    from vlmo.finetune.train import FinetuneConfig, latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest:  # an interrupted stage goes on from its last checkpoint; its log keeps the steps before it
        _trim_log(run_dir / "metrics.jsonl", latest[1])
    cfg = FinetuneConfig(
        model=str(start),
        out=str(run_dir),
        train=("full",),
        lr=lr,
        weight_decay=recipe.weight_decay,
        warmup_steps=warmup,
        steps=steps,
        batch_size=recipe.batch_size // recipe.processes,
        seed=recipe.seed,
        save_every=recipe.save_every,
        device=recipe.device,
        progress=progress,
        resume=str(latest[0]) if latest else None,
    )
    if recipe.processes == 1:
        _worker(0, 1, "", cfg, recipe, data)
    else:
        import torch.multiprocessing as mp

        port = _free_port()
        args = (recipe.processes, port, cfg, recipe, data)
        workers = mp.start_processes(_worker, args=args, nprocs=recipe.processes, join=False, start_method="spawn")
        try:
            while not workers.join():
                pass
        finally:  # interrupted (Ctrl-C, SIGTERM: `main`) or a worker failed: leave no worker training on alone
            for process in workers.processes:
                if process.is_alive():
                    process.terminate()


def _trim_log(log: Path, step: int) -> None:
    if log.is_file():
        lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
        log.write_text("".join(line for line in lines if json.loads(line)["step"] <= step), encoding="utf-8")


def _worker(rank: int, world: int, port: str | int, cfg: Any, recipe: Recipe, data: dict[str, Any]) -> None:
    """One training process: `finetune` joins the others through the torchrun-style environment (gloo on CPU).

    Several single-threaded processes beat one multi-threaded one on a small shared CPU: a process that loses its
    core for a moment delays the others once per step (the gradient all-reduce), not once per operator."""
    import os

    from vlmo.finetune.train import finetune

    if world > 1:
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(recipe.threads)
    finetune(cfg, dataset=ShapesDataset(recipe.seed, length=cfg.steps * recipe.batch_size, **data))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install(model_dir: Path, target: Path = MODEL_DIR) -> Path:
    """Copy a trained model's files into the package (what `vlmo/shapes` loads)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(model_dir / name, target / name)  # the umask's mode, not the run's 0600
    if (model_dir / MASK_DECODER_FILE).is_file():
        shutil.copyfile(model_dir / MASK_DECODER_FILE, target / MASK_DECODER_FILE)
    else:
        (target / MASK_DECODER_FILE).unlink(missing_ok=True)  # a decoder of another model would decode nonsense
    return target


# The Recipe fields the command line sets, each as --field-name with the field's type and default, and their help.
_RECIPE_FLAGS: dict[str, str | None] = {
    "vision_steps": "stage 1 (0: skip it)",
    "vision_lr": None,
    "steps": "stage 2",
    "focus_steps": "stage 3 (0: skip it)",
    "focus_lr": None,
    "detect_steps": "stage 4 (0: skip it)",
    "detect_lr": None,
    "detect_zoom": "stage 4's larger input and patches (1: as before)",
    "polish_steps": "stage 5 (0: skip it)",
    "polish_lr": None,
    "refine_steps": "stage 6 (0: skip it)",
    "refine_lr": None,
    "sizes_steps": "stage 7 (0: skip it)",
    "sizes_lr": None,
    "mask_steps": "stage 8, the mask tokenizer (0: skip it, and stage 9)",
    "mask_lr": None,
    "segment_steps": "stage 9 (0: skip it and stage 10)",
    "segment_lr": None,
    "blend_steps": "stage 10 (0: skip it)",
    "blend_lr": None,
    "batch_size": None,
    "lr": None,
    "warmup_steps": None,
    "seed": None,
    "processes": "data-parallel CPU processes",
    "threads": "torch threads per process",
    "device": "cpu (default) or cuda (with --processes 1)",
    "eval_images": "held-out scenes (0: none)",
}


def main(argv: list[str] | None = None) -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(prog="python -m vlmo.demo.train", description=__doc__.split("\n\n")[0])
    stages = "init/ vision/ run/ focus/ detect/ polish/ refine/ sizes/ masks/ segment/ blend/"
    parser.add_argument("--out", type=Path, required=True, help=f"run directory ({stages} model/ metrics.json)")
    for name, text in _RECIPE_FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=text)
    parser.add_argument("--install", action="store_true", help=f"copy the trained model into {MODEL_DIR}")
    parser.add_argument("--resume", action="store_true", help="reuse the stages an interrupted run in --out finished")
    args = parser.parse_args(argv)
    # SIGTERM ends the run as Ctrl-C does, through `_finetune_stage`'s cleanup of its worker processes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.resume and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; pick a new --out, or add --resume to finish that run")
    recipe = Recipe(**{name: getattr(args, name) for name in _RECIPE_FLAGS})
    model_dir = train(args.out, recipe, resume=args.resume)
    if args.install:
        install(model_dir)
    print((args.out / "metrics.json").read_text(encoding="utf-8"), end="")
    print(f"model: {model_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
