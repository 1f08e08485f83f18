"""PaliGemma's mask tokenizer: the "vae-oid" VQ-VAE that maps 16 `<segNNN>` codes to a 64×64 mask and back.

docs/model-notes.md §9.3. The published checkpoint (`vae-oid.npz`) is a PyTorch state dict of the VQ-VAE from
"All in Tokens" (Ning et al. 2023, arXiv 2301.02229; code: SwinTransformer/AiT `vae/models/VQVAE.py`,
instance-segmentation config: 64 px masks, 1 channel, hidden 16, downsample 16, 2 residual blocks, 128 codes of
width 512). The modules below keep that model's `nn.Sequential` numbering, so `state_dict()` names equal the
checkpoint's (ReLUs sit at the odd indices and own no weights):

    _vq_vae._embedding                           (128, 512)  codebook
    decoder.0                Conv2d 512→128 1×1, ReLU
    decoder.{2,3}.net.{0,2,4}  residual blocks: x + [Conv3×3 → ReLU → Conv3×3 → ReLU → Conv1×1] (128 ch)
    decoder.{4,6,8,10}       ConvTranspose2d k4 s2 p1, 128→128→64→32→16, each + ReLU   (4→8→16→32→64 px)
    decoder.12               Conv2d 16→1 1×1
    encoder.{0,2,4,6}        Conv2d k4 s2 p1, 1→16→32→64→128, each + ReLU               (64→32→16→8→4 px)
    encoder.{8,9}.net.{0,2,4}  residual blocks as above (128 ch)
    encoder.10               Conv2d 128→512 1×1, then the nearest codebook entry per cell

Both directions are checked against big_vision, which runs the same weights in JAX/TF: the decoder in
`evaluators/proj/paligemma/transfers/segmentation.py` (flax `ConvTranspose(padding=2, transpose_kernel=True)`
is PyTorch's `padding=1`), the encoder in `pp/proj/paligemma/segmentation.py` (TF `SAME` padding with a 4×4
kernel, stride 2 and an even input pads one pixel on each side, which is PyTorch's `padding=1`; input scaled
to [-1, 1]; codes by the least squared distance, cells in row-major order).

Axes: B batch, C channels, H×W spatial; masks are 64×64, codes a 4×4 grid flattened row-major to 16.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmo.errors import InputError

__all__ = ["NUM_CODES", "CODE_DIM", "MASK_SIZE", "VQVAEDecoder", "VQVAEEncoder"]

NUM_CODES = 128  # <seg000>…<seg127> (model-notes §9.3)
CODE_DIM = 512  # codebook width, AiT insseg config `codebook_dim`
MASK_SIZE = 64  # decoded masks are 64×64 (model-notes §9.3)
GRID = 4  # 16 codes = a 4×4 grid
_WIDTH = 128  # channels of the residual stage (AiT: hidden_dim 16 × downsample 16 / 2)


class Codebook(nn.Module):
    """The VQ codebook, named `_vq_vae._embedding` in the checkpoint (AiT's VectorQuantizerEMA buffer)."""

    def __init__(self, num_codes: int = NUM_CODES, dim: int = CODE_DIM) -> None:
        super().__init__()
        self._embedding = nn.Parameter(torch.randn(num_codes, dim))  # AiT initialises it N(0, 1)


class ResBlock(nn.Module):
    """`x + net(x)`, net = Conv3×3 → ReLU → Conv3×3 → ReLU → Conv1×1, no ReLU after the sum. x: float[B, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _check_codes(codes: torch.Tensor) -> None:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.shape[1] != GRID * GRID:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise InputError(f"codes must be an int tensor of shape (B, {GRID * GRID}), got {shape}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InputError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= NUM_CODES):
        raise InputError(
            f"codes must be in 0..{NUM_CODES - 1}, got values from {int(codes.min())} to {int(codes.max())}"
        )


class VQVAEDecoder(nn.Module):
    """16 codebook indices → a 64×64 mask logit map (positive inside the object, nominally in [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self._vq_vae = Codebook()
        up = [(_WIDTH, _WIDTH), (_WIDTH, 64), (64, 32), (32, 16)]
        layers: list[nn.Module] = [nn.Conv2d(CODE_DIM, _WIDTH, 1), nn.ReLU(), ResBlock(_WIDTH), ResBlock(_WIDTH)]
        for c_in, c_out in up:  # indices 4, 6, 8, 10 (+ ReLU at 5, 7, 9, 11)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(16, 1, 1))  # index 12
        self.decoder = nn.Sequential(*layers)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: int[B, 16] in 0…127 → float[B, 512, 4, 4], the codebook rows laid out as a row-major 4×4 grid."""
        _check_codes(codes)
        table = self._vq_vae._embedding
        x = table[codes.to(table.device, torch.long)]  # (B, 16, 512)
        return x.view(codes.shape[0], GRID, GRID, table.shape[1]).permute(0, 3, 1, 2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: int[B, 16] in 0…127 → float[B, 1, 64, 64]."""
        return self.decoder(self.embed(codes))


class VQVAEEncoder(nn.Module):
    """A 64×64 mask in [0, 1] → 16 codebook indices; builds `<seg>` targets the way PaliGemma's were built."""

    def __init__(self) -> None:
        super().__init__()
        self._vq_vae = Codebook()
        layers: list[nn.Module] = []
        for c_in, c_out in [(1, 16), (16, 32), (32, 64), (64, _WIDTH)]:  # indices 0, 2, 4, 6 (+ ReLU)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        layers += [ResBlock(_WIDTH), ResBlock(_WIDTH), nn.Conv2d(_WIDTH, CODE_DIM, 1)]  # indices 8, 9, 10
        self.encoder = nn.Sequential(*layers)

    def features(self, masks: torch.Tensor) -> torch.Tensor:
        """masks: float[B, 1, 64, 64] in [0, 1] → float[B, 512, 4, 4] (before quantization)."""
        if masks.ndim != 4 or tuple(masks.shape[1:]) != (1, MASK_SIZE, MASK_SIZE):
            raise InputError(f"masks must be float[B, 1, {MASK_SIZE}, {MASK_SIZE}], got shape {tuple(masks.shape)}")
        weight = self.encoder.get_parameter("0.weight")
        x = masks.to(weight.device, weight.dtype)
        return self.encoder(2.0 * (x - 0.5))  # [0, 1] → [-1, 1], as AiT's `norm` and big_vision's `_norm`

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """masks: float[B, 1, 64, 64] in [0, 1] → int64[B, 16], the nearest code per cell, cells row-major."""
        z = self.features(masks)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B·16, 512), cells row-major
        table = self._vq_vae._embedding
        # Squared distances without the per-row constant |z|², which cannot change the argmin.
        distances = (table * table).sum(1) - 2.0 * flat @ table.t()
        return distances.argmin(1).view(z.shape[0], GRID * GRID)
