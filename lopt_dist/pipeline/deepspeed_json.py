"""A group's DeepSpeed JSON, as users write it for the Hugging Face Trainer, checked against the experiment and
completed from it.

The experiment YAML owns everything that must agree across stages and with the single-process trainer: batch
sizes, clipping, precision, and the optimizer and its schedule (AdamW with lopt-dist's parameter groups, linear
warm-up then cosine). The JSON owns how the group runs: ZeRO stage and its knobs, offload, communication.

What a JSON may say about the experiment's values, as the HF integration reads it:
- `"auto"` where the experiment (or the model) has the value: it is filled in, as the HF Trainer fills it
  (`AUTO_FILLED` lists the keys); anywhere else DeepSpeed would silently use its own default, so it is refused;
- a concrete value that equals the experiment's is accepted; one that differs is refused, naming both keys;
- an `optimizer` block must be Adam/AdamW (the experiment's optimizer) and a `scheduler` block one of DeepSpeed's
  warm-up schedules; their numbers are checked as above. lopt-dist then builds the optimizer and schedule from
  train.* and drops both blocks; a scheduler's shape (its type, DeepSpeed's default log warm-up) is not
  reproduced, and one warning before start names the schedule used instead.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from lopt_dist.config import ConfigError, ExperimentConfig, GroupConfig
from lopt_dist.train.optim import adam_hyperparameters, stage_lr
from lopt_dist.train.precision import refuse_policy_contradictions

_ADAM_TYPES = ("adam", "adamw")  # DeepSpeed's Adam is AdamW unless adam_w_mode is false
_SCHEDULER_PARAMS = {
    "warmuplr": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "warmupdecaylr": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration",
                      "total_num_steps"},
    "warmupcosinelr": {"warmup_min_ratio", "cos_min_ratio", "warmup_num_steps", "warmup_type",
                       "last_batch_iteration", "total_num_steps"},
}
_OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction", "amsgrad"}
# zero_optimization sizes the HF Trainer derives from the model's hidden size h (as it does: h*h, 0.9*h*h, 10*h).
_HIDDEN_SIZED = {
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
}


def read_deepspeed_json(path: str, key: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: DeepSpeed config file {path} does not exist (in an experiment YAML, paths are "
                          "relative to the YAML file; in --set, to the current directory; the shipped ones are "
                          "configs/deepspeed/zero*.json)")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object")
    return values


def zero_stage_of(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def batch_values(cfg: ExperimentConfig, group: GroupConfig) -> dict[str, Any]:
    """What the experiment sets in every group's JSON, whatever the JSON says (checked first)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.micro_batches_per_step // group.workers,
        "train_batch_size": cfg.train.samples_per_step,
        "gradient_clipping": cfg.train.grad_clip,
    }


def experiment_values(cfg: ExperimentConfig, stage: int) -> dict[str, Any]:
    """Dotted JSON key -> the experiment's value, for every key the HF integration fills or matches (the zero
    bucket sizes come from the model: `hidden_sized_values`)."""
    train, group = cfg.train, cfg.runtime.groups[stage]
    lr = train.lr if train.method == "e2e" else stage_lr(stage, cfg.model.num_stages, train)
    adam = adam_hyperparameters(train)
    bf16 = train.dtype == "bfloat16"
    return {
        **batch_values(cfg, group),
        "bf16.enabled": bf16, "bfloat16.enabled": bf16, "fp16.enabled": False, "amp.enabled": False,
        "optimizer.params.lr": lr, "optimizer.params.betas": list(adam["betas"]),
        "optimizer.params.eps": adam["eps"], "optimizer.params.weight_decay": train.weight_decay,
        "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": lr,
        "scheduler.params.warmup_num_steps": train.warmup, "scheduler.params.total_num_steps": train.steps,
        "scheduler.params.warmup_min_ratio": 0.0, "scheduler.params.cos_min_ratio": train.min_lr_ratio,
    }


# Filled where "auto", any value accepted: lopt-dist writes its own export (gathering ZeRO-3 parameters one at a
# time), never DeepSpeed's 16-bit save, so this setting does not matter to it.
_FILL_ONLY = {"zero_optimization.stage3_gather_16bit_weights_on_model_save": False}
# The keys where "auto" may stand, for messages (the README lists them too).
AUTO_FILLED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "gradient_clipping", "bf16.enabled", "fp16.enabled", "amp.enabled", "optimizer.params.*",
               "scheduler.params.*", *_HIDDEN_SIZED, *_FILL_ONLY)


