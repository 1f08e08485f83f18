"""The checkpoint key table: Hugging Face tensor names ↔ vlmo module names.

Three layouts exist for the same tensors (model-notes §1.3):
- legacy (hub files, transformers 4): `vision_tower.vision_model.…`, `language_model.model.…`
- what transformers 5 `save_pretrained` writes: `vision_tower.…` (no `vision_model.`), `language_model.model.…`
- transformers 5 in-memory `state_dict()`: `model.vision_tower.…`, `model.language_model.…`, `lm_head.weight`
A key is mapped in two steps: its tower prefix (any layout), then its name inside the tower (`_RULES`).
`to_hf` writes the legacy layout, which every transformers version loads; `to_v5` the in-memory one (the names PEFT
gives adapter tensors and `modules_to_save`).
"""

from __future__ import annotations

import re

from vlmo.config import TextArch

# (checkpoint prefix, vlmo prefix), longest first so `vision_tower.vision_model.` wins over `vision_tower.`.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("language_model.lm_head.", "text.lm_head."),
    ("lm_head.", "text.lm_head."),
)

# Inside each tower: (HF name, vlmo name) with `{i}` for a layer index and `{p}` for weight/bias.
_VISION = (
    ("embeddings.patch_embedding.{p}", "patch_embed.{p}"),
    ("embeddings.position_embedding.weight", "pos_embed.weight"),
    ("encoder.layers.{i}.layer_norm1.{p}", "layers.{i}.norm1.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "layers.{i}.norm2.{p}"),
    ("encoder.layers.{i}.self_attn.q_proj.{p}", "layers.{i}.attn.q_proj.{p}"),
    ("encoder.layers.{i}.self_attn.k_proj.{p}", "layers.{i}.attn.k_proj.{p}"),
    ("encoder.layers.{i}.self_attn.v_proj.{p}", "layers.{i}.attn.v_proj.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "layers.{i}.attn.o_proj.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}"),
    ("post_layernorm.{p}", "norm.{p}"),
    ("head.{rest}", "unused_head.{rest}"),  # SigLIP's pooling head: PaliGemma does not use it (see loader)
)
_PROJECTOR = (
    ("linear.{p}", "linear.{p}"),
    # Dense Connector branches (vlmo's own projector kinds, see nn/projector.py); PaliGemma checkpoints lack them.
    ("norms.{i}.{p}", "norms.{i}.{p}"),
    ("mlp.fc1.{p}", "mlp.fc1.{p}"),
    ("mlp.fc2.{p}", "mlp.fc2.{p}"),
    ("proj.{p}", "proj.{p}"),
)
_TEXT_COMMON = (
    ("embed_tokens.weight", "embed.weight"),
    ("norm.weight", "norm.weight"),
    ("layers.{i}.self_attn.{proj}.weight", "layers.{i}.attn.{proj}.weight"),
    ("layers.{i}.mlp.{mlp}.weight", "layers.{i}.mlp.{mlp}.weight"),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
)
# Same HF key, different role: in Gemma 1 `post_attention_layernorm` is the *pre-MLP* norm; in Gemma 2 it norms the
# attention output and the pre-MLP norm is `pre_feedforward_layernorm` (model-notes §1.3 naming pitfall).
_TEXT_ARCH: dict[TextArch, tuple[tuple[str, str], ...]] = {
    "gemma": (("layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),),
    "gemma2": (
        ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight"),
        ("layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        ("layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.weight"),
    ),
}
_LM_HEAD = (("weight", "weight"),)

# The legacy layout's tower prefixes → transformers 5's module tree (its in-memory `state_dict()`). Names inside a
# tower are the same in both.
_LEGACY_TO_V5 = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)

_FIELDS = {
    "i": r"(?P<i>\d+)",
    "p": r"(?P<p>weight|bias)",
    "proj": r"(?P<proj>[qkvo]_proj)",
    "mlp": r"(?P<mlp>gate_proj|up_proj|down_proj)",
    "rest": r"(?P<rest>.+)",
}


def _compile(rules: tuple[tuple[str, str], ...], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for hf, ours in rules:
        src, dst = (ours, hf) if reverse else (hf, ours)
        pattern = re.escape(src)
        for name, rx in _FIELDS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), rx)
        out.append((re.compile(pattern + "$"), dst))
    return out


class KeyMap:
    """Maps checkpoint keys of any known layout to vlmo names (and vlmo names back to the legacy layout)."""

    def __init__(self, arch: TextArch) -> None:
        towers = {
            "vision.": _VISION,
            "projector.": _PROJECTOR,
            "text.": _TEXT_COMMON + _TEXT_ARCH[arch],
            "text.lm_head.": _LM_HEAD,
        }
        self._from_hf = {tower: _compile(rules, reverse=False) for tower, rules in towers.items()}
        self._to_hf = {tower: _compile(rules, reverse=True) for tower, rules in towers.items()}

    def from_hf(self, key: str) -> str | None:
        """A checkpoint key → the vlmo parameter name, or None if the key is not part of PaliGemma."""
        for hf_prefix, tower in _PREFIXES:
            if key.startswith(hf_prefix):
                return _apply(self._from_hf[tower], key[len(hf_prefix) :], tower)
        return None

    def to_hf(self, name: str) -> str:
        """A vlmo parameter name → its legacy (hub) checkpoint key."""
        legacy = {
            "vision.": "vision_tower.vision_model.",
            "projector.": "multi_modal_projector.",
            "text.lm_head.": "language_model.lm_head.",
            "text.": "language_model.model.",
        }
        for tower, hf_prefix in legacy.items():
            if name.startswith(tower):
                mapped = _apply(self._to_hf[tower], name[len(tower) :], hf_prefix)
                if mapped is not None:
                    return mapped
        raise KeyError(f"no checkpoint name for vlmo parameter {name!r}")

    def to_v5(self, name: str) -> str:
        """A vlmo parameter name → its name in transformers 5's PaliGemmaForConditionalGeneration
        (`text.layers.0.attn.q_proj.weight` → `model.language_model.layers.0.self_attn.q_proj.weight`)."""
        legacy = self.to_hf(name)
        for old, new in _LEGACY_TO_V5:
            if legacy.startswith(old):
                return new + legacy[len(old) :]
        return legacy


def _apply(rules: list[tuple[re.Pattern[str], str]], rest: str, prefix: str) -> str | None:
    for pattern, template in rules:
        m = pattern.match(rest)
        if m:
            return prefix + template.format(**m.groupdict())
    return None
