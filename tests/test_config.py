"""`PaliGemmaConfig.from_hf` against what transformers 5.24 resolves from the same `config.json` (model-notes §1.2).

The hub dicts below are written from the field lists of the hub copies in model-notes §1.2 (transformers-4 layout); the
transformers-5 layout is produced by transformers itself. Every test compares our dataclasses with transformers'
resolved sub-configs, so a default that drifts on either side shows up here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from hub_configs import HUB_CONFIGS, pg1_224, pg1_448, pg2_3b_224
from vlmo.config import PaliGemmaConfig, ProjectorConfig, TextConfig, VisionConfig
from vlmo.errors import ConfigError

transformers = pytest.importorskip("transformers")

# --- what transformers resolves, expressed as our dataclasses -------------------------------------------------------

# transformers' ACT2FN names → our GELU flavour. Gemma 1's legacy "gelu" is rewritten by GemmaConfig itself.
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def hf_resolve(d: dict[str, Any]) -> Any:
    """transformers' PaliGemmaConfig for `d` (deep-copied: transformers may consume the sub-dicts)."""
    return transformers.PaliGemmaConfig(**copy.deepcopy(d))


def as_vlmo(hf: Any) -> PaliGemmaConfig:
    """Our dataclasses filled field by field from transformers' resolved config."""
    v, t = hf.vision_config, hf.text_config
    vision = VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        gelu_approximate=_GELU[v.hidden_act],
        has_unused_head=v.vision_use_head,
    )
    gemma2: dict[str, Any] = {}
    if t.model_type == "gemma2":
        gemma2 = dict(
            query_pre_attn_scalar=t.query_pre_attn_scalar,
            attn_logit_softcapping=t.attn_logit_softcapping,
            final_logit_softcapping=t.final_logit_softcapping,
            sliding_window=t.sliding_window,
            layer_types=tuple(t.layer_types),
        )
    text = TextConfig(
        arch=t.model_type,
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_parameters["rope_theta"],
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=hf.tie_word_embeddings,
        **gemma2,
    )
    gen = transformers.GenerationConfig.from_model_config(hf)  # where generate() takes bos/eos/pad from
    eos = gen.eos_token_id
    return PaliGemmaConfig(
        vision=vision,
        text=text,
        projector=ProjectorConfig(
            kind="linear", in_features=v.hidden_size, out_features=hf.projection_dim, vision_layers=v.num_hidden_layers
        ),
        image_token_id=hf.image_token_index,
        bos_token_id=gen.bos_token_id,
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        pad_token_id=gen.pad_token_id,
    )


def assert_matches_transformers(d: dict[str, Any]) -> PaliGemmaConfig:
    ours = PaliGemmaConfig.from_hf(copy.deepcopy(d))
    hf = hf_resolve(d)
    assert ours == as_vlmo(hf)
    assert ours.num_image_tokens == hf.text_config.num_image_tokens
    assert ours.text.rope_theta == hf.text_config.rope_parameters["rope_theta"]
    assert hf.text_config.rope_parameters["rope_type"] == "default"
    return ours


def v5_layout(d: dict[str, Any]) -> dict[str, Any]:
    """The full config.json transformers 5 writes for `d` (`rope_parameters`, `dtype`, `layer_types`, ...)."""
    return json.loads(hf_resolve(d).to_json_string(use_diff=False))


# --- hub configs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_config_matches_transformers(name: str) -> None:
    assert_matches_transformers(HUB_CONFIGS[name]())


