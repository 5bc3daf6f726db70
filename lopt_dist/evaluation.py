"""Evaluation during training: every `eval.every` steps (and after the last), each stage's loss on fixed held-out
micro-batches, written into that step's record.

What is evaluated (config `eval`):
- `eval`: held-out SFT examples (`eval.source` / `eval.split`, or `eval.holdout` of data.source's examples, left out
  of training), read and tokenized as the training data is;
- `retention`: windows of general text (`eval.retention`, the pydoc topics lopt-eval uses), every token scored.

Each set is `eval.micro_batches` micro-batches of `train.micro_batch_size`, in file order (unshuffled), so every
evaluation sees the same samples. Per set the record gets the last stage's loss (`eval_task_loss`: the answer
loss; `retention_task_loss` and `retention_ppl`) and each earlier stage's reconstruction loss (`eval_recon_loss_0`,
...), each the mean over the set's micro-batches of the micro-batch's mean, as the training losses are reported.
Both runtimes compute the same numbers (tests/pipeline/test_equivalence.py); the Ray pipeline streams the
evaluation micro-batches through its stages between two training steps (StageWorker.evaluate).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from lopt_dist.config import DataConfig, ExperimentConfig
from lopt_dist.data import DataError, MicroBatches, build_examples, micro_batches
from lopt_dist.data.retention import pydoc_topics, token_windows
from lopt_dist.data.sources import BUILTIN_PREFIX, is_local_file

# The hold-out split draws from its own seeded stream, apart from the per-epoch shuffles (seeded by (seed, epoch)).
_HOLDOUT_STREAM = 7_919


@dataclass(frozen=True)
class EvalSet:
    name: str  # "eval" or "retention": the prefix of its record fields
    batches: MicroBatches  # unshuffled, so micro-batch i holds the same samples at every evaluation


def set_names(cfg: ExperimentConfig) -> list[str]:
    """The sets evaluated, in the order their micro-batches are numbered."""
    names = []
    if cfg.eval.held_out_sets:
        names.append("eval")
    if cfg.eval.retention:
        names.append("retention")
    return names


def plan(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """Evaluation micro-batch e (numbered from 0 across the sets) -> (its set, its index in the set)."""
    return [(name, i) for name in set_names(cfg) for i in range(cfg.eval.micro_batches)]


def due(cfg: ExperimentConfig, done: int) -> bool:
    """Whether to evaluate once `done` optimizer steps are complete."""
    every = cfg.eval.every
    return every > 0 and (done % every == 0 or done == cfg.train.steps)


def split_holdout(examples: Sequence, cfg: ExperimentConfig) -> tuple[list, list | None]:
    """(training examples, held-out examples or None): `eval.holdout` of the examples, drawn with data.seed, left out
    of training. Both keep the examples' order."""
    fraction = cfg.eval.holdout
    if not fraction:
        return examples, None
    count = len(examples)
    held = max(1, round(count * fraction))
    if held >= count:
        raise DataError(f"eval.holdout={fraction} of data.source's {count} examples leaves none to train on; hold "
                        "out a smaller fraction or give held-out data in eval.source")
    order = np.random.default_rng([cfg.data.seed, _HOLDOUT_STREAM]).permutation(count)
    out = set(order[:held].tolist())
    return ([e for i, e in enumerate(examples) if i not in out], [e for i, e in enumerate(examples) if i in out])


def eval_data_config(cfg: ExperimentConfig) -> DataConfig:
    """The held-out data, read as data.source is (format, template, max_seq_length, bad rows)."""
    return dataclasses.replace(cfg.data, source=cfg.eval.source or cfg.data.source,
                               split=cfg.eval.split or cfg.data.split, max_samples=None)


def build_eval_sets(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, held_out: list | None) -> list[EvalSet]:
    """The sets to evaluate; `held_out`: what `split_holdout` kept out of training (None without eval.holdout)."""
    pad = tokenizer.pad_token_id
    count = cfg.eval.micro_batches * cfg.train.micro_batch_size  # samples evaluated per set
    sets = []
    if cfg.eval.held_out_sets:
        if held_out is None:
            data = eval_data_config(cfg)
            hub = not data.source.startswith(BUILTIN_PREFIX) and not is_local_file(data.source)
            held_out = build_examples(data, tokenizer, limit=count if hub else None).examples
        sets.append(EvalSet("eval", micro_batches(held_out, cfg, pad, shuffle=False)))
    if cfg.eval.retention:
        text, _ = pydoc_topics()
        windows = token_windows(tokenizer, text, cfg.data.max_seq_length, count)
        examples = [{"input_ids": w, "labels": w} for w in windows]  # every token scored
        sets.append(EvalSet("retention", micro_batches(examples, cfg, pad, shuffle=False)))
    return sets


def eval_record(sums: dict[str, list[float]], cfg: ExperimentConfig) -> dict[str, float]:
    """Record fields from `sums[set][stage]`: each stage's metric summed over the set's micro-batches."""
    record = {}
    for name, per_stage in sums.items():
        last = len(per_stage) - 1
        for stage, total in enumerate(per_stage):
            key = f"{name}_task_loss" if stage == last else f"{name}_recon_loss_{stage}"
            record[key] = total / cfg.eval.micro_batches
    if "retention" in sums:
        record["retention_ppl"] = math.exp(min(record["retention_task_loss"], 700.0))  # exp overflows past ~709
    return record
