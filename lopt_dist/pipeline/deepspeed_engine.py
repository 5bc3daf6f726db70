"""One DeepSpeed engine per stage worker, built from its group's JSON file and the experiment's hyper-parameters.

The JSON is checked against the experiment and completed from it in `deepspeed_json.py` (HF-style "auto" values,
optimizer and scheduler blocks); the precision policy is applied by `precision.deepspeed_precision`; the
optimizer and schedule are lopt-dist's own (`train/optim.py`), so every path makes the same updates.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from lopt_dist.config import ExperimentConfig
from lopt_dist.model import Stage
from lopt_dist.pipeline.deepspeed_json import (  # noqa: F401  (re-exported: the JSON's public names live here too)
    check_deepspeed_json,
    complete_deepspeed_json,
    needs_hidden_size,
    read_deepspeed_json,
    zero_stage_of,
)
from lopt_dist.train.optim import build_optimizer, build_scheduler, stage_lr
from lopt_dist.train.precision import deepspeed_precision

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: ExperimentConfig, stage: int, key: str | None = None) -> dict[str, Any]:
    """Stage `stage`'s group JSON, checked, completed from the experiment and given the precision policy.
    `key` names the JSON in messages (default: runtime.groups[stage].deepspeed_config)."""
    group = cfg.runtime.groups[stage]
    key = key or f"runtime.groups[{stage}].deepspeed_config"
    ds = read_deepspeed_json(group.deepspeed_config, key)
    check_deepspeed_json(ds, cfg, stage, key)
    ds = complete_deepspeed_json(ds, cfg, stage, _hidden_size(cfg.model.name) if needs_hidden_size(ds) else None)
    zero_stage = zero_stage_of(ds)
    if group.workers == 1 and zero_stage > 0:
        logger.warning("%s: ZeRO stage %d on a one-worker group shards nothing but still costs time and memory "
                       "(about 1.5x slower on CPU, docs/benchmarks.md); configs/deepspeed/zero0.json gives the "
                       "same updates", key, zero_stage)
    return deepspeed_precision(ds, cfg.train, f"{key}: {group.deepspeed_config}")


def _hidden_size(model_name: str) -> int | None:
    """The model's hidden size as the HF integration finds it (hidden_size, the largest of hidden_sizes, or the
    text config's), for the zero_optimization sizes it derives from it."""
    from lopt_dist.model.loading import load_model_config

    config = load_model_config(model_name)
    for candidate in (config, getattr(config, "text_config", None)):
        if candidate is None:
            continue
        if getattr(candidate, "hidden_size", None):
            return candidate.hidden_size
        if getattr(candidate, "hidden_sizes", None):
            return max(candidate.hidden_sizes)
    return None


def zero3_partitioner(ds_config: dict[str, Any], dtype: torch.dtype) -> Callable[[nn.Module], None] | None:
    """Under ZeRO-3, what partitions a freshly filled module over the group (None for other stages).

    `zero.Init(module=...)` broadcasts the module's parameters from rank 0 and keeps only this rank's slice of
    each, so calling it on each unit right after filling it means no worker ever holds its whole stage;
    `deepspeed.initialize` then finds the parameters already partitioned and leaves them so.
    """
    if zero_stage_of(ds_config) != 3:
        return None
    import deepspeed

    # zero.Init reads the group's size from deepspeed.comm, which deepspeed.initialize would set up only later.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)

    def partition(module: nn.Module) -> None:
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, dtype=dtype)

    return partition


def build_engine(stage: Stage, cfg: ExperimentConfig, stage_index: int, ds_config: dict[str, Any]):
    """`ds_config` comes from `deepspeed_config`, read on the driver so that bad files fail before start-up."""
    import deepspeed

    lr = stage_lr(stage_index, cfg.model.num_stages, cfg.train)
    optimizer = build_optimizer(stage, lr, cfg.train.weight_decay, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=stage, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
