"""int8 mode (`quantize="int8"`, the CPU default), its loader, and the image-feature cache under every task."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import BLUE, RED, TAUGHT_EXAMPLES, gaussian_noise
from vlmo import VLMo
from vlmo.cli.commands import app as cli_app
from vlmo.errors import InputError
from vlmo.nn.quant import Float16Linear, Int8Embedding, Int8Linear, _quantize_rows, is_quantized, quantize_int8
from vlmo.processing import preprocess_images
from vlmo.weights.loader import load_model
from vlmo.weights.safetensors_io import open_tensors, release_pages

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="int8 mode needs fbgemm (x86)"
)


def test_rows_quantize_to_int8_within_half_a_step() -> None:
    w = torch.randn(300, 70) * torch.linspace(0.01, 3, 300)[:, None]  # rows of very different scales
    w[7] = 0  # an all-zero row must not divide by zero
    q, scale = _quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[7], torch.zeros(70, dtype=torch.int8))
    q16, s16 = _quantize_rows(w.bfloat16())  # any float dtype in, same code path (chunked, fp32 inside)
    peak = w.bfloat16().float().abs().amax(1)
    assert torch.equal(s16, torch.where(peak > 0, peak / 127, torch.ones(300)))
    assert (q16.int() - q.int()).abs().max() <= 1


def test_int8_linear_and_embedding_match_float_within_quantization_error() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384, bias=True)
    x = torch.randn(2, 9, 512)
    ref = linear(x)
    got = Int8Linear.from_float(linear)(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.02, err  # really int8 (not a float path), and close
    q, scale = _quantize_rows(linear.weight.detach())
    embed = Int8Embedding(q, scale)
    ids = torch.tensor([[0, 5, 383], [2, 2, 7]])
    assert torch.equal(embed(ids), q[ids].float() * scale[ids][..., None])


@pytest.mark.parametrize("name", ["gqa", "odd", "gemma2", "hires"])
def test_quantized_model_tracks_float32_logits(tiny_checkpoints: dict[str, Path], name: str) -> None:
    """Tiny random models are the hard case (64-wide layers, near-flat logits); 3B-shape figures are in
    docs/benchmarks.md. What must hold: the same structure, small relative error, mostly the same top-1."""
    path = tiny_checkpoints[name]
    ref = VLMo.from_pretrained(path, device="cpu", dtype="float32")
    q8 = VLMo.from_pretrained(path, device="cpu", quantize="int8")
    assert q8.quantized and not ref.quantized and q8.dtype == torch.float32
    images = [gaussian_noise(80, 60, 60, seed=0), Image.new("RGB", (50, 90), RED)]
    batch = ref.text.encode(["caption en", "answer en what is this thing?"], ["a cat on a mat", "a dog"])
    pixels = preprocess_images(images, ref.image_config)
    with torch.no_grad():
        a = ref.model(batch.input_ids, pixels, batch.attention_mask, batch.token_type_ids)
        b = q8.model(batch.input_ids, pixels, batch.attention_mask, batch.token_type_ids)
    valid = batch.attention_mask.bool()
    a, b = a[valid], b[valid]
    assert ((a - b).norm() / a.norm()).item() < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.7


def test_taught_model_gives_the_same_answers_in_int8(taught_checkpoint: Path) -> None:
    """A trained model (confident logits): every taught answer, boxes and mask codes included, is unchanged."""
    q8 = VLMo.from_pretrained(taught_checkpoint, device="cpu")  # the CPU default
    assert q8.quantized
    for color, prompt, target in TAUGHT_EXAMPLES:
        assert q8.generate(Image.new("RGB", (96, 64), color), prompt, max_new_tokens=48) == target


def test_quantizing_a_bfloat16_checkpoint_reads_it_as_stored(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """int8 loading starts from the stored tensors (no float32 copy of the model first): for a bf16 checkpoint the
    result equals quantizing the bf16 weights cast to float32, and whatever stays float ends up float32."""
    half = tmp_path / "bf16"
    shutil.copytree(tiny_checkpoint, half)
    tensors = {k: v.bfloat16() for k, v in load_file(str(half / "model.safetensors")).items()}
    save_file(tensors, str(half / "model.safetensors"), metadata={"format": "pt"})
    got = VLMo.from_pretrained(half, device="cpu", quantize="int8")
    as_float = load_model(half, dtype=torch.float32)
    ids = torch.tensor([[2, 40, 41, 42]])
    with torch.no_grad():
        lookups = as_float.text.embed(ids)
        manual = quantize_int8(as_float)
        assert {p.dtype for p in got.model.parameters()} == {torch.float32}
        assert torch.equal(got.model.text.embed(ids), lookups)  # the stored bf16 rows, read in place
        x = got.model.text.embed_text(ids)
        assert torch.equal(got.model.text.logits(x), manual.text.logits(x))
        layer = got.model.text.layers[0].mlp.up_proj
        assert torch.equal(layer(x), manual.text.layers[0].mlp.up_proj(x))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) is Linux behaviour")
def test_release_pages_returns_a_mapped_tensor_to_the_os(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.arange(16 * 2**20, dtype=torch.float32), "b": torch.ones(3)}, str(path))
    tensors = open_tensors(path)
    a = tensors["a"]

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    total = a.sum().item()  # touch all 64 MiB
    before = resident()
    release_pages(a)
    after = resident()
    assert before - after > 48 * 2**20, (before, after)
    assert a.sum().item() == total and torch.equal(tensors["b"], torch.ones(3))  # read back from the file


def test_quantize_options_and_errors(tiny_checkpoint: Path) -> None:
    assert VLMo.from_pretrained(tiny_checkpoint, device="cpu").quantized  # auto on a CPU
    assert not VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32").quantized  # an explicit dtype
    assert not VLMo.from_pretrained(tiny_checkpoint, device="cpu", quantize="none").quantized
    assert VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", quantize="int8").quantized
    with pytest.raises(InputError, match="computes in float32"):
        VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize="int8")
    with pytest.raises(InputError, match="unknown quantize mode 'int4'"):
        VLMo.from_pretrained(tiny_checkpoint, device="cpu", quantize="int4")
    model = load_model(tiny_checkpoint)
    assert not is_quantized(model) and is_quantized(quantize_int8(model))


def test_cli_quantize_option(taught_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    Image.new("RGB", (96, 64), RED).save(image)
    runner = CliRunner()
    for mode in ("int8", "none"):
        result = runner.invoke(cli_app, ["ask", str(image), "what color is it?", "-m", str(taught_checkpoint),
                                         "--quantize", mode, "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"][0]["text"] == "red"
    bad = runner.invoke(cli_app, ["ask", str(image), "q?", "-m", str(taught_checkpoint), "--quantize", "int8",
                                  "--dtype", "float16"])  # fmt: skip
    assert bad.exit_code == 2 and "drop --dtype float16" in bad.output
    info = runner.invoke(cli_app, ["info", "--json"])
    assert json.loads(info.stdout)["auto_quantize"] == "int8"


def test_every_task_reuses_an_encoded_image(taught_checkpoint: Path) -> None:
    """ask, caption, detect and segment about one picture: the vision tower runs once (the cache is by content)."""
    vlm = VLMo.from_pretrained(taught_checkpoint, device="cpu", dtype="float32")
    calls: list[int] = []
    vlm.model.vision.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    red = Image.new("RGB", (96, 64), RED)
    assert vlm.ask(red, "what color is it?") == "red"
    assert vlm.caption(red.copy()) == "a red square"
    assert [d.label for d in vlm.detect(red, "cat ; dog")] == ["cat", "dog"]
    assert calls == [1] and (vlm.image_cache.hits, vlm.image_cache.misses) == (2, 1)
    # a batch with a new image and a cached one encodes just the new one
    assert vlm.ask([Image.new("RGB", (96, 64), BLUE), red], "what color is it?") == ["blue", "red"]
    assert calls == [1, 1]
    # the cached features are what a fresh encoding gives
    fresh = vlm._encode_pils([red])
    assert torch.equal(vlm.encode_images([red]), fresh)
    vlm.image_cache.capacity = 0
    vlm.image_cache.clear()
    vlm.ask(red, "what color is it?"), vlm.ask(red, "what color is it?")
    assert calls[-2:] == [1, 1] and len(vlm.image_cache) == 0


def test_quantized_linear_handles_any_leading_shape() -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(16, 8, bias=False))
    for shape in [(16,), (3, 16), (2, 3, 16), (0, 16)]:
        x = torch.randn(shape)
        assert layer(x).shape == (*shape[:-1], 8)
    w = torch.randn(8, 16)
    q, s = _quantize_rows(w)
    x = torch.randn(4, 16)
    got, ref = Int8Linear(q, s, None)(x), F.linear(x, q.float() * s[:, None])
    assert ((got - ref).norm() / ref.norm()).item() < 0.03  # only the inputs' rounding differs


# -- bfloat16 on the CPU: float16-held linear weights -------------------------------------------------------------


def test_float16_linear_paths_and_overflow_guard() -> None:
    torch.manual_seed(0)
    w, bias = torch.randn(96, 64) * 0.05, torch.randn(96)
    layer = Float16Linear(w, bias).to(torch.bfloat16)
    assert layer.weight16.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16
    one, many = torch.randn(1, 1, 64).bfloat16(), torch.randn(2, 5, 64).bfloat16()
    # one row (decode): float16 product, then bf16; many rows: the bf16 GEMM on the weight cast to bf16
    expect_one = (F.linear(one.half(), w.half()).bfloat16() + bias.bfloat16()).float()
    assert torch.equal(layer(one).float(), expect_one)
    expect_many = F.linear(many, w.half().bfloat16()) + bias.bfloat16()
    assert torch.equal(layer(many), expect_many)
    ref = F.linear(one.float(), w, bias)
    assert torch.allclose(layer(one).float(), ref, rtol=2e-2, atol=2e-2)
    huge = Float16Linear(torch.full((4, 64), 60.0), None).to(torch.bfloat16)  # 64 · 60 · 30 > 65504
    y = huge(torch.full((1, 64), 30.0).bfloat16())
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.full((1, 4), 115200.0), rtol=1e-2)


def test_bfloat16_cpu_model_holds_float16_weights_and_answers_the_same(taught_checkpoint: Path) -> None:
    vlm = VLMo.from_pretrained(taught_checkpoint, device="cpu", dtype="bfloat16")
    assert vlm.dtype == torch.bfloat16 and not vlm.quantized
    assert isinstance(vlm.model.text.layers[0].mlp.up_proj, Float16Linear)
    assert vlm.model.text.lm_head.weight16 is vlm.model.text.embed.weight16  # tied: one table
    for color, prompt, target in TAUGHT_EXAMPLES:
        assert vlm.generate(Image.new("RGB", (96, 64), color), prompt, max_new_tokens=48) == target


def test_int8_lookups_read_the_mapped_table_unless_an_adapter_changed_it(tiny_checkpoint: Path) -> None:
    from vlmo.nn.quant import MappedEmbedding

    vlm = VLMo.from_pretrained(tiny_checkpoint, device="cpu", quantize="int8")
    assert isinstance(vlm.model.text.embed, MappedEmbedding)
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    table = next(v for k, v in stored.items() if k.endswith("embed_tokens.weight"))
    ids = torch.tensor([[2, 7, 100]])
    assert torch.equal(vlm.model.text.embed(ids), table[ids].float())  # exact rows, pages released or not
    manual = quantize_int8(load_model(tiny_checkpoint))  # the general path: an int8 copy of the table
    assert isinstance(manual.text.embed, Int8Embedding)


def test_packed_models_refuse_to_be_saved(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from vlmo.weights.writer import save_weights

    for options in ({"quantize": "int8"}, {"dtype": "bfloat16"}):
        vlm = VLMo.from_pretrained(tiny_checkpoint, device="cpu", **options)
        with pytest.raises(InputError, match="not a checkpoint"):
            save_weights(vlm.model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
