"""vlmo on a CUDA GPU against vlmo on the CPU: the same numbers, answers, batches, boxes and masks.

Marked `cuda` and skipped without a CUDA GPU; `benchmarks/gpu.sh` runs them (`pytest -m cuda`) on a GPU machine.
Float32 comparisons turn TF32 off (matmuls and cuDNN convolutions), so the GPU computes in true float32 and only
the summation order differs from the CPU's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import BLUE, RED, TAUGHT_EXAMPLES
from vlmo import VLMo
from vlmo.errors import OptionError
from vlmo.processing import preprocess_images

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu.sh)"),
]

ATOL = RTOL = 1e-4  # float32 without TF32: CPU and GPU differ by summation order only (≈ 1e-6 here)
PROMPTS = ["caption en", "answer en how many shapes are there in this picture?", "ocr", "answer en what is it?"]


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.new("RGB", size, rgb)


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint: Path) -> tuple[VLMo, VLMo]:
    """The random `gqa` tiny model in float32: on the CPU, on the GPU."""
    cpu = VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    gpu = VLMo.from_pretrained(tiny_checkpoint, device="cuda", dtype="float32")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32 and not gpu.quantized
    return cpu, gpu


@pytest.fixture(scope="module")
def taught_pair(taught_checkpoint: Path) -> tuple[VLMo, VLMo]:
    """The taught tiny model: float32 on the CPU; the GPU's defaults (dtype "auto": bfloat16 on an H100/H200)."""
    cpu = VLMo.from_pretrained(taught_checkpoint, device="cpu", dtype="float32")
    gpu = VLMo.from_pretrained(taught_checkpoint, device="cuda")
    assert gpu.device.type == "cuda" and not gpu.quantized
    return cpu, gpu


def test_float32_logits_and_greedy_text_match_the_cpu(tiny_pair: tuple[VLMo, VLMo]) -> None:
    cpu, gpu = tiny_pair
    images = [picture(0), picture(1, (50, 90))]
    batch = cpu.text.encode(PROMPTS[:2], ["a cat on a mat", "two"])
    pixels = preprocess_images(images, cpu.image_config)
    with torch.no_grad():
        want = cpu.model(batch.input_ids, pixels, batch.attention_mask, batch.token_type_ids)
        got = gpu.model(*(t.cuda() for t in (batch.input_ids, pixels, batch.attention_mask, batch.token_type_ids)))
    real = batch.attention_mask.bool()
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu()[real], want[real], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gpu.encode_images(images).cpu(), cpu.encode_images(images), atol=ATOL, rtol=RTOL)
    for image, prompt in zip(images, PROMPTS[:2], strict=True):
        assert gpu.generate(image, prompt, max_new_tokens=24) == cpu.generate(image, prompt, max_new_tokens=24)


def test_auto_dtype_is_16_bit_and_answers_the_taught_questions(taught_pair: tuple[VLMo, VLMo]) -> None:
    _, gpu = taught_pair
    assert gpu.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    for color, prompt, target in TAUGHT_EXAMPLES:
        assert gpu.generate(solid(color), prompt, max_new_tokens=48) == target, prompt


def test_float32_batch_of_four_equals_one_by_one(tiny_pair: tuple[VLMo, VLMo]) -> None:
    """Left padding (prompts of different lengths) on the GPU, random model: batched rows = single answers."""
    _, gpu = tiny_pair
    images = [picture(i) for i in range(4)]
    batched = gpu.generate(images, PROMPTS, max_new_tokens=24)
    single = [gpu.generate(im, p, max_new_tokens=24) for im, p in zip(images, PROMPTS, strict=True)]
    assert batched == single
    assert len(set(batched)) > 1


def test_16_bit_batch_of_four_equals_one_by_one(taught_pair: tuple[VLMo, VLMo]) -> None:
    _, gpu = taught_pair
    examples = [e for e in TAUGHT_EXAMPLES if not e[1].startswith(("detect", "segment"))][:4]
    images, prompts, targets = ([e[i] for e in examples] for i in range(3))
    batched = gpu.generate([solid(c) for c in images], prompts, max_new_tokens=16)
    single = [gpu.generate(solid(c), p, max_new_tokens=16) for c, p in zip(images, prompts, strict=True)]
    assert batched == single == targets


def test_detect_and_segment_give_the_cpu_boxes(taught_pair: tuple[VLMo, VLMo], filled_mask_decoder: Path) -> None:
    cpu, gpu = taught_pair
    image = solid(RED, (300, 200))
    want = cpu.detect(image, "cat ; dog")
    assert [d.label for d in want] == ["cat", "dog"]
    assert gpu.detect(image, "cat ; dog") == want
    (want_seg,) = cpu.segment(image, "cat", mask_decoder=filled_mask_decoder)
    (got_seg,) = gpu.segment(image, "cat", mask_decoder=filled_mask_decoder)
    assert (got_seg.label, got_seg.box, got_seg.bins, got_seg.seg_codes) == (
        want_seg.label,
        want_seg.box,
        want_seg.bins,
        want_seg.seg_codes,
    )
    assert got_seg.mask.device.type == "cpu" and torch.equal(got_seg.mask, want_seg.mask)
    batch = gpu.detect([image, solid(BLUE)], ["cat", "dog"])
    assert batch[0] == cpu.detect(image, ["cat", "dog"])


def test_int8_on_cuda_is_a_clear_option_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(OptionError, match=r"runs on the CPU only, not cuda") as info:
        VLMo.from_pretrained(tiny_checkpoint, device="cuda", quantize="int8")
    assert "\n" not in str(info.value)
