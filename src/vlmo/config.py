"""Typed model configuration, and the one place that knows Hugging Face's `config.json` field names.

`PaliGemmaConfig.from_hf(d)` reads a `config.json` of `model_type: paligemma` as transformers 4 wrote it (hub
checkpoints: `rope_theta`, `torch_dtype`, `hidden_activation`) and as transformers 5 writes it (`rope_parameters`,
`dtype`, explicit `layer_types`), filling absent fields the way transformers 5.24 fills them (model-notes §1.2).
Unknown keys are ignored here and nowhere else. Defaults are those of the *sub-config classes* (`SiglipVisionConfig`,
`GemmaConfig`, `Gemma2Config`) when a sub-config is given, because that is what transformers does; the
PaliGemma-3B shapes apply only when a sub-config is missing entirely.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from vlmo.errors import ConfigError

TextArch = Literal["gemma", "gemma2"]
LayerType = Literal["full_attention", "sliding_attention"]

# Activation names that mean GELU with the tanh approximation (transformers' ACT2FN); "gelu" is exact GELU except in
# Gemma 1, whose config loader rewrites the legacy "gelu" to the tanh form (model-notes §1.2).
_TANH_GELU = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}

# The decoder's shape in `text_config`: key → (TextConfig field, GemmaConfig default, Gemma2Config default).
_TEXT_SHAPE = {
    "vocab_size": ("vocab_size", 256000, 256000),
    "hidden_size": ("hidden_size", 3072, 2304),
    "intermediate_size": ("intermediate_size", 24576, 9216),
    "num_hidden_layers": ("num_layers", 28, 26),
    "num_attention_heads": ("num_heads", 16, 8),
    "num_key_value_heads": ("num_kv_heads", 16, 4),
}


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower. PaliGemma uses So400m/14: width 1152, 27 layers, 16 heads, MLP 4304."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    gelu_approximate: Literal["tanh", "none"] = "tanh"
    # SigLIP's attention-pooling head. PaliGemma never uses it (it reads every patch token); a checkpoint made with
    # `vision_use_head: true` carries its weights, which the loader then skips.
    has_unused_head: bool = False

    @property
    def grid(self) -> int:
        """Patches per side, e.g. 224 px / 14 = 16 (image_size is a multiple of patch_size: __post_init__)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) is not divisible by "
                f"vision_config.num_attention_heads ({self.num_heads})"
            )
        if self.grid < 1:
            raise ConfigError(
                f"vision_config.image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision_config.image_size ({self.image_size}) is not a multiple of vision_config.patch_size "
                f"({self.patch_size}): the image would not split into whole patches"
            )


