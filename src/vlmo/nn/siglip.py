"""SigLIP vision encoder as PaliGemma uses it: patch embedding, learned positions, pre-LN blocks, final LayerNorm.

Axes: B images, N = (image_size // patch_size)² patches, C vision width, I MLP width.
No class token and no pooling head: PaliGemma consumes every patch token (model-notes §4.1). Any image and patch
size work; a valid convolution drops the remainder when the size is not a multiple of the patch (e.g. 70 px / 14 →
5×5 grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmo.config import VisionConfig
from vlmo.nn.embedding import embedding


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: dt[B, N, C] → dt[B, N, C]; every patch attends to every patch (no mask)."""
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = cfg.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipVision(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = embedding(cfg.num_patches, cfg.hidden_size)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values: float[B, 3, H, W] in [-1, 1] (cast to the weight dtype here).

        Returns (features dt[B, N, C] after the final LayerNorm, hidden states). With `output_hidden_states`, the
        list holds the embeddings and each block's output (num_layers + 1 entries, as transformers returns them) —
        the Dense Connector projectors read intermediate layers from it; otherwise it is empty.
        """
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.weight  # row-major patches, index = row·g + col
        hidden = [x] if output_hidden_states else []
        for block in self.layers:
            x = block(x)
            if output_hidden_states:
                hidden.append(x)
        return self.norm(x), hidden
