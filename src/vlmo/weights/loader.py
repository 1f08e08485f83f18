"""Load a PaliGemma checkpoint directory into a `PaliGemma` module, strictly and without a second copy.

A checkpoint directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and `tokenizer.json` (read by `processing.py`). The model is built on the meta
device, every checkpoint tensor is renamed through the key table and assigned (mmapped, cast only when the dtype
differs), and anything missing, unexpected or of the wrong shape is an error that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vlmo.config import PaliGemmaConfig
from vlmo.errors import CheckpointError, ConfigError
from vlmo.fileio.jsonfile import read_json
from vlmo.nn.paligemma import PaliGemma
from vlmo.weights.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, check_shard_name
from vlmo.weights.keys import KeyMap
from vlmo.weights.safetensors_io import open_tensors, release_pages

# A checkpoint directory without its config is most likely not a checkpoint directory at all.
NOT_A_CHECKPOINT = "is this a PaliGemma checkpoint directory?"


def load_config(model_dir: Path) -> PaliGemmaConfig:
    return PaliGemmaConfig.from_hf(read_json(model_dir / CONFIG_FILE, missing=NOT_A_CHECKPOINT))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    if (model_dir / INDEX_FILE).is_file():
        weight_map = read_json(model_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{model_dir / INDEX_FILE} has no 'weight_map'; download it again")
        # Only plain names inside the directory: an index naming ../../x or /etc/x is refused, not followed.
        names = {check_shard_name(name, model_dir / INDEX_FILE) for name in weight_map.values()}
        shards = [model_dir / name for name in sorted(names)]
        missing = [str(p.relative_to(model_dir)) for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir} lacks shard(s) {', '.join(missing[:3])} listed in {INDEX_FILE}")
        return shards
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
        raise CheckpointError(
            f"{model_dir} has only pickle weights (*.bin/*.pth); vlmo loads safetensors only — convert them with "
            "transformers' save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(
        f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE}; pass a complete checkpoint directory or a hub id"
    )


def read_state_dict(
    model_dir: Path, cfg: PaliGemmaConfig, keymap: KeyMap
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the checkpoint under its vlmo name (mmapped, in the stored dtype), and for each name the key
    it has in the file (for error messages a user can search the file for)."""
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    for path in weight_files(model_dir):
        for key, tensor in open_tensors(path).items():
            name = keymap.from_hf(key)
            if name is not None and name.startswith("vision.unused_head.") and cfg.vision.has_unused_head:
                continue  # declared by `vision_use_head: true`, never used by PaliGemma
            if name is None or name.startswith("vision.unused_head."):
                unexpected.append(key)
            elif name in out:
                raise CheckpointError(f"{model_dir}: two checkpoint tensors map to {name!r} (one is {key!r})")
            else:
                out[name] = tensor
                sources[name] = key
    if unexpected:
        raise CheckpointError(
            f"{model_dir} has {len(unexpected)} tensor(s) that are not part of PaliGemma, e.g. {few_names(unexpected)}"
        )
    return out, sources


def load_model(
    model_dir: str | Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> PaliGemma:
    """Build the model described by `model_dir/config.json` and load its weights strictly.

    Floating-point tensors are cast to `dtype` (no copy when the stored dtype already matches and the device is
    the CPU; `dtype=None` keeps the stored dtypes, so a CPU model is entirely mmapped). Raises `CheckpointError`
    naming the first missing/unexpected keys or the first shape mismatch.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {model_dir}")
    cfg = load_config(model_dir)
    keymap = KeyMap(cfg.text.arch)
    state, sources = read_state_dict(model_dir, cfg, keymap)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    _resolve_lm_head(model, state)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{model_dir} lacks {len(missing)} tensor(s) the config needs, e.g. "
            f"{few_names([keymap.to_hf(k) for k in missing])}; is {CONFIG_FILE} from the same model?"
        )
    extra = [sources[k] for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"{model_dir} has {len(extra)} tensor(s) that {CONFIG_FILE} does not describe, e.g. {few_names(extra)}; "
            f"is {CONFIG_FILE} from the same model?"
        )
    for name, ref in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{model_dir}: tensor {sources[name]!r} has shape {tuple(got.shape)} but {CONFIG_FILE} implies "
                f"{tuple(ref.shape)}"
            )
        if got.is_floating_point():
            state[name] = got.to(device=device, dtype=dtype or got.dtype)
            if state[name] is not got:
                release_pages(got)  # a converted copy exists: the file's pages need not stay in memory
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _resolve_lm_head(model: PaliGemma, state: dict[str, torch.Tensor]) -> None:
    """Tie the output head to the embedding unless the checkpoint carries a *different* lm_head (model-notes §1.3).

    transformers 5.24 keeps a file's lm_head separate only when both tensors exist and differ; we do the same.
    """
    head, embed = state.get("text.lm_head.weight"), state.get("text.embed.weight")
    tied = model.cfg.text.tie_word_embeddings
    if head is None and tied:
        return
    if head is not None and tied and embed is not None and torch.equal(head, embed):
        del state["text.lm_head.weight"]
        return
    # An untied head: loaded from the file, or reported missing by the strict check (never left random).
    with torch.device("meta"):
        model.text.lm_head = nn.Linear(model.cfg.text.hidden_size, model.cfg.text.vocab_size, bias=False)


def few_names(keys: Sequence[str], n: int = 3) -> str:
    """The first `n` names, quoted, and how many more: for error messages that must stay on one line."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


__all__ = ["ConfigError", "load_config", "load_model", "read_state_dict", "weight_files"]
