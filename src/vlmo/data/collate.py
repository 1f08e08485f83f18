"""Examples → a training batch. The collator owns the prefix/suffix split, `<eos>`, padding and the label mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmo.data.examples import Example
from vlmo.processing import ImageProcessorConfig, TextProcessor, load_image, preprocess_images


@dataclass(frozen=True)
class TrainBatch:
    """input_ids, attention_mask, token_type_ids, labels: int64[B, T] (right-padded); pixel_values: float32[B, 3, H, W].

    labels hold the suffix ids and the final `<eos>` (what the model must produce) and -100 everywhere else, as
    transformers' PaliGemmaProcessor builds them; the loss shifts them by one position.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(*(t.to(device) for t in vars(self).values()))

    @property
    def num_targets(self) -> int:
        """How many tokens the loss is computed on."""
        return int((self.labels[:, 1:] != -100).sum())


class Collator:
    def __init__(self, text: TextProcessor, image_config: ImageProcessorConfig) -> None:
        self.text, self.image_config = text, image_config

    def __call__(self, examples: Sequence[Example]) -> TrainBatch:
        encoded = self.text.encode([e.prefix for e in examples], [e.suffix for e in examples], padding_side="right")
        assert encoded.labels is not None
        pixels = preprocess_images([load_image(e.image) for e in examples], self.image_config)
        return TrainBatch(encoded.input_ids, encoded.attention_mask, encoded.token_type_ids, encoded.labels, pixels)
