"""Projectors: vision features → text-width "soft tokens".

PaliGemma's projector is one affine layer (big_vision's ViT `head`): no activation, no scaling, whatever the
config's unused `projector_hidden_act` says (spec §1.2). Other kinds (the Dense Connector family) are added to
`PROJECTORS` beside it; each takes the final features and, if it wants them, the vision tower's hidden states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmo.config import ProjectorConfig


class LinearProjector(nn.Module):
    uses_hidden_states = False

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.in_features, cfg.out_features)

    def forward(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """features: dt[B, N, C] → dt[B, N, D]."""
        return self.linear(features)


PROJECTORS: dict[str, Callable[[ProjectorConfig], nn.Module]] = {"linear": LinearProjector}


def build_projector(cfg: ProjectorConfig) -> nn.Module:
    return PROJECTORS[cfg.kind](cfg)
