"""Segmentation: the vae-oid VQ-VAE port, mask placement, COCO RLE, drawing, and loading the weights.

References here use other primitives than the code under test: the convolutions are numpy einsums over
shifted views (float64), the transposed convolutions scatter-add each input pixel's kernel, the resize is
PIL's (what big_vision's evaluator runs) and the RLE a plain Python loop over `ravel(order="F")`.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.utils._http
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from fake_hub import FakeHub, isolate_hf
from vlmo.detection import bins_to_box, draw_detections, label_colours
from vlmo.errors import CheckpointError, InputError
from vlmo.nn.vqvae import VQVAEDecoder, VQVAEEncoder
from vlmo.segmentation import (
    Segmentation,
    decode_masks,
    draw_segmentations,
    encode_mask,
    mask_to_rle,
    parse_segmentations,
    place_mask,
    rle_to_mask,
)
from vlmo.weights.hub import DownloadError, ModelNotFoundError, OfflineError
from vlmo.weights.vqvae import (
    CONVERTED,
    VAE_FILENAME,
    VAE_REPO,
    load_mask_decoder,
    load_mask_encoder,
    mask_cache_dir,
    read_npz,
)

# The published structure (model-notes §9.3): every tensor of the decoder and of the encoder, in order.
DECODER_SHAPES = {
    "_vq_vae._embedding": (128, 512),
    "decoder.0.weight": (128, 512, 1, 1),
    "decoder.0.bias": (128,),
    **{
        f"decoder.{b}.net.{i}.{p}": shape
        for b in (2, 3)
        for i, k in ((0, 3), (2, 3), (4, 1))
        for p, shape in (("weight", (128, 128, k, k)), ("bias", (128,)))
    },
    "decoder.4.weight": (128, 128, 4, 4),
    "decoder.4.bias": (128,),
    "decoder.6.weight": (128, 64, 4, 4),
    "decoder.6.bias": (64,),
    "decoder.8.weight": (64, 32, 4, 4),
    "decoder.8.bias": (32,),
    "decoder.10.weight": (32, 16, 4, 4),
    "decoder.10.bias": (16,),
    "decoder.12.weight": (1, 16, 1, 1),
    "decoder.12.bias": (1,),
}
ENCODER_SHAPES = {
    "_vq_vae._embedding": (128, 512),
    "encoder.0.weight": (16, 1, 4, 4),
    "encoder.0.bias": (16,),
    "encoder.2.weight": (32, 16, 4, 4),
    "encoder.2.bias": (32,),
    "encoder.4.weight": (64, 32, 4, 4),
    "encoder.4.bias": (64,),
    "encoder.6.weight": (128, 64, 4, 4),
    "encoder.6.bias": (128,),
    **{
        f"encoder.{b}.net.{i}.{p}": shape
        for b in (8, 9)
        for i, k in ((0, 3), (2, 3), (4, 1))
        for p, shape in (("weight", (128, 128, k, k)), ("bias", (128,)))
    },
    "encoder.10.weight": (512, 128, 1, 1),
    "encoder.10.bias": (512,),
}
ALL_SHAPES = {**DECODER_SHAPES, **ENCODER_SHAPES}


def random_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of the published names and shapes; scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in ALL_SHAPES.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if ".weight" in name and name.startswith(("decoder.4", "decoder.6", "decoder.8", "decoder.10")):
            fan_in = shape[0] * 4  # a transposed conv with stride 2 sums 2×2 taps of each input channel
        scale = 1.0 if name == "_vq_vae._embedding" else np.sqrt(2.0 / fan_in)
        out[name] = (rng.standard_normal(shape) * (0.1 if name.endswith("bias") else scale)).astype(np.float32)
    return out


def state_from(arrays: dict[str, np.ndarray], keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(arrays[k].copy()) for k in keys}


@pytest.fixture(autouse=True)
def _vlmo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's vlmo cache."""
    monkeypatch.setenv("VLMO_CACHE", str(tmp_path / "vlmo-cache-default"))


