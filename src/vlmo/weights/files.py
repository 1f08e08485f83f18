"""The file names of a Hugging Face PaliGemma checkpoint directory, shared by the hub, the loader and the writer.

No imports, so `weights.hub` can use them without pulling in torch and the model.
"""

from __future__ import annotations

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"  # all weights in one file
INDEX_FILE = "model.safetensors.index.json"  # or: tensor name → shard file, for sharded weights
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
GENERATION_FILE = "generation_config.json"
# Used when present (downloaded, copied into saved checkpoints), never required.
OPTIONAL_FILES = (PREPROCESSOR_FILE, GENERATION_FILE)
