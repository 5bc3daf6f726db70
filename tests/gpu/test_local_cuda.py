"""The single-process trainer on CUDA in bf16: both methods learn, losses finite, memory from the allocator."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt_dist.config import load_config
from lopt_dist.model.tiny import tiny_config
from lopt_dist.telemetry.memory import step_peak_bytes
from lopt_dist.train.local import LocalTrainer

pytestmark = pytest.mark.gpu
VOCAB = 128


class RepeatedBatch:
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (4, 32), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 20:] = 0
        self.batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def get(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_bf16_training_on_cuda_learns_with_finite_losses(method):
    cfg = load_config(None, [f"train.method={method}", "train.steps=15", "train.lr=3e-3", "train.lr_first=3e-3",
                             "train.micro_batches_per_step=2", "train.dtype=bfloat16", "runtime.device=cuda"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB))
    trainer = LocalTrainer(cfg, model, RepeatedBatch(), torch.device("cuda"))
    results = [trainer.train_step() for _ in range(15)]
    losses = [r.task_loss for r in results]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(r.tokens == 2 * int(RepeatedBatch().batch["attention_mask"].sum()) for r in results)
    memory = trainer.memory()
    assert memory["cuda_peak_allocated_bytes"] > 0 and step_peak_bytes(memory) == memory["cuda_peak_allocated_bytes"]
    if method == "lopt":
        assert results[-1].recon_losses[0] < results[0].recon_losses[0]