# ------------------------------------------------------------------------------------------------------------
# The modules


def test_decoder_names_and_shapes_are_the_published_ones() -> None:
    got = {k: tuple(v.shape) for k, v in VQVAEDecoder().state_dict().items()}
    assert got == DECODER_SHAPES
    assert list(got) == list(DECODER_SHAPES)


def test_encoder_names_and_shapes() -> None:
    got = {k: tuple(v.shape) for k, v in VQVAEEncoder().state_dict().items()}
    assert got == ENCODER_SHAPES


def conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """Cross-correlation as a sum over kernel taps of strided views: x (B,C,H,W), w (O,C,k,k)."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = (xp.shape[2] - k) // stride + 1
    out_w = (xp.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    for i in range(k):
        for j in range(k):
            view = xp[:, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
            out += np.einsum("bchw,oc->bohw", view, w[:, :, i, j])
    return out + b[None, :, None, None]


def conv_transpose_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 2, pad: int = 1) -> np.ndarray:
    """The definition: each input pixel adds its kernel, scaled, at stride × its position; then crop `pad`."""
    batch, _, h, wd = x.shape
    k = w.shape[2]
    full = np.zeros((batch, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k))
    for y in range(h):
        for xx in range(wd):
            patch = np.einsum("bc,cokl->bokl", x[:, :, y, xx], w)
            full[:, :, y * stride : y * stride + k, xx * stride : xx * stride + k] += patch
    return full[:, :, pad : full.shape[2] - pad, pad : full.shape[3] - pad] + b[None, :, None, None]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def resblock_ref(p: dict[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    h = relu(conv_ref(x, p[f"{name}.net.0.weight"], p[f"{name}.net.0.bias"], pad=1))
    h = relu(conv_ref(h, p[f"{name}.net.2.weight"], p[f"{name}.net.2.bias"], pad=1))
    return x + conv_ref(h, p[f"{name}.net.4.weight"], p[f"{name}.net.4.bias"])


def decoder_ref(p: dict[str, np.ndarray], codes: np.ndarray) -> np.ndarray:
    """codes (B,16) → (B,1,64,64), model-notes §9.3 step by step."""
    x = p["_vq_vae._embedding"][codes]  # (B,16,512)
    x = x.reshape(codes.shape[0], 4, 4, -1).transpose(0, 3, 1, 2)  # row-major grid → NCHW
    x = relu(conv_ref(x, p["decoder.0.weight"], p["decoder.0.bias"]))
    x = resblock_ref(p, "decoder.3", resblock_ref(p, "decoder.2", x))
    for i in (4, 6, 8, 10):
        x = relu(conv_transpose_ref(x, p[f"decoder.{i}.weight"], p[f"decoder.{i}.bias"]))
    return conv_ref(x, p["decoder.12.weight"], p["decoder.12.bias"])


def test_decoder_matches_a_numpy_reference() -> None:
    arrays = random_arrays(1)
    decoder = VQVAEDecoder()
    decoder.load_state_dict(state_from(arrays, DECODER_SHAPES))
    codes = np.random.default_rng(2).integers(0, 128, size=(3, 16))
    ref = decoder_ref({k: v.astype(np.float64) for k, v in arrays.items()}, codes)
    with torch.no_grad():
        got = decoder(torch.from_numpy(codes)).double().numpy()
    assert got.shape == (3, 1, 64, 64)
    assert ref.std() > 0.1  # the weights give a non-trivial output
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)
    np.testing.assert_allclose(decode_masks(torch.from_numpy(codes), decoder).numpy(), ref[:, 0], atol=1e-4, rtol=1e-4)


def test_codes_are_laid_out_row_major() -> None:
    decoder = VQVAEDecoder()
    codes = torch.arange(16)[None] * 7  # distinct codes
    grid = decoder.embed(codes)  # (1,512,4,4)
    table = decoder._vq_vae._embedding
    for k in range(16):
        assert torch.equal(grid[0, :, k // 4, k % 4], table[codes[0, k]])


def encoder_ref(p: dict[str, np.ndarray], masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """masks (B,1,64,64) in [0,1] → (features (B,512,4,4), codes (B,16)): big_vision's `encode_to_codebook_indices`."""
    x = 2.0 * (masks - 0.5)
    for i in (0, 2, 4, 6):  # TF SAME, 4×4 kernel, stride 2, even size: one pixel each side
        x = relu(conv_ref(x, p[f"encoder.{i}.weight"], p[f"encoder.{i}.bias"], stride=2, pad=1))
    x = resblock_ref(p, "encoder.9", resblock_ref(p, "encoder.8", x))
    x = conv_ref(x, p["encoder.10.weight"], p["encoder.10.bias"])  # (B,512,4,4)
    flat = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    table = p["_vq_vae._embedding"]
    distances = ((flat[:, None, :] - table[None]) ** 2).sum(-1)
    return x, distances.argmin(1).reshape(-1, 16)


