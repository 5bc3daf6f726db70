"""The reconstruction decoder a non-final stage learns from: boundary hidden state -> stage input."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The decoder starts near zero so that the reconstruction loss begins as the plain energy of the target and
# the first updates of the stage are not driven by a random projection.
DECODER_INIT_STD = 0.02


class ReconstructionDecoder(nn.Module):
    """LayerNorm -> Linear(h, h/4) -> GELU -> Linear(h/4, h)."""

    def __init__(self, hidden_size: int, seed: int) -> None:
        super().__init__()
        width = max(1, hidden_size // 4)
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, width)
        self.down = nn.Linear(width, hidden_size)
        self.seed = seed
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The seeded start. On its own generator, so every process that builds this stage gets the same decoder."""
        if self.up.weight.is_meta:
            return  # an empty skeleton: the stage loader calls this again once the memory exists
        self.norm.reset_parameters()
        gen = torch.Generator().manual_seed(self.seed)
        for linear in (self.up, self.down):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * DECODER_INIT_STD)
            linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(hidden))))


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE over the real (non-padding) tokens, so padding length does not dilute the loss."""
    mask = attention_mask.to(pred.dtype).unsqueeze(-1)
    sq = (pred.float() - target.float()).pow(2) * mask.float()
    return sq.sum() / (mask.float().sum() * pred.shape[-1]).clamp_min(1.0)
