"""Write a model's weights back as a Hugging Face-layout safetensors file (the legacy names every version loads)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from vlmo.nn.paligemma import PaliGemma
from vlmo.weights.keys import KeyMap
from vlmo.weights.loader import SINGLE_FILE


def save_weights(model: PaliGemma, out_dir: str | Path) -> Path:
    """Save every parameter of `model` to `out_dir/model.safetensors` under its checkpoint (legacy) name.

    The tied head is not written, as transformers does not write it. `config.json` and `tokenizer.json` are the
    caller's to copy or write.
    """
    keymap = KeyMap(model.cfg.text.arch)
    tensors = {keymap.to_hf(name): t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    path = Path(out_dir) / SINGLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
