"""LoRA adapters in PEFT's file format: save vlmo's adapters so PEFT loads them, and load PEFT's into vlmo.

What PEFT 0.21 `PeftModel.save_pretrained` writes for a LoRA on transformers 5's `PaliGemmaForConditionalGeneration`
(checked against PEFT itself in tests/test_lora.py):

    adapter_config.json        `LoraConfig.to_dict()`, 2-space indent, sorted keys: peft_type "LORA", r, lora_alpha,
                               lora_dropout, target_modules (a list of leaf names or one regex), rank_pattern,
                               alpha_pattern, use_rslora, modules_to_save, bias "none", task_type, auto_mapping, …
    adapter_model.safetensors  metadata {"format": "pt"}; for each adapted Linear at module path P
                                   base_model.model.P.lora_A.weight  [r, in]
                                   base_model.model.P.lora_B.weight  [out, r]
                               and each parameter of a `modules_to_save` module, in full, under its own name
                                   base_model.model.model.multi_modal_projector.linear.weight
                               (PEFT strips the wrapper's `modules_to_save.<adapter>` segments when saving).

P is `model.language_model.layers.0.self_attn.q_proj` under transformers 5 and `language_model.model.layers.0.…` or
`vision_tower.vision_model.…` in adapters made with transformers 4. Both load: a path maps to a vlmo layer through
`KeyMap`, exactly as checkpoint keys do. Saving writes the transformers 5 layout, as PEFT 0.21 does.

PEFT's names for vlmo's modules live here too (vlmo.nn.lora knows vlmo's only): `apply_lora` applies a `LoRAConfig`
whose `targets` may use transformers' leaf names (`out_proj`) and whose `modules_to_save` are PEFT's module names.

The tensors decide which layers get an adapter; `target_modules` is only checked for form. Loading is strict: a tensor
that matches no layer, an A without its B, or a shape that disagrees with the model or the config is a
`CheckpointError` naming it. Variants that change the maths (DoRA, aLoRA, LoRA bias, …) are refused, and pickle files
(`adapter_model.bin`) are never opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from torch import nn

from vlmo.config import projector_to_hf
from vlmo.errors import CheckpointError, ConfigError, InputError
from vlmo.fileio.atomic import atomic_path, write_output
from vlmo.fileio.jsonfile import read_json
from vlmo.nn import lora
from vlmo.nn.lora import LoRAConfig, LoRALinear, adaptable_layers, lora_modules, untie_head
from vlmo.nn.paligemma import PaliGemma
from vlmo.progress import ProgressBars
from vlmo.weights.hub import (
    ModelNotFoundError,
    OfflineError,
    check_repo_id,
    hub_errors,
    hub_requests,
    looks_like_path,
    repo_label,
    want_progress,
)
from vlmo.weights.keys import KeyMap
from vlmo.weights.loader import few_names
from vlmo.weights.safetensors_io import open_tensors

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "apply_lora",
    "hf_parameter_names",
    "load_adapter",
    "mark_modules_to_save",
    "peft_layer_paths",
    "resolve_adapter",
    "save_adapter",
    "saved_module_parameters",
    "use_saved_projector",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
# vlmo-only files beside a PEFT adapter, for a Dense Connector projector (PEFT ignores them)
PROJECTOR_CONFIG = "vlmo_projector.json"
PROJECTOR_WEIGHTS = "vlmo_projector.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel → LoraModel → the transformers model
# The PEFT release whose format we write (its `peft_version` field; PEFT only reads it for information).
PEFT_FORMAT_VERSION = "0.21.2"
# Set when `task_type` is null, so AutoPeftModel can find the base class (peft_model.py, save_pretrained).
_AUTO_MAPPING = {
    "base_model_class": "PaliGemmaForConditionalGeneration",
    "parent_library": "transformers.models.paligemma.modeling_paligemma",
}
# One regex per tower for `target_modules`, matching transformers 5 and 4 module paths alike (PEFT uses fullmatch).
_TOWER_PATTERNS = {
    "text.": r".*language_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\.",
    "vision.": r".*vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\.(?:self_attn|mlp)\.",
    "projector.": r".*multi_modal_projector\.",
}
# The Linears of SigLIP's pooling head (transformers' SiglipMultiheadAttentionPoolingHead), present in transformers'
# model when a config says `vision_use_head: true` though PaliGemma never runs them: PEFT's leaf-name rule would wrap
# them too, so target_modules must not be a bare leaf list then.
_UNUSED_HEAD_LINEARS = (
    "model.vision_tower.head.attention.out_proj",
    "model.vision_tower.head.mlp.fc1",
    "model.vision_tower.head.mlp.fc2",
)
# Config fields that turn on a LoRA variant or a feature whose maths vlmo does not implement (PEFT 0.21's
# `is_lora_variant` fields, and the others that change the forward or the model's structure).
_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "replicated layers (layer_replication)",
}
# Initialisations that also rewrite the base weights (or, for MiCA, select a variant): such an adapter only fits the
# base model PEFT modified, unless PEFT converted it when saving (which resets init_lora_weights to true).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


# -- PEFT's names for vlmo's modules -------------------------------------------------------------------------------
# PEFT names modules after transformers 5's module tree (`KeyMap.to_v5`). It differs from vlmo's leaf names in one
# place: the vision attention output is `o_proj` in vlmo and `out_proj` in transformers.

_EMBED = "model.language_model.embed_tokens.weight"


def hf_parameter_names(model: PaliGemma) -> dict[str, str]:
    """Every base parameter's vlmo name → its name in transformers 5's PaliGemmaForConditionalGeneration
    (`text.layers.0.attn.q_proj.weight` → `model.language_model.layers.0.self_attn.q_proj.weight`). LoRA factors are
    left out. A tied output head has no parameter of its own, so no `lm_head.weight` entry."""
    keymap = KeyMap(model.cfg.text.arch)
    out = {}
    for name, _ in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            out[name] = keymap.to_v5(name)
    return out


def peft_layer_paths(model: PaliGemma) -> dict[str, str]:
    """vlmo module name → transformers 5 module path for every Linear that LoRA may wrap (`adaptable_layers`)."""
    keymap = KeyMap(model.cfg.text.arch)
    return {name: keymap.to_v5(name + ".weight").removesuffix(".weight") for name in adaptable_layers(model)}


def saved_module_parameters(model: PaliGemma, names: Iterable[str]) -> dict[str, str]:
    """The parameters of PEFT `modules_to_save` entries: transformers 5 parameter name → vlmo parameter name, for
    every parameter below a module whose path ends with one of `names` (PEFT's own suffix rule).

    While the head is tied, transformers' `lm_head.weight` *is* the embedding matrix: "lm_head" then selects
    `text.embed.weight` under the name `lm_head.weight`.
    """
    names = tuple(names)
    hf = {key: name for name, key in hf_parameter_names(model).items()}
    if model.text.lm_head is None:
        hf["lm_head.weight"] = "text.embed.weight"
    return {key: name for key, name in hf.items() if _under_any(key, names)}


def _under_any(key: str, names: tuple[str, ...]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]).endswith(n) for i in range(1, len(parts)) for n in names)


def mark_modules_to_save(model: PaliGemma, names: Iterable[str]) -> list[str]:
    """Resolve PEFT-style `modules_to_save` names to vlmo parameter names. When the output head or the embedding is
    among them, the head is untied first, as PEFT does without `ensure_weight_tying`: each then trains on its own."""
    names = tuple(names)
    found = saved_module_parameters(model, names)
    missing = [n for n in names if not any(_under_any(key, (n,)) for key in found)]
    if missing:
        raise InputError(
            f"modules_to_save {missing} match no module; use transformers' module names, e.g. "
            "'multi_modal_projector', 'embed_tokens', 'lm_head'"
        )
    if model.text.lm_head is None and {"lm_head.weight", _EMBED} & found.keys():
        untie_head(model)
        found = saved_module_parameters(model, names)
    return sorted(set(found.values()))


def apply_lora(model: PaliGemma, cfg: LoRAConfig) -> list[str]:
    """`vlmo.nn.lora.apply_lora` for a config in PEFT's naming: `cfg.targets` match vlmo's leaf names *or*
    transformers' (`"out_proj"` selects the vision `o_proj` only, `"o_proj"` the text one and, with `include_vision`,
    the vision one too), and `cfg.modules_to_save` are PEFT's module names (`mark_modules_to_save`), trained in full.
    Returns the vlmo names of the wrapped layers."""
    if lora_modules(model):
        raise InputError("the model already has LoRA layers; call remove_lora(model) before applying a new adapter")
    aliases = {name: path.rsplit(".", 1)[-1] for name, path in peft_layer_paths(model).items()}
    layers = lora.select_targets(model, cfg, aliases)
    train = mark_modules_to_save(model, cfg.modules_to_save) if cfg.modules_to_save else []
    return lora.apply_lora(model, cfg, layers=layers, train=train)


# -- saving --------------------------------------------------------------------------------------------------------


def save_adapter(
    model: PaliGemma, out_dir: str | os.PathLike[str], cfg: LoRAConfig, base_model: str | None = None
) -> Path:
    """Write the model's LoRA adapters to `out_dir` as `adapter_config.json` + `adapter_model.safetensors`, exactly as
    PEFT 0.21 saves a LoRA of transformers 5's PaliGemmaForConditionalGeneration; `PeftModel.from_pretrained` loads it.

    `cfg` gives r, alpha, dropout, use_rslora and modules_to_save; layers whose rank or alpha differ from it (an
    adapter loaded with `rank_pattern`) are written as `rank_pattern`/`alpha_pattern` entries. `target_modules` names
    exactly the wrapped layers: a list of leaf names when that selects them and nothing else in transformers' model,
    otherwise a regex. `base_model` goes to `base_model_name_or_path` (e.g. "google/paligemma2-3b-pt-224").
    Returns `out_dir`. The adapter factors are written in their own dtype (float32 for a half-precision model).
    """
    mods = lora_modules(model)
    if not mods:
        raise InputError("the model has no LoRA layers to save; call apply_lora(model, cfg) or load_adapter first")
    paths = peft_layer_paths(model)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, m in mods.items():
        if m.use_rslora != cfg.use_rslora:
            raise InputError(f"layer {name} has use_rslora={m.use_rslora} but cfg.use_rslora={cfg.use_rslora}")
        if m.r != cfg.r:
            rank_pattern[paths[name]] = m.r
        if m.alpha != cfg.alpha:
            alpha_pattern[paths[name]] = m.alpha
    for what, pattern, value in (("rank", rank_pattern, cfg.r), ("alpha", alpha_pattern, cfg.alpha)):
        if len(pattern) == len(mods):
            raise InputError(
                f"cfg says {what} {value} but no LoRA layer of the model has it (they have "
                f"{sorted(set(pattern.values()))}); pass the LoRAConfig the adapters were made with"
            )

    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        key = PEFT_PREFIX + paths[name]
        tensors[key + ".lora_A.weight"] = m.lora_A.weight
        tensors[key + ".lora_B.weight"] = m.lora_B.weight
    if cfg.modules_to_save:
        saved = saved_module_parameters(model, cfg.modules_to_save)
        missing = [n for n in cfg.modules_to_save if not saved_module_parameters(model, (n,))]
        if missing:
            raise InputError(f"modules_to_save {missing} match no module of the model")
        params = dict(model.named_parameters())
        tensors.update({PEFT_PREFIX + key: params[name] for key, name in saved.items()})
    tensors = _distinct(tensors)

    config = _peft_config(cfg, _target_modules(model, set(mods)), rank_pattern, alpha_pattern, base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all (vlmo.fileio.atomic): a failed write leaves the previous adapter's file in place.
    write_output(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    extra = projector_to_hf(model.cfg.projector)
    if extra is not None:  # a Dense Connector projector: PEFT has no place for it, so it sits beside the adapter
        write_output(out / PROJECTOR_CONFIG, json.dumps(extra, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.projector.state_dict().items()}
        with atomic_path(out / PROJECTOR_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    return out


def use_saved_projector(model: PaliGemma, directory: Path) -> bool:
    """Give `model` (a base model, on any device, meta included) the kind of Dense Connector projector saved beside
    the adapter in `directory`, freshly initialised; False, and nothing changed, when the adapter has none. The
    prepared-weights cache builds its model with this too, so an entry has the projector the adapter brings."""
    if not (directory / PROJECTOR_CONFIG).is_file():
        return False
    fields = read_json(directory / PROJECTOR_CONFIG)
    if not (directory / PROJECTOR_WEIGHTS).is_file():
        raise CheckpointError(f"{directory} has {PROJECTOR_CONFIG} but no {PROJECTOR_WEIGHTS}; copy the whole adapter")
    kind = fields.pop("kind", None)
    fields.pop("vision_layers", None)
    model.use_projector(str(kind), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    return True


def _load_projector(model: PaliGemma, directory: Path) -> None:
    """Switch to and load the Dense Connector projector saved beside an adapter (all its tensors, strictly)."""
    if not use_saved_projector(model, directory):
        return
    kind, weights = model.cfg.projector.kind, directory / PROJECTOR_WEIGHTS
    tensors = open_tensors(weights)
    expected = model.projector.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{weights} does not fit a {kind!r} projector: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.projector.load_state_dict(tensors)


def _distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage (safetensors refuses aliases, e.g. a tied head saved
    under both of its names; PEFT clones them the same way)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _target_modules(model: PaliGemma, wrapped: set[str]) -> list[str] | str:
    """A PEFT `target_modules` value that selects exactly the `wrapped` layers in transformers' model: the sorted leaf
    names if PEFT's suffix rule picks those and no others (e.g. all q_proj of both towers), else one regex per tower
    over leaf names, else (layer subsets) the full module paths."""
    paths = peft_layer_paths(model)
    universe = set(paths.values()) | set(_UNUSED_HEAD_LINEARS if model.cfg.vision.has_unused_head else ())
    want = {paths[n] for n in wrapped}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in want})
    if {p for p in universe if any(p == t or p.endswith("." + t) for t in leaves)} == want:
        return leaves
    parts = []
    for tower, prefix in _TOWER_PATTERNS.items():
        tower_leaves = sorted({paths[n].rsplit(".", 1)[-1] for n in wrapped if n.startswith(tower)})
        if tower_leaves:
            parts.append(f"{prefix}(?:{'|'.join(tower_leaves)})")
    regex = "|".join(parts)
    if {p for p in universe if re.fullmatch(regex, p)} == want:
        return regex
    return sorted(want)


def _peft_config(
    cfg: LoRAConfig,
    target_modules: list[str] | str,
    rank_pattern: dict[str, int],
    alpha_pattern: dict[str, float],
    base_model: str | None,
) -> dict[str, Any]:
    """Every field PEFT 0.21's LoraConfig saves, at PEFT's defaults except where the adapter says otherwise."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": alpha_pattern,
        "arrow_config": None,
        "auto_mapping": _AUTO_MAPPING,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": cfg.alpha,
        "lora_bias": False,
        "lora_dropout": cfg.dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": list(cfg.modules_to_save) or None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": cfg.r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": target_modules,
        "target_parameters": None,
        "task_type": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": cfg.use_rslora,
        "velora_config": None,
    }