def test_encoder_matches_a_numpy_reference() -> None:
    arrays = random_arrays(3)
    arrays["_vq_vae._embedding"] *= 3.0  # spread the codes apart so the argmin has clear winners
    encoder = VQVAEEncoder()
    encoder.load_state_dict(state_from(arrays, ENCODER_SHAPES))
    masks = (np.random.default_rng(4).random((4, 1, 64, 64)) > 0.5).astype(np.float32)
    features, ref = encoder_ref({k: v.astype(np.float64) for k, v in arrays.items()}, masks.astype(np.float64))
    with torch.no_grad():
        got_features = encoder.features(torch.from_numpy(masks)).double().numpy()
        got = encoder(torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(got_features, features, atol=1e-4 * float(np.abs(features).max()), rtol=0)
    assert len(np.unique(ref)) > 3  # not one code everywhere
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.int64 and got.shape == (4, 16)


@pytest.mark.parametrize("codes", [torch.zeros(2, 15, dtype=torch.long), torch.full((1, 16), 128), torch.ones(1, 16)])
def test_decoder_rejects_bad_codes(codes: torch.Tensor) -> None:
    with pytest.raises(InputError):
        VQVAEDecoder()(codes)


# ------------------------------------------------------------------------------------------------------------
# COCO RLE


def rle_ref(mask: np.ndarray) -> list[int]:
    counts, value, run = [], False, 0
    for v in mask.ravel(order="F"):
        if bool(v) != value:
            counts.append(run)
            value, run = bool(v), 0
        run += 1
    return [*counts, run]


@pytest.mark.parametrize(
    ("rows", "counts"),
    [
        ([[0, 0], [0, 0]], [4]),
        ([[1, 1], [1, 1]], [0, 4]),
        ([[0, 1], [0, 0]], [2, 1, 1]),  # column-major; row-major would be [1, 1, 2]
        ([[1, 1, 0], [0, 1, 0]], [0, 1, 1, 2, 2]),  # columns (1,0) (1,1) (0,0)
        ([[0], [1], [1]], [1, 2]),
    ],
)
def test_rle_hand_examples(rows: list[list[int]], counts: list[int]) -> None:
    mask = torch.tensor(rows, dtype=torch.bool)
    rle = mask_to_rle(mask)
    assert rle == {"size": [len(rows), len(rows[0])], "counts": counts}
    assert torch.equal(rle_to_mask(rle), mask)


@st.composite
def small_masks(draw: st.DrawFn) -> np.ndarray:
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    return np.array(bits, dtype=bool).reshape(h, w)


@settings(max_examples=150, deadline=None)
@given(small_masks())
def test_rle_round_trip_and_coco_order(mask: np.ndarray) -> None:
    rle = mask_to_rle(torch.from_numpy(mask))
    assert rle["size"] == list(mask.shape)
    assert rle["counts"] == rle_ref(mask)
    assert sum(rle["counts"]) == mask.size
    assert torch.equal(rle_to_mask(rle), torch.from_numpy(mask))


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [2, 2], "counts": [1, 2]},  # sums to 3, not 4
        {"size": [2, 2], "counts": [5, -1]},
        {"size": [2, 2], "counts": "04"},  # compressed string
        {"counts": [4]},
    ],
)
def test_rle_rejects_malformed_input(rle: dict) -> None:
    with pytest.raises(InputError):
        rle_to_mask(rle)


