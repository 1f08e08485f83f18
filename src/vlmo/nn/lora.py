"""LoRA: low-rank adapters on PaliGemma's Linear layers, for fine-tuning and for running PEFT adapters.

Axes: B batch, T tokens, I in_features, O out_features, r rank.

A wrapped layer computes  y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ  with A: [r, I], B: [O, r], and s = alpha / r
(alpha / √r with rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").
Initialisation follows PEFT and the LoRA paper: A kaiming-uniform (a = √5, nn.Linear's own init), B zero, so a
freshly wrapped model computes exactly what the base model does.

Naming. This module knows vlmo's own module names only. `LoRAConfig.targets` are module *leaf names*, matched like
PEFT's `target_modules` list against the leaf name of every Linear LoRA may wrap (`adaptable_layers`): `"o_proj"`
selects the text `o_proj` and, with `include_vision`, the vision one too. A caller may give layers a second leaf name
to answer to (`select_targets`' `aliases`). The text decoder is always searched, the vision tower only with
`include_vision`, and the projector (`linear`) when a target names it. `LoRAConfig.modules_to_save` belongs to the
adapter format and is not read here: `apply_lora` takes the parameters to train in full as vlmo names (`train`).
Checkpoint and PEFT names (transformers' `out_proj`, `multi_modal_projector`, …) live in `weights/adapters.py`,
whose `apply_lora` reads a `LoRAConfig` in PEFT's naming and resolves it to vlmo names for this module.

Parameter names. `LoRALinear` holds the base layer's own `weight`/`bias` Parameters (the same objects), not a
`base_layer` submodule, so every base parameter keeps its name (`text.layers.0.attn.q_proj.weight`) and the adapter
adds only `….lora_A.weight` / `….lora_B.weight`. A base `state_dict` therefore loads into a wrapped model, and the
wrapped model's `state_dict` minus the `lora_` keys is the base model's in the checkpoint's naming (merged or not,
as `merged` says). `remove_lora` puts plain `nn.Linear` modules back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmo.errors import InputError, check_count, check_number
from vlmo.nn.paligemma import PaliGemma

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Where the Linears LoRA may wrap live: the decoder and vision blocks, and the projector.
_TOWERS = ("text.layers.", "vision.layers.", "projector.")


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get an adapter, and its rank, scale and dropout.

    r: rank (≥ 1). alpha: scale numerator, s = alpha / r (or alpha / √r with `use_rslora`). dropout: on the adapter's
    input only, in training mode. targets: leaf names (see the module docstring). include_vision: also adapt the vision
    tower. modules_to_save: modules trained (and saved) in full next to the adapters, in PEFT's naming (e.g.
    "multi_modal_projector", "lm_head", "embed_tokens"); weights/adapters.py resolves them, this module does not.
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
        check_count(self.r, "r")
        check_number(self.alpha, "alpha", above=0)
        check_number(self.dropout, "dropout", minimum=0, below=1)

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


# -- finding layers ------------------------------------------------------------------------------------------------


def adaptable_layers(model: nn.Module) -> list[str]:
    """The vlmo module names of every Linear that LoRA may wrap (decoder and vision blocks, the projector), wrapped
    or not, in model order."""
    out = []
    for name, module in model.named_modules():
        factor = name.endswith((".lora_A", ".lora_B"))
        if isinstance(module, nn.Linear | LoRALinear) and name.startswith(_TOWERS) and not factor:
            out.append(name)
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped layers by vlmo module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def select_targets(model: nn.Module, cfg: LoRAConfig, aliases: Mapping[str, str] | None = None) -> list[str]:
    """The vlmo names of the Linear layers `cfg` selects: those whose leaf name (`q_proj`, `fc1`, `linear`) is one of
    `cfg.targets`, or whose second leaf name in `aliases` (vlmo module name → leaf name, e.g. another naming's) is.
    Every target must select something (a typo, or a vision name without `include_vision`, is an `InputError` that
    names it)."""
    aliases = aliases or {}
    chosen: list[str] = []
    used: set[str] = set()
    vision: set[str] = set()
    for name in adaptable_layers(model):
        leaves = {name.rsplit(".", 1)[-1]} | ({aliases[name]} if name in aliases else set())
        if name.startswith("vision."):
            vision |= leaves
            if not cfg.include_vision:
                continue
        hits = leaves.intersection(cfg.targets)
        if hits:
            chosen.append(name)
            used |= hits
    unused = [t for t in cfg.targets if t not in used]
    if unused:
        hidden = vision.intersection(unused) and not cfg.include_vision
        hint = " (vision-tower names: set include_vision=True)" if hidden else ""
        raise InputError(f"LoRA targets {unused} match no layer{hint}; {_layer_names(model, aliases)}")
    return chosen


def _layer_names(model: nn.Module, aliases: Mapping[str, str]) -> str:
    """'text layers are q_proj, …; vision layers …, o_proj (out_proj), …; projector linear', for error messages."""
    towers: dict[str, dict[str, None]] = {"text": {}, "vision": {}, "projector": {}}
    for name in adaptable_layers(model):
        leaf = name.rsplit(".", 1)[-1]
        alias = aliases.get(name, leaf)
        towers[name.split(".", 1)[0]][leaf if alias == leaf else f"{leaf} ({alias})"] = None
    text, vision, projector = (", ".join(leaves) for leaves in towers.values())
    return f"text layers are {text}; vision layers {vision}; projector {projector}"


# -- applying, merging, removing -----------------------------------------------------------------------------------


def apply_lora(
    model: PaliGemma, cfg: LoRAConfig, layers: Iterable[str] | None = None, train: Iterable[str] | None = None
) -> list[str]:
    """Wrap the layers `cfg` selects in `LoRALinear` (in place) and return their vlmo names.

    layers: the vlmo module names to wrap instead of `select_targets(model, cfg)` (a selection made in another
    naming). train: vlmo parameter names trained in full next to the adapters; a config with `modules_to_save` needs
    them resolved (weights/adapters.py's `apply_lora` does that from PEFT's names).

    The whole model is frozen first; afterwards only the LoRA factors (and the `train` parameters) require grad, so
    `lora_parameters(model)` is what an optimizer needs. The base weights are unchanged, and the output is
    bit-identical to the base model's until B is trained away from zero. Nested wrapping is refused.
    """
    if lora_modules(model):
        raise InputError("the model already has LoRA layers; call remove_lora(model) before applying a new adapter")
    if train is None and cfg.modules_to_save:
        raise InputError(
            f"modules_to_save {list(cfg.modules_to_save)} are PEFT module names, which vlmo.nn.lora does not resolve: "
            "apply the config with weights.adapters.apply_lora, or pass the vlmo parameter names as train="
        )
    names = select_targets(model, cfg) if layers is None else list(layers)
    saved = sorted(set(train or ()))
    adaptable = set(adaptable_layers(model))
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in adaptable] + [n for n in saved if n not in params]
    if unknown:
        raise InputError(f"{unknown[0]} is not a Linear LoRA may wrap nor a parameter of the model")
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
    factors = ("lora_A.weight", "lora_B.weight")
    return [m.get_parameter(name) for m in lora_modules(model).values() for name in factors]


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
    "lora_modules",
    "lora_parameters",
    "lora_scaling",
    "merge_lora",
    "remove_lora",
    "select_targets",
    "unmerge_lora",
    "untie_head",
]