@dataclass(frozen=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder. Defaults: Gemma 2B as used by PaliGemma-3B."""

    arch: TextArch = "gemma"
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    # Gemma 2 only (None/empty for Gemma 1).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] = ()

    @property
    def attn_scale(self) -> float:
        """Query scale: head_dim^-0.5 for Gemma; query_pre_attn_scalar^-0.5 for Gemma 2 (144 for 27B, hd 128)."""
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    @property
    def embed_scale(self) -> float:
        """√D, the factor on *text* embeddings only (model-notes §4.2)."""
        return math.sqrt(self.hidden_size)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"text_config.num_attention_heads ({self.num_heads}) must be a multiple of "
                f"text_config.num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"text_config.layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )


@dataclass(frozen=True)
class ProjectorConfig:
    """Maps vision features (width `in_features`) to the text width. `kind` selects the module in `nn/projector.py`.

    `linear` is PaliGemma's own projector. `sti`, `sci`, `dci` are the Dense Connector instantiations (arXiv
    2405.13800) and `seed` the seed project's variant, each built as the pretrained linear plus a zero-initialised
    branch over intermediate vision layers (definitions and adaptations: `nn/projector.py`). Layer numbers are indices
    into the tower's hidden states as transformers numbers them: 0 is the patch embeddings, i the output of block i.
    Only the fields a kind uses are validated, so a `linear` config never fails on the Dense Connector fields.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("linear", "sti", "sci", "dci", "seed")

    kind: Literal["linear", "sti", "sci", "dci", "seed"] = "linear"
    in_features: int = 1152
    out_features: int = 2048
    vision_layers: int = 27
    """Depth of the vision tower the projector reads (it receives vision_layers + 1 hidden states). Must equal
    `VisionConfig.num_layers` for the Dense Connector kinds; 27 for SigLIP So400m."""
    layers: tuple[int, ...] | None = None
    """sti, sci, seed: the intermediate hidden states used, strictly increasing, each in 0..vision_layers - 1.
    None means the kind's default for this depth (`intermediate_layers`): sti/sci scale the paper's choice for
    24-layer CLIP-L (hidden states 7 and 15) to (8, 17) at 27 layers; seed takes 1/3 and 2/3 depth, (9, 18)."""
    pool_stride: int = 8
    """sti: tokens per average-pooling window over the row-major patch sequence (the paper's α = 8)."""
    groups: int | None = None
    """dci: hidden states 0..vision_layers - 2 are split into this many contiguous groups of adjacent layers, each
    averaged. None: the paper's 2 (at 27 layers: 0-12 and 13-25, its own SigLIP grouping), 1 for a 2-layer tower."""
    mlp_width: int | None = None
    """sti, sci, dci: hidden width of the branch MLP (Linear, GELU, Linear). None: `out_features`, as in the paper's
    two-layer MLP, whose hidden width is the LLM width."""

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the projector needs the tower's hidden states (every kind but `linear`)."""
        return self.kind != "linear"

    @property
    def intermediate_layers(self) -> tuple[int, ...]:
        """sti, sci, seed: `layers`, or the kind's default scaled to `vision_layers` (rounded half up)."""
        if self.layers is not None:
            return self.layers
        # seed: 1/3 and 2/3 depth; sti/sci: the paper's code reads CLIP-L/24 hidden_states[7] and [15].
        fractions = (1 / 3, 2 / 3) if self.kind == "seed" else (7 / 24, 15 / 24)
        # A shallow (test-sized) tower can round two fractions to one layer: keep each layer once.
        return tuple(sorted({math.floor(f * self.vision_layers + 0.5) for f in fractions}))

    @property
    def group_ranges(self) -> tuple[tuple[int, int], ...]:
        """dci: half-open [start, stop) hidden-state ranges, earlier groups one larger when the split is uneven.

        The paper's SigLIP tower drops So400m's last block, takes hidden state 26 as its final features and averages
        every state before it (0-12, 13-25). We average those same states: all but the last two, which are the
        paper's final layer (L - 1) and ours (L, normed into the final features)."""
        n = self.vision_layers - 1
        g = self.groups if self.groups is not None else min(2, n)  # the paper's 2, unless the tower is too shallow
        sizes = [n // g + (1 if i < n % g else 0) for i in range(g)]
        starts = [sum(sizes[:i]) for i in range(g)]
        return tuple((s, s + size) for s, size in zip(starts, sizes, strict=True))

    @property
    def branch_width(self) -> int:
        """Hidden width of the branch MLP (sti, sci, dci)."""
        return self.out_features if self.mlp_width is None else self.mlp_width

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ConfigError(f"unknown projector kind {self.kind!r}; choose one of {', '.join(self.KINDS)}")
        if isinstance(self.layers, list):  # a config read back from JSON
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind == "linear":
            return
        depth = self.vision_layers
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ConfigError(
                f"projector kind {self.kind!r} needs a vision tower of at least 2 layers; vision_layers is {depth!r}"
            )
        if self.kind in ("sti", "sci", "seed"):
            layers = self.intermediate_layers
            ok = (
                isinstance(layers, tuple)
                and len(layers) > 0
                and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
                and all(0 <= i < depth for i in layers)
                and all(a < b for a, b in zip(layers, layers[1:], strict=False))
            )
            if not ok:
                raise ConfigError(
                    f"projector layers {layers!r} must be strictly increasing hidden-state indices in 0..{depth - 1} "
                    f"(0 = embeddings, i = block i of the {depth}-layer vision tower; block {depth} gives the final "
                    "features); set ProjectorConfig.layers"
                )
        if self.kind == "sti" and (not isinstance(self.pool_stride, int) or self.pool_stride < 1):
            raise ConfigError(f"projector pool_stride must be a positive number of tokens, not {self.pool_stride!r}")
        if (
            self.kind == "dci"
            and self.groups is not None
            and (not isinstance(self.groups, int) or not 1 <= self.groups <= depth - 1)
        ):
            raise ConfigError(
                f"projector groups must be in 1..{depth - 1} (hidden states 0..{depth - 2} of the {depth}-layer "
                f"vision tower are split into groups), not {self.groups!r}"
            )
        if self.kind != "seed" and self.mlp_width is not None and self.mlp_width < 1:
            raise ConfigError(f"projector mlp_width must be positive (or None for out_features), not {self.mlp_width}")


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int = 257152
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def __post_init__(self) -> None:
        if self.projector.in_features != self.vision.hidden_size:
            raise ConfigError(
                f"projector input width {self.projector.in_features} != vision hidden_size {self.vision.hidden_size}"
            )
        if self.projector.uses_hidden_states and self.projector.vision_layers != self.vision.num_layers:
            raise ConfigError(
                f"projector kind {self.projector.kind!r} reads a {self.projector.vision_layers}-layer tower but the "
                f"vision tower has {self.vision.num_layers} layers; set vlmo_projector.vision_layers to match"
            )
        if self.projector.out_features != self.text.hidden_size:
            raise ConfigError(
                f"projection_dim ({self.projector.out_features}) must equal text_config.hidden_size "
                f"({self.text.hidden_size}): image features enter the decoder unchanged"
            )

    def with_overrides(self, **changes: Any) -> PaliGemmaConfig:
        return replace(self, **changes)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> PaliGemmaConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 layout). See the module docstring."""
        model_type = d.get("model_type")
        if model_type != "paligemma":
            raise ConfigError(
                f"config.json field 'model_type' is {model_type!r}; vlmo runs only 'paligemma' checkpoints"
            )
        rd = _Fields(d, "")
        vision = _vision_from_hf(d.get("vision_config"))
        # transformers ties the head by the *top-level* flag (PreTrainedModel reads the PaliGemma config).
        text = replace(_text_from_hf(d.get("text_config")), tie_word_embeddings=rd.bool("tie_word_embeddings", True))
        projection_dim = rd.int("projection_dim", 2048, positive=True)
        eos = d.get("eos_token_id", (d.get("text_config") or {}).get("eos_token_id", 1))
        eos_list = eos if isinstance(eos, list | tuple) else [eos]
        eos_ids = tuple(_Fields({"eos_token_id": e}, "").int("eos_token_id", 1) for e in eos_list)
        image_token = d.get("image_token_index", d.get("image_token_id", 256000))
        return cls(
            vision=vision,
            text=text,
            projector=_projector_from_hf(d.get("vlmo_projector"), vision, projection_dim),
            image_token_id=_Fields({"image_token_index": image_token}, "").int("image_token_index", 256000),
            bos_token_id=rd.int("bos_token_id", 2),
            eos_token_ids=eos_ids,
            pad_token_id=rd.int("pad_token_id", 0),
        )


def _projector_from_hf(p: dict[str, Any] | None, vision: VisionConfig, projection_dim: int) -> ProjectorConfig:
    """PaliGemma's linear projector, unless vlmo saved a Dense Connector kind under the `vlmo_projector` key."""
    if p is None:
        return ProjectorConfig("linear", vision.hidden_size, projection_dim, vision_layers=vision.num_layers)
    if not isinstance(p, dict):
        raise ConfigError("config.json field 'vlmo_projector' must be an object")
    known = {"kind", "layers", "pool_stride", "groups", "mlp_width", "vision_layers"}
    unknown = sorted(set(p) - known - {"in_features", "out_features"})
    if unknown:
        raise ConfigError(f"config.json field 'vlmo_projector' has unknown key(s) {', '.join(unknown)}")
    fields = {k: v for k, v in p.items() if k in known}
    fields.setdefault("vision_layers", vision.num_layers)
    return ProjectorConfig(in_features=vision.hidden_size, out_features=projection_dim, **fields)


