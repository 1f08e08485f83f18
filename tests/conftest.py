"""Shared fixtures: tiny random PaliGemma checkpoints written by transformers' own `save_pretrained`.

Tests never download anything. A checkpoint is built once per session per config and reused (read-only), and so
is a model that several test files ask for in the same way (`shapes_int8`, `shapes_float32`, `tiny_float32`): lent,
never to be changed (a test that trains, merges or swaps parts loads its own).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fake_hub import isolate_hf
from vlmo.demo.standins import build_tokenizer, preprocessor_config

_SESSION_CACHE = tempfile.mkdtemp(prefix="vlmo-test-cache-")
# The runtime folder of resident models (XDG_RUNTIME_DIR): private to the session, short enough for a Unix socket.
SESSION_RUNTIME = tempfile.mkdtemp(prefix="vr-", dir="/tmp" if os.path.isdir("/tmp") else None)
RESIDENT_MODULE = "vlmo.cli.remote.process"


def pytest_configure(config: pytest.Config) -> None:
    """A private prepared-weights cache for the whole session, set before any fixture runs: module- and
    session-scoped fixtures load models before the per-test isolation below applies, and no test may write into
    the user's cache."""
    os.environ["VLMO_CACHE"] = _SESSION_CACHE
    os.environ["XDG_RUNTIME_DIR"] = SESSION_RUNTIME
    # One intra-op thread, here and (through the variable) in every process a test starts, unless the caller chose:
    # the test models are tiny, so a second thread gains nothing, while two threads per process on a busy 2-core
    # machine wait on each other (test_tasks.py with test_engine.py, other work running: 113 s with 2, 11 s with 1).
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
    shutil.rmtree(SESSION_RUNTIME, ignore_errors=True)


def session_residents() -> list[str]:
    """Resident model processes that serve from this session's runtime folders (a CLI run in a subprocess starts
    them as grandchildren, which `_living_children` does not see), as "pid: command line"."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if RESIDENT_MODULE in command and SESSION_RUNTIME in command:
            found.append(f"{cmdline.parent.name}: {command.strip()[:200]}")
    return found


def _living_children() -> list[str]:
    """This process's children that are still running (not zombies), as "pid: command line"."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(parent) == os.getpid() and state != "Z":
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{stat.parent.name}: {command.strip()}")
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
    return found


