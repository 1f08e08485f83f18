"""A preallocated key/value cache: one buffer pair per layer, written in place, never grown with `torch.cat`."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values for `num_layers` layers: `dt[L, B, Hkv, S, hd]` each, S = `max_len` slots.

    Slots are absolute sequence positions (left padding included). Keys are stored after RoPE, so a cached key never
    changes. `update` writes a block of T new slots and returns the views of slots [0, start + T) that attention
    needs, without copying the rest.
    """

    k: torch.Tensor  # buffers, registered in __init__
    v: torch.Tensor

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: dt[B, Hkv, T, hd] for slots [start, start+T) → all keys/values so far, dt[B, Hkv, start+T, hd]."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
