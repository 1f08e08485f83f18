"""The shapes world's own mask tokenizer: a VQ-VAE with PaliGemma's layout, trained on shapes masks.

    python -m vlmo.demo.train --out runs/shapes      # stage 8 (`masks/`) trains it, stage 9 uses its codes

PaliGemma writes an object's mask as 16 `<segNNN>` codes: a 4×4 grid of entries from a 128-code codebook, which the
"vae-oid" VQ-VAE decodes into a 64×64 mask of the object's box (docs/model-notes.md §9.3). The demo model cannot
use vae-oid's codes (its download is what it must do without, and its codebook knows open-world objects, not these
three outlines), so the recipe trains a VQ-VAE of the same architecture (`MaskTokenizer`: `vlmo.nn.vqvae`'s
encoder, codebook and decoder, with vae-oid's tensor names) on masks of the shapes world, and the model ships its
decoder: `vlmo.nn.vqvae.VQVAEDecoder` and every segmentation face decode both the same way.

Training data (`training_masks`): a circle, square or triangle drawn in a box of 24–200 px, cropped to its box and
resized to 64×64 as `vlmo.segmentation.encode_mask` crops a target; half the crops move each box edge by up to 15 %
of the side, so the codebook also knows partial and loose outlines, not only the three exact ones. The loss is
AiT's: the squared error of the decoder's output against the mask in [-1, 1] (so > 0 is inside), plus the codebook
and commitment terms of a VQ-VAE (straight-through gradient); codes unused for `reset_every` steps restart on
encoder outputs of the current batch. Resumable: a checkpoint every `save_every` steps (`finetune`'s format).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmo.demo.shapes import SHAPES, Shape, box_mask
from vlmo.nn.vqvae import GRID, VQVAEDecoder, VQVAEEncoder
from vlmo.segmentation import crop_mask, encode_mask

TOKENIZER_FILE = "mask_tokenizer.safetensors"  # the whole VQ-VAE, float32, vae-oid's names (a stage's output)


@dataclass(frozen=True)
class MaskRecipe:
    """The mask tokenizer's training settings (stage 8 of `vlmo.demo.train`; docs/demo-model.md)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    commitment: float = 0.25  # β of the commitment term
    jitter: float = 0.15  # half the crops move each edge by up to this fraction of the side
    sides: tuple[int, int] = (24, 200)  # box sides drawn, px (the shapes world's boxes: 32–180)
    reset_every: int = 100  # codes unused for this many steps restart on encoder outputs
    save_every: int = 500  # a multiple of reset_every: a resumed run restarts codes at the same steps
    seed: int = 0
    eval_masks: int = 512


