"""What a checkpoint records about its run, and the checks before a run resumes from it.

Every check runs on the driver before any worker starts, and each failure is one line naming the file or key
and the fix: a state.json that does not parse, a file that is missing or shorter than when it was committed
(state.json lists every file's size), a config that would feed other batches or cut the model elsewhere
(boundaries compared as resolved, so `[2]` equals the default cut of a 4-layer model), other group sizes, or
another ZeRO stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lopt_dist.checkpoint.files import CheckpointError
from lopt_dist.checkpoint.store import STATE_FILE, CheckpointStore
from lopt_dist.config import ConfigError, ExperimentConfig

FORMAT = 2  # 1: lopt-dist before the checkpoint component (pickled RNG and trainer files; not read any more)

# What must not change between a checkpoint and the run that resumes it: the batches and the training maths.
_MUST_MATCH = (
    ("model", "name"), ("data", "source"), ("data", "hub_config"), ("data", "split"), ("data", "format"),
    ("data", "max_seq_length"), ("data", "shuffle"), ("data", "seed"), ("data", "max_samples"),
    ("data", "builtin_samples"), ("data", "prompt_format"), ("data", "chat_template_kwargs"), ("data", "truncation"),
    ("data", "packing"), ("model", "lora"), ("train", "method"), ("train", "micro_batch_size"),
    ("train", "micro_batches_per_step"), ("train", "dtype"), ("runtime", "mode"), ("eval", "holdout"),
)


@dataclass(frozen=True)
class RunLayout:
    """How the run cuts and shards the model, as resolved (not as written in the config)."""

    boundaries: list[int]
    workers: list[int] | None  # per stage group (Ray runs)
    zero_stages: list[Any] | None  # per stage group, from its DeepSpeed JSON (Ray runs)

    @classmethod
    def of(cls, cfg: ExperimentConfig, num_layers: int) -> RunLayout:
        from lopt_dist.model.stages import resolve_boundaries

        boundaries = resolve_boundaries(cfg.model.boundaries, num_layers) if cfg.train.method == "lopt" else []
        if cfg.runtime.mode != "ray":
            return cls(boundaries, None, None)
        from lopt_dist.pipeline.deepspeed_engine import read_deepspeed_json

        stages = [read_deepspeed_json(g.deepspeed_config, f"runtime.groups[{i}].deepspeed_config")
                  .get("zero_optimization", {}).get("stage", 0) for i, g in enumerate(cfg.runtime.groups)]
        return cls(boundaries, [g.workers for g in cfg.runtime.groups], stages)


def checkpoint_state(cfg: ExperimentConfig, layout: RunLayout, step: int) -> dict[str, Any]:
    """state.json's content (the store adds the step and the file sizes)."""
    return {"format": FORMAT, "step": step, "micro_batches_consumed": step * cfg.train.micro_batches_per_step,
            "layout": asdict(layout), "config": cfg.to_dict()}


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    step: int
    state: dict[str, Any]


def resolve(store: CheckpointStore, resume: str) -> Path:
    """'latest' or a checkpoint directory -> that directory (not yet checked)."""
    if resume == "latest":
        latest = store.latest()
        if latest is None:
            raise ConfigError(f"checkpoint.resume: 'latest' but {store.root} holds no committed checkpoint; "
                              "start without --resume, or name a checkpoint directory")
        return latest.path
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {path} is not a directory; give a checkpoint such as "
                          f"{store.root}/step_000010, or 'latest'")
    return path


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, or one line saying why it cannot be used."""
    file = path / STATE_FILE
    others = _others(path)
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a committed checkpoint (no {STATE_FILE}); {others}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is truncated or damaged ({err}); {others}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file}: written by an older lopt-dist (checkpoint format "
                              f"{state.get('format', 1) if isinstance(state, dict) else '?'}, this one reads "
                              f"{FORMAT}); start a new run, or resume it with the version that wrote it")
    return state


def verify_files(path: Path, state: dict[str, Any]) -> None:
    """Every file the checkpoint was committed with is there, at its committed size."""
    others = _others(path)
    stage_dirs = sorted({Path(name).parts[0] for name in state["files"] if "/" in name})
    for stage in stage_dirs:
        if not (path / stage).is_dir():
            raise CheckpointError(f"{path / stage}/ is missing; the checkpoint is incomplete: {others}")
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete: {others}")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file} is truncated or changed ({actual} bytes, committed with {size}); {others}")


def check_compatible(path: Path, state: dict[str, Any], cfg: ExperimentConfig, layout: RunLayout) -> None:
    saved, now = state["config"], cfg.to_dict()
    for section, key in _MUST_MATCH:
        # A key added to the config after the checkpoint was written had its default value then.
        was = saved.get(section, {}).get(key, _default(section, key))
        if was != now[section][key]:
            raise ConfigError(
                f"{section}.{key}: is {now[section][key]!r} but the checkpoint {path} was made with "
                f"{was!r}; resuming would change the batches or the model, so keep it as it was")
    was = state["layout"]
    if was["boundaries"] != layout.boundaries:
        raise ConfigError(f"model.boundaries: cuts the model at {layout.boundaries} but the checkpoint {path} was "
                          f"made with cuts at {was['boundaries']}; resume with model.boundaries={was['boundaries']}")
    if cfg.runtime.mode == "ray" and was["workers"] != layout.workers:
        raise ConfigError(f"runtime.groups: workers {layout.workers} differ from the checkpoint's {was['workers']}; "
                          "DeepSpeed states are sharded per worker, so resume with the same group sizes")
    if cfg.runtime.mode == "ray":
        for i, (before, after) in enumerate(zip(was["zero_stages"], layout.zero_stages)):
            if before != after:
                raise ConfigError(
                    f"runtime.groups[{i}].deepspeed_config: ZeRO stage {after} but the checkpoint {path} was written "
                    f"with ZeRO stage {before}, whose files DeepSpeed cannot load into stage {after}; resume with a "
                    f"JSON of stage {before} (configs/deepspeed/zero{before}.json), or export the checkpoint with "
                    "lopt-export and start a new run from the exported model")
    if state["step"] >= cfg.train.steps:
        raise ConfigError(f"train.steps: the checkpoint {path} is already at step {state['step']}; "
                          f"set train.steps above {state['step']} to train further")


def _default(section: str, key: str) -> Any:
    return ExperimentConfig().to_dict()[section][key]


def resume_point(store: CheckpointStore, cfg: ExperimentConfig, layout: RunLayout) -> ResumePoint:
    path = resolve(store, cfg.checkpoint.resume)
    state = read_state(path)
    verify_files(path, state)
    check_compatible(path, state, cfg, layout)
    return ResumePoint(path, state["step"], state)


def _others(path: Path) -> str:
    """The fix for an unusable checkpoint: the other committed ones beside it, if any."""
    siblings = [p for p in CheckpointStore(path.parent, 1).committed() if p.path != path]
    if not siblings:
        return "no other checkpoint is there, so start the run again (--overwrite)"
    names = ", ".join(str(c.path) for c in siblings[-3:])
    return f"resume from another one with --resume DIR ({names})"
