"""End-to-end pipeline stages made from LoPT stages: the same layers, but the activation keeps its graph.

A LoPT `Stage` detaches what it hands on and learns from its own reconstruction loss. For end-to-end pipeline
parallelism a stage is a plain function hidden -> hidden (the first takes token ids, the last returns
logits) through which gradients flow back across the boundary. Sequences are fixed-length and unpadded, so
the attention mask is all ones and positions are 0..T-1, rebuilt on each stage instead of being sent.
"""

from __future__ import annotations

import torch
from torch import nn

from lopt_dist.model import Stage


def chunk_forward(stage: Stage, inputs: torch.Tensor) -> torch.Tensor:
    """Token ids (first stage) or hidden states -> hidden states, or logits on the last stage."""
    hidden = stage.embed(inputs) if stage.is_first else inputs
    batch, length = hidden.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
    positions = torch.arange(length, device=hidden.device).expand(batch, -1)
    hidden = stage.run_layers(hidden, mask, positions)
    return stage.logits(hidden) if stage.is_last else hidden


class E2EChunk(nn.Module):
    """One stage of an end-to-end pipeline; owns only the parameters the forward uses."""

    def __init__(self, stage: Stage) -> None:
        super().__init__()
        stage.decoder = None  # the reconstruction decoder has no role end to end
        self.stage = stage

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return chunk_forward(self.stage, inputs)