# ------------------------------------------------------------------------------------------------------------
# Placing masks


def big_vision_place(m64: np.ndarray, bins: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """big_vision's evaluator: int() of bin/1023 × size, PIL BILINEAR on an "F" image, > 0, paste."""
    y1, x1, y2, x2 = (b / 1023 for b in bins)
    y1, x1, y2, x2 = map(int, (y1 * height, x1 * width, y2 * height, x2 * width))
    out = np.zeros((height, width), dtype=bool)
    if x2 > x1 and y2 > y1:
        resized = np.asarray(Image.fromarray(m64).resize([x2 - x1, y2 - y1], resample=Image.BILINEAR))
        out[y1:y2, x1:x2] = resized > 0.0
    return out


@pytest.mark.parametrize(
    ("bins", "size"),
    [
        ((100, 200, 600, 700), (640, 480)),  # shrink and enlarge mixed
        ((0, 0, 1023, 1023), (300, 100)),  # whole image, non-square
        ((0, 0, 1023, 1023), (100, 300)),
        ((500, 10, 530, 40), (640, 480)),  # much smaller than 64: antialiasing matters
        ((0, 900, 1023, 1023), (1000, 50)),
    ],
)
def test_place_mask_matches_big_vision(bins: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    m64 = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)
    got = place_mask(torch.from_numpy(m64), bins, size).numpy()
    assert got.shape == (size[1], size[0]) and got.dtype == bool
    assert (got != big_vision_place(m64, bins, *size)).sum() == 0


def test_plain_bilinear_would_not_match_pil_when_shrinking() -> None:
    """Why place_mask resizes with antialias=True (module docstring)."""
    m64 = torch.from_numpy(np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32))
    pil = np.asarray(Image.fromarray(m64.numpy()).resize([20, 37], resample=Image.BILINEAR))
    kwargs = {"size": (37, 20), "mode": "bilinear", "align_corners": False}
    aa = torch.nn.functional.interpolate(m64[None, None], antialias=True, **kwargs)[0, 0].numpy()
    plain = torch.nn.functional.interpolate(m64[None, None], antialias=False, **kwargs)[0, 0].numpy()
    assert np.abs(aa - pil).max() < 1e-4
    assert np.abs(plain - pil).max() > 0.1


def test_place_mask_edge_cases() -> None:
    positive = torch.ones(64, 64)
    full = place_mask(positive, (0, 0, 1023, 1023), (300, 100))
    assert full.shape == (100, 300) and bool(full.all())
    assert not place_mask(positive, (400, 400, 400, 800), (300, 100)).any()  # zero height
    assert not place_mask(positive, (400, 400, 401, 800), (30, 10)).any()  # under a pixel after int()
    inverted = place_mask(positive, (600, 700, 100, 200), (320, 240))
    assert torch.equal(inverted, place_mask(positive, (100, 200, 600, 700), (320, 240)))
    assert not place_mask(-positive, (0, 0, 1023, 1023), (8, 8)).any()
    with pytest.raises(InputError):
        place_mask(positive, (0, 0, 1024, 10), (8, 8))
    with pytest.raises(InputError):
        place_mask(positive, (0, 0, 10, 10), (0, 8))


# ------------------------------------------------------------------------------------------------------------
# End to end: text → masks


def constant_decoder(value: float = 1.0) -> VQVAEDecoder:
    """A real decoder whose output is `value` everywhere: all weights 0, the last bias = value."""
    decoder = VQVAEDecoder()
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.decoder[12].bias.fill_(value)
    return decoder.eval()


class HalfDecoder(VQVAEDecoder):
    """Positive on the left half of the 64×64 map when the first code is even, else on the top half."""

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        out = -torch.ones(codes.shape[0], 1, 64, 64)
        for i, first in enumerate(codes[:, 0].tolist()):
            if first % 2 == 0:
                out[i, 0, :, :32] = 1.0
            else:
                out[i, 0, :32, :] = 1.0
        return out


