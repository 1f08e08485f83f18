"""Write a model back as a Hugging Face-layout checkpoint (the legacy tensor names every transformers loads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from vlmo.config import projector_to_hf
from vlmo.errors import InputError
from vlmo.fileio.atomic import atomic_path, write_output
from vlmo.fileio.jsonfile import read_json
from vlmo.nn.paligemma import PaliGemma
from vlmo.weights.files import CONFIG_FILE, OPTIONAL_FILES, SINGLE_FILE, TOKENIZER_FILE
from vlmo.weights.keys import KeyMap
from vlmo.weights.loader import NOT_A_CHECKPOINT


def save_weights(model: PaliGemma, out_dir: str | Path) -> Path:
    """Save every parameter of `model` to `out_dir/model.safetensors` under its checkpoint (legacy) name.

    The tied head is not written, as transformers does not write it. `config.json` and `tokenizer.json` are the
    caller's to copy or write (`save_checkpoint` does both).
    """
    from vlmo.nn.quant import holds_packed_weights

    if holds_packed_weights(model):
        raise InputError(
            "this model holds int8 or float16-packed weights, which are not a checkpoint; load it with "
            'dtype="float32" (or quantize="none") to save it'
        )
    if any(".lora_" in name for name in model.state_dict()):
        raise InputError("the model has LoRA layers; merge them first with vlmo.nn.lora.remove_lora(model, merge=True)")
    keymap = KeyMap(model.cfg.text.arch)
    tensors = {keymap.to_hf(name): t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    path = Path(out_dir) / SINGLE_FILE
    with atomic_path(path, make_parents=True) as tmp:  # a failed write leaves the old file, not a truncated one
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path


def save_checkpoint(model: PaliGemma, out_dir: str | Path, source: str | Path) -> Path:
    """A complete checkpoint directory: the weights, and `source`'s config, tokenizer and preprocessor files.

    config.json is `source`'s, with the `vlmo_projector` entry set for a Dense Connector projector (transformers
    ignores the key and would load such a checkpoint as plain PaliGemma, without the branch) or removed otherwise.
    """
    out, source = Path(out_dir), Path(source)
    out.mkdir(parents=True, exist_ok=True)
    config = read_json(source / CONFIG_FILE, missing=NOT_A_CHECKPOINT)
    config.pop("vlmo_projector", None)
    extra = projector_to_hf(model.cfg.projector)
    if extra is not None:
        config["vlmo_projector"] = extra
    write_output(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    for name in (TOKENIZER_FILE, *OPTIONAL_FILES):
        if (source / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copy(source / name, tmp)
    save_weights(model, out)
    return out