# -- finding -------------------------------------------------------------------------------------------------------


def resolve_adapter(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    progress: bool | None = None,
) -> Path:
    """The local directory holding the adapter: an existing directory as is, or a hub repo (owner/name) downloaded
    into the Hugging Face cache (only `adapter_config.json` and `adapter_model.safetensors`; a cached adapter costs no
    network access). Hub failures raise the same errors as `vlmo.weights.hub.resolve_model`."""
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or looks_like_path(name) or (name and Path(name).is_dir()):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"no such adapter directory: {path} (a hub id looks like owner/name)")
        return path
    repo_id = check_repo_id(name)
    with hub_errors(repo_id, revision, None):
        cached = _cached_adapter(repo_id, revision)
        if cached is not None:
            return cached
        if constants.is_offline_mode():
            raise OfflineError(
                f"the adapter {repo_label(repo_id, revision)} is not in the cache and HF_HUB_OFFLINE is set: "
                "load it once while online, or unset HF_HUB_OFFLINE"
            )
        return _download_adapter(repo_id, revision, token, want_progress(progress))


def _cached_adapter(repo_id: str, revision: str | None) -> Path | None:
    try:
        config = Path(hf_hub_download(repo_id, ADAPTER_CONFIG, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return config.parent if (config.parent / ADAPTER_WEIGHTS).is_file() else None


def _download_adapter(repo_id: str, revision: str | None, token: str | bool | None, show: bool) -> Path:
    where = repo_label(repo_id, revision)
    with hub_requests() as timeouts:  # timeouts and quiet retries, as for models
        info = HfApi().model_info(repo_id, revision=revision, token=token, timeout=timeouts.metadata)
        files = {s.rfilename for s in info.siblings or []}
        if ADAPTER_CONFIG not in files:
            raise CheckpointError(f"{where} has no {ADAPTER_CONFIG}: is it a PEFT adapter repo?")
        if ADAPTER_WEIGHTS not in files:
            raise CheckpointError(_no_safetensors(where, PICKLE_WEIGHTS in files))
        with ProgressBars(unit="bytes", enabled=show) as bars:
            paths = [
                Path(
                    hf_hub_download(
                        repo_id,
                        f,
                        revision=revision,
                        token=token,
                        tqdm_class=bars.tqdm_class(f),
                        etag_timeout=timeouts.metadata,
                    )
                )
                for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
            ]
    if paths[0].parent != paths[1].parent:  # the branch moved between the two files
        raise CheckpointError(f"the download of {where} is incomplete: run the same command again")
    return paths[0].parent


def _no_safetensors(where: str | Path, has_pickle: bool) -> str:
    if has_pickle:
        return (
            f"{where} has only {PICKLE_WEIGHTS}, a pickle file, which vlmo never opens: re-save the adapter with "
            f"PEFT's save_pretrained(..., safe_serialization=True) to get {ADAPTER_WEIGHTS}"
        )
    return f"{where} has no {ADAPTER_WEIGHTS}: pass a PEFT adapter directory (what save_pretrained writes)"


# -- loading -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What an adapter_config.json says, validated."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules_to_save: tuple[str, ...]

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha of the layer at module path `path`, by PEFT's rule: the first pattern that matches a dotted
        suffix of the path wins (peft.utils.other.get_pattern_key)."""
        return _pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path, self.alpha)


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(
    model: PaliGemma,
    path_or_hub_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> LoRAConfig:
    """Load a PEFT LoRA adapter into `model` (in place) and return its settings as a `LoRAConfig`.

    `path_or_hub_id`: a directory with `adapter_config.json` + `adapter_model.safetensors`, or a hub repo id
    (`revision`/`token` as for models). The adapted layers become `LoRALinear` (unmerged, factors frozen: call
    `merge_lora` for faster inference, or set `requires_grad` on `lora_parameters(model)` to train on). Full copies
    from `modules_to_save` replace the model's parameters; a head or embedding among them unties the head as PEFT
    does. The returned config's `targets` are the leaf names that carry adapters, in transformers' naming.

    Raises ConfigError for adapters vlmo cannot run (another PEFT type, DoRA and other variants, trained biases),
    CheckpointError for files that do not fit the model, InputError if the model already has LoRA layers.
    """
    if lora_modules(model):
        raise InputError("the model already has LoRA layers; call remove_lora(model) before loading another adapter")
    directory = resolve_adapter(path_or_hub_id, revision=revision, token=token)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}: pass a PEFT adapter directory or hub id")
    settings = _read_settings(read_json(directory / ADAPTER_CONFIG), directory / ADAPTER_CONFIG)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(_no_safetensors(directory, (directory / PICKLE_WEIGHTS).is_file()))
    _load_projector(model, directory)
    factors, full = _match_tensors(model, open_tensors(weights), settings, weights)

    for name, (a, b, r, alpha) in factors.items():
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        layer = LoRALinear(base, r, alpha, settings.dropout, settings.use_rslora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        layer.requires_grad_(False)
        setattr(model.get_submodule(parent), leaf, layer)
    _assign_full(model, full)

    paths = peft_layer_paths(model)
    return LoRAConfig(
        r=settings.r,
        alpha=settings.alpha,
        dropout=settings.dropout,
        targets=tuple(sorted({paths[n].rsplit(".", 1)[-1] for n in factors})),
        include_vision=any(n.startswith("vision.") for n in factors),
        use_rslora=settings.use_rslora,
        modules_to_save=settings.modules_to_save,
    )


def _read_settings(raw: dict[str, Any], where: Path) -> _Settings:
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise CheckpointError(f"{where} has no 'peft_type': is it a PEFT adapter config?")
    if peft_type != "LORA":
        raise ConfigError(f"{where} is a {peft_type} adapter; vlmo loads LoRA adapters only (peft_type LORA)")
    used = [what for field, what in _REFUSED.items() if raw.get(field)]
    bias = raw.get("bias", "none")
    if bias != "none":
        used.append(f"trained biases (bias={bias!r})")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        used.append(f"init_lora_weights={init!r}, whose adapter needs the base weights PEFT changed")
    if used:
        raise ConfigError(
            f"{where} uses {', '.join(used)}, which vlmo does not implement; merge the adapter with PEFT "
            "(merge_and_unload) and load the merged model, or train a plain LoRA"
        )

    def number(field: str, default: float, ok: Callable[[Any], bool], want: str) -> Any:
        value = raw.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise ConfigError(f"{where}: {field} must be {want}, got {value!r}")
        return value

    r = number("r", 8, lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1")
    alpha = number("lora_alpha", 8, lambda v: v > 0, "a number > 0")
    dropout = number("lora_dropout", 0.0, lambda v: 0 <= v < 1, "in [0, 1)")
    targets = raw.get("target_modules")
    if not (targets is None or isinstance(targets, str) or _str_list(targets)):
        raise ConfigError(f"{where}: target_modules must be a list of names or a regex string, got {targets!r}")
    modules_to_save = raw.get("modules_to_save") or []
    if not _str_list(modules_to_save):
        raise ConfigError(f"{where}: modules_to_save must be a list of module names, got {modules_to_save!r}")
    patterns = []
    for field, want_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = raw.get(field) or {}
        bad = not isinstance(pattern, dict) or any(
            isinstance(v, bool) or not isinstance(v, int if want_int else int | float) or v <= 0
            for v in pattern.values()
        )
        if bad:
            raise ConfigError(f"{where}: {field} must map module names to positive numbers, got {pattern!r}")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise ConfigError(f"{where}: {field} key {key!r} is not a valid regex ({e})") from None
        patterns.append(pattern)
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ConfigError(f"{where}: use_rslora must be true or false, got {use_rslora!r}")
    return _Settings(r, alpha, dropout, use_rslora, patterns[0], patterns[1], tuple(modules_to_save))


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_FACTOR = re.compile(r"(?P<path>.+)\.lora_(?P<which>[AB])\.weight")


def _match_tensors(
    model: PaliGemma, tensors: dict[str, torch.Tensor], settings: _Settings, where: Path
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, int, float]], dict[str, torch.Tensor]]:
    """Map every adapter tensor to a vlmo layer or parameter and check it, before the model is touched.

    Returns {layer name: (A float[r, I], B float[O, r], r, alpha)} and {vlmo parameter name: full tensor}.
    """
    keymap = KeyMap(model.cfg.text.arch)
    skip_head = model.cfg.vision.has_unused_head
    layers = set(adaptable_layers(model))
    found: dict[str, dict[str, tuple[str, torch.Tensor, str]]] = {}
    full: dict[str, tuple[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    unsupported: list[str] = []
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            unmatched.append(key)
            continue
        rest = key[len(PEFT_PREFIX) :]
        factor = _FACTOR.fullmatch(rest)
        if factor is None and "lora_" in rest:
            unsupported.append(key)  # lora_embedding_A, lora_magnitude_vector (DoRA), lora_B.bias, adapter names …
            continue
        path = factor["path"] if factor else rest
        name = keymap.from_hf(path + ".weight" if factor else path)
        if name is not None and name.startswith("vision.unused_head.") and skip_head:
            logger.debug("skipping %s: SigLIP's pooling head is not part of PaliGemma", key)
            continue  # an adapter on a module PaliGemma never runs changes nothing
        if factor is None:
            if name is None or name.startswith("vision.unused_head."):
                unmatched.append(key)
            else:
                full[name] = (key, tensor)
            continue
        layer = None if name is None else name.removesuffix(".weight")
        if layer is None or layer not in layers:
            unmatched.append(key)
            continue
        found.setdefault(layer, {})[factor["which"]] = (key, tensor, path)
    if unsupported:
        raise CheckpointError(
            f"{where} holds tensors of a LoRA kind vlmo does not run: {few_names(unsupported)}; only lora_A/lora_B "
            "weights of Linear layers (and full modules_to_save copies) are supported"
        )
    if unmatched:
        raise CheckpointError(
            f"{where} has {len(unmatched)} tensor(s) that match no layer of this model: {few_names(unmatched)}; "
            "is the adapter made for another base model?"
        )
    if not found:
        raise CheckpointError(f"{where} holds no lora_A/lora_B tensors")

    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    if model.text.lm_head is None:
        params["text.lm_head.weight"] = model.text.embed.weight  # transformers' tied lm_head.weight
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, int, float]] = {}
    for layer, pair in found.items():
        missing = {"A", "B"} - pair.keys()
        if missing:
            (key, _, _), which = next(iter(pair.values())), missing.pop()
            other = key.replace(f".lora_{'B' if which == 'A' else 'A'}.", f".lora_{which}.")
            raise CheckpointError(f"{where} has {key!r} but not {other!r}: the file is incomplete; save it again")
        (key_a, a, path), (key_b, b, _) = pair["A"], pair["B"]
        r, alpha = settings.rank_alpha(path)
        base = model.get_submodule(layer)
        for key, got, want in ((key_a, a, (r, base.in_features)), (key_b, b, (base.out_features, r))):
            if tuple(got.shape) != want:
                raise CheckpointError(
                    f"{where}: tensor {key!r} has shape {tuple(got.shape)} but the model and adapter_config.json "
                    f"(r={r}) imply {want}; is the adapter made for this base model?"
                )
        factors[layer] = (a, b, r, alpha)
    for name, (key, tensor) in full.items():
        if name not in params:
            raise CheckpointError(f"{where}: tensor {key!r} matches no parameter of this model")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)} but the model's is "
                f"{tuple(params[name].shape)}; is the adapter made for this base model?"
            )
    return factors, {name: tensor for name, (_, tensor) in full.items()}


@torch.no_grad()
def _assign_full(model: PaliGemma, full: dict[str, torch.Tensor]) -> None:
    """Copy `modules_to_save` tensors into the model. The embedding and the head follow transformers' rule: they stay
    tied only if both come with equal values; otherwise the head gets its own matrix (model-notes §1.3)."""
    embed, head = full.pop("text.embed.weight", None), full.pop("text.lm_head.weight", None)
    if embed is not None or head is not None:
        text = model.text
        if text.lm_head is None and embed is not None and head is not None and torch.equal(embed, head):
            text.embed.weight.copy_(embed)
        else:
            untie_head(model)
            assert text.lm_head is not None
            if embed is not None:
                text.embed.weight.copy_(embed)
            if head is not None:
                text.lm_head.get_parameter("weight").copy_(head)
    params = dict(model.named_parameters())
    for name, tensor in full.items():
        params[name].copy_(tensor)