def seg_tokens(codes: list[int]) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


def assert_fills_box(mask: torch.Tensor, box: tuple[float, float, float, float]) -> None:
    """True on every pixel wholly inside the box, False on every pixel wholly outside (one pixel of slack)."""
    height, width = mask.shape
    ys = torch.arange(height, dtype=torch.float64)[:, None]
    xs = torch.arange(width, dtype=torch.float64)[None, :]
    x0, y0, x1, y1 = box
    inside = (xs >= x0) & (xs + 1 <= x1) & (ys >= y0) & (ys + 1 <= y1)
    outside = (xs + 1 <= x0 - 1) | (xs >= x1 + 1) | (ys + 1 <= y0 - 1) | (ys >= y1 + 1)
    assert bool(mask[inside].all())
    assert not bool(mask[outside].any())


@pytest.mark.parametrize("size", [(640, 480), (300, 100), (100, 300)])
def test_segment_answer_end_to_end(size: tuple[int, int]) -> None:
    codes = list(range(12, 28))
    text = (
        f"<loc0100><loc0200><loc0600><loc0700>{seg_tokens(codes)} cat ; "
        f"<loc0000><loc0000><loc1023><loc1023>{seg_tokens([0] * 16)} whole image ; "
        "<loc0010><loc0020><loc0030><loc0040> box only ; "  # a detection: no seg codes
        f"<loc0001><loc0002><loc0003><loc0004>{seg_tokens([5] * 9)} cut short ; "  # truncated seg block
        f"<loc0100><loc0200><loc0600>{seg_tokens(codes)}"  # truncated box
    )
    segs = parse_segmentations(text, size, constant_decoder())
    assert [s.label for s in segs] == ["cat", "whole image"]
    cat, whole = segs
    assert cat.bins == (100, 200, 600, 700) and cat.seg_codes == tuple(codes)
    assert cat.box == bins_to_box((100, 200, 600, 700), size)
    assert cat.mask.shape == (size[1], size[0]) and cat.mask.dtype == torch.bool
    assert_fills_box(cat.mask, cat.box)
    assert bool(whole.mask.all())  # bins 0 and 1023 reach the borders


def test_segment_pattern_keeps_orientation() -> None:
    even, odd = [2] + [0] * 15, [3] + [0] * 15
    whole = "<loc0000><loc0000><loc1023><loc1023>"
    text = f"{whole}{seg_tokens(even)} a ; {whole}{seg_tokens(odd)} b"
    left, top = parse_segmentations(text, (200, 100), HalfDecoder())
    assert bool(left.mask[:, :100].all()) and not left.mask[:, 100:].any()  # left half of a 200×100 image
    assert bool(top.mask[:50].all()) and not top.mask[50:].any()


@pytest.mark.parametrize("text", ["", "no tokens", "<loc0001><loc0002>", "<seg001>" * 16, None])
def test_no_segments_is_an_empty_list(text: str) -> None:
    assert parse_segmentations(text, (10, 10), constant_decoder()) == []


def test_parse_segmentations_rejects_a_bad_image_size() -> None:
    with pytest.raises(InputError):
        parse_segmentations("", (10, 0), constant_decoder())


def test_to_dict_is_json_ready() -> None:
    text = f"<loc0000><loc0000><loc1023><loc0512>{seg_tokens([1] * 16)} cat"
    (seg,) = parse_segmentations(text, (4, 2), constant_decoder())
    d = seg.to_dict()
    assert d["label"] == "cat" and d["bins"] == [0, 0, 1023, 512] and d["seg_codes"] == [1] * 16
    # x_max = int(512 / 1023 × 4) = int(2.002) = 2: columns 0 and 1, i.e. the first 4 pixels column-major.
    assert d["mask"] == {"size": [2, 4], "counts": [0, 4, 4]}
    assert torch.equal(rle_to_mask(d["mask"]), seg.mask)
    assert json.loads(json.dumps(d)) == d
    assert seg.to_dict(rle=False)["mask"] == seg.mask.to(torch.uint8).tolist()


