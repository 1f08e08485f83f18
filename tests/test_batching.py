"""Batching never changes an answer: a row's result is the same alone or in a batch, in every CPU mode.

int8 (`Int8Linear`, `Int8Head`) is row-independent by construction, so its layers are checked bit for bit; the
bfloat16 mode's float16-held layers are checked bit for bit on this CPU's kernels; every mode's greedy answers are
checked end to end (a batch of 4 images and prompts of different lengths against each pair alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import gaussian_noise
from vlmo import VLMo
from vlmo.nn.quant import REDUCE_RANGE, Float16Linear, Int8Head, Int8Linear, _pack, _quantize_rows, normalize_rows

needs_fbgemm = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="int8 mode needs fbgemm (x86)"
)


def _rows_with_a_loud_one(k: int) -> torch.Tensor:
    """Rows whose ranges differ a lot: a 100× louder row, a one-signed row, a zero row, a constant row."""
    torch.manual_seed(1)
    x = torch.randn(6, k)
    x[1] *= 100.0
    x[2] = x[2].abs() + 0.5
    x[3] = 0.0
    x[4] = -0.25
    return x


def test_every_row_is_normalized_to_exactly_zero_to_one() -> None:
    """What makes int8 rows independent: every call's input spans exactly [0, 1], so fbgemm's range never moves."""
    torch.manual_seed(0)
    scales = torch.logspace(-40, 30, 1000)[:, None]  # denormal ranges too
    x = torch.cat([torch.randn(1000, 37) * scales, torch.randn(1000, 37) + torch.randn(1000, 1) * 1e3])
    rows, lo, span = normalize_rows(x)
    assert torch.equal(rows.amax(1), torch.ones(2000)) and torch.equal(rows.amin(1), torch.zeros(2000))
    back = lo + span * rows
    assert torch.all((back - x).abs() <= 1e-6 * (span + lo.abs()))  # float rounding, nothing more
    flat, lo, span = normalize_rows(torch.tensor([[0.0, 0.0], [3.0, 3.0], [-1e30, -1e30]]))
    assert torch.equal(flat, torch.zeros(3, 2)) and torch.equal(lo.flatten(), torch.tensor([0.0, 3.0, -1e30]))


@needs_fbgemm
def test_int8_linear_gives_each_row_the_same_bits_alone_and_batched() -> None:
    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    w, bias = torch.randn(40, 64) * 0.1, torch.randn(40)
    q, scale = _quantize_rows(w)
    layer = Int8Linear(q, scale, bias)
    x = _rows_with_a_loud_one(64)
    batched = layer(x)
    for i in range(len(x)):
        assert torch.equal(batched[i], layer(x[i : i + 1])[0]), i
        assert torch.equal(batched[i], layer(x[i])), i  # 1-D input too
    assert torch.equal(layer(x.view(2, 3, 64)), batched.view(2, 3, 40))
    assert torch.equal(batched[3], bias) and torch.allclose(batched[4], -0.25 * w.sum(1) + bias, atol=0.05)
    # What the old layer did (fbgemm's one range per call) fails exactly this: the loud row coarsens row 0.
    old = _pack(q, scale, bias)
    alone = torch.ops.quantized.linear_dynamic(x[:1].contiguous(), old, REDUCE_RANGE)
    assert not torch.equal(torch.ops.quantized.linear_dynamic(x, old, REDUCE_RANGE)[0], alone[0])


@needs_fbgemm
def test_int8_head_gives_each_row_the_same_bits_alone_and_batched() -> None:
    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    q, scale = _quantize_rows(torch.randn(100, 64))
    head = Int8Head(q, scale, block=32)  # 4 blocks, the last one short
    x = _rows_with_a_loud_one(64)
    batched = head(x)
    assert batched.shape == (6, 100)
    for i in range(len(x)):
        assert torch.equal(batched[i], head(x[i : i + 1])[0]), i
    ref = x @ (q.float() * scale[:, None]).T
    assert ((batched[0] - ref[0]).norm() / ref[0].norm()).item() < 0.03


def test_float16_linear_decode_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    layer = Float16Linear(torch.randn(48, 64) * 0.05, torch.randn(48)).to(torch.bfloat16)
    x = _rows_with_a_loud_one(64).bfloat16()
    decode = layer(x[:, None, :])  # six sequences, one position each
    for i in range(len(x)):
        assert torch.equal(decode[i], layer(x[i : i + 1, None, :])[0]), i
        assert torch.equal(decode[i, 0], layer(x[i : i + 1])[0]), i  # 2-D: one position per row (the head)
    prefill = layer(x.view(2, 3, 64))  # several positions: the bfloat16 GEMM, one path for any batch size
    assert torch.equal(prefill[1], layer(x[3:].view(1, 3, 64))[0])
    # a row whose float16 product overflows is recomputed alone; the other rows keep their float16 result
    huge = Float16Linear(torch.full((4, 64), 60.0), None).to(torch.bfloat16)
    rows = torch.stack([torch.full((64,), 30.0), torch.full((64,), 0.01)]).bfloat16()[:, None, :]
    y = huge(rows)
    assert torch.allclose(y[0].float(), torch.full((1, 4), 115200.0), rtol=1e-2)
    assert torch.equal(y[1], huge(rows[1:])[0])


IMAGES = (
    lambda: Image.new("RGB", (96, 64), (255, 255, 250)),  # very bright
    lambda: gaussian_noise(80, 60, 25, seed=1).point(lambda v: v // 6).convert("RGB"),  # dark and noisy
    lambda: Image.new("RGB", (50, 90), (220, 30, 30)),
    lambda: gaussian_noise(70, 70, 120, seed=2),  # loud noise
)
PROMPTS = ("caption en", "answer en what is in the picture on the left side of the table?", "ocr", "detect cat")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"quantize": "int8"}, id="int8", marks=needs_fbgemm),
        pytest.param({"dtype": "bfloat16"}, id="bfloat16"),
        pytest.param({"dtype": "float32"}, id="float32"),
    ],
)
@pytest.mark.parametrize("name", ["gqa", "gemma2"])
def test_a_batch_answers_as_each_request_alone(
    tiny_checkpoints: dict[str, Path], name: str, options: dict[str, str]
) -> None:
    """Random tiny models (near-flat logits: the sensitive case), prompts of different lengths (left padding), and
    images whose activations span very different ranges. Each row alone is encoded alone too (cache cleared)."""
    vlm = VLMo.from_pretrained(tiny_checkpoints[name], device="cpu", **options)
    images = [make() for make in IMAGES]
    batched = vlm.generate(images, list(PROMPTS), max_new_tokens=16)
    alone = []
    for image, prompt in zip(images, PROMPTS, strict=True):
        vlm.image_cache.clear()
        alone.append(vlm.generate(image, prompt, max_new_tokens=16))
    assert batched == alone
    assert len(set(alone)) > 1  # the rows really differ (not one answer for everything)
