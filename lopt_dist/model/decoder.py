"""The reconstruction decoder a non-final stage learns from: boundary hidden state -> stage input."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The decoder starts near zero so that the reconstruction loss begins as the plain energy of the target and
# the first updates of the stage are not driven by a random projection: N(0, 0.02) ("normal"), or, as the
# paper's reference implementation, xavier-uniform with gain 0.1 ("xavier").
DECODER_INIT_STD = 0.02
DECODER_XAVIER_GAIN = 0.1
DECODER_INITS = ("normal", "xavier")


class ReconstructionDecoder(nn.Module):
    """LayerNorm -> Linear(h, h/4) -> GELU -> Linear(h/4, h)."""

    def __init__(self, hidden_size: int, seed: int, init: str = "normal") -> None:
        super().__init__()
        if init not in DECODER_INITS:
            raise ValueError(f"decoder init must be one of {DECODER_INITS}, got {init!r}")
        width = max(1, hidden_size // 4)
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, width)
        self.down = nn.Linear(width, hidden_size)
        self.seed = seed
        self.init = init
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The seeded start. On its own generator, so every process that builds this stage gets the same decoder."""
        if self.up.weight.is_meta:
            return  # an empty skeleton: the stage loader calls this again once the memory exists
        self.norm.reset_parameters()
        gen = torch.Generator().manual_seed(self.seed)
        for linear in (self.up, self.down):
            # Drawn on the CPU generator, then copied: the same values whatever device the decoder lives on.
            if self.init == "xavier":
                start = nn.init.xavier_uniform_(torch.empty(linear.weight.shape), DECODER_XAVIER_GAIN, generator=gen)
            else:
                start = torch.randn(linear.weight.shape, generator=gen) * DECODER_INIT_STD
            linear.weight.copy_(start)
            linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(hidden))))


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE over the real (non-padding) tokens, so padding length does not dilute the loss."""
    mask = attention_mask.to(pred.dtype).unsqueeze(-1)
    sq = (pred.float() - target.float()).pow(2) * mask.float()
    return sq.sum() / (mask.float().sum() * pred.shape[-1]).clamp_min(1.0)