def test_encode_mask_crops_and_resizes_like_big_vision() -> None:
    arrays = random_arrays(7)
    encoder = VQVAEEncoder()
    encoder.load_state_dict(state_from(arrays, ENCODER_SHAPES))
    mask = torch.zeros(100, 150, dtype=torch.bool)
    mask[20:60, 30:90] = True
    codes = encode_mask(mask, (30.4, 19.6, 89.5, 60.2), encoder)  # rounds to [30, 90) × [20, 60)
    assert codes == tuple(encoder(torch.ones(1, 1, 64, 64))[0].tolist())
    with pytest.raises(InputError, match="covers no pixel"):
        encode_mask(mask, (10, 10, 10.2, 50), encoder)


# ------------------------------------------------------------------------------------------------------------
# Drawing


def test_draw_segmentations() -> None:
    image = Image.new("RGB", (200, 120), (10, 20, 30))
    before = image.tobytes()
    text = f"<loc0256><loc0256><loc0768><loc0512>{seg_tokens([1] * 16)} cat"
    (seg,) = parse_segmentations(text, image.size, constant_decoder())
    out = draw_segmentations(image, [seg], alpha=0.5)
    assert image.tobytes() == before and out.size == image.size and out.mode == "RGB"
    colour = label_colours(["cat"])["cat"]
    inner = out.getpixel((75, 60))  # inside the mask, away from the box outline
    assert all(abs(c - (b + o) / 2) <= 1 for c, b, o in zip(inner, (10, 20, 30), colour, strict=True))
    assert out.getpixel((190, 110)) == (10, 20, 30)  # outside the mask, the box and its label
    boxes = draw_detections(image, [seg.to_detection()])
    x0, y0 = int(seg.box[0]), int(seg.box[1])
    assert out.getpixel((x0, y0 + 10)) == boxes.getpixel((x0, y0 + 10)) == colour  # the outline is on top


def test_draw_segmentations_validates() -> None:
    image = Image.new("RGB", (20, 10))
    seg = Segmentation("x", (0, 0, 1, 1), (0, 0, 1, 1), (0,) * 16, torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="does not fit"):
        draw_segmentations(image, [seg])
    with pytest.raises(InputError, match="alpha"):
        draw_segmentations(image, [], alpha=1.5)
    assert draw_segmentations(image, []).tobytes() == image.tobytes()


# ------------------------------------------------------------------------------------------------------------
# Weights: .npz and .safetensors files


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return random_arrays(8)


def write_npz(path: Path, arrays: dict[str, np.ndarray], **extra: np.ndarray) -> Path:
    np.savez(path, **arrays, **extra)
    return path


def assert_loaded(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    assert state
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, torch.from_numpy(arrays[name].astype(np.float32))), name