class MaskTokenizer(nn.Module):
    """Encoder, codebook and decoder of `vlmo.nn.vqvae` in one module, whose `state_dict()` names are vae-oid's, so
    `vlmo.weights.vqvae.load_mask_decoder` / `load_mask_encoder` read what it saves.

    masks: float[B, 1, 64, 64] in [0, 1]; z: float[B, 512, 4, 4]; codes: int64[B, 16] (cells row-major)."""

    def __init__(self) -> None:
        super().__init__()
        decoder, encoder = VQVAEDecoder(), VQVAEEncoder()
        self._vq_vae = decoder._vq_vae
        self.encoder = encoder.encoder
        self.decoder = decoder.decoder

    @property
    def codebook(self) -> nn.Parameter:
        return self._vq_vae._embedding

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        return self.encoder(2.0 * (masks - 0.5))  # [0, 1] → [-1, 1], as vae-oid's encoder

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z → (the nearest codebook rows laid out as z, codes)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        table = self.codebook
        codes = ((table * table).sum(1) - 2.0 * flat @ table.t()).argmin(1)
        quantized = table[codes].view(z.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
        return quantized, codes.view(z.shape[0], GRID * GRID)

    def forward(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """masks → (decoded logits float[B, 1, 64, 64], codes), without the training losses."""
        quantized, codes = self.quantize(self.encode(masks))
        return self.decoder(quantized), codes


def training_masks(rng: random.Random, n: int, recipe: MaskRecipe) -> torch.Tensor:
    """float32[n, 1, 64, 64]: shapes masks cropped to their box (half of the boxes jittered; module docstring)."""
    crops = []
    for _ in range(n):
        kind, side = rng.choice(SHAPES), rng.randint(*recipe.sides)
        pad = int(recipe.jitter * side) + 1
        box: list[float] = [pad, pad, pad + side, pad + side]
        if rng.random() < 0.5:
            box = [v + rng.uniform(-recipe.jitter, recipe.jitter) * side for v in box]
            box[2], box[3] = max(box[2], box[0] + 2), max(box[3], box[1] + 2)
        crops.append(crop_mask(box_mask(kind, side, pad), box))
    return torch.cat(crops)


def mask_iou(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """float[B]: IoU of the decoded masks (logits > 0) with the true ones (> 0.5); 1 where both are empty."""
    predicted, truth = logits.flatten(1) > 0, masks.flatten(1) > 0.5
    union = (predicted | truth).sum(1)
    return torch.where(union > 0, (predicted & truth).sum(1) / union.clamp(min=1), 1.0)


def train_mask_tokenizer(out: Path, recipe: MaskRecipe = MaskRecipe(), log: bool = True) -> dict[str, Any]:
    """Train the mask tokenizer into `out` (checkpoint-N/ along the way; `final/mask_tokenizer.safetensors` and
    `final/report.json`, written last, at the end); a run interrupted in `out` goes on from its last checkpoint.
    Returns the report: held-out IoU of the round trip mask → codes → mask, and the stage's seconds."""
    from safetensors.torch import save_file

    from vlmo.finetune.train import latest_checkpoint, load_checkpoint, save_checkpoint, warmup_cosine

    torch.manual_seed(recipe.seed)
    model = MaskTokenizer().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(recipe.warmup_steps, recipe.steps))
    latest = latest_checkpoint(out)
    step = first = load_checkpoint(latest[0], model, optimizer, scheduler) if latest else 0
    used = torch.zeros(model.codebook.shape[0], dtype=torch.long)
    started = time.perf_counter()
    while step < recipe.steps:
        masks = training_masks(random.Random(f"masks:{recipe.seed}:{step}"), recipe.batch_size, recipe)
        z = model.encode(masks)
        if step == 0:  # the codebook starts on encoder outputs, not at N(0, 1) far from all of them
            with torch.no_grad():
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                model.codebook.copy_(flat[torch.randint(len(flat), (model.codebook.shape[0],))])
        quantized, codes = model.quantize(z)
        logits = model.decoder(z + (quantized - z).detach())  # straight-through: the decoder's gradient reaches z
        loss = (
            F.mse_loss(logits, 2.0 * masks - 1.0)
            + F.mse_loss(quantized, z.detach())
            + recipe.commitment * F.mse_loss(z, quantized.detach())
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        used += torch.bincount(codes.flatten(), minlength=len(used))
        if step % recipe.reset_every == 0:
            _restart_unused(model, z.detach(), used)
            used.zero_()
        if log and (step % 100 == 0 or step == recipe.steps):
            elapsed = time.perf_counter() - started
            print(f"masks {step}/{recipe.steps} loss {loss.item():.4f} {elapsed:.0f}s", file=sys.stderr)
        if recipe.save_every and step % recipe.save_every == 0 and step < recipe.steps:
            save_checkpoint(out / f"checkpoint-{step}", model, list(model.named_parameters()), optimizer, scheduler,
                            step, recipe)  # fmt: skip
    model.eval()
    report = {**evaluate_tokenizer(model, recipe), "seconds": round(time.perf_counter() - started, 1)}
    report["resumed_from_step"] = first
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(final / TOKENIZER_FILE))
    (final / "report.json").write_text(json.dumps({**report, "recipe": asdict(recipe)}, indent=2) + "\n")
    if log:
        print(f"masks held-out: {json.dumps(report)}", file=sys.stderr)
    return report


def _restart_unused(model: MaskTokenizer, z: torch.Tensor, used: torch.Tensor) -> None:
    """Codes no cell chose since the last restart take the place of random encoder outputs of this batch."""
    dead = (used == 0).nonzero().flatten()
    if len(dead):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        with torch.no_grad():
            model.codebook[dead] = flat[torch.randint(len(flat), (len(dead),))]


def evaluate_tokenizer(model: MaskTokenizer, recipe: MaskRecipe = MaskRecipe()) -> dict[str, Any]:
    """Held-out IoU of mask → codes → mask: on every kind's exact box at every side from 24 to 200 px in steps of
    4 (the `segment` targets), and on `eval_masks` crops drawn as in training from the stream "heldout-masks"."""
    exact = torch.cat([crop_mask(box_mask(k, s), (0, 0, s, s)) for k in SHAPES for s in range(24, 201, 4)])
    jittered = training_masks(random.Random("heldout-masks"), recipe.eval_masks, recipe)
    with torch.no_grad():
        (exact_logits, exact_codes), (jitter_logits, _) = model(exact), model(jittered)
    exact_iou, jitter_iou = mask_iou(exact_logits, exact), mask_iou(jitter_logits, jittered)
    per_kind = exact_iou.view(len(SHAPES), -1)
    return {
        "exact_mean_iou": round(exact_iou.mean().item(), 4),
        "exact_min_iou": round(exact_iou.min().item(), 4),
        "exact_mean_iou_by_kind": {k: round(v.mean().item(), 4) for k, v in zip(SHAPES, per_kind, strict=True)},
        "jittered_mean_iou": round(jitter_iou.mean().item(), 4),
        "codes_in_exact_targets": len(exact_codes.unique()),
    }


class ShapeCodes:
    """A shape's 16 `<seg>` codes under a trained mask tokenizer: `encode_mask` of its mask in its own box. The
    drawing depends on the kind and the side only (module docstring of `vlmo.demo.shapes`), so the codes are
    worked out once per (kind, side). The encoder loads on first use (in each training process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._encoder: VQVAEEncoder | None = None
        self._codes: dict[tuple[str, int], tuple[int, ...]] = {}

    def __call__(self, shape: Shape) -> tuple[int, ...]:
        side = shape.box[2] - shape.box[0]
        key = (shape.kind, side)
        if key not in self._codes:
            if self._encoder is None:
                from vlmo.weights.vqvae import load_mask_encoder

                self._encoder = load_mask_encoder(self.path)
            self._codes[key] = encode_mask(box_mask(shape.kind, side), (0, 0, side, side), self._encoder)
        return self._codes[key]

    def __getstate__(self) -> dict[str, Any]:  # sent to other processes without the loaded encoder
        return {"path": self.path, "_encoder": None, "_codes": {}}