def test_pg1_224_values() -> None:
    cfg = PaliGemmaConfig.from_hf(pg1_224())
    assert cfg.vision == VisionConfig()  # So400m/14 at 224, no head
    assert cfg.text == TextConfig()  # Gemma 2B with the padded 257216-row vocabulary
    assert (cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim) == (8, 1, 256)
    assert cfg.projector == ProjectorConfig(in_features=1152, out_features=2048)
    assert cfg.num_image_tokens == 256
    assert (cfg.image_token_id, cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (257152, 2, (1,), 0)
    assert cfg.vision.gelu_approximate == "tanh"  # projector_hidden_act "gelu_fast" is unused, not the tower's act


def test_pg1_448_values() -> None:
    cfg = PaliGemmaConfig.from_hf(pg1_448())
    assert cfg.vision.image_size == 448
    assert cfg.vision.grid == 32
    assert cfg.num_image_tokens == 1024


def test_pg2_values() -> None:
    cfg = PaliGemmaConfig.from_hf(pg2_3b_224())
    t = cfg.text
    assert t.arch == "gemma2"
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (2304, 9216, 26, 8, 4)
    assert (t.query_pre_attn_scalar, t.attn_logit_softcapping, t.final_logit_softcapping) == (256, 50.0, 30.0)
    assert t.sliding_window == 4096
    # layer i is sliding when i is even (model-notes §1.2)
    assert t.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert len(t.layer_types) == 26
    assert t.attn_scale == pytest.approx(256**-0.5)
    assert cfg.projector.out_features == 2304
    assert cfg.eos_token_ids == (1, 107)  # only text_config has eos; <end_of_turn> is 107
    assert cfg.num_image_tokens == 256


# --- transformers-5 layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_transformers5_layout_gives_same_config(name: str) -> None:
    legacy = HUB_CONFIGS[name]()
    v5 = v5_layout(legacy)
    assert "rope_parameters" in v5["text_config"] and "rope_theta" not in v5["text_config"]
    assert "dtype" in v5 and "torch_dtype" not in v5
    assert v5["text_config"]["use_bidirectional_attention"] is True
    if v5["text_config"]["model_type"] == "gemma2":
        assert "layer_types" in v5["text_config"]
    assert PaliGemmaConfig.from_hf(v5) == PaliGemmaConfig.from_hf(legacy)
    assert_matches_transformers(v5)


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_transformers5_diff_layout_gives_same_config(name: str) -> None:
    """What `save_pretrained` actually writes (only the fields that differ from the class defaults)."""
    legacy = HUB_CONFIGS[name]()
    diff = json.loads(hf_resolve(legacy).to_json_string(use_diff=True))
    assert PaliGemmaConfig.from_hf(diff) == PaliGemmaConfig.from_hf(legacy)


def test_explicit_layer_types_are_used() -> None:
    d = pg2_3b_224()
    d["text_config"]["layer_types"] = ["full_attention"] * 26
    assert PaliGemmaConfig.from_hf(d).text.layer_types == ("full_attention",) * 26
    assert_matches_transformers(d)


def test_rope_theta_from_either_layout() -> None:
    d = pg1_224()
    d["text_config"]["rope_theta"] = 20000.0
    assert PaliGemmaConfig.from_hf(d).text.rope_theta == 20000.0
    assert PaliGemmaConfig.from_hf(v5_layout(d)).text.rope_theta == 20000.0
    assert_matches_transformers(d)


def test_unknown_keys_are_ignored() -> None:
    d = pg1_224()
    d["some_future_field"] = {"x": 1}
    d["text_config"]["another_one"] = [1, 2]
    d["vision_config"]["and_this"] = "y"
    assert PaliGemmaConfig.from_hf(d) == PaliGemmaConfig.from_hf(pg1_224())


def test_from_hf_does_not_modify_its_input() -> None:
    d = pg2_3b_224()
    before = copy.deepcopy(d)
    PaliGemmaConfig.from_hf(d)
    assert d == before


# --- defaults for absent fields --------------------------------------------------------------------------------------

PARTIAL_CONFIGS = {
    # sub-configs given but nearly empty: the *sub-config class* defaults apply (SigLIP ViT-B/16, Gemma 7B shapes)
    "gemma-partial": {
        "model_type": "paligemma",
        "projection_dim": 64,
        "text_config": {"hidden_size": 64},
        "vision_config": {"hidden_size": 48},
    },
    "gemma-no-model-types": {
        "model_type": "paligemma",
        "projection_dim": 3072,
        "text_config": {},
        "vision_config": {},
    },
    "gemma2-partial": {
        "model_type": "paligemma",
        "projection_dim": 64,
        "text_config": {"model_type": "gemma2", "hidden_size": 64},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 48, "image_size": 96},
    },
    # sub-configs missing entirely: PaliGemmaConfig's own defaults (So400m with MLP 4096, Gemma 2B, vocab 257152)
    "no-subconfigs": {"model_type": "paligemma"},
    "no-vision": {"model_type": "paligemma", "projection_dim": 64, "text_config": {"hidden_size": 64}},
    "no-text": {"model_type": "paligemma", "vision_config": {"hidden_size": 48, "num_attention_heads": 4}},
}


