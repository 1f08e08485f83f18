"""`embedding`: an `nn.Embedding` that costs nothing to build on the meta device.

Loading builds the model on the meta device and then assigns the checkpoint's tensors, so no weight is ever
initialised for real. `nn.Embedding` still runs `normal_` on its meta weight, and on the meta device torch routes
that through code that imports its compiler (`torch._dynamo`): over a second of every `vlmo ask`, for a weight that
is replaced at once. Built on a real device, the weight is drawn exactly as `nn.Embedding` draws it.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An embedding table float[num_embeddings, dim]: N(0, 1) like `nn.Embedding`'s, left empty on the meta device."""
    weight = torch.empty(num_embeddings, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, dim, _weight=weight)
