"""Numerical parity with transformers' PaliGemmaForConditionalGeneration on the same tiny checkpoints.

Reference: transformers with eager attention in fp32 (the ground truth, model-notes §10.1); vlmo uses SDPA, so agreement
is to ~1e-6, well inside the 1e-4 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmo import VLMo
from vlmo.weights.safetensors_io import open_tensors

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

ATOL = 1e-4
PROMPTS = ["caption en", "answer en what is the color of the car?"]


def images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(90, 120, 3, generator=g) * 255).to(torch.uint8).numpy()
    b = (torch.rand(50, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a), Image.fromarray(b)]


def reference(path: Path):  # noqa: ANN201 - transformers types
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    siglip = transformers.models.siglip
    proc = transformers.PaliGemmaProcessor(
        image_processor=siglip.SiglipImageProcessorPil.from_pretrained(path),
        tokenizer=transformers.GemmaTokenizer(tokenizer_file=str(path / "tokenizer.json")),
    )
    return model, proc


@pytest.fixture(scope="module", params=["gqa", "odd", "gemma2", "hires"])
def pair(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path]):  # noqa: ANN201
    path = tiny_checkpoints[request.param]
    return VLMo.from_pretrained(path, device="cpu", dtype="float32"), *reference(path)


def hf_inputs(proc, prompts: list[str], imgs: list[Image.Image], suffix: list[str] | None = None):  # noqa: ANN001,ANN201
    text = ["<image>" + p for p in prompts]
    return proc(images=imgs, text=text, suffix=suffix, return_tensors="pt", padding="longest")


def test_vision_features_match(pair) -> None:  # noqa: ANN001
    vlm, ref, proc = pair
    inputs = hf_inputs(proc, PROMPTS, images())
    with torch.no_grad():
        want = ref.model.get_image_features(inputs["pixel_values"])
        want = getattr(want, "pooler_output", want)
    got = vlm.encode_images(images())
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_full_sequence_logits_match_with_suffix(pair) -> None:  # noqa: ANN001
    """Prefix-LM mask over a prompt + suffix, with padding: every position's logits."""
    vlm, ref, proc = pair
    inputs = hf_inputs(proc, PROMPTS, images(), suffix=["a red car", "yes"])
    with torch.no_grad():
        want = ref(**inputs).logits
        got = vlm.model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], inputs["token_type_ids"])
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_prefill_decode_logits_and_greedy_text_match(pair, batched: bool) -> None:  # noqa: ANN001
    vlm, ref, proc = pair
    prompts, imgs = (PROMPTS, images()) if batched else (PROMPTS[:1], images()[:1])
    n_new = 24
    inputs = hf_inputs(proc, prompts, imgs)
    with torch.no_grad():
        out = ref.generate(
            **inputs, max_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    want_ids = out.sequences[:, inputs["input_ids"].shape[1] :]
    assert want_ids.shape[1] == n_new, "reference stopped early; pick another seed/prompt"

    # Our own pipeline builds the same ids (checked in test_processing); run prefill + decode step by step.
    batch = vlm.text.encode(prompts)
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    model = vlm.model
    with torch.no_grad():
        feats = vlm.encode_images(imgs)
        cache = model.new_cache(len(prompts), batch.input_ids.shape[1] + n_new)
        prefill_all, _ = model.prefill(batch.input_ids, feats, batch.attention_mask, cache, all_logits=True)
        want_prefill = ref(**inputs).logits
        real = batch.attention_mask.bool()
        torch.testing.assert_close(prefill_all[real], want_prefill[real], atol=ATOL, rtol=0)

        cache = model.new_cache(len(prompts), batch.input_ids.shape[1] + n_new)
        logits, state = model.prefill(batch.input_ids, feats, batch.attention_mask, cache)
        for step in range(n_new):
            torch.testing.assert_close(logits, out.logits[step], atol=ATOL, rtol=0, msg=f"step {step}")
            token = logits.argmax(-1)
            assert torch.equal(token, want_ids[:, step]), f"greedy token differs at step {step}"
            logits = model.decode(token, state)

    texts = vlm.generate(imgs if batched else imgs[0], prompts if batched else prompts[0], max_new_tokens=n_new)
    want_text = proc.tokenizer.batch_decode(want_ids, skip_special_tokens=True)
    assert (texts if batched else [texts]) == want_text
    assert all(len(t) > 0 for t in want_text)


def _rewrite(src: Path, dst: Path, rename) -> Path:  # noqa: ANN001
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = {rename(k): v.clone() for k, v in open_tensors(src / "model.safetensors").items()}
    tensors = {k: v for k, v in tensors.items() if k is not None}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _legacy(key: str) -> str:
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key


def _in_memory(key: str) -> str:
    key = _legacy(key).replace("vision_tower.vision_model.", "model.vision_tower.")
    key = key.replace("language_model.model.", "model.language_model.")
    return key.replace("multi_modal_projector.", "model.multi_modal_projector.")


@pytest.mark.parametrize("layout", ["legacy", "in_memory"])
def test_other_key_layouts_give_the_same_logits(tiny_checkpoint: Path, tmp_path: Path, layout: str) -> None:
    rename = _legacy if layout == "legacy" else _in_memory
    other = _rewrite(tiny_checkpoint, tmp_path / layout, rename)
    names = open_tensors(other / "model.safetensors")
    assert any(k.startswith("vision_tower.vision_model." if layout == "legacy" else "model.") for k in names)
    if layout == "in_memory":  # transformers' state_dict() also holds the tied head
        tensors = {k: v.clone() for k, v in names.items()}
        tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
        save_file(tensors, str(other / "model.safetensors"))
    a = VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    b = VLMo.from_pretrained(other, device="cpu", dtype="float32")
    assert b.model.text.lm_head is None  # an identical lm_head stays tied
    ids = a.text.encode(PROMPTS)
    with torch.no_grad():
        pix = torch.randn(2, 3, a.model.cfg.vision.image_size, a.model.cfg.vision.image_size)
        want = a.model(ids.input_ids, pix, ids.attention_mask)
        got = b.model(ids.input_ids, pix, ids.attention_mask)
    assert torch.equal(got, want)


def test_differing_lm_head_is_kept_untied_like_transformers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = _rewrite(tiny_checkpoint, tmp_path / "untied", lambda k: k)
    tensors = {k: v.clone() for k, v in open_tensors(other / "model.safetensors").items()}
    head = tensors["language_model.model.embed_tokens.weight"].clone()
    head[-8:] += 1.0  # e.g. padding rows sampled separately by a converter (model-notes §1.3)
    tensors["language_model.lm_head.weight"] = head
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    vlm = VLMo.from_pretrained(other, device="cpu", dtype="float32")
    assert vlm.model.text.lm_head is not None
    ref, proc = reference(other)
    inputs = hf_inputs(proc, PROMPTS[:1], images()[:1])
    with torch.no_grad():
        want = ref(**inputs).logits
        got = vlm.model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
