"""The file names of a Hugging Face PaliGemma checkpoint directory, shared by the hub, the loader and the writer.

No heavy imports (only `vlmo.errors`), so `weights.hub` can use them without pulling in torch and the model.
"""

from __future__ import annotations

from vlmo.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"  # all weights in one file
INDEX_FILE = "model.safetensors.index.json"  # or: tensor name → shard file, for sharded weights
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
GENERATION_FILE = "generation_config.json"
# The checkpoint's own `<seg>` decoder where its codes are not vae-oid's (the demo model's; `VLMo.mask_decoder`).
MASK_DECODER_FILE = "mask_decoder.safetensors"
# Used when present (downloaded, copied into saved checkpoints), never required.
OPTIONAL_FILES = (PREPROCESSOR_FILE, GENERATION_FILE, MASK_DECODER_FILE)


def check_shard_name(name: object, index: object = INDEX_FILE) -> str:
    """`name`, a shard file listed in a shard index (`index`, named in the error), if it is a plain relative
    `.safetensors` path inside the checkpoint directory; else a one-line `CheckpointError`.

    The loader and the hub both call this, so a local directory and a download refuse the same names. The *name*
    is checked, not where it leads: hub snapshot files are symlinks into the cache's `blobs/` folder, which is
    normal. Refused: non-strings, empty names, absolute paths (`/x`, `C:/x`), backslashes, and any `.`, `..` or
    empty part (`../x`, `a/../../x`, `a//x`), so a shard can never name a file outside the directory.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index} lists a shard named {name!r}; shard names are file names: download it again")
    parts = name.split("/")
    if (
        "\\" in name
        or ":" in name
        or "\0" in name
        or name.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise CheckpointError(
            f"{index} lists shard {name!r}, which is not a plain file name inside the checkpoint directory; "
            "refusing to read it"
        )
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{index} lists shard {name!r}, which is not a .safetensors file; refusing to read it")
    return name
