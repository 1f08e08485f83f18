"""Random-weight PaliGemma checkpoints at real shapes, in Hugging Face layout, for benchmarks.

Real weights are gated on the hub; speed and memory depend only on shapes and dtypes, so the benchmark writes its
own checkpoint once (sharded safetensors + index, `config.json`, `tokenizer.json`, `preprocessor_config.json`)
and both vlmo and transformers load that same directory. Tensors are drawn and written one shard at a time, so
writing the 3B checkpoints needs about one shard (≤ 2 GB) of memory.

Sizes: `tiny` (seconds), `paligemma-3b` (google/paligemma-3b-*-224 shapes, stored float32 as on the hub) and
`paligemma2-3b` (google/paligemma2-3b-*-224 shapes, stored bfloat16 as on the hub). The tokenizer is vlmo's small
test tokenizer (the real one is gated); the embedding keeps the real 257216 rows.

`dtype` stores another dtype than the hub's (bfloat16 halves what a float32 size writes and loads), and
`device="cuda"` draws the random tensors on the GPU (seconds instead of a minute; different numbers, same
distribution), for the GPU benchmark (benchmarks/gpu.sh).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 * 1024**3


def _vision(width: int, layers: int, heads: int, mlp: int, patch: int, image: int, proj: int) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "patch_size": patch,
        "image_size": image,
        "projection_dim": proj,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
    }


def config_for(size: str, image_token: int, stored: str | None = None) -> dict[str, Any]:
    """config.json (transformers layout) of a benchmark size; `stored` overrides the hub's stored dtype."""
    if size == "tiny":
        text = {"model_type": "gemma", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 4096}  # fmt: skip
        vision, dtype = _vision(192, 4, 3, 768, 16, 112, 256), "float32"
    elif size == "paligemma-3b":
        text = {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 257216}  # fmt: skip
        vision, dtype = _vision(1152, 27, 16, 4304, 14, 224, 2048), "float32"
    elif size == "paligemma2-3b":
        text = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 257216,
                "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0}  # fmt: skip
        vision, dtype = _vision(1152, 27, 16, 4304, 14, 224, 2304), "bfloat16"
    else:
        raise SystemExit(f"unknown size {size!r}; use tiny, paligemma-3b or paligemma2-3b")
    dtype = stored or dtype
    text |= {"hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "torch_dtype": dtype}
    return {
        "model_type": "paligemma",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "torch_dtype": dtype,
        "image_token_index": image_token,
        "projection_dim": text["hidden_size"],
        "hidden_size": text["hidden_size"],
        "vocab_size": text["vocab_size"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "text_config": text,
        "vision_config": vision,
    }


def write_checkpoint(size: str, out: Path, seed: int = 0, dtype: str | None = None, device: str = "cpu") -> Path:
    """Write (once) the checkpoint of `size` into `out`; a complete directory is reused as it is.

    `dtype`: "float32" or "bfloat16" instead of the size's hub dtype; `device`: where the tensors are drawn."""
    if (out / "done").is_file():
        return out
    from vlmo.config import PaliGemmaConfig
    from vlmo.demo.standins import build_tokenizer, preprocessor_config
    from vlmo.nn.paligemma import PaliGemma
    from vlmo.weights.keys import KeyMap

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = config_for(size, tok.token_to_id("<image>"), dtype)
    cfg = PaliGemmaConfig.from_hf(config)
    stored = getattr(torch, config["torch_dtype"])
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in PaliGemma(cfg).state_dict().items()}
    keymap = KeyMap(cfg.text.arch)
    g = torch.Generator(device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, shape in shapes.items():
        # Weights N(0, 0.02) like an initialised model; norms small offsets around Gemma's 1 + w and LayerNorm's 1.
        t = torch.randn(shape, generator=g, dtype=torch.float32, device=device).mul_(0.02)
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "post_norm.weight")):
            t = t if name.startswith("text.") else t.add_(1.0)
        t = t.to(stored).cpu()
        if used + t.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            used = 0
        shards[-1][keymap.to_hf(name)] = t
        used += t.nbytes
        if used >= SHARD_BYTES:
            shards.append({})
            used = 0
    shards = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()
    total = sum(torch.Size(s).numel() * stored.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    pre = preprocessor_config(cfg.vision.image_size, cfg.num_image_tokens)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "done").write_text("")
    return out
