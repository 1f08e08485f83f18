"""Projectors: vision features → text-width "soft tokens".

Axes: B images, N image tokens (patches), C vision width, D text width, H branch MLP width, L vision layers.

PaliGemma's projector is one affine layer (big_vision's ViT `head`): no activation, no scaling, whatever the
config's unused `projector_hidden_act` says (model-notes §1.2). The other kinds in `PROJECTORS` are the Dense Connector
family (Yao et al., "Dense Connector for MLLMs", arXiv 2405.13800, code: HJYao00/DenseConnector). There, a frozen
tower's multi-layer features go through LLaVA's two-layer MLP projector (Linear C'→D, GELU, Linear D→D):

    STI  final tokens, then CLIP-L/24 hidden states 7 and 15, each average-pooled over the token sequence in windows
         of α = 8 tokens and appended as extra tokens: N + 2N/8 tokens.
    SCI  [final ‖ h7 ‖ h15] along channels (3C), N tokens.
    DCI  the hidden states before the final layer, split into 2 groups of adjacent layers, each group averaged;
         [final ‖ g1 ‖ g2] along channels. For SigLIP So400m (PaliGemma's tower) the code averages 0-12 and 13-25.
Intermediate states enter raw, and the MLP replaces the linear projector outright.

How PaliGemma changes that (decisions):
1. Zero change at initialisation. Every kind computes `linear(final) + branch(...)`. `linear` is PaliGemma's
   pretrained projector under the same parameter names (`linear.weight`, `linear.bias`), so a base checkpoint's
   projector loads into it; the branch's last layer (weight and bias) starts at zero, so before training the output
   equals the base output exactly. The paper trains its MLP from scratch together with the LLM; PaliGemma's decoder
   was pretrained on `linear(final)`, so we keep that as the skip path and learn only what the other layers add.
   Consequence for training: at initialisation only the last branch layer gets a non-zero gradient (its input is
   non-zero); the zero weight blocks the backward path, so earlier branch layers get exactly zero gradient until the
   first optimiser step has made the last layer non-zero, after which every branch parameter learns.
2. N stays N. PaliGemma's prompt holds exactly `num_image_tokens` `<image>` placeholders and its decoder saw image
   tokens only there. STI's extra tokens would change the processor, every text position and — unavoidably — the
   output at initialisation (a zero vector still takes attention weight). So STI *integrates* its pooled tokens
   instead: each pooled intermediate token is projected and added to the final tokens of its window. The number of
   image tokens (`PaliGemmaConfig.num_image_tokens`) is the patch count for every kind.
3. Intermediate states are LayerNorm'd before use (one LayerNorm per layer or group, eps 1e-6 like SigLIP). PaliGemma's
   final features come after SigLIP's final LayerNorm, while mid-tower residual states do not and differ from them,
   and from each other, in scale; in the paper both sides were raw residual states.

The kinds (f: final features [B, N, C]; h_i: hidden state i; LN_k: the k-th branch LayerNorm):
    linear  linear(f)
    sti     linear(f) + Σ_k spread(MLP(LN_k(pool(h_k))))  pool: mean over windows of `pool_stride` row-major tokens
                                                           (the last one partial); spread: back to each window's tokens
    sci     linear(f) + MLP([f ‖ LN_1(h_a) ‖ LN_2(h_b)])
    dci     linear(f) + MLP([f ‖ LN_1(mean g_1) ‖ … ‖ LN_G(mean g_G)])    g: `ProjectorConfig.group_ranges`
    seed    linear(f) + proj([LN_1(h_9) ‖ LN_2(h_18)])   final + 1/3- and 2/3-depth layers; no hidden layer, so it is
                                                         SCI with PaliGemma's own (linear) projector type
The MLP's last layer is `mlp.fc2`; seed's is `proj`. Layer choices and widths: `ProjectorConfig`.

Loading: a plain PaliGemma checkpoint carries only `linear.*`. `extra_parameter_names(cfg)` lists what a kind adds
(the loader must report those as missing rather than leave them random), and `init_from_linear(cfg, base)` turns a
loaded linear projector into a new kind that starts out equal to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmo.config import ProjectorConfig
from vlmo.errors import ConfigError

# The parameters a plain PaliGemma checkpoint's projector carries (under `multi_modal_projector.`).
BASE_PARAMETERS: tuple[str, ...] = ("linear.weight", "linear.bias")
_LN_EPS = 1e-6  # SigLIP's layer_norm_eps


class LinearProjector(nn.Module):
    uses_hidden_states = False

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.in_features, cfg.out_features)

    def forward(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """features: dt[B, N, C] → dt[B, N, D]."""
        return self.linear(features)


class BranchMLP(nn.Module):
    """The paper's projector shape: Linear(in → H), exact GELU, Linear(H → D). `fc2` is the zero-initialised layer."""

    def __init__(self, in_features: int, width: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DenseProjector(nn.Module):
    """Base of the Dense Connector kinds: `linear(features) + branch(features, hidden_states)`.

    Subclasses build their branch modules in `__init__` and call `reset_branch_parameters()` last; they implement
    `branch` and `last_layer`.
    """

    uses_hidden_states = True

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.in_features, cfg.out_features)

    def branch(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """What the intermediate layers add: dt[B, N, D]; exactly zero until the branch has trained."""
        raise NotImplementedError

    def last_layer(self) -> nn.Linear:
        """The branch's output layer, zero at initialisation."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_branch_parameters(self) -> None:
        """(Re)initialise everything but `linear`: PyTorch's default init, then zeros for the last layer.

        Use it after materialising a meta-device projector (`to_empty`) whose branch no checkpoint provides.
        """
        for name, child in self.named_children():
            if name == "linear":
                continue
            for module in child.modules():
                if isinstance(module, nn.Linear | nn.LayerNorm):
                    module.reset_parameters()
        last = self.last_layer()
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """features: dt[B, N, C] (after the tower's final LayerNorm); hidden_states: L + 1 tensors dt[B, N, C]
        (embeddings, then each block's output). Returns dt[B, N, D]."""
        if len(hidden_states) != self.cfg.vision_layers + 1:
            raise ConfigError(
                f"projector kind {self.cfg.kind!r} is configured for a {self.cfg.vision_layers}-layer vision tower "
                f"(ProjectorConfig.vision_layers) but received {len(hidden_states)} hidden states instead of "
                f"{self.cfg.vision_layers + 1}; set vision_layers to vision_config.num_hidden_layers and run the "
                "tower with output_hidden_states=True"
            )
        return self.linear(features) + self.branch(features, hidden_states)


def _norms(count: int, width: int) -> nn.ModuleList:
    return nn.ModuleList(nn.LayerNorm(width, eps=_LN_EPS) for _ in range(count))


class STIProjector(DenseProjector):
    """Sparse token integration, kept at N tokens (module docstring, decision 2).

    Each chosen hidden state is average-pooled over windows of `pool_stride` consecutive row-major tokens (the
    paper's 1-D pooling; a 16×16 grid with stride 8 gives 1×8-patch strips as the paper's 24×24 grid does), normed,
    and sent through one MLP shared by all layers (the paper projects all tokens with one projector). Each window's
    result is added to the N final tokens in that window. When N is not a multiple of the stride, the last window
    is partial and averages the tokens it has.
    """

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg)
        self.layer_ids = cfg.intermediate_layers
        self.norms = _norms(len(self.layer_ids), cfg.in_features)
        self.mlp = BranchMLP(cfg.in_features, cfg.branch_width, cfg.out_features)
        self.reset_branch_parameters()

    def last_layer(self) -> nn.Linear:
        return self.mlp.fc2

    def branch(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        n, stride = features.shape[1], self.cfg.pool_stride
        coarse = features.new_zeros(())
        for norm, index in zip(self.norms, self.layer_ids, strict=True):
            h = hidden_states[index].transpose(1, 2)  # [B, C, N]: pooling runs over the last axis
            pooled = F.avg_pool1d(h, stride, stride, ceil_mode=True).transpose(1, 2)  # [B, ⌈N/stride⌉, C]
            coarse = coarse + self.mlp(norm(pooled))  # [B, ⌈N/stride⌉, D]
        return coarse.repeat_interleave(stride, dim=1)[:, :n]  # window w → tokens w·stride … w·stride + stride − 1


class ChannelProjector(DenseProjector):
    """Channel integration (SCI, DCI): MLP([f ‖ LN_1(s_1) ‖ … ‖ LN_k(s_k)]) over the k intermediate states s_i that
    `sources` picks; input width (1 + k)·C."""

    def __init__(self, cfg: ProjectorConfig, num_sources: int) -> None:
        super().__init__(cfg)
        self.norms = _norms(num_sources, cfg.in_features)
        self.mlp = BranchMLP((1 + num_sources) * cfg.in_features, cfg.branch_width, cfg.out_features)
        self.reset_branch_parameters()

    def sources(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The k intermediate states the branch integrates, each dt[B, N, C]."""
        raise NotImplementedError

    def last_layer(self) -> nn.Linear:
        return self.mlp.fc2

    def branch(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        normed = [norm(s) for norm, s in zip(self.norms, self.sources(hidden_states), strict=True)]
        return self.mlp(torch.cat([features, *normed], dim=-1))


class SCIProjector(ChannelProjector):
    """Sparse channel integration: MLP([f ‖ LN(h_a) ‖ LN(h_b) …]), input width (1 + len(layers))·C."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg, len(cfg.intermediate_layers))
        self.layer_ids = cfg.intermediate_layers

    def sources(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [hidden_states[i] for i in self.layer_ids]


class DCIProjector(ChannelProjector):
    """Dense channel integration: MLP([f ‖ LN(mean g_1) ‖ … ‖ LN(mean g_G)]), input width (1 + G)·C.

    Every hidden state from the embeddings to block L − 2 takes part, averaged within groups of adjacent layers.
    """

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg, len(cfg.group_ranges))
        self.ranges = cfg.group_ranges

    def sources(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack(hidden_states[a:b]).mean(0) for a, b in self.ranges]  # each [B, N, C]


class SeedProjector(DenseProjector):
    """The seed project's variant: the final features plus the 1/3- and 2/3-depth layers (9 and 18 of 27), combined
    by one more affine map: proj([LN(h_9) ‖ LN(h_18)]) is added to linear(f). Together that is a single linear map of
    [f ‖ LN(h_9) ‖ LN(h_18)] — channel integration with PaliGemma's linear projector type instead of an MLP."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg)
        self.layer_ids = cfg.intermediate_layers
        self.norms = _norms(len(self.layer_ids), cfg.in_features)
        self.proj = nn.Linear(len(self.layer_ids) * cfg.in_features, cfg.out_features)
        self.reset_branch_parameters()

    def last_layer(self) -> nn.Linear:
        return self.proj

    def branch(self, features: torch.Tensor, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        picked = [norm(hidden_states[i]) for norm, i in zip(self.norms, self.layer_ids, strict=True)]
        return self.proj(torch.cat(picked, dim=-1))


# Every kind: `LinearProjector`, or a `DenseProjector` subclass; each has PaliGemma's `linear` layer.
Projector = LinearProjector | DenseProjector

PROJECTORS: dict[str, Callable[[ProjectorConfig], Projector]] = {
    "linear": LinearProjector,
    "sti": STIProjector,
    "sci": SCIProjector,
    "dci": DCIProjector,
    "seed": SeedProjector,
}


def build_projector(cfg: ProjectorConfig) -> Projector:
    if cfg.kind not in PROJECTORS:
        raise ConfigError(f"unknown projector kind {cfg.kind!r}; choose one of {', '.join(PROJECTORS)}")
    return PROJECTORS[cfg.kind](cfg)


def extra_parameter_names(cfg: ProjectorConfig) -> list[str]:
    """Names (relative to the projector, i.e. without `projector.`) of the tensors that a plain PaliGemma checkpoint
    does not carry: empty for `linear`. Computed on the meta device, so it costs no memory at real sizes."""
    with torch.device("meta"):
        module = build_projector(cfg)
    return [name for name in module.state_dict() if name not in BASE_PARAMETERS]


def init_from_linear(cfg: ProjectorConfig, base: nn.Module) -> Projector:
    """A projector of kind `cfg.kind` that starts as `base` (any projector with a `linear` layer, typically a loaded
    `LinearProjector`): its `linear` is a copy of `base.linear` and its branch is freshly initialised with a zero last
    layer, so its output equals base's until it trains. Device, dtype, train/eval mode and `requires_grad` follow
    `base.linear`; the branch draws from torch's global RNG (seed it for reproducible runs).
    """
    src = base.linear
    if not isinstance(src, nn.Linear) or (src.in_features, src.out_features) != (cfg.in_features, cfg.out_features):
        raise ConfigError(
            f"cannot start a {cfg.kind!r} projector ({cfg.in_features} → {cfg.out_features}) from a projector whose "
            f"linear layer is {getattr(src, 'in_features', '?')} → {getattr(src, 'out_features', '?')}"
        )
    with torch.device(src.weight.device):
        new = build_projector(cfg)
    new.to(src.weight.dtype)
    with torch.no_grad():
        new.linear.weight.copy_(src.weight)
        new.linear.bias.copy_(src.bias)
    return new.train(base.training).requires_grad_(src.weight.requires_grad)
