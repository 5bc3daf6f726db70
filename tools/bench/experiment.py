"""lopt-dist's own experiment config for the rows that run lopt-dist code (LocalTrainer, stage workers, ZeRO).

Built from the benchmark's settings, so every row trains with the same batch, learning rate and schedule.
Gradient clipping is off in every row: a pipeline would need a global-norm all-reduce across its stages that
the other rows skip, and clipping is not what this benchmark compares.
"""

from __future__ import annotations

from typing import Literal

from lopt_dist.config import (
    CheckpointConfig,
    DataConfig,
    ExperimentConfig,
    GroupConfig,
    LoggingConfig,
    ModelConfig,
    RuntimeConfig,
    TrainConfig,
)
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config

from .config import BenchConfig
from .models import ModelInfo, even_boundaries


def pipeline_boundaries(cfg: BenchConfig, model: ModelInfo) -> list[int]:
    """Where the `workers` stages of lopt-dist and of the one-stage-per-rank pipeline schedules start."""
    return list(cfg.boundaries) if cfg.boundaries is not None else even_boundaries(model.num_layers, cfg.workers)


def data_config(cfg: BenchConfig) -> DataConfig:
    """`--data` as lopt-train's data section: rows cut from the left to --seq-len (answers kept), packed or not."""
    return DataConfig(source=cfg.data or "builtin:arithmetic", max_seq_length=cfg.seq_len, truncation="left",
                      packing=cfg.packing, seed=cfg.seed)


def experiment_config(
    cfg: BenchConfig,
    model: ModelInfo,
    *,
    method: Literal["lopt", "e2e"] = "lopt",
    mode: Literal["local", "ray"] = "local",
    group_sizes: tuple[int, ...] | None = None,
    deepspeed_file: str | None = None,
) -> ExperimentConfig:
    """`group_sizes`: workers per group; None gives one single-worker group per pipeline stage, with the lopt-dist
    DeepSpeed config unless `deepspeed_file` names another."""
    sizes = group_sizes or (1,) * cfg.workers
    ds_file = deepspeed_file or cfg.lopt_dist_deepspeed_config
    groups = [GroupConfig(workers=n, deepspeed_config=ds_file, threads_per_worker=cfg.threads_per_worker)
              for n in sizes]
    return ExperimentConfig(
        name="lopt-bench",
        output_dir=f"{cfg.out_dir}/run",
        model=ModelConfig(name=model.path, boundaries=pipeline_boundaries(cfg, model)),
        data=data_config(cfg),
        train=TrainConfig(method=method, steps=cfg.total_steps, micro_batch_size=cfg.micro_batch_size,
                          micro_batches_per_step=cfg.micro_batches, lr=cfg.lr, grad_clip=0.0, seed=cfg.seed,
                          dtype=cfg.dtype),
        runtime=RuntimeConfig(mode=mode, device=cfg.device, groups=groups, channel_depth=cfg.channel_depth),
        checkpoint=CheckpointConfig(export=False),
        logging=LoggingConfig(progress=False),
    )


def zero2_deepspeed_config(cfg: BenchConfig, model: ModelInfo, profile_comms: bool) -> dict:
    """The data-parallel row's DeepSpeed config: lopt-dist's own completion of the ZeRO-2 JSON for one group of
    all the workers. `profile_comms` turns on DeepSpeed's comms logger, which times every collective (and makes
    each one blocking, which on a CPU they are anyway)."""
    experiment = experiment_config(cfg, model, method="e2e", group_sizes=(cfg.workers,),
                                   deepspeed_file=cfg.zero2_config)
    ds = deepspeed_config(experiment, 0, key="--zero2-config")
    if profile_comms:
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    return ds
