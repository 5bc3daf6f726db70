"""A training run from config to exported model: validate, build, train (with checkpoints), export, close.

The same loop serves both runtimes: `local` (one process, stage after stage) and `ray` (one worker group
per stage). Each yields per-step records; this module logs them, checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lopt_dist.checkpoint import RunCheckpoints
from lopt_dist.checkpoint.export import write_weights
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ExperimentConfig
from lopt_dist.device import local_device
from lopt_dist.evaluation import build_eval_sets, due, eval_record, split_holdout
from lopt_dist.model.loading import load_model_config, load_tokenizer
from lopt_dist.preflight import prepare
from lopt_dist.telemetry.memory import step_peak_bytes
from lopt_dist.telemetry.sinks import Sinks
from lopt_dist.telemetry.progress import Progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    records: list[dict]
    checkpoint: Path | None
    model_dir: Path | None


def train(cfg: ExperimentConfig) -> RunResult:
    started = time.perf_counter()
    cfg = prepare(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("output: %s", out)
    checkpoints = RunCheckpoints(cfg, load_model_config(cfg.model.name).num_hidden_layers)
    resume = checkpoints.open()  # before any worker starts: a bad checkpoint or a used output_dir fails here
    start_step = resume.step if resume is not None else 0
    end_step = min(cfg.train.steps, cfg.checkpoint.stop_after or cfg.train.steps)

    def checkpoint_at(done: int) -> Path | None:
        every = cfg.checkpoint.save_every
        if done == end_step or (every and done % every == 0):
            return checkpoints.staging(done)
        return None

    runner = _LocalRunner(cfg) if cfg.runtime.mode == "local" else _RayRunner(cfg)
    records, last_checkpoint, model_dir = [], None, None
    sinks = Sinks(cfg, out, start_step)  # metrics.jsonl and logging.report_to
    progress = None
    try:
        checks_s = time.perf_counter() - started
        runner.start(resume.path if resume is not None else None)
        _log_setup({"checks": checks_s, **runner.setup_times})
        progress = Progress(cfg, start_step)  # created now, so its rate and ETA count steps only
        for record, staged in runner.steps(start_step, end_step, checkpoint_at):
            sinks.write(record)
            progress.update(record)
            records.append(record)
            if staged is not None:
                last_checkpoint = checkpoints.commit(staged, record["step"] + 1)
        if cfg.checkpoint.export and end_step == cfg.train.steps:
            model_dir = checkpoints.export(runner.export_shards)
    finally:
        if progress is not None:
            progress.close()
        sinks.close()
        runner.close()
        checkpoints.abort()  # staging directories left by a failure are not checkpoints
    return RunResult(out, records, last_checkpoint, model_dir)


def _log_setup(times: dict[str, float]) -> None:
    """One line: how long the run took to start, and where that time went."""
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
    logger.info("set-up took %.1f s (%s); training starts", sum(times.values()), parts)


class _LocalRunner:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.setup_times: dict[str, float] = {}

    def start(self, resume_from: Path | None) -> None:
        from lopt_dist.data import build_examples, micro_batches
        from lopt_dist.model.loading import load_causal_lm
        from lopt_dist.train.local import LocalTrainer
        from lopt_dist.train.precision import run_dtype

        cfg = self.cfg
        started = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model.name)
        examples, held_out = split_holdout(build_examples(cfg.data, tokenizer), cfg)
        batches = micro_batches(examples, cfg, tokenizer.pad_token_id)
        self.eval_sets = build_eval_sets(cfg, tokenizer, held_out) if cfg.eval.every else []
        device = local_device(cfg.runtime.device, torch.cuda.is_available())
        model = load_causal_lm(cfg.model.name, dtype=run_dtype(cfg.train),
                               attn_implementation=cfg.model.attn_implementation)
        self.trainer = LocalTrainer(cfg, model, batches, device)
        if resume_from is not None:
            self.trainer.load_state(resume_from)
        self.setup_times["data and model"] = time.perf_counter() - started

    def steps(self, first: int, end: int, checkpoint_at) -> Iterator[tuple[dict, Path | None]]:
        while self.trainer.step < end:
            result = self.trainer.train_step()
            record = result.as_record()
            record["peak_mem_bytes"] = step_peak_bytes(self.trainer.memory())
            if due(self.cfg, result.step + 1):
                started = time.perf_counter()
                record.update(eval_record(self.trainer.evaluate(self.eval_sets), self.cfg))
                record["eval_seconds"] = time.perf_counter() - started
            staged = checkpoint_at(result.step + 1)
            if staged is not None:
                self.trainer.save_state(staged)
            yield record, staged

    def export_shards(self, directory: Path, max_bytes: int, dtype: torch.dtype) -> list[Shard]:
        """The same shard writer as the workers', over the trainer's fp32 weights, one stage at a time."""
        return write_weights(directory, self.trainer.stage_weights(), max_bytes, dtype)

    def close(self) -> None:
        pass


class _RayRunner:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.driver = None
        self.setup_times: dict[str, float] = {}

    def start(self, resume_from: Path | None) -> None:
        from lopt_dist.pipeline.driver import PipelineDriver

        self.driver = PipelineDriver.start(self.cfg)
        self.setup_times.update(self.driver.setup_times)
        if resume_from is not None:
            started = time.perf_counter()
            self.driver.load_checkpoint(str(resume_from))
            self.setup_times["resume"] = time.perf_counter() - started

    def steps(self, first: int, end: int, checkpoint_at) -> Iterator[tuple[dict, Path | None]]:
        from lopt_dist.pipeline.driver import summarize_step

        last = time.perf_counter()
        for report in self.driver.steps(first, end, checkpoint_at, evaluate_at=lambda done: due(self.cfg, done)):
            now = time.perf_counter()
            yield summarize_step(report, self.cfg, now - last), report.checkpoint
            last = now

    def export_shards(self, directory: Path, max_bytes: int, dtype: torch.dtype) -> list[Shard]:
        return self.driver.export_shards(directory, max_bytes, dtype)

    def close(self) -> None:
        if self.driver is not None:
            self.driver.shutdown()