@pytest.hookimpl(trylast=True)  # after pytest's own finish, which tears the session's fixtures down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a Ray cluster or a process of its own (a server, a worker) running."""
    left = []
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        left.append("a Ray cluster (ray.init without ray.shutdown)")
    if Path("/proc/self/stat").exists():
        left += _living_children()
        left += [f"a resident model ({r})" for r in session_residents() if r not in left]
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")  # after the progress line, which has no end of line yet
            reporter.write_line("still running after the tests: " + "; ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _isolate_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test away from the user's Hugging Face cache and token (a private cache in tmp_path/"hf"), from
    the user's prepared-weights cache (VLMO_CACHE: a private one in tmp_path/"vlmo-cache"), and from the caller's
    other VLMO_* settings."""
    isolate_hf(monkeypatch, tmp_path / "hf")
    for name in ("VLMO_MODEL", "VLMO_DEBUG", "VLMO_SERVER", "VLMO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLMO_CACHE", str(tmp_path / "vlmo-cache"))
    # Commands load in-process unless a test is about the resident model (tests/test_resident.py sets its own).
    monkeypatch.setenv("VLMO_KEEP_ALIVE", "0")


@dataclass(frozen=True)
class TinySpec:
    """A small PaliGemma config. Defaults: Gemma 1 with more query heads than KV heads, 56 px images, 4×4 patches."""

    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 48
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    text_mlp: int = 96
    arch: str = "gemma"
    vision_use_head: bool = False  # real checkpoints say false; SigLIP's class default is true
    text_extra: dict[str, Any] = field(default_factory=dict)


def hf_config_dict(spec: TinySpec, vocab_size: int, image_token_id: int) -> dict[str, Any]:
    return {
        "model_type": "paligemma",
        "image_token_index": image_token_id,
        "projection_dim": spec.text_hidden,
        "vocab_size": vocab_size,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_mlp,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "projection_dim": spec.text_hidden,
            "vision_use_head": spec.vision_use_head,
        },
        "text_config": {
            "model_type": spec.arch,
            "vocab_size": vocab_size,
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_mlp,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.head_dim,
            **spec.text_extra,
        },
    }


def write_tiny_checkpoint(path: Path, spec: TinySpec, seed: int = 0) -> Path:
    """Random PaliGemma via transformers (norm weights random too, so `1 + w` matters) + tokenizer + processor cfg."""
    transformers = pytest.importorskip("transformers")
    tok = build_tokenizer()
    n_tok = tok.get_vocab_size()
    vocab = (n_tok + 63) // 64 * 64  # padded like the real 257216-row table; pad rows stay random
    cfg = transformers.PaliGemmaConfig(**hf_config_dict(spec, vocab, tok.token_to_id("<image>")))
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Scales chosen so that greedy decoding wanders through the vocabulary instead of repeating one token.
            if "norm" in name and name.endswith("weight"):
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "embed_tokens" in name:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    grid = spec.image_size // spec.patch_size
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(spec.image_size, grid * grid)))
    return path


_SPECS = {
    "gqa": TinySpec(vision_use_head=True),
    # image size ≠ 224 with an odd patch grid (70 / 14 = 5×5) and multi-query attention
    "odd": TinySpec(image_size=70, text_heads=4, text_kv_heads=1, vision_heads=2, text_layers=3),
    # PaliGemma 2: Gemma 2 decoder with a sliding window shorter than the prompt and soft-capping that bites
    "gemma2": TinySpec(
        arch="gemma2",
        text_layers=3,
        text_extra={
            "sliding_window": 6,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    # "448-style": a larger image for the same patch size, so 4× the image tokens (8×8 = 64)
    "hires": TinySpec(image_size=112, arch="gemma2", text_extra={"sliding_window": 32}),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_tiny_checkpoint(root / name, spec, seed=i) for i, (name, spec) in enumerate(_SPECS.items())}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["gqa"]


# -- models lent to several test files ----------------------------------------------------------------------------
# Loaded once per session (each file used to load its own). The image-feature cache is emptied at every module's
# start, so a module sees a cache as fresh as a model of its own; the weights are checked at the end of the session.

_LENT: list[Any] = []


def _fingerprint(vlm: Any) -> tuple[Any, ...]:
    state = vlm.model.state_dict()
    sums = tuple((k, v.dtype, tuple(v.shape), float(v.double().sum())) for k, v in state.items())
    return vlm.model.cfg, vlm.model.training, sums


def _lend(vlm: Any) -> Iterator[Any]:
    before = _fingerprint(vlm)
    _LENT.append(vlm)
    yield vlm
    _LENT.remove(vlm)
    assert _fingerprint(vlm) == before, "a test changed a shared model: give that test a model of its own"


@pytest.fixture(scope="module", autouse=True)
def _fresh_image_caches() -> None:
    for vlm in _LENT:
        vlm.image_cache.clear()


@pytest.fixture(scope="session")
def shapes_int8() -> Iterator[Any]:
    """The built-in model `vlmo/shapes` in vlmo's CPU default mode (int8), as `vlmo serve` runs it."""
    from vlmo import VLMo

    yield from _lend(VLMo.from_pretrained("vlmo/shapes", device="cpu"))


@pytest.fixture(scope="session")
def shapes_float32() -> Iterator[Any]:
    """`vlmo/shapes` with `quantize="none"` (float32), as the batch tests run it (`--quantize none`)."""
    from vlmo import VLMo

    yield from _lend(VLMo.from_pretrained("vlmo/shapes", quantize="none"))


@pytest.fixture(scope="session")
def tiny_float32(tiny_checkpoints: dict[str, Path]) -> Iterator[Any]:
    """The `gqa` tiny checkpoint in float32 on the CPU."""
    from vlmo import VLMo

    yield from _lend(VLMo.from_pretrained(tiny_checkpoints["gqa"], device="cpu", dtype="float32"))


def gaussian_noise(width: int, height: int, sigma: float, seed: int) -> Any:
    """Grey Gaussian noise around 128 as an RGB image, the same on every run. (PIL's `Image.effect_noise` draws from
    the C library's shared generator, which other code in the process moves: a failure on it could not be replayed.)"""
    from PIL import Image

    values = torch.randn(height, width, generator=torch.Generator().manual_seed(seed)) * sigma + 128
    return Image.fromarray(values.round().clamp(0, 255).to(torch.uint8).numpy()).convert("RGB")


# What the "taught" model answers: a tiny checkpoint fitted for a second to these examples, so task and CLI tests
# check real answers (boxes, colours) coming out of the whole pipeline instead of random tokens.
TAUGHT_DETECTION = "<loc0100><loc0200><loc0600><loc0700> cat ; <loc0300><loc0050><loc0900><loc0400> dog"
RED, BLUE = (220, 30, 30), (30, 30, 220)
TAUGHT_SEGMENT = "<loc0100><loc0200><loc0600><loc0700>" + "".join(f"<seg{c:03d}>" for c in range(16)) + " cat"
TAUGHT_EXAMPLES = (
    (RED, "answer en what color is it?", "red"),
    (BLUE, "answer en what color is it?", "blue"),
    (RED, "detect cat ; dog", TAUGHT_DETECTION),
    (RED, "segment cat", TAUGHT_SEGMENT),
    (RED, "caption en", "a red square"),
    (RED, "ocr", "STOP"),
)


@pytest.fixture(scope="session")
def taught_checkpoint(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `gqa` tiny checkpoint trained to answer TAUGHT_EXAMPLES (images: solid 96×64 colours), saved by vlmo."""
    import shutil

    from PIL import Image

    from vlmo import VLMo
    from vlmo.processing import preprocess_images
    from vlmo.weights.writer import save_weights

    src = tiny_checkpoints["gqa"]
    vlm = VLMo.from_pretrained(src, device="cpu", dtype="float32")
    model = vlm.model.requires_grad_(True).train()
    batch = vlm.text.encode([e[1] for e in TAUGHT_EXAMPLES], [e[2] for e in TAUGHT_EXAMPLES], padding_side="right")
    pixels = preprocess_images([Image.new("RGB", (96, 64), e[0]) for e in TAUGHT_EXAMPLES], vlm.image_config)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        logits = model(batch.input_ids, pixels, batch.attention_mask, batch.token_type_ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.005:
            break
    out = tmp_path_factory.mktemp("taught")
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        shutil.copy(src / name, out / name)
    save_weights(model, out)
    return out


@pytest.fixture(scope="session")
def filled_mask_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vae-oid decoder file whose every 64×64 logit is +5 (zero weights, last bias 5): each mask fills its box."""
    from safetensors.torch import save_file

    from vlmo.nn.vqvae import VQVAEDecoder

    decoder = VQVAEDecoder()
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.state_dict()["decoder.12.bias"].fill_(5.0)
    path = tmp_path_factory.mktemp("vae") / "vae-oid.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    return path
