"""`RunCheckpoints`: the one object a run loop calls for its output directory's checkpoints, resume and export.

    ckpt = RunCheckpoints(cfg, num_layers)
    point = ckpt.open()                    # hygiene; refuses a used output_dir; checks and rewinds a resume
    staged = ckpt.staging(step)            # workers / the trainer write the state after `step` steps here
    ckpt.commit(staged, step)              # one rename; `latest`; pruning by step
    ckpt.abort()                           # after a failure: staging directories are not checkpoints
    ckpt.export(write_shards)              # the final model, written by the stages, joined here

A retry loop needs no more than `latest_point()` (the newest committed checkpoint, checked as a
resume) and `rewind(step)` (drop later checkpoints; truncate metrics with `MetricsLog.truncate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from lopt_dist.atomic import remove_stale
from lopt_dist.checkpoint.export import ModelFiles, export_dtype, export_to
from lopt_dist.checkpoint.files import remove_tree
from lopt_dist.checkpoint.resume import (
    ResumePoint,
    RunLayout,
    check_compatible,
    checkpoint_state,
    read_state,
    resume_point,
    verify_files,
)
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.checkpoint.store import CheckpointStore
from lopt_dist.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

# What a run writes into output_dir besides its checkpoints; --overwrite deletes these too.
_RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "model", "failures.jsonl")


class RunCheckpoints:
    def __init__(self, cfg: ExperimentConfig, num_layers: int) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.store = CheckpointStore(self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.layout = RunLayout.of(cfg, num_layers)

    def open(self) -> ResumePoint | None:
        """Prepare output_dir for this run; the checkpoint to resume from, if the config asks for one."""
        self.store.clean()
        remove_stale(self.out / "model")
        if self.cfg.checkpoint.resume:
            point = resume_point(self.store, self.cfg, self.layout)
            self.rewind(point.step)
            return point
        used = self.store.committed()
        if used and not self.cfg.checkpoint.overwrite:
            raise ConfigError(
                f"output_dir: {self.out} already holds checkpoints of a run (newest: {used[-1].path.name}); "
                "continue it with --resume, start over with --overwrite (deletes its checkpoints, metrics and "
                "model), or choose another output_dir")
        if used or self.cfg.checkpoint.overwrite:
            self.store.discard_all()
            for name in _RUN_OUTPUTS:
                path = self.out / name
                if path.is_dir():
                    remove_tree(path)
                else:
                    path.unlink(missing_ok=True)
        return None

    def rewind(self, step: int) -> None:
        dropped = self.store.rewind(step)
        if dropped:
            logger.warning("resuming at step %d: deleted the later checkpoints %s of the abandoned continuation",
                           step, dropped)

    def latest_point(self) -> ResumePoint | None:
        latest = self.store.latest()
        if latest is None:
            return None
        state = read_state(latest.path)
        verify_files(latest.path, state)
        check_compatible(latest.path, state, self.cfg, self.layout)
        return ResumePoint(latest.path, state["step"], state)

    def staging(self, step: int) -> Path:
        return self.store.staging(step)

    def commit(self, staging: Path, step: int) -> Path:
        return self.store.commit(staging, step, checkpoint_state(self.cfg, self.layout, step))

    def abort(self) -> None:
        self.store.abort()

    def export(self, write_shards: Callable[[Path, int, torch.dtype], list[Shard]]) -> Path:
        """The final model in output_dir/model: `write_shards(directory, max_bytes, dtype)` has every stage write
        its shards into `directory` and returns their metadata; this adds the index, config and tokenizer."""
        dtype, max_bytes = export_dtype(self.cfg), self.cfg.checkpoint.export_shard_bytes
        return export_to(self.out / "model", lambda directory: write_shards(directory, max_bytes, dtype),
                         ModelFiles.of(self.cfg.model.name), dtype)
