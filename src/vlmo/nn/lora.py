"""LoRA: low-rank adapters on PaliGemma's Linear layers, for fine-tuning and for running PEFT adapters.

Axes: B batch, T tokens, I in_features, O out_features, r rank.

A wrapped layer computes  y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ  with A: [r, I], B: [O, r], and s = alpha / r
(alpha / √r with rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").
Initialisation follows PEFT and the LoRA paper: A kaiming-uniform (a = √5, nn.Linear's own init), B zero, so a
freshly wrapped model computes exactly what the base model does.

Naming. `LoRAConfig.targets` are module *leaf names*, matched like PEFT's `target_modules` list, against vlmo's leaf
name *or* the Hugging Face one. They differ in one place: the vision attention output is `o_proj` here and `out_proj`
in transformers, so `"out_proj"` (a PEFT config) selects the vision `o_proj` only, while `"o_proj"` selects the text
`o_proj` and, with `include_vision`, the vision one too. The text decoder is always searched, the vision tower only
with `include_vision`, and the projector (`linear`) when a target names it.

Parameter names. `LoRALinear` holds the base layer's own `weight`/`bias` Parameters (the same objects), not a
`base_layer` submodule, so every base parameter keeps its name (`text.layers.0.attn.q_proj.weight`) and the adapter
adds only `….lora_A.weight` / `….lora_B.weight`. A base `state_dict` therefore loads into a wrapped model, and the
wrapped model's `state_dict` minus the `lora_` keys is the base model's in the checkpoint's naming (merged or not,
as `merged` says). `remove_lora` puts plain `nn.Linear` modules back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmo.errors import InputError
from vlmo.nn.paligemma import PaliGemma
from vlmo.weights.keys import KeyMap

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# KeyMap writes the legacy hub layout; PEFT names adapter tensors after transformers 5's module tree, whose tower
# prefixes differ (spec §1.3). Only the prefixes change: names inside a tower come from KeyMap.
_LEGACY_TO_V5 = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
_TOWERS = ("text.layers.", "vision.layers.", "projector.")
_EMBED = "model.language_model.embed_tokens.weight"


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get an adapter, and its rank, scale and dropout.

    r: rank (≥ 1). alpha: scale numerator, s = alpha / r (or alpha / √r with `use_rslora`). dropout: on the adapter's
    input only, in training mode. targets: leaf names (see the module docstring). include_vision: also adapt the vision
    tower. modules_to_save: modules trained (and saved) in full next to the adapters, named as in PEFT's
    `modules_to_save` after transformers' module tree (e.g. "multi_modal_projector", "lm_head", "embed_tokens").
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    include_vision: bool = False
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("targets", "modules_to_save"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(t, str) and t for t in value):
                raise InputError(
                    f"LoRAConfig.{field} must be a tuple of module names such as ('q_proj', 'v_proj'), got {value!r}"
                )
            object.__setattr__(self, field, tuple(value))
        if not self.targets:
            raise InputError("LoRAConfig.targets is empty; name at least one layer, e.g. ('q_proj', 'v_proj')")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRAConfig.r must be an integer ≥ 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise InputError(f"LoRAConfig.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise InputError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / √r with rsLoRA (PEFT's `use_rslora`)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a low-rank update: x: dt[..., I] → dt[..., O].

    `weight` (dt[O, I]) and `bias` (dt[O] or None) are the wrapped layer's own Parameters. The factors `lora_A.weight`
    (float[r, I]) and `lora_B.weight` (float[O, r]) are kept in float32 when the base is fp16/bf16 (PEFT's default
    "autocast_adapter_dtype"), otherwise in the base dtype; the update is computed in the input's dtype. While
    `merged`, the update lives inside `weight` and the forward is the plain layer's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        half = base.weight.dtype in (torch.float16, torch.bfloat16)
        factory = {"device": base.weight.device, "dtype": torch.float32 if half else base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a = √5), B = 0: the update starts at exactly zero (LoRA paper §4.1; PEFT's default)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s · B A as float32[O, I] (fp32 even for half-precision factors: CPUs multiply bf16 slowly and inexactly)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (in place; a no-op when already merged)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of `weight` (exact up to rounding in the weight's dtype)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain `nn.Linear` on the same Parameters: with the update folded in (`merge`) or without it."""
        if merge:
            self.merge()
        else:
            self.unmerge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}"
        )


# -- checkpoint names ----------------------------------------------------------------------------------------------


