"""The benchmark's samples: fixed-length random token sequences, the same in every row and every process.

Fixed length and no padding make every micro-batch the same shape, so the pipelines can use static buffers
and the attention mask is all ones. Micro-batch m is a pure function of (seed, m), generated on its own
`torch.Generator`, so a worker that builds a model (which draws from the global generator) still gets the
very samples every other row gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Ids below this are usually special tokens (pad, bos, eos); random text should not be made of them.
FIRST_ORDINARY_ID = 3


@dataclass(frozen=True)
class SyntheticBatches:
    micro_batch_size: int
    seq_len: int
    vocab_size: int
    seed: int

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels of micro-batch `index`: [micro_batch_size, seq_len] LongTensors."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        shape = (self.micro_batch_size, self.seq_len)
        ids = torch.randint(FIRST_ORDINARY_ID, self.vocab_size, shape, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones(shape, dtype=torch.long), "labels": ids.clone()}

    def step(self, step: int, micro_batches: int) -> dict[str, torch.Tensor]:
        """The whole global batch of optimizer step `step`: its micro-batches stacked in order."""
        parts = [self.get(step * micro_batches + j) for j in range(micro_batches)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def tokens(self, index: int) -> int:
        return self.micro_batch_size * self.seq_len


def bench_batches(cfg, model, micro_batch_size: int):
    """The micro-batches of a row that trains through lopt-dist's trainers: `--data`'s examples (padded, or packed
    with `--packing`, as lopt-train makes them), else the synthetic samples."""
    if cfg.data is None:
        return SyntheticBatches(micro_batch_size, cfg.seq_len, model.vocab_size, cfg.seed)
    from lopt_dist.data import build_examples, micro_batches
    from lopt_dist.model.loading import load_tokenizer
    from .experiment import data_config, experiment_config

    tokenizer = load_tokenizer(model.path)
    examples = build_examples(data_config(cfg), tokenizer)
    return micro_batches(examples, experiment_config(cfg, model), tokenizer.pad_token_id)
