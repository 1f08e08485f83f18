"""config.json dicts of real PaliGemma checkpoints (transformers-4 layout, as on the hub), per model-notes §1.2.

Functions, not constants: each call returns a fresh dict that a test may edit.
"""

from __future__ import annotations

from typing import Any


def pg1_224() -> dict[str, Any]:
    """`google/paligemma-3b-pt-224` (hub copy): float32 Gemma-2B text, SigLIP So400m/14 vision."""
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "hidden_size": 2048,
        "ignore_index": -100,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "projection_dim": 2048,
        "vocab_size": 257216,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.0.dev0",
        "text_config": {
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "model_type": "gemma",
            "num_attention_heads": 8,
            "num_hidden_layers": 18,
            "num_image_tokens": 256,
            "num_key_value_heads": 1,
            "torch_dtype": "float32",
            "vocab_size": 257216,
        },
        "vision_config": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "num_image_tokens": 256,
            "patch_size": 14,
            "projection_dim": 2048,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    }


def pg1_448() -> dict[str, Any]:
    d = pg1_224()
    d["vision_config"]["image_size"] = 448
    d["vision_config"]["num_image_tokens"] = 1024
    d["text_config"]["num_image_tokens"] = 1024
    return d


def pg2_3b_224() -> dict[str, Any]:
    """`google/paligemma2-3b-pt-224` (hub copy): bfloat16 Gemma2-2B text; no top-level bos/eos/pad."""
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "_vocab_size": 257152,
        "hidden_size": 2048,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "num_hidden_layers": 26,
        "projection_dim": 2304,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.47.0.dev0",
        "text_config": {
            "model_type": "gemma2",
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_image_tokens": 256,
            "num_key_value_heads": 4,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "eos_token_id": [1, 107],
            "cache_implementation": "hybrid",
            "vocab_size": 257216,
            "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "num_image_tokens": 256,
            "patch_size": 14,
            "projection_dim": 2304,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    }


HUB_CONFIGS = {"pg1-224": pg1_224, "pg1-448": pg1_448, "pg2-3b-224": pg2_3b_224}