def projector_to_hf(p: ProjectorConfig) -> dict[str, Any] | None:
    """The `vlmo_projector` entry of config.json for a non-linear projector (None for PaliGemma's own)."""
    if p.kind == "linear":
        return None
    out = {k: getattr(p, k) for k in ("kind", "layers", "pool_stride", "groups", "mlp_width", "vision_layers")}
    out["layers"] = list(p.intermediate_layers) if p.kind in ("sti", "sci", "seed") else None
    return out


def _vision_from_hf(v: dict[str, Any] | None) -> VisionConfig:
    if v is None:  # PaliGemmaConfig's own defaults for a missing sub-config (note: intermediate 4096, not 4304)
        return VisionConfig(intermediate_size=4096)
    rv = _Fields(v, "vision_config.")
    mt = v.get("model_type", "siglip_vision_model")
    if mt != "siglip_vision_model":
        raise ConfigError(f"config.json field 'vision_config.model_type' is {mt!r}; expected 'siglip_vision_model'")
    # SiglipVisionConfig class defaults (ViT-B/16) apply to any field the file leaves out.
    return VisionConfig(
        hidden_size=rv.int("hidden_size", 768, positive=True),
        intermediate_size=rv.int("intermediate_size", 3072, positive=True),
        num_layers=rv.int("num_hidden_layers", 12, positive=True),
        num_heads=rv.int("num_attention_heads", 12, positive=True),
        num_channels=rv.int("num_channels", 3, positive=True),
        image_size=rv.int("image_size", 224, positive=True),
        patch_size=rv.int("patch_size", 16, positive=True),
        layer_norm_eps=rv.float("layer_norm_eps", 1e-6),
        gelu_approximate=_gelu_kind(v.get("hidden_act", "gelu_pytorch_tanh"), "vision_config.hidden_act"),
        has_unused_head=rv.bool("vision_use_head", True),  # SiglipVisionConfig's default is True
    )


