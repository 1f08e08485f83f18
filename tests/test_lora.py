"""LoRA (`vlmo.nn.lora`) and PEFT adapter files (`vlmo.weights.adapters`), checked against PEFT and transformers.

Reference: PEFT on transformers' PaliGemmaForConditionalGeneration with eager attention in fp32; logits agree to
1e-4 over every real position of a padded prompt + suffix batch (so prefix-LM masks and padding are exercised).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fake_hub import FakeHub, isolate_hf
from vlmo.errors import CheckpointError, ConfigError, InputError
from vlmo.nn.lora import (
    LoRAConfig,
    LoRALinear,
    lora_modules,
    lora_parameters,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from vlmo.nn.paligemma import PaliGemma
from vlmo.processing import TextProcessor
from vlmo.weights.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, load_adapter, save_adapter
from vlmo.weights.hub import OfflineError
from vlmo.weights.loader import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATOL = 1e-4
ALL_VISION = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
Inputs = dict[str, torch.Tensor]


# -- helpers -------------------------------------------------------------------------------------------------------


def hf_model(path: Path) -> Any:
    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def make_inputs(path: Path, model: PaliGemma) -> Inputs:
    """Two right-padded rows of `<image>… prompt \\n suffix <eos>` with random pixels in [-1, 1]."""
    text = TextProcessor.from_file(path / "tokenizer.json", model.cfg.num_image_tokens)
    batch = text.encode(["caption en", "answer en what is the color of the car?"], ["a red car", "yes"], "right")
    size = model.cfg.vision.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "token_type_ids": batch.token_type_ids,
        "pixel_values": pixels,
    }


@torch.no_grad()
def ours(model: PaliGemma, x: Inputs) -> torch.Tensor:
    logits = model(x["input_ids"], x["pixel_values"], x["attention_mask"], x["token_type_ids"])
    return logits[x["attention_mask"].bool()]


@torch.no_grad()
def theirs(model: Any, x: Inputs) -> torch.Tensor:
    return model(**x).logits[x["attention_mask"].bool()]


def randomise(params: Iterable[tuple[str, nn.Parameter]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def randomise_vlmo(model: PaliGemma, seed: int = 0) -> None:
    randomise([(str(i), p) for i, p in enumerate(lora_parameters(model))], seed)


def randomise_peft(model: Any, seed: int = 0) -> None:
    """Every LoRA factor and every modules_to_save copy of a PeftModel."""
    randomise([(n, p) for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n], seed)


def peft_save(path: Path, out: Path, seed: int = 0, **config: Any) -> tuple[Any, Path]:
    """A PEFT LoRA of the checkpoint at `path` with random factors, saved to `out`; returns the PeftModel too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(path), peft.LoraConfig(**config)).eval()
        randomise_peft(model, seed)
        model.save_pretrained(out)
    return model, out


def peft_load(path: Path, adapter: Path) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(path), adapter).eval()
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing  # every layer PEFT wrapped got its tensors from our file
    return model


def vlmo_with_lora(path: Path, cfg: LoRAConfig, seed: int = 0) -> PaliGemma:
    model = load_model(path)
    apply_lora(model, cfg)
    randomise_vlmo(model, seed)
    return model


