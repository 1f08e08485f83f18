"""The checkpoint key table, checked at the real PaliGemma-3B / PaliGemma 2 3B shapes on the meta device (no memory)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hub_configs import pg1_224, pg2_3b_224
from vlmo.config import PaliGemmaConfig
from vlmo.nn.paligemma import PaliGemma
from vlmo.weights.keys import KeyMap

transformers = pytest.importorskip("transformers")


def _meta_models(d: dict[str, Any]) -> tuple[PaliGemma, torch.nn.Module]:
    with torch.device("meta"):
        ours = PaliGemma(PaliGemmaConfig.from_hf(d))
        ref = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**d))
    return ours, ref


def _legacy_name(v5_key: str) -> str:
    """transformers 5 in-memory name → the hub's legacy on-disk name (model-notes §1.3 (a))."""
    key = v5_key.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
    key = key.replace("model.language_model.", "language_model.model.", 1)
    return key.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)


@pytest.mark.parametrize(
    ("d", "n_params"), [(pg1_224(), 2_923_466_480), (pg2_3b_224(), 3_032_242_416)], ids=["pg1", "pg2"]
)
def test_every_reference_tensor_maps_to_ours_with_the_same_shape(d: dict[str, Any], n_params: int) -> None:
    ours, ref = _meta_models(d)
    keymap = KeyMap(ours.cfg.text.arch)
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    mapped = {}
    for key, tensor in ref.state_dict().items():
        if key == "lm_head.weight":  # tied to the embedding; not stored
            continue
        for layout_key in (key, _legacy_name(key)):
            name = keymap.from_hf(layout_key)
            assert name in our_shapes, f"{layout_key} → {name}"
            assert our_shapes[name] == tuple(tensor.shape), layout_key
        mapped[keymap.from_hf(key)] = key
        assert keymap.to_hf(name) == _legacy_name(key)  # and back to the hub's names
    assert set(mapped) == set(our_shapes), "every vlmo parameter comes from exactly one checkpoint tensor"
    assert sum(p.numel() for p in ours.parameters()) == n_params  # model-notes §1.1, 64 padding rows included


def test_gemma_norm_names_differ_between_gemma_1_and_2() -> None:
    """`post_attention_layernorm` is the pre-MLP norm in Gemma 1 but the attention-output norm in Gemma 2."""
    key = "language_model.model.layers.3.post_attention_layernorm.weight"
    assert KeyMap("gemma").from_hf(key) == "text.layers.3.mlp_norm.weight"
    assert KeyMap("gemma2").from_hf(key) == "text.layers.3.post_attn_norm.weight"
    assert KeyMap("gemma2").from_hf(key.replace("post_attention", "pre_feedforward")) == "text.layers.3.mlp_norm.weight"


def test_mapping_is_idempotent_and_rejects_foreign_keys() -> None:
    keymap = KeyMap("gemma")
    for name in ("vision.layers.0.attn.o_proj.bias", "text.layers.17.mlp.down_proj.weight", "projector.linear.weight"):
        assert keymap.from_hf(keymap.to_hf(name)) == name
    assert keymap.from_hf("model.decoder.layers.0.weight") is None
    assert keymap.from_hf("language_model.model.layers.0.self_attn.rotary_emb.inv_freq") is None
