"""Device and dtype resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmo import VLMo
from vlmo.errors import DeviceError, InputError
from vlmo.weights.devices import resolve_device, resolve_dtype


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_unavailable_or_unknown_devices_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, words in [("cuda", "not available"), ("cuda:1", "not available"), ("mps", "not available")]:
        with pytest.raises(DeviceError, match=words):
            resolve_device(name)
    for name in ("tpu", "gpu", "", "cpu:x"):
        with pytest.raises(DeviceError, match="device"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_dtype_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("mps")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16


def test_explicit_dtypes_and_errors() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) is torch.float16
    with pytest.raises(InputError, match="dtype"):
        resolve_dtype("float64", cpu)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="dtype"):
        resolve_dtype(torch.int8, cpu)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_run_and_stay_close_to_float32(tiny_checkpoint: Path, dtype: str) -> None:
    ref = VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    half = VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype=dtype)
    assert half.dtype == getattr(torch, dtype)
    batch = ref.text.encode(["caption en"])
    pixels = torch.rand(1, 3, ref.model.cfg.vision.image_size, ref.model.cfg.vision.image_size) * 2 - 1
    with torch.no_grad():
        want = ref.model(batch.input_ids, pixels, batch.attention_mask)[0, -1]
        got = half.model(batch.input_ids, pixels, batch.attention_mask)[0, -1]
    assert got.dtype == getattr(torch, dtype)
    assert torch.corrcoef(torch.stack([want, got.float()]))[0, 1] > 0.99
    assert isinstance(half.generate(Image.new("RGB", (40, 30), (10, 200, 30)), "caption en", max_new_tokens=4), str)
