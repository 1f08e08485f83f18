"""Gemma and Gemma 2 decoders (the text half of PaliGemma 1 and 2), written against a preallocated KV cache.

Axes: B batch, T new tokens in this call, S cache slots (max sequence length), D model width, Hq/Hkv query/key-value
heads, hd head dim, I MLP width, V vocabulary rows.

Gemma details that change the numbers (model-notes §4.3, §5, §10):
- RMSNorm computes in fp32 and multiplies by (1 + w), stored weights being offsets around 0; one downcast at the end.
- MLP is GeGLU with tanh-approximated GELU: down(gelu_tanh(gate(x)) * up(x)); no biases anywhere.
- RoPE over the full head dim, rotate-half layout, angles in fp32, cos/sin cast to the activation dtype.
- Gemma 2 adds a norm after attention and after the MLP, a pre-MLP norm, attention-logit soft-capping (before the
  mask), query scale query_pre_attn_scalar^-0.5, and a sliding window on the layers `layer_types` marks.
- The output head is the embedding matrix (tied) unless a checkpoint carries a different `lm_head` (model-notes §1.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmo.config import TextConfig
from vlmo.nn.embedding import embedding
from vlmo.nn.kv_cache import KVCache


class RMSNorm(nn.Module):
    """Gemma RMSNorm: `x * rsqrt(mean(x²) + eps) * (1 + w)`, all in fp32, cast back once."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions `pos: int64[B, T]` → two `dtype[B, 1, T, hd]` tensors.

    `inv_freq` is recomputed in fp32 rather than stored as a buffer: a buffer would be cast by `model.to(bf16)`
    and shift every angle (model-notes §10.2).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=pos.device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)  # float32[hd/2]
        angles = pos.float()[..., None] * inv_freq  # float32[B, T, hd/2]
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # float32[B, 1, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on `x: [B, H, T, hd]`: x·cos + (−x₂, x₁)·sin with x₁, x₂ the two halves of hd."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass(frozen=True, slots=True)
class AttentionContext:
    """What every layer's attention shares in one decoder call; `Gemma.forward` builds it once per call.

    rope: cos, sin dt[B, 1, T, hd]; masks[sliding]: bool[B, 1, T, K] (True = may attend) over the K = start + T keys
    seen so far. With a cache, each layer writes this call's keys/values into slots [start, start + T) and attends
    over slots [0, start + T); without one (training, full-sequence checks), start must be 0.
    """

    rope: tuple[torch.Tensor, torch.Tensor]
    masks: dict[bool, torch.Tensor]
    cache: KVCache | None
    start: int


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding  # attends through the sliding-window mask, `ctx.masks[True]`
        hd, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, hd
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, hq * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * hd, bias=False)
        self.o_proj = nn.Linear(hq * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int, last_only: bool = False) -> torch.Tensor:
        """x: dt[B, T, D] → dt[B, T, D]; `ctx`: the call's RoPE, masks and cache (`AttentionContext`); `layer`: this
        layer's index in the cache.

        `last_only`: keys and values for all T positions, but queries and the output for the last one only: dt[B, 1, D].
        """
        b, t, _ = x.shape
        xq = x[:, -1:] if last_only else x
        tq = xq.shape[1]
        q = self.q_proj(xq).view(b, tq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos[:, :, -tq:], sin[:, :, -tq:]), apply_rope(k, cos, sin)  # keys cached after RoPE
        mask = ctx.masks[self.sliding][:, :, -tq:]
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, ctx.start, k, v)
        else:
            assert ctx.start == 0, "a non-zero start needs a KV cache"
        if tq == 1 and not q.requires_grad:
            out = _one_query_attention(q, k, v, mask, self.scale, self.softcap)
        elif self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        else:
            out = _softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, tq, -1))


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float | None
) -> torch.Tensor:
    """Decode-step attention (T = 1), q: [B, Hq, 1, hd], k/v: [B, Hkv, S, hd], mask: bool[B, 1, 1, S].

    Two small batched products with the query heads of each kv head side by side ([B, Hkv, g, hd]), so the cache
    is read once and never repeated per query head; a tenth of SDPA's time for one query on the CPU. Soft-capping
    (Gemma 2) and the softmax in fp32 as in `_softcapped_attention`."""
    b, hq, _, hd = q.shape
    hkv = k.shape[1]
    scores = (q.reshape(b, hkv, hq // hkv, hd) @ k.transpose(-1, -2)) * scale  # [B, Hkv, g, S]
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).reshape(b, hq, 1, hd)


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """Gemma 2 attention: SDPA cannot soft-cap, so scores are explicit. Cap in dt before masking, softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # kv head j serves query heads j·g … j·g+g−1
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Gemma: x + attn(norm(x)), then + mlp(mlp_norm(·)). Gemma 2 also norms each branch's output."""

    def __init__(self, cfg: TextConfig, sliding: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, sliding)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        gemma2 = cfg.arch == "gemma2"
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if gemma2 else None
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if gemma2 else None

    @property
    def sliding(self) -> bool:
        """Whether this layer attends through the sliding-window mask (Gemma 2's `layer_types`)."""
        return self.attn.sliding

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int, last_only: bool = False) -> torch.Tensor:
        """x: dt[B, T, D] → dt[B, T, D], or dt[B, 1, D] for the last position only (`Attention`'s `last_only`)."""
        h = self.attn(self.attn_norm(x), ctx, layer, last_only)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = (x[:, -1:] if last_only else x) + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Gemma(nn.Module):
    """The decoder stack. It takes embeddings (PaliGemma merges image features into them) and returns hidden states;
    `logits()` applies the tied head to just the positions the caller needs."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.vocab_size, cfg.hidden_size)
        sliding = [t == "sliding_attention" for t in cfg.layer_types] or [False] * cfg.num_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, s) for s in sliding)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # None while tied to `embed` (all PaliGemma checkpoints); a Linear only for a checkpoint whose own lm_head
        # differs from the embedding (model-notes §1.3), or the int8 head of a quantized model (nn/quant.py).
        self.lm_head: nn.Module | None = None
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the norms' (never quantized, so also right for an int8 model: float32)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """int64[B, T] → dt[B, T, D], scaled by √D cast to the weight dtype first (bf16: 45.25 for D=2048)."""
        scale = torch.tensor(self.cfg.embed_scale, dtype=self.dtype)
        return self.embed(ids) * scale

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[bool, torch.Tensor],
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """x: dt[B, T, D] embeddings; positions: int64[B, T]; masks[sliding]: bool[B, 1, T, start+T].

        Returns the final-normed hidden states dt[B, T, D], or dt[B, 1, D] of the last position with `last_only`:
        the last layer then still writes every position's key and value to the cache, but skips the query,
        attention, output projection and MLP of the others, whose outputs only ever feed logits (about 1/L of a
        prefill, which the caller does not want anyway).
        """
        ctx = AttentionContext(self.rope(positions, x.dtype), masks, cache, start)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                # Recompute each layer's activations in the backward pass: memory O(layers) → O(1) layer.
                x = checkpoint(layer, x, ctx, i, use_reentrant=False)
            else:
                x = layer(x, ctx, i, last_only and i == last)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """dt[..., D] → dt[..., V] through the (tied) head, with Gemma 2's final soft-cap."""
        out = F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out