def check_deepspeed_json(ds: dict[str, Any], cfg: ExperimentConfig, stage: int, key: str) -> list[str]:
    """Refuse a JSON that contradicts the experiment or that DeepSpeed would read differently than written, naming
    the JSON key and the fix; return the warnings to show once before start. Run by preflight, and again (its
    warnings dropped) when the driver completes the JSON."""
    where = f"{key}: {cfg.runtime.groups[stage].deepspeed_config}"
    values = experiment_values(cfg, stage)
    warnings = _check_optimizer(ds, where) + _check_scheduler(ds, cfg, where)
    for path, value in _leaves(ds):
        if value == "auto":
            if path not in values and path not in _HIDDEN_SIZED and path not in _FILL_ONLY:
                raise ConfigError(
                    f"{where} sets {path}: \"auto\", which lopt-dist does not fill (it fills the keys the HF Trainer "
                    f"fills from the experiment: {', '.join(AUTO_FILLED)}) and DeepSpeed would silently replace by "
                    "its default; give the value or remove the key")
        elif path in values and not _precision_key(path) and not _same(value, values[path]):
            raise ConfigError(
                f"{where} sets {path}={json.dumps(value)} but the experiment gives {json.dumps(values[path])} "
                f"({_EXPERIMENT_KEYS.get(path, 'from train.* and the group size')}); change it there, or set the "
                "JSON value to \"auto\" or remove it")
    _check_precision(ds, cfg, where)
    _check_zero(ds, where)
    return warnings


def complete_deepspeed_json(ds: dict[str, Any], cfg: ExperimentConfig, stage: int,
                            hidden_size: int | None) -> dict[str, Any]:
    """The checked JSON as DeepSpeed gets it: "auto" filled, the optimizer and scheduler blocks dropped (lopt-dist
    passes its own), the experiment's batch and clipping values set. Precision: `precision.deepspeed_precision`."""
    ds = copy.deepcopy(ds)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    values = experiment_values(cfg, stage)
    for path, value in _leaves(ds):
        if value == "auto":
            if path in _HIDDEN_SIZED:
                if hidden_size is None:
                    raise ConfigError(f"{path}: \"auto\" needs the model's hidden_size, which {cfg.model.name}'s "
                                      "config does not give; write the number")
                _set(ds, path, _HIDDEN_SIZED[path](hidden_size))
            else:
                _set(ds, path, {**values, **_FILL_ONLY}[path])
    ds.update(batch_values(cfg, cfg.runtime.groups[stage]))
    # Our optimizer is torch's AdamW, which DeepSpeed has not certified for every ZeRO stage, and which it refuses
    # with optimizer offload unless told: the update is the same as on every other path (DeepSpeedCPUAdam's is not).
    ds["zero_allow_untested_optimizer"] = True
    if ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)
    return ds


def needs_hidden_size(ds: dict[str, Any]) -> bool:
    return any(value == "auto" and path in _HIDDEN_SIZED for path, value in _leaves(ds))


_EXPERIMENT_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.micro_batches_per_step / the group's workers",
    "train_batch_size": "train.micro_batch_size x train.micro_batches_per_step",
    "gradient_clipping": "train.grad_clip",
    "optimizer.params.lr": "train.lr for the last stage, train.lr_first for the others",
    "optimizer.params.betas": "train.adam_betas", "optimizer.params.eps": "train.adam_eps",
    "optimizer.params.weight_decay": "train.weight_decay",
    "scheduler.params.warmup_min_lr": "the warm-up starts from 0",
    "scheduler.params.warmup_max_lr": "train.lr for the last stage, train.lr_first for the others",
    "scheduler.params.warmup_num_steps": "train.warmup_steps",
    "scheduler.params.total_num_steps": "train.steps",
    "scheduler.params.warmup_min_ratio": "the warm-up starts from 0",
    "scheduler.params.cos_min_ratio": "train.min_lr_ratio",
}


