"""Optimizer and learning-rate schedule, shared by the single-process trainer and the DeepSpeed workers.

Both paths build the very same AdamW parameter groups and the same warm-up + cosine multiplier, which is
what lets a distributed run reproduce a single-process one update for update.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lopt_dist.config import TrainConfig


def adam_hyperparameters(train: TrainConfig) -> dict[str, object]:
    """AdamW's betas and eps, as every path builds it (single process and every DeepSpeed group); the DeepSpeed
    JSON check compares a JSON's optimizer block with these."""
    return {"betas": tuple(train.adam_betas), "eps": train.adam_eps}


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and other vectors are left undecayed."""
    decay, no_decay = [], []
    for _, param in module.named_parameters():
        if param.requires_grad:
            # A ZeRO-3 parameter partitioned at construction holds an empty 1-D tensor; its shape is `ds_shape`.
            shape = getattr(param, "ds_shape", param.shape)
            (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float,
                    train: TrainConfig | None = None) -> torch.optim.AdamW:
    """AdamW over the module's trainable parameters only (frozen LoRA bases are left out), with the betas and eps
    of `train` (None: the defaults of train.adam_betas / train.adam_eps)."""
    # foreach=False: the same kernel on every path, so per-element results match bit for bit.
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, foreach=False,
                             **adam_hyperparameters(train or TrainConfig()))


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Linear warm-up to 1 over `train.warmup` steps, then cosine down to `min_lr_ratio` at the last step.
    `step` counts from 0."""
    warmup = train.warmup
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, train.steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))


def stage_lr(stage_index: int, num_stages: int, train: TrainConfig) -> float:
    """The last stage learns at `lr`; earlier stages and their decoders at `lr_first`."""
    return train.lr if stage_index == num_stages - 1 else train.first_lr