def hf_parameter_names(model: PaliGemma) -> dict[str, str]:
    """Every base parameter's vlmo name → its name in transformers 5's PaliGemmaForConditionalGeneration
    (`text.layers.0.attn.q_proj.weight` → `model.language_model.layers.0.self_attn.q_proj.weight`). LoRA factors are
    left out. A tied output head has no parameter of its own, so no `lm_head.weight` entry."""
    keymap = KeyMap(model.cfg.text.arch)
    out = {}
    for name, _ in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        legacy = keymap.to_hf(name)
        for old, new in _LEGACY_TO_V5:
            if legacy.startswith(old):
                legacy = new + legacy[len(old) :]
                break
        out[name] = legacy
    return out


def adaptable_layers(model: PaliGemma) -> dict[str, str]:
    """vlmo module name → transformers 5 module path for every Linear that LoRA may wrap (decoder and vision blocks,
    the projector), wrapped or not."""
    hf = hf_parameter_names(model)
    out = {}
    for name, module in model.named_modules():
        factor = name.endswith((".lora_A", ".lora_B"))
        if isinstance(module, nn.Linear | LoRALinear) and name.startswith(_TOWERS) and not factor:
            out[name] = hf[name + ".weight"].removesuffix(".weight")
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped layers by vlmo module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


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


# -- applying, merging, removing -----------------------------------------------------------------------------------


def select_targets(model: PaliGemma, cfg: LoRAConfig) -> list[str]:
    """The vlmo names of the Linear layers `cfg` selects. Every target must select something (a typo, or a vision
    name without `include_vision`, is an `InputError` that names it)."""
    chosen: list[str] = []
    used: set[str] = set()
    for name, path in adaptable_layers(model).items():
        if name.startswith("vision.") and not cfg.include_vision:
            continue
        leaves = {name.rsplit(".", 1)[-1], path.rsplit(".", 1)[-1]}
        hits = leaves.intersection(cfg.targets)
        if hits:
            chosen.append(name)
            used |= hits
    unused = [t for t in cfg.targets if t not in used]
    if unused:
        vision_only = [t for t in unused if t in ("out_proj", "fc1", "fc2")]
        hint = " (vision-tower names: set include_vision=True)" if vision_only and not cfg.include_vision else ""
        raise InputError(
            f"LoRA targets {unused} match no layer{hint}; text layers are q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj; vision layers q_proj, k_proj, v_proj, o_proj (out_proj), fc1, fc2; projector linear"
        )
    return chosen


def apply_lora(model: PaliGemma, cfg: LoRAConfig) -> list[str]:
    """Wrap the layers `cfg` selects in `LoRALinear` (in place) and return their vlmo names.

    The whole model is frozen first; afterwards only the LoRA factors (and the parameters of `cfg.modules_to_save`)
    require grad, so `lora_parameters(model)` is what an optimizer needs. The base weights are unchanged, and the
    output is bit-identical to the base model's until B is trained away from zero. Nested wrapping is refused.
    """
    if lora_modules(model):
        raise InputError("the model already has LoRA layers; call remove_lora(model) before applying a new adapter")
    names = select_targets(model, cfg)
    saved = mark_modules_to_save(model, cfg.modules_to_save) if cfg.modules_to_save else []
    both = [n for n in names if n + ".weight" in saved]
    if both:
        raise InputError(f"{both[0]} is both a LoRA target and in modules_to_save; choose one (PEFT refuses it too)")
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        setattr(model.get_submodule(parent), leaf, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora))
    for p in lora_parameters(model):
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    for name in saved:
        params[name].requires_grad_(True)
    return names


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


def untie_head(model: PaliGemma) -> None:
    """Give the output head its own copy of the embedding matrix (no-op when it already has its own)."""
    text = model.text
    if text.lm_head is not None:
        return
    weight = text.embed.weight
    head = nn.Linear(text.cfg.hidden_size, text.cfg.vocab_size, bias=False, device="meta")
    head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    text.lm_head = head


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors (every `lora_A.weight` and `lora_B.weight`), in model order: what to hand an optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (faster inference; `unmerge_lora` undoes it)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter back out of its base weight."""
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every `LoRALinear` with a plain `nn.Linear`: with the update folded in (`merge`) or the original
    weights back (`merge=False`). Returns the names of the layers that were restored."""
    names = []
    for name, m in lora_modules(model).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m.to_linear(merge))
        names.append(name)
    return names


__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "adaptable_layers",
    "apply_lora",
    "hf_parameter_names",
    "lora_modules",
    "lora_parameters",
    "lora_scaling",
    "mark_modules_to_save",
    "merge_lora",
    "remove_lora",
    "saved_module_parameters",
    "select_targets",
    "unmerge_lora",
    "untie_head",
]