def test_load_from_npz(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    ema = {"_vq_vae._ema_w": np.zeros((128, 512), np.float32), "_vq_vae._ema_cluster_size": np.zeros(128, np.float32)}
    npz = write_npz(tmp_path / "vae-oid.npz", arrays, **ema)  # EMA training state is ignored
    decoder = load_mask_decoder(npz)
    assert isinstance(decoder, VQVAEDecoder) and not decoder.training
    assert not any(p.requires_grad for p in decoder.parameters())
    assert_loaded(decoder, arrays)
    assert_loaded(load_mask_encoder(npz), arrays)


def test_npz_reader_handles_float16_and_compression(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    half = {k: v.astype(np.float16) for k, v in arrays.items()}
    np.savez_compressed(tmp_path / "half.npz", **half)
    read = read_npz(tmp_path / "half.npz")
    assert read["decoder.4.weight"].dtype == torch.float16
    assert torch.equal(read["decoder.4.weight"], torch.from_numpy(half["decoder.4.weight"]))
    assert_loaded(load_mask_decoder(tmp_path / "half.npz"), {k: v.astype(np.float32) for k, v in half.items()})


def test_load_from_safetensors(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    decoder_only = {k: torch.from_numpy(arrays[k]) for k in DECODER_SHAPES}
    save_file(decoder_only, tmp_path / "dec.safetensors")
    assert_loaded(load_mask_decoder(tmp_path / "dec.safetensors"), arrays)
    with pytest.raises(CheckpointError, match=r"no encoder weights \('encoder.0.weight'"):
        load_mask_encoder(tmp_path / "dec.safetensors")


class _Trap:
    """Unpickling this would create `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_pickled_npz_is_refused_and_never_unpickled(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    marker = tmp_path / "unpickled"
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(marker)
    npz = write_npz(tmp_path / "evil.npz", arrays, payload=trap)
    with pytest.raises(CheckpointError, match=r"payload.npy holds Python objects.*refuses"):
        load_mask_decoder(npz)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Trap(marker)))  # the trap is armed: unpickling does create the file
    assert marker.exists()


def test_bad_checkpoints_name_the_problem(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    missing = dict(arrays)
    del missing["decoder.12.bias"]
    with pytest.raises(CheckpointError, match=r"missing 'decoder.12.bias'"):
        load_mask_decoder(write_npz(tmp_path / "missing.npz", missing))
    with pytest.raises(CheckpointError, match=r"unexpected 'extra.weight'"):
        load_mask_decoder(write_npz(tmp_path / "extra.npz", arrays, **{"extra.weight": np.zeros(2, np.float32)}))
    wrong = {**arrays, "decoder.6.weight": np.zeros((64, 128, 4, 4), np.float32)}
    with pytest.raises(CheckpointError, match=r"decoder.6.weight \(64, 128, 4, 4\) \(expected \(128, 64, 4, 4\)\)"):
        load_mask_decoder(write_npz(tmp_path / "wrong.npz", wrong))
    partial = {k: v for k, v in arrays.items() if k != "encoder.10.bias"}  # an encoder, but incomplete
    with pytest.raises(CheckpointError, match=r"missing 'encoder.10.bias'"):
        load_mask_decoder(write_npz(tmp_path / "partial.npz", partial))
    doubles = {k: v.astype(np.float64) for k, v in arrays.items()}
    with pytest.raises(CheckpointError, match=r"dtype '<f8'"):
        load_mask_decoder(write_npz(tmp_path / "f64.npz", doubles))


def test_corrupt_files_are_checkpoint_errors(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_mask_decoder(tmp_path / "junk.npz")
    good = write_npz(tmp_path / "good.npz", arrays)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "short.npz", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-4] if info.filename == "decoder.0.weight.npy" else data)
    with pytest.raises(CheckpointError, match=r"decoder.0.weight.npy has \d+ data bytes"):
        load_mask_decoder(tmp_path / "short.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        load_mask_decoder(tmp_path / "absent.npz")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="neither .npz nor .safetensors"):
        load_mask_decoder(tmp_path / "weights.bin")


def test_numpy_is_not_needed_at_run_time(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    npz = write_npz(tmp_path / "vae-oid.npz", arrays)
    script = f"""
import sys
sys.modules["numpy"] = None  # any `import numpy` now fails
from PIL import Image
from vlmo.segmentation import draw_segmentations, parse_segmentations, rle_to_mask
from vlmo.weights.vqvae import load_mask_decoder
decoder = load_mask_decoder({str(npz)!r})
(seg,) = parse_segmentations("<loc0100><loc0200><loc0600><loc0700>" + "<seg001>" * 16 + " cat", (64, 48), decoder)
assert (rle_to_mask(seg.to_dict()["mask"]) == seg.mask).all()
draw_segmentations(Image.new("RGB", (64, 48)), [seg])
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------------------
# Weights: download from the Space, convert once, reuse


@pytest.fixture
def space(tmp_path: Path, arrays: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    files = tmp_path / "space"
    files.mkdir()
    write_npz(files / VAE_FILENAME, arrays)
    with FakeHub() as hub:
        hub.add_repo(VAE_REPO, files)
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=hub.url)
        yield hub


def test_download_converts_once_then_reuses(space: FakeHub, tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    cache = tmp_path / "vlmo-cache"
    assert_loaded(load_mask_decoder(cache_dir=cache), arrays)
    assert space.seen(contains=f"/{VAE_REPO}/resolve/main/{VAE_FILENAME}")
    converted = cache / CONVERTED
    assert sorted(p.name for p in cache.iterdir()) == [CONVERTED]
    npz = next((tmp_path / "hf" / "hub").rglob(VAE_FILENAME))
    npz.unlink()  # the npz is not read again…
    space.stop()  # …and the hub is not asked
    n_requests = len(space.requests)
    mtime = converted.stat().st_mtime_ns
    assert_loaded(load_mask_decoder(cache_dir=cache), arrays)
    assert_loaded(load_mask_encoder(cache_dir=cache), arrays)
    assert len(space.requests) == n_requests and converted.stat().st_mtime_ns == mtime


def test_default_cache_is_vlmo_cache(space: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMO_CACHE", str(tmp_path / "env-cache"))
    assert mask_cache_dir() == tmp_path / "env-cache"
    load_mask_decoder()
    assert (tmp_path / "env-cache" / CONVERTED).is_file()


def test_offline_uses_the_cached_npz(space: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_mask_decoder(cache_dir=tmp_path / "a")
    space.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    load_mask_decoder(cache_dir=tmp_path / "b")  # converts again from the npz in the HF cache
    assert (tmp_path / "b" / CONVERTED).is_file()


def test_offline_and_not_cached(space: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match=r"vae-oid.npz from the Space big-vision/paligemma-hf.*HF_HUB_OFFLINE"):
        load_mask_decoder(cache_dir=tmp_path / "c")
    assert space.requests == []


def test_unreachable_and_missing(space: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub retries a refused connection 5 times with back-off (~23 s): skip the waiting.
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    space.repos.clear()
    with pytest.raises(ModelNotFoundError, match="was not found"):
        load_mask_decoder(cache_dir=tmp_path / "d")
    space.stop()
    with pytest.raises(DownloadError, match="could not reach") as caught:
        load_mask_decoder(cache_dir=tmp_path / "d")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "d" / CONVERTED).exists()


def test_corrupt_converted_file_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / CONVERTED).write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match=f"delete {tmp_path / CONVERTED}"):
        load_mask_decoder(cache_dir=tmp_path)


def test_a_checkpoint_with_its_own_mask_decoder_segments_with_it(
    tiny_checkpoint: Path, filled_mask_decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`VLMo.mask_decoder()` with no file given takes the checkpoint's `mask_decoder.safetensors` (the built-in
    demo model's codes are its own), never the vae-oid download; a file given still wins; a saved (fine-tuned) copy
    of the model carries its decoder along."""
    import shutil

    import vlmo.weights.vqvae as vqvae
    from vlmo import VLMo
    from vlmo.weights.files import MASK_DECODER_FILE
    from vlmo.weights.writer import save_checkpoint

    def no_download() -> Path:
        raise AssertionError("a checkpoint with its own mask decoder must not download vae-oid")

    monkeypatch.setattr(vqvae, "_download_vae", no_download)
    own = tmp_path / "own"
    shutil.copytree(tiny_checkpoint, own)
    shutil.copy(filled_mask_decoder, own / MASK_DECODER_FILE)
    vlm = VLMo.from_pretrained(own, device="cpu", dtype="float32")
    codes = torch.zeros(1, 16, dtype=torch.long)
    assert (vlm.mask_decoder()(codes) == 5.0).all()  # the filled decoder: +5 everywhere
    other = VQVAEDecoder()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    assert torch.equal(vlm.mask_decoder(tmp_path / "other.safetensors")(codes), other(codes).detach())
    saved = save_checkpoint(vlm.model, tmp_path / "saved", own)
    assert (saved / MASK_DECODER_FILE).read_bytes() == (own / MASK_DECODER_FILE).read_bytes()