def rewrite(src: Path, dst: Path, config: dict[str, Any] | None = None, rename: Any = None, drop: str = "") -> Path:
    """A copy of an adapter directory with its config updated and tensor keys renamed or dropped."""
    dst.mkdir()
    cfg = json.loads((src / ADAPTER_CONFIG).read_text()) | (config or {})
    (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    tensors = load_file(src / ADAPTER_WEIGHTS)
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if not (drop and drop in k)}
    save_file(tensors, dst / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return dst


# -- the layer and the model ---------------------------------------------------------------------------------------


def test_fresh_adapter_is_bit_exact(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["gqa"]
    base = load_model(path)
    x = make_inputs(path, base)
    want = ours(base, x)
    cfg = LoRAConfig(targets=(*ALL_VISION, "gate_proj", "up_proj", "down_proj"), include_vision=True)
    names = apply_lora(base, cfg)
    assert len(names) == 2 * 6 + 2 * 7
    assert torch.equal(ours(base, x), want)


def test_merge_unmerge_and_remove(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["gqa"]
    model = vlmo_with_lora(path, LoRAConfig(r=4, alpha=8, include_vision=True))
    x = make_inputs(path, model)
    originals = {n: m.weight.detach().clone() for n, m in lora_modules(model).items()}
    unmerged = ours(model, x)
    assert (unmerged - ours(load_model(path), x)).abs().max() > 1e-2  # the adapter does change the outputs

    merge_lora(model)
    merge_lora(model)  # idempotent: the update is folded in once
    assert all(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(ours(model, x), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, m in lora_modules(model).items():
        torch.testing.assert_close(m.weight, originals[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(model, x), unmerged, atol=1e-5, rtol=0)

    deltas = {n: m.delta_weight() for n, m in lora_modules(model).items()}
    restored = remove_lora(model, merge=True)
    assert sorted(restored) == sorted(originals)
    for name in restored:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        torch.testing.assert_close(layer.weight, originals[name] + deltas[name], atol=1e-6, rtol=0)
    assert set(model.state_dict()) == set(load_model(path).state_dict())  # checkpoint names again
    torch.testing.assert_close(ours(model, x), unmerged, atol=1e-5, rtol=0)


def test_remove_without_merge_gives_the_base_model_back(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["odd"]
    base = load_model(path)
    model = vlmo_with_lora(path, LoRAConfig(include_vision=True))
    merge_lora(model)
    remove_lora(model, merge=False)
    x = make_inputs(path, base)
    assert not lora_modules(model)
    torch.testing.assert_close(ours(model, x), ours(base, x), atol=1e-5, rtol=0)


def test_base_parameter_names_are_unchanged(tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["gqa"])
    base_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig())
    keys = set(model.state_dict())
    assert {k for k in keys if ".lora_" not in k} == base_keys
    assert "text.layers.0.attn.q_proj.lora_A.weight" in keys


def test_only_lora_factors_train(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["gemma2"]
    model = load_model(path)
    apply_lora(model, LoRAConfig(r=2, include_vision=True, dropout=0.1))
    model.train()
    trainable = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert all(isinstance(lora_modules(model)[n], LoRALinear) for n in lora_modules(model))
    x = make_inputs(path, model)
    logits = model(x["input_ids"], x["pixel_values"], x["attention_mask"], x["token_type_ids"])
    logits.float().logsumexp(-1).mean().backward()
    graded = {id(p) for p in model.parameters() if p.grad is not None}
    assert graded == trainable
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora_modules(model).values())


def test_half_precision_model(tiny_checkpoints: dict[str, Path]) -> None:
    """Factors stay float32 (PEFT's default for half models); the update is computed in the input's dtype."""
    path = tiny_checkpoints["gqa"]
    half = load_model(path, dtype=torch.bfloat16)
    x = make_inputs(path, half)
    base = ours(half, x)
    apply_lora(half, LoRAConfig(include_vision=True))
    assert all(p.dtype == torch.float32 for p in lora_parameters(half))
    assert torch.equal(ours(half, x), base)

    randomise_vlmo(half)
    layer = half.text.layers[0].attn.q_proj
    assert isinstance(layer, LoRALinear)
    inp = torch.randn(3, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    want = inp.float() @ (layer.weight.float() + layer.delta_weight()).T
    tol = 0.02 * want.abs().max().item()  # bf16 keeps 8 significant bits
    out = layer(inp.requires_grad_(True))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=0)
    out.float().sum().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.dtype == torch.float32
    layer.merge()
    torch.testing.assert_close(layer(inp).float(), want, atol=tol, rtol=0)
    assert ours(half, x).dtype == torch.bfloat16


def test_config_validation(tiny_checkpoints: dict[str, Path]) -> None:
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()}, {"targets": "q_proj"}):
        with pytest.raises(InputError):
            LoRAConfig(**bad)
    model = load_model(tiny_checkpoints["gqa"])
    with pytest.raises(InputError, match="q_prj"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "q_prj")))
    with pytest.raises(InputError, match="include_vision"):
        apply_lora(model, LoRAConfig(targets=("out_proj",)))
    assert not lora_modules(model)  # nothing was wrapped by the failed calls
    apply_lora(model, LoRAConfig(targets=("out_proj",), include_vision=True))
    assert list(lora_modules(model)) == ["vision.layers.0.attn.o_proj", "vision.layers.1.attn.o_proj"]
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(InputError, match="modules_to_save"):
        apply_lora(load_model(tiny_checkpoints["gqa"]), LoRAConfig(modules_to_save=("projektor",)))
    with pytest.raises(InputError, match="both a LoRA target and in modules_to_save"):
        apply_lora(load_model(tiny_checkpoints["gqa"]), LoRAConfig(targets=("linear",), modules_to_save=("linear",)))


# -- PEFT interop --------------------------------------------------------------------------------------------------

VLMO_CASES = {
    "text": ("gqa", LoRAConfig(r=4, alpha=8)),
    "tied-head": ("gqa", LoRAConfig(r=4, alpha=8, targets=("v_proj",), modules_to_save=("lm_head",))),
    "vision": ("odd", LoRAConfig(r=3, alpha=5, targets=("q_proj", "o_proj", "fc1", "down_proj"), include_vision=True)),
    "gemma2-rslora": ("gemma2", LoRAConfig(r=4, alpha=6, use_rslora=True, modules_to_save=("multi_modal_projector",))),
}


@pytest.mark.parametrize("case", list(VLMO_CASES))
def test_vlmo_adapter_runs_in_peft(case: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    name, cfg = VLMO_CASES[case]
    path = tiny_checkpoints[name]
    model = vlmo_with_lora(path, cfg)
    factors = {id(p) for p in lora_parameters(model)}
    full = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in factors]
    assert {n for n, _ in full} == {
        "tied-head": {"text.lm_head.weight"},  # untied: the head trains, the input embedding stays
        "gemma2-rslora": {"projector.linear.weight", "projector.linear.bias"},
    }.get(case, set())
    randomise(full, seed=5)  # modules_to_save are trained in full next to the adapters
    save_adapter(model, tmp_path / "a", cfg, base_model=str(path))
    x = make_inputs(path, model)
    want = ours(model, x)
    torch.testing.assert_close(theirs(peft_load(path, tmp_path / "a"), x), want, atol=ATOL, rtol=0)
    merge_lora(model)
    torch.testing.assert_close(ours(model, x), want, atol=ATOL, rtol=0)


PEFT_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("gqa", {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "o_proj", "down_proj"]}),
    # out_proj/fc1 are vision-only names; q_proj hits both towers; the gqa head's LoRA tensors are skipped
    "vision": ("gqa", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "out_proj", "fc1", "gate_proj"]}),
    "gemma2-patterns": (
        "gemma2",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": r".*language_model.*\.(q_proj|k_proj|down_proj)",
            "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 3},
            "alpha_pattern": {"k_proj": 3},
            "modules_to_save": ["multi_modal_projector"],
        },
    ),
    "rslora-tied-head": (
        "odd",
        {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["up_proj"], "modules_to_save": ["lm_head"]},
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_runs_in_vlmo(case: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    name, config = PEFT_CASES[case]
    path = tiny_checkpoints[name]
    reference, adapter = peft_save(path, tmp_path / "peft", **config)
    model = load_model(path)
    cfg = load_adapter(model, adapter)
    x = make_inputs(path, model)
    want = theirs(reference, x)
    torch.testing.assert_close(ours(model, x), want, atol=ATOL, rtol=0)
    assert cfg.r == config["r"] and cfg.alpha == config["lora_alpha"]
    assert cfg.use_rslora == config.get("use_rslora", False)
    assert not any(p.requires_grad for p in model.parameters())

    # and back: what vlmo saves from it, PEFT runs the same (rank/alpha patterns and full copies included)
    save_adapter(model, tmp_path / "again", cfg)
    torch.testing.assert_close(theirs(peft_load(path, tmp_path / "again"), x), want, atol=ATOL, rtol=0)
    merge_lora(model)
    torch.testing.assert_close(ours(model, x), want, atol=ATOL, rtol=0)


def test_peft_target_names_map_to_vlmo_layers(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    _, adapter = peft_save(tiny_checkpoints["gqa"], tmp_path / "p", **PEFT_CASES["vision"][1])
    model = load_model(tiny_checkpoints["gqa"])
    cfg = load_adapter(model, adapter)
    assert cfg.targets == ("fc1", "gate_proj", "out_proj", "q_proj") and cfg.include_vision
    assert set(lora_modules(model)) == {
        f"{tower}.layers.{i}.{leaf}"
        for i in range(2)
        for tower, leaf in [("vision", "attn.q_proj"), ("vision", "attn.o_proj"), ("vision", "mlp.fc1")]
        + [("text", "attn.q_proj"), ("text", "mlp.gate_proj")]
    }
    # the same config applied by vlmo wraps the same layers
    fresh = load_model(tiny_checkpoints["gqa"])
    assert set(apply_lora(fresh, cfg)) == set(lora_modules(model))


def test_transformers4_key_layout_loads(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Adapters trained under transformers 4 name layers `language_model.model.…` and `vision_tower.vision_model.…`."""
    path = tiny_checkpoints["odd"]
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "fc2"]}
    config["modules_to_save"] = ["multi_modal_projector"]
    reference, adapter = peft_save(path, tmp_path / "v5", **config)
    renames = {
        "base_model.model.model.language_model.": "base_model.model.language_model.model.",
        "base_model.model.model.vision_tower.": "base_model.model.vision_tower.vision_model.",
        "base_model.model.model.multi_modal_projector.": "base_model.model.multi_modal_projector.",
    }

    def legacy(key: str) -> str:
        for old, new in renames.items():
            if key.startswith(old):
                return new + key[len(old) :]
        raise AssertionError(key)

    old = rewrite(adapter, tmp_path / "v4", rename=legacy)
    assert any(k.startswith("base_model.model.language_model.model.") for k in load_file(old / ADAPTER_WEIGHTS))
    model = load_model(path)
    load_adapter(model, old)
    x = make_inputs(path, model)
    torch.testing.assert_close(ours(model, x), theirs(reference, x), atol=ATOL, rtol=0)


FORMAT_CASES = {
    "text-regex": ("gqa", LoRAConfig(r=4, alpha=8)),
    "leaf-list": ("odd", LoRAConfig(r=2, alpha=2, dropout=0.05, targets=("q_proj", "fc1"), include_vision=True)),
    "head-regex": ("gqa", LoRAConfig(targets=("v_proj", "fc2"), include_vision=True)),
    "saved-modules": ("gemma2", LoRAConfig(targets=("gate_proj",), modules_to_save=("multi_modal_projector",))),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_saved_files_match_what_peft_writes(case: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    name, cfg = FORMAT_CASES[case]
    path = tiny_checkpoints[name]
    model = vlmo_with_lora(path, cfg)
    save_adapter(model, tmp_path / "ours", cfg, base_model=str(path))
    mine = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    peft_config = {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": mine["target_modules"],
        "modules_to_save": list(cfg.modules_to_save) or None,
    }
    peft_save(path, tmp_path / "peft", **peft_config)
    want = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    for config in (mine, want):
        if isinstance(config["target_modules"], list):
            config["target_modules"] = sorted(config["target_modules"])
    assert mine == want
    assert list(mine) == sorted(mine)  # sorted keys, as PEFT writes them
    got, expected = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in expected.items()}
    if case == "text-regex":
        assert isinstance(mine["target_modules"], str)  # q_proj alone would also wrap the vision tower's
    if case == "leaf-list":
        assert mine["target_modules"] == ["fc1", "q_proj"]


# -- errors --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_adapter(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tiny_checkpoints["gqa"]
    model = vlmo_with_lora(path, LoRAConfig(r=4, alpha=8))
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", LoRAConfig(r=4, alpha=8))


def test_pickle_only_adapter_is_refused(good_adapter: Path, tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    (d / ADAPTER_CONFIG).write_bytes((good_adapter / ADAPTER_CONFIG).read_bytes())
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_adapter(load_model(tiny_checkpoints["gqa"]), d)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"bias": "all"}, "bias"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
        ({"r": 0}, "r must be"),
    ],
)
def test_unsupported_configs_are_refused(
    config: dict[str, Any], match: str, good_adapter: Path, tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    model = load_model(tiny_checkpoints["gqa"])
    with pytest.raises(ConfigError, match=match):
        load_adapter(model, rewrite(good_adapter, tmp_path / "x", config=config))
    assert not lora_modules(model)


@pytest.mark.parametrize(
    ("rename", "drop", "match"),
    [
        (lambda k: k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"), "", "match no layer"),
        (lambda k: k.replace("self_attn.k_proj", "self_attn.kk_proj"), "", "match no layer"),
        (None, "layers.0.mlp.up_proj.lora_B", "up_proj.lora_B.weight"),
        (lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight"), "", "LoRA kind"),
    ],
)
def test_mismatched_tensors_are_refused(
    rename: Any, drop: str, match: str, good_adapter: Path, tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    model = load_model(tiny_checkpoints["gqa"])
    with pytest.raises(CheckpointError, match=match):
        load_adapter(model, rewrite(good_adapter, tmp_path / "x", rename=rename, drop=drop))
    assert not lora_modules(model)


def test_shape_mismatch_is_refused(good_adapter: Path, tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["gqa"])
    with pytest.raises(CheckpointError, match=r"shape \(4, \d+\) but .*\(2, \d+\)"):
        load_adapter(model, rewrite(good_adapter, tmp_path / "r", config={"r": 2}))
    other = load_model(tiny_checkpoints["odd"])  # 3 layers, one KV head: another base model
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter(other, good_adapter)


def test_save_needs_adapters(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="apply_lora"):
        save_adapter(load_model(tiny_checkpoints["gqa"]), tmp_path, LoRAConfig())
    model = vlmo_with_lora(tiny_checkpoints["gqa"], LoRAConfig(r=4))
    with pytest.raises(InputError, match="rank 8"):
        save_adapter(model, tmp_path, LoRAConfig(r=8))


# -- the hub -------------------------------------------------------------------------------------------------------


def test_adapter_from_the_hub_then_offline(
    good_adapter: Path, tiny_checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_checkpoints["gqa"]
    want = load_model(path)
    load_adapter(want, good_adapter)
    x = make_inputs(path, want)
    decoy = rewrite(good_adapter, tmp_path / "repo")
    (decoy / "adapter_model.bin").write_bytes(b"never fetched")
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-lora", decoy)
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=hub.url)
        model = load_model(path)
        load_adapter(model, "acme/tiny-lora")
        assert not hub.seen(contains=".bin")
        torch.testing.assert_close(ours(model, x), ours(want, x), atol=0, rtol=0)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    load_adapter(load_model(path), "acme/tiny-lora")  # from the cache, with the server gone
    with pytest.raises(OfflineError):
        load_adapter(load_model(path), "acme/other-lora")