def _text_from_hf(t: dict[str, Any] | None) -> TextConfig:
    if t is None:  # PaliGemmaConfig's own defaults: Gemma 2B, vocab 257152
        return TextConfig(vocab_size=257152)
    rt = _Fields(t, "text_config.")
    mt = t.get("model_type", "gemma")
    if mt not in ("gemma", "gemma2"):
        raise ConfigError(f"config.json field 'text_config.model_type' is {mt!r}; expected 'gemma' or 'gemma2'")
    if t.get("attention_bias"):
        raise ConfigError("config.json field 'text_config.attention_bias' is true; Gemma has no attention biases")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json field 'text_config.rope_parameters.rope_type' is {rope_type!r}; only 'default'")
    rope_theta = _Fields(rope, "text_config.rope_parameters.").float(
        "rope_theta", rt.float("rope_theta", 10000.0, positive=True), positive=True
    )
    common: dict[str, Any] = dict(
        arch=mt,
        rms_norm_eps=rt.float("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=rt.int("max_position_embeddings", 8192, positive=True),
        head_dim=rt.int("head_dim", 256, positive=True),
    )
    if mt == "gemma":
        act = t.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu":  # Gemma's legacy "gelu" means the tanh approximation (transformers rewrites it)
            _require_tanh(act, "text_config.hidden_act")
    else:
        _require_tanh(t.get("hidden_activation", "gelu_pytorch_tanh"), "text_config.hidden_activation")
    for key, (name, gemma_default, gemma2_default) in _TEXT_SHAPE.items():
        common[name] = rt.int(key, gemma_default if mt == "gemma" else gemma2_default, positive=True)
    if mt == "gemma":
        return TextConfig(**common)
    num_layers = common["num_layers"]
    layer_types = t.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
    for lt in layer_types:
        if lt not in ("full_attention", "sliding_attention"):
            raise ConfigError(f"config.json field 'text_config.layer_types' has unknown entry {lt!r}")
    return TextConfig(
        query_pre_attn_scalar=rt.float("query_pre_attn_scalar", 256, positive=True),
        attn_logit_softcapping=rt.opt_float("attn_logit_softcapping", 50.0),
        final_logit_softcapping=rt.opt_float("final_logit_softcapping", 30.0),
        sliding_window=rt.opt_int("sliding_window", 4096, positive=True),
        layer_types=tuple(layer_types),
        **common,
    )


def _gelu_kind(act: str, name: str) -> Literal["tanh", "none"]:
    if act in _TANH_GELU:
        return "tanh"
    if act == "gelu":
        return "none"
    raise ConfigError(f"config.json field {name!r} is {act!r}; vlmo supports GELU (exact or tanh) only")


def _require_tanh(act: str, name: str) -> None:
    if act not in _TANH_GELU:
        raise ConfigError(f"config.json field {name!r} is {act!r}; Gemma uses 'gelu_pytorch_tanh'")


class _Fields:
    """Reads typed fields of one config dict; `null` means "use the default", anything else wrong is an error."""

    def __init__(self, d: dict[str, Any], where: str) -> None:
        self.d, self.where = d, where

    def _get(self, key: str, default: Any, kind: type, optional: bool = False, positive: bool = False) -> Any:
        value = self.d.get(key)
        if value is None:
            return None if optional and key in self.d else default
        number = self._typed(key, value, kind)
        if positive and not number > 0:
            raise ConfigError(
                f"config.json field '{self.where}{key}' is {value!r}; expected a positive {kind.__name__}"
            )
        return number

    def _typed(self, key: str, value: Any, kind: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            value = "bool"
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError
                return value
            number = kind(value)
            if kind is int and number != value:
                raise ValueError
            return number
        except (TypeError, ValueError):
            raise ConfigError(
                f"config.json field '{self.where}{key}' is {self.d.get(key)!r}; expected a {kind.__name__}"
            ) from None

    # `positive=True` for sizes, counts and scales: the one place a zero or negative one is refused, so it never
    # reaches a division, a tensor shape or torch (whose warnings would come before the error).
    def int(self, key: str, default: int, positive: bool = False) -> int:
        return self._get(key, default, int, positive=positive)

    def float(self, key: str, default: float, positive: bool = False) -> float:
        return self._get(key, default, float, positive=positive)

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool)

    # `builtins.` because the methods above shadow the builtin names inside this class body.
    def opt_int(self, key: str, default: builtins.int | None, positive: builtins.bool = False) -> builtins.int | None:
        return self._get(key, default, int, optional=True, positive=positive)

    def opt_float(
        self, key: str, default: builtins.float | None, positive: builtins.bool = False
    ) -> builtins.float | None:
        return self._get(key, default, float, optional=True, positive=positive)