@pytest.mark.parametrize("name", PARTIAL_CONFIGS)
def test_defaults_match_transformers(name: str) -> None:
    assert_matches_transformers(PARTIAL_CONFIGS[name])


def test_subconfig_class_defaults() -> None:
    cfg = PaliGemmaConfig.from_hf(PARTIAL_CONFIGS["gemma-partial"])
    assert (cfg.vision.intermediate_size, cfg.vision.num_layers, cfg.vision.patch_size) == (3072, 12, 16)
    assert cfg.vision.has_unused_head  # SiglipVisionConfig's default is vision_use_head=True
    assert cfg.num_image_tokens == (224 // 16) ** 2
    assert (cfg.text.vocab_size, cfg.text.num_layers, cfg.text.num_heads, cfg.text.num_kv_heads) == (256000, 28, 16, 16)
    assert cfg.image_token_id == 256000  # PaliGemmaConfig's class default
    g2 = PaliGemmaConfig.from_hf(PARTIAL_CONFIGS["gemma2-partial"]).text
    assert (g2.num_layers, g2.num_kv_heads, g2.sliding_window, g2.final_logit_softcapping) == (26, 4, 4096, 30.0)


def test_missing_subconfigs_get_paligemma_defaults() -> None:
    cfg = PaliGemmaConfig.from_hf({"model_type": "paligemma"})
    assert cfg.vision == VisionConfig(intermediate_size=4096)  # the class default, not the real checkpoints' 4304
    assert cfg.text == TextConfig(vocab_size=257152)
    assert cfg.projector.out_features == 2048
    assert cfg.num_image_tokens == 256


def test_gemma1_legacy_gelu_means_tanh() -> None:
    d = pg1_224()
    d["text_config"]["hidden_act"] = "gelu"
    assert PaliGemmaConfig.from_hf(d) == PaliGemmaConfig.from_hf(pg1_224())
    assert hf_resolve(d).text_config.hidden_act == "gelu_pytorch_tanh"  # transformers rewrites it the same way


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu"])
def test_vision_activation(act: str) -> None:
    d = pg1_224()
    d["vision_config"]["hidden_act"] = act
    cfg = assert_matches_transformers(d)
    assert cfg.vision.gelu_approximate == ("none" if act == "gelu" else "tanh")


# --- errors ----------------------------------------------------------------------------------------------------------


def _with(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `d` with the dotted `path` set to `value` (or removed when value is `...`)."""
    d = copy.deepcopy(d)
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is ...:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return d


BAD_CONFIGS = {
    "llava": (_with(pg1_224(), "model_type", "llava"), ["model_type", "llava"]),
    "no-model-type": (_with(pg1_224(), "model_type", ...), ["model_type"]),
    "text-llama": (_with(pg1_224(), "text_config.model_type", "llama"), ["text_config.model_type", "llama"]),
    "vision-clip": (
        _with(pg1_224(), "vision_config.model_type", "clip_vision_model"),
        ["vision_config.model_type", "clip_vision_model"],
    ),
    "rope-linear-v4": (
        _with(pg1_224(), "text_config.rope_scaling", {"type": "linear", "factor": 2.0}),
        ["rope", "linear"],
    ),
    "rope-linear-v5": (
        _with(pg1_224(), "text_config.rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        ["rope", "linear"],
    ),
    "attention-bias": (_with(pg1_224(), "text_config.attention_bias", True), ["attention_bias"]),
    "heads-vs-kv": (
        _with(_with(pg2_3b_224(), "text_config.num_attention_heads", 6), "text_config.num_key_value_heads", 4),
        ["num_attention_heads", "num_key_value_heads"],
    ),
    "projection-dim": (_with(pg1_224(), "projection_dim", 2304), ["projection_dim", "2304", "2048"]),
    "text-act": (_with(pg1_224(), "text_config.hidden_act", "relu"), ["text_config.hidden_act", "relu"]),
    "gemma2-act": (
        _with(pg2_3b_224(), "text_config.hidden_activation", "silu"),
        ["text_config.hidden_activation", "silu"],
    ),
    "vision-act": (_with(pg1_224(), "vision_config.hidden_act", "quick_gelu"), ["vision_config.hidden_act"]),
    "layer-types-length": (
        _with(pg2_3b_224(), "text_config.layer_types", ["full_attention"] * 3),
        ["layer_types", "26"],
    ),
    "layer-types-entry": (
        _with(pg2_3b_224(), "text_config.layer_types", ["chunked_attention"] * 26),
        ["layer_types", "chunked_attention"],
    ),
    "vision-heads": (_with(pg1_224(), "vision_config.num_attention_heads", 7), ["vision_config", "1152", "7"]),
    "image-smaller-than-patch": (_with(pg1_224(), "vision_config.image_size", 10), ["image_size", "patch_size"]),
    "image-not-divisible-by-patch": (
        _with(pg1_224(), "vision_config.image_size", 230),
        ["vision_config.image_size", "230", "patch_size", "14"],
    ),
    # Sizes must be positive: zero or negative ones used to end in ZeroDivisionError, torch errors or warnings.
    **{
        f"{path}={value}": (_with(pg1_224(), path, value), [repr(path), str(value), "positive"])
        for path, value in [
            ("vision_config.patch_size", 0),
            ("vision_config.patch_size", -14),
            ("vision_config.image_size", 0),
            ("vision_config.hidden_size", 0),
            ("vision_config.intermediate_size", -1),
            ("vision_config.num_hidden_layers", 0),
            ("vision_config.num_attention_heads", 0),
            ("vision_config.num_channels", 0),
            ("text_config.vocab_size", 0),
            ("text_config.hidden_size", 0),
            ("text_config.intermediate_size", 0),
            ("text_config.num_hidden_layers", -2),
            ("text_config.num_attention_heads", 0),
            ("text_config.num_key_value_heads", 0),
            ("text_config.head_dim", 0),
            ("text_config.max_position_embeddings", -1),
            ("text_config.max_position_embeddings", 0),
            ("text_config.rope_theta", 0),
            ("projection_dim", 0),
        ]
    },
    "gemma2-sliding-window": (_with(pg2_3b_224(), "text_config.sliding_window", 0), ["sliding_window", "positive"]),
    "gemma2-query-scalar": (
        _with(pg2_3b_224(), "text_config.query_pre_attn_scalar", -1),
        ["query_pre_attn_scalar", "positive"],
    ),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_config_errors(name: str) -> None:
    d, words = BAD_CONFIGS[name]
    with pytest.raises(ConfigError) as info:
        PaliGemmaConfig.from_hf(d)
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PaliGemmaConfig.from_hf({"model_type": "llava"})


# --- fields transformers reads elsewhere, and null values -------------------------------------------------------


@pytest.mark.parametrize(("top", "text"), [(False, True), (True, False)])
def test_tie_word_embeddings_follows_top_level(top: bool, text: bool) -> None:
    d = _with(_with(pg1_224(), "tie_word_embeddings", top), "text_config.tie_word_embeddings", text)
    assert PaliGemmaConfig.from_hf(d).text.tie_word_embeddings is hf_resolve(d).tie_word_embeddings is top


@pytest.mark.parametrize(
    ("path", "read"),
    [
        ("pad_token_id", lambda c: c.pad_token_id),
        ("eos_token_id", lambda c: c.eos_token_ids),
        ("text_config.rope_theta", lambda c: c.text.rope_theta),
    ],
)
def test_null_fields_are_not_a_crash(path: str, read: Callable[[PaliGemmaConfig], object]) -> None:
    # A null value means "not given": the field takes its default, as when the key is absent.
    nulled = PaliGemmaConfig.from_hf(_with(pg1_224(), path, None))
    *parents, key = path.split(".")
    absent = pg1_224()
    (absent[parents[0]] if parents else absent).pop(key, None)
    assert read(nulled) == read(PaliGemmaConfig.from_hf(absent))
    assert nulled == PaliGemmaConfig.from_hf(absent)
