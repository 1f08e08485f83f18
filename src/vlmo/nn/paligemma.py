"""PaliGemma: SigLIP → projector → Gemma, with a prefix-LM mask and a prefill/decode split.

Axes: B batch, T tokens in this call, K keys visible (cache slots so far), N image tokens, D text width, V vocab rows.

Sequence layout (built by `processing.py`): `<image>×N <bos> prompt \\n [suffix <eos>]`, left-padded for generation.
`token_type` is 0 for image + prefix + "\\n" (and pads) and 1 for suffix/generated tokens. Positions are 1-indexed
over real tokens (transformers' convention; bf16 rounding depends on it, model-notes §6.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partialmethod
from typing import Any

import torch
from torch import nn

from vlmo.config import PaliGemmaConfig
from vlmo.errors import InputError
from vlmo.nn.gemma import Gemma
from vlmo.nn.kv_cache import KVCache
from vlmo.nn.projector import build_projector
from vlmo.nn.siglip import SiglipVision


def make_attn_mask(
    key_valid: torch.Tensor, token_type: torch.Tensor, q_start: int, window: int | None = None
) -> torch.Tensor:
    """Prefix-LM attention mask for queries at slots [q_start, K) over keys [0, K).

    key_valid: bool[B, K] (False on padding); token_type: int[B, K] (0 prefix, 1 suffix).
    Returns bool[B, 1, K - q_start, K], True where query q may attend key k:
        valid[k] and (k ≤ q [and k > q − window] or (type[q] == 0 and type[k] == 0)).
    The prefix block is fully bidirectional, suffix tokens are causal, and a sliding window limits only suffix
    queries (the prefix keeps its block, as transformers 5.24 does, model-notes §6.3). Example, one row, types
    [0 0 0 1 1] (3 prefix tokens, 2 suffix), no padding, q_start=0:

        q0: 1 1 1 0 0      prefix attends the whole prefix, both directions
        q1: 1 1 1 0 0
        q2: 1 1 1 0 0
        q3: 1 1 1 1 0      suffix is causal and sees the prefix
        q4: 1 1 1 1 1

    A decode step is the same call with q_start = K − 1 (one query of type 1).
    """
    k_len = key_valid.shape[1]
    q_idx = torch.arange(q_start, k_len, device=key_valid.device)[:, None]  # [T, 1]
    k_idx = torch.arange(k_len, device=key_valid.device)[None, :]  # [1, K]
    causal = k_idx <= q_idx
    if window is not None:
        causal = causal & (k_idx > q_idx - window)
    is_prefix = token_type == 0
    block = is_prefix[:, q_start:, None] & is_prefix[:, None, :]  # [B, T, K]
    return ((causal[None] | block) & key_valid[:, None, :])[:, None]


@dataclass
class DecodeState:
    """What decoding needs after prefill: the cache, which slots hold real tokens, and where each row is."""

    cache: KVCache
    key_valid: torch.Tensor  # bool[B, S]
    token_type: torch.Tensor  # int64[B, S]
    length: int  # slots filled so far (same for every row: left padding aligns the ends)
    next_pos: torch.Tensor  # int64[B], the position id of each row's next token


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision)
        self.projector = build_projector(cfg.projector)
        self.text = Gemma(cfg.text)

    def use_projector(self, kind: str, **fields: Any) -> None:
        """Swap the linear projector for one of another `kind` (a Dense Connector, nn/projector.py) that starts out
        equal to it: same linear weights, zero-initialised branch. `fields` override other ProjectorConfig fields."""
        from dataclasses import replace

        from vlmo.nn.projector import init_from_linear

        if self.cfg.projector.kind != "linear":
            raise InputError(f"the model already has a {self.cfg.projector.kind!r} projector")
        # Values as given: ProjectorConfig checks `kind` (any str here) and the other fields when it is built.
        given: dict[str, Any] = {"kind": kind, "vision_layers": self.cfg.vision.num_layers}
        new = replace(self.cfg.projector, **given, **fields)
        self.projector = init_from_linear(new, self.projector)
        self.cfg = self.cfg.with_overrides(projector=new)

    @property
    def dtype(self) -> torch.dtype:
        return self.text.dtype

    @property
    def device(self) -> torch.device:
        return self.text.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """float[B, 3, H, W] in [-1, 1] → projected soft tokens dt[B, N, D]. Run once per image, not per token."""
        uses_hidden = getattr(self.projector, "uses_hidden_states", False)
        features, hidden = self.vision(pixel_values, output_hidden_states=uses_hidden)
        return self.projector(features, hidden)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """int64[B, T] + dt[B_img, N, D] → dt[B, T, D].

        Text embeddings are scaled by √D; image features replace the `<image>` positions in order, *unscaled*
        (transformers 5 and big_vision; the v4 divide-then-multiply is not ported — model-notes §4.2).
        """
        is_image = input_ids == self.cfg.image_token_id
        x = self.text.embed_text(torch.where(is_image, 0, input_ids))
        n_slots, n_feats = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise InputError(
                f"the prompts hold {n_slots} <image> tokens but the images give {n_feats} features; build prompts "
                "with vlmo.processing so each image gets exactly its num_image_tokens placeholders"
            )
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def _masks(self, key_valid: torch.Tensor, token_type: torch.Tensor, q_start: int) -> dict[bool, torch.Tensor]:
        full = make_attn_mask(key_valid, token_type, q_start)
        window = self.cfg.text.sliding_window
        needs_window = window is not None and any(layer.sliding for layer in self.text.layers)
        sliding = make_attn_mask(key_valid, token_type, q_start, window) if needs_window else full
        return {False: full, True: sliding}

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Whole-sequence logits without a cache (reference checks): dt[B, T, V]; without the `head`, the
        final-normed decoder states dt[B, T, D] (`hidden_states`).

        input_ids/attention_mask/token_type_ids: int64[B, T]; token_type_ids default to all-prefix.
        """
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.embed(input_ids, self.encode_images(pixel_values))
        h = self.text(x, positions_from_mask(valid), self._masks(valid, tt, 0))
        return self.text.logits(h) if head else h

    # `forward` without the head: dt[B, T, D]. Training applies the head only where there are targets: with 257216
    # vocabulary rows, logits for every position would cost far more memory than the rest of the step.
    hidden_states = partialmethod(forward, head=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.cfg.text
        return KVCache(t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim, self.dtype, self.device)

    def prefill(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache,
        token_type_ids: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt through the decoder, filling the cache.

        input_ids, attention_mask: int64[B, T], left-padded so every row ends with its last prompt token.
        Returns the logits of the last position dt[B, V] (or of all positions dt[B, T, V] with `all_logits`, for
        checks), and the state `decode` continues from.
        """
        b, t = input_ids.shape
        valid = torch.zeros(b, cache.max_len, dtype=torch.bool, device=input_ids.device)
        valid[:, :t] = attention_mask.bool()
        token_type = torch.ones(b, cache.max_len, dtype=torch.long, device=input_ids.device)
        token_type[:, :t] = 0 if token_type_ids is None else token_type_ids
        positions = positions_from_mask(valid[:, :t])
        x = self.embed(input_ids, image_features)
        masks = self._masks(valid[:, :t], token_type[:, :t], 0)
        h = self.text(x, positions, masks, cache, 0, last_only=not all_logits)
        logits = self.text.logits(h if all_logits else h[:, -1])
        state = DecodeState(cache, valid, token_type, t, positions[:, -1] + 1)
        return logits, state

    def decode(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row (int64[B]); its key/value is written into the cache in place. Returns dt[B, V]."""
        start = state.length
        state.key_valid[:, start] = True
        k = start + 1
        masks = self._masks(state.key_valid[:, :k], state.token_type[:, :k], start)
        x = self.text.embed_text(tokens[:, None])
        h = self.text(x, state.next_pos[:, None], masks, state.cache, start)
        state.length = k
        state.next_pos = state.next_pos + 1
        return self.text.logits(h[:, -1])


def regroup(parts: list[tuple[DecodeState, torch.Tensor]], capacity_after: int) -> DecodeState:
    """A new decode state holding the chosen rows of several states, for a batch whose rows come and go.

    parts: (state, rows int64[R]) pairs; the result holds every part's rows, in order. `capacity_after`: how many
    more tokens any row may still need, so the new cache has room for them. Rows keep their right alignment (every
    row's last token in the last filled slot, as left padding gives at prefill): each part's slots are shifted so
    that its rows end at the new `length`, and leading slots that none of the chosen rows uses are dropped. A row's
    tokens stay contiguous and keep their position ids, so its attention sees exactly the keys it saw before;
    only masked-out slots differ (docs/architecture.md, "Continuous batching").
    """
    spans = []
    for state, rows in parts:
        used = state.key_valid[rows, : state.length].any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else state.length
        spans.append(state.length - first)
    length = max(spans)
    cache0 = parts[0][0].cache
    layers, _, heads, _, head_dim = cache0.k.shape
    batch = sum(int(rows.numel()) for _, rows in parts)
    cache = KVCache(layers, batch, length + capacity_after, heads, head_dim, cache0.k.dtype, cache0.k.device)
    device = cache0.k.device
    key_valid = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=device)
    token_type = torch.ones(batch, cache.max_len, dtype=torch.long, device=device)
    next_pos = torch.cat([state.next_pos[rows] for state, rows in parts])
    row = 0
    for (state, rows), span in zip(parts, spans, strict=True):
        n, old = int(rows.numel()), slice(state.length - span, state.length)
        new, out = slice(length - span, length), slice(row, row + n)
        cache.k[:, out, :, new] = state.cache.k[:, rows][:, :, :, old]
        cache.v[:, out, :, new] = state.cache.v[:, rows][:, :, :, old]
        key_valid[out, new] = state.key_valid[rows][:, old]
        token_type[out, new] = state.token_type[rows][:, old]
        row += n
    return DecodeState(cache, key_valid, token_type, length, next_pos)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """bool[B, T] → int64[B, T]: 1, 2, 3, … over real tokens (pads get 1; they are masked anyway)."""
    pos = valid.long().cumsum(-1)
    return pos.masked_fill(~valid, 1)