def _check_optimizer(ds: dict[str, Any], where: str) -> list[str]:
    block = _section(ds, "optimizer", where)
    if not block:
        return []
    kind = str(block.get("type", "")).lower()
    params = block.get("params", {})
    if kind not in _ADAM_TYPES or not isinstance(params, dict):
        raise ConfigError(f"{where} sets optimizer.type {json.dumps(block.get('type'))}; lopt-dist trains every "
                          "stage with AdamW built from train.* (lr, lr_first, weight_decay, adam_betas, adam_eps): "
                          "use \"AdamW\" or remove the optimizer block")
    unknown = sorted(set(params) - _OPTIMIZER_PARAMS)
    if unknown:
        raise ConfigError(f"{where} sets optimizer.params.{unknown[0]}, which lopt-dist's AdamW cannot apply; remove "
                          f"it (accepted: {', '.join(sorted(_OPTIMIZER_PARAMS))})")
    for name, plain in (("adam_w_mode", True), ("bias_correction", True), ("amsgrad", False)):
        if params.get(name, plain) not in (plain, "auto"):
            raise ConfigError(f"{where} sets optimizer.params.{name}: {json.dumps(params[name])}; lopt-dist's AdamW "
                              f"runs with {name}={str(plain).lower()}; remove it")
    return []


def _check_scheduler(ds: dict[str, Any], cfg: ExperimentConfig, where: str) -> list[str]:
    block = _section(ds, "scheduler", where)
    if not block:
        return []
    kind = str(block.get("type", ""))
    params = block.get("params", {})
    if kind.lower() not in _SCHEDULER_PARAMS or not isinstance(params, dict):
        raise ConfigError(f"{where} sets scheduler.type {json.dumps(block.get('type'))}; lopt-dist schedules every "
                          "stage with a linear warm-up then cosine decay (train.warmup_steps, train.min_lr_ratio): "
                          "remove the scheduler block (WarmupLR, WarmupDecayLR and WarmupCosineLR blocks are read)")
    unknown = sorted(set(params) - _SCHEDULER_PARAMS[kind.lower()])
    if unknown:
        raise ConfigError(f"{where} sets scheduler.params.{unknown[0]}, which {kind} does not take; remove it")
    if params.get("warmup_type", "linear") not in ("linear", "auto"):
        raise ConfigError(f"{where} sets scheduler.params.warmup_type: {json.dumps(params['warmup_type'])}; "
                          "lopt-dist's warm-up is linear: remove it or write \"linear\"")
    if params.get("last_batch_iteration", -1) != -1:
        raise ConfigError(f"{where} sets scheduler.params.last_batch_iteration; the schedule's position comes from "
                          "the run's step (resume with --resume): remove it")
    train = cfg.train
    constant = " (for a constant rate after it, set train.min_lr_ratio=1)" if kind.lower() == "warmuplr" else ""
    return [f"{where}: its scheduler {kind} is not used; every stage follows the experiment's schedule: a linear "
            f"warm-up over train.warmup_steps={train.warmup} steps, then a cosine decay to train.min_lr_ratio="
            f"{train.min_lr_ratio:g} of the stage's rate at the last step{constant}"]


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


def _precision_key(path: str) -> bool:
    return path.split(".")[0] in ("bf16", "bfloat16", "fp16", "amp")  # checked by _check_precision, with its hints


def _section(ds: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = ds.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where} sets {name} to {json.dumps(value)}; it must be a JSON object, e.g. "
                          f"\"{name}\": {{...}}")
    return value


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every non-object value in the JSON."""
    if not isinstance(tree, dict):
        return []
    found = []
    for name, value in tree.items():
        path = f"{prefix}{name}"
        found += _leaves(value, f"{path}.") if isinstance(value, dict) else [(path, value)]
    return found


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for name in parents:
        tree = tree[name]
    tree[last] = value


def _same(given: Any, wanted: Any) -> bool:
    """JSON value = the experiment's, numbers compared as numbers (1e-4 = 0.0001, [0.9, 0.95] = (0.9, 0.95))."""
    if isinstance(wanted, bool) or isinstance(given, bool):
        return given is wanted
    if isinstance(wanted, (int, float)) and isinstance(given, (int, float)):
        return math.isclose(given, wanted, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(wanted, (list, tuple)) and isinstance(given, list):
        return len(given) == len(wanted) and all(_same(g, w) for g, w in zip(given, wanted))
    return given == wanted
