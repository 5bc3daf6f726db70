"""One DeepSpeed engine per stage worker, built from its group's JSON file and the experiment's hyper-parameters.

The experiment YAML owns everything that must agree across stages and with the single-process trainer
(batch sizes, learning rates and schedule, clipping, dtype); the group's JSON owns how the group runs
(ZeRO stage and its knobs, communication, offload). A JSON that sets one of the YAML's values differently
is rejected rather than silently overridden.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lopt_dist.config import ConfigError, ExperimentConfig, GroupConfig
from lopt_dist.model import Stage
from lopt_dist.train.optim import build_optimizer, build_scheduler, stage_lr
from lopt_dist.train.precision import deepspeed_precision, refuse_policy_contradictions

logger = logging.getLogger(__name__)

# Set from the experiment YAML; the optimizer and scheduler are built by lopt-dist so that every path
# (single process, any ZeRO stage) uses the same AdamW groups and warm-up + cosine schedule.
_OWNED_BY_EXPERIMENT = ("optimizer", "scheduler")


def read_deepspeed_json(path: str, key: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: DeepSpeed config file {path} does not exist (paths are relative to the "
                          "directory lopt-train runs in; the shipped ones are configs/deepspeed/zero*.json)")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object")
    return values


def deepspeed_config(cfg: ExperimentConfig, group: GroupConfig, key: str) -> dict[str, Any]:
    """The group's JSON, completed with the experiment's batch and clipping settings and the precision policy."""
    ds = read_deepspeed_json(group.deepspeed_config, key)
    check_deepspeed_json(ds, cfg, group, key)
    ds.update(_experiment_values(cfg, group))
    # Our optimizer is torch's AdamW, which DeepSpeed has not certified for every ZeRO stage.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    zero_stage = zero_stage_of(ds)
    if group.workers == 1 and zero_stage > 0:
        logger.warning("%s: ZeRO stage %d on a one-worker group shards nothing but still costs time and memory "
                       "(about 1.5x slower on CPU, docs/benchmarks.md); configs/deepspeed/zero0.json gives the "
                       "same updates", key, zero_stage)
    return deepspeed_precision(ds, cfg.train, f"{key}: {group.deepspeed_config}")


def zero_stage_of(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


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


def _experiment_values(cfg: ExperimentConfig, group: GroupConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.micro_batches_per_step // group.workers,
        "train_batch_size": cfg.train.samples_per_step,
        "gradient_clipping": cfg.train.grad_clip,
    }


# Where "auto" may stand: the values lopt-dist fills from the experiment. DeepSpeed itself drops "auto" and
# uses its default, which differs from what the HF Trainer would fill, so anywhere else it is refused.
_FILLED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
           "gradient_clipping", "bf16.enabled", "fp16.enabled")


def check_deepspeed_json(ds: dict[str, Any], cfg: ExperimentConfig, group: GroupConfig, key: str) -> None:
    """Refuse a JSON that contradicts the experiment or that DeepSpeed would read differently than written,
    naming the JSON key and the fix. Run on the driver before anything starts, and again by `deepspeed_config`."""
    where = f"{key}: {group.deepspeed_config}"
    for name in _OWNED_BY_EXPERIMENT:
        if name in ds:
            raise ConfigError(
                f"{where} sets '{name}'; lopt-dist builds the optimizer and schedule from the experiment's train.* "
                f"settings (lr, lr_first, weight_decay, warmup_steps, min_lr_ratio). Remove '{name}' from the JSON"
            )
    for name, value in _experiment_values(cfg, group).items():
        if name in ds and ds[name] != "auto" and ds[name] != value:
            raise ConfigError(
                f"{where} sets {name}={ds[name]} but the experiment needs {value} (from train.* and the group's "
                f"{group.workers} workers); remove it or set it to \"auto\""
            )
    for path in _auto_values(ds):
        if path not in _FILLED:
            raise ConfigError(
                f"{where} sets {path}: \"auto\", which lopt-dist does not fill (it fills {', '.join(_FILLED)}) and "
                "DeepSpeed would silently replace by its default; give the value or remove the key"
            )
    _check_precision(ds, cfg, where)
    _check_zero(ds, where)


def _auto_values(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every "auto" value in the JSON."""
    if not isinstance(tree, dict):
        return []
    found = []
    for name, value in tree.items():
        path = f"{prefix}{name}"
        found += [path] if value == "auto" else _auto_values(value, f"{path}.")
    return found


def _check_precision(ds: dict[str, Any], cfg: ExperimentConfig, where: str) -> None:
    """train.dtype decides the precision; a JSON that asks for another one is refused, not overridden."""
    dtype = cfg.train.dtype
    for name in ("bf16", "bfloat16"):  # "bfloat16" is DeepSpeed's older spelling
        enabled = _section(ds, name, where).get("enabled", "auto")
        if enabled != "auto" and enabled != (dtype == "bfloat16"):
            raise ConfigError(
                f"{where} sets {name}.enabled: {str(enabled).lower()} but train.dtype is {dtype}; set "
                f"train.dtype={'bfloat16' if enabled else 'float32'} in the experiment, or remove {name}.enabled "
                "(or set it to \"auto\") so the experiment decides"
            )
    for name in ("fp16", "amp"):
        if _section(ds, name, where).get("enabled", False) not in (False, "auto"):
            raise ConfigError(f"{where} enables {name}; use train.dtype=bfloat16 or float32 and remove "
                              f"{name}.enabled (lopt-dist trains in float32 or bfloat16 only)")
    if dtype == "bfloat16":
        refuse_policy_contradictions(ds, where)


def _check_zero(ds: dict[str, Any], where: str) -> None:
    stage = _section(ds, "zero_optimization", where).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where} sets zero_optimization.stage: {json.dumps(stage)}; give 0, 1, 2 or 3 (the "
                          "shipped configs/deepspeed/zero{0,1,2,3}.json show each)")


def _section(ds: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = ds.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where} sets {name} to {json.dumps(value)}; it must be a JSON object, e.g. "
                          f"\"{name}\": {{...}}")
    return value


def build_engine(stage: Stage, cfg: ExperimentConfig, stage_index: int, ds_config: dict[str, Any]):
    """`ds_config` comes from `deepspeed_config`, read on the driver so that bad files fail before start-up."""
    import deepspeed

    lr = stage_lr(stage_index, cfg.model.num_stages, cfg.train)
    optimizer = build_optimizer(stage, lr, cfg.train.weight_decay, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=stage, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
