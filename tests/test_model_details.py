"""One test per PaliGemma detail that earlier re-implementations got wrong (model-notes §2–§6, §10)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlmo import VLMo
from vlmo.detection import parse_detections
from vlmo.nn.gemma import RMSNorm, RotaryEmbedding
from vlmo.nn.paligemma import make_attn_mask, positions_from_mask
from vlmo.processing import ImageProcessorConfig, preprocess_images


@pytest.fixture(scope="module")
def vlm(tiny_float32: VLMo) -> VLMo:
    return tiny_float32  # conftest.py: loaded once, shared with test_generation.py


def test_pixels_are_normalised_with_mean_and_std_one_half_not_imagenet() -> None:
    img = Image.new("RGB", (4, 4), (255, 0, 128))
    px = preprocess_images([img], ImageProcessorConfig(height=4, width=4))
    assert px.shape == (1, 3, 4, 4)
    assert px[0, 0].eq(1.0).all() and px[0, 1].eq(-1.0).all()
    assert px[0, 2].sub(128 / 127.5 - 1).abs().max() < 1e-6


def test_prompt_is_image_tokens_then_bos_then_prompt_then_newline(vlm: VLMo) -> None:
    n = vlm.model.cfg.num_image_tokens
    ids = vlm.text.encode("caption en").input_ids[0].tolist()
    tok = vlm.text.tokenizer
    assert ids[:n] == [vlm.text.image_id] * n
    assert ids[n] == vlm.text.bos_id == 2
    assert ids[-1] == tok.token_to_id("\n")
    assert tok.decode(ids[n + 1 : -1]) == "caption en"


def test_prefix_lm_mask_matches_the_documented_example() -> None:
    valid = torch.ones(1, 5, dtype=torch.bool)
    types = torch.tensor([[0, 0, 0, 1, 1]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(make_attn_mask(valid, types, 0)[0, 0], want.bool())
    # padding is never attended; a window limits only suffix queries
    valid[0, 0] = False
    assert not make_attn_mask(valid, types, 0)[0, 0, :, 0].any()
    windowed = make_attn_mask(torch.ones(1, 5, dtype=torch.bool), types, 0, window=1)[0, 0]
    assert windowed[0].tolist() == [True, True, True, False, False]
    assert windowed[4].tolist() == [False, False, False, False, True]


def test_prefix_attends_both_ways_and_suffix_is_causal(vlm: VLMo) -> None:
    model = vlm.model
    batch = vlm.text.encode(["caption en"], ["a cat"])
    ids, types = batch.input_ids, batch.token_type_ids
    pixels = torch.zeros(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    first_suffix = int(types[0].nonzero()[0])
    with torch.no_grad():
        base = model(ids, pixels, None, types)
        later_prefix = ids.clone()
        later_prefix[0, first_suffix - 2] = 300  # a prefix token just before "\n"
        changed = model(later_prefix, pixels, None, types)
        later_suffix = ids.clone()
        later_suffix[0, -1] = 300
        causal = model(later_suffix, pixels, None, types)
    n = model.cfg.num_image_tokens
    assert (changed[0, n] - base[0, n]).abs().max() > 1e-4, "an earlier prefix token must see a later one"
    torch.testing.assert_close(causal[0, :-1], base[0, :-1], atol=0, rtol=0)


def test_text_embeddings_are_scaled_by_sqrt_d_and_image_features_are_not(vlm: VLMo) -> None:
    model = vlm.model
    d = model.cfg.text.hidden_size
    ids = vlm.text.encode("ocr").input_ids
    feats = torch.randn(1, model.cfg.num_image_tokens, d)
    x = model.embed(ids, feats)
    is_img = ids[0] == model.cfg.image_token_id
    assert torch.equal(x[0, is_img], feats[0])
    torch.testing.assert_close(x[0, ~is_img], model.text.embed.weight[ids[0, ~is_img]] * math.sqrt(d))


def test_bf16_embedding_scale_is_rounded_like_transformers() -> None:
    from vlmo.config import TextConfig
    from vlmo.nn.gemma import Gemma

    g = Gemma(
        TextConfig(vocab_size=8, hidden_size=2048, intermediate_size=8, num_layers=0, num_heads=1, num_kv_heads=1)
    )
    g = g.to(torch.bfloat16)
    torch.nn.init.ones_(g.embed.weight)
    assert g.embed_text(torch.tensor([[1]]))[0, 0, 0].item() == 45.25  # bf16(√2048), model-notes §4.2


def test_rmsnorm_uses_one_plus_w_in_float32() -> None:
    norm = RMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.0, 1.0, -0.5, 2.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = x.pow(2).mean().add(1e-6).rsqrt()
    torch.testing.assert_close(norm(x), x * rms * torch.tensor([1.0, 2.0, 0.5, 3.0]))
    xb = (torch.randn(3, 4) * 10).to(torch.bfloat16)
    want = xb.double() * xb.double().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt() * (1 + norm.weight.double())
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb), want.to(torch.bfloat16), atol=0, rtol=0)


def test_rope_angles_stay_float32_under_a_bf16_model() -> None:
    rope = RotaryEmbedding(head_dim=8, theta=10000.0).to(torch.bfloat16)
    pos = torch.tensor([[1, 2, 300]])
    cos, _ = rope(pos, torch.bfloat16)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    want = torch.cat([pos.float()[..., None] * inv] * 2, -1).cos().to(torch.bfloat16)
    assert torch.equal(cos[:, 0], want)


def test_positions_are_one_indexed_over_real_tokens() -> None:
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert positions_from_mask(valid).tolist() == [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]]


def test_output_head_is_the_tied_embedding(vlm: VLMo) -> None:
    text = vlm.model.text
    assert text.lm_head is None
    h = torch.randn(2, text.cfg.hidden_size)
    torch.testing.assert_close(text.logits(h), h @ text.embed.weight.T)
    assert text.logits(h).shape[-1] == text.cfg.vocab_size  # padding rows keep their logits (model-notes §10.10)


def test_loc_tokens_are_y_first() -> None:
    (det,) = parse_detections("<loc0100><loc0200><loc0300><loc0400> cat", image_size=(1023, 2046))
    assert det.box == (200.0, 200.0, 400.0, 600.0)  # (x_min, y_min, x_max, y_max)
