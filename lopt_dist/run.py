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

from lopt_dist.checkpoint import Checkpoints, read_state
from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.model.export import export_model
from lopt_dist.model.loading import load_model_config, load_tokenizer
from lopt_dist.model.stages import resolve_boundaries
from lopt_dist.model.weights import check_readable
from lopt_dist.telemetry.memory import step_peak_bytes
from lopt_dist.telemetry.metrics import MetricsLog, TensorBoardLog
from lopt_dist.telemetry.progress import Progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    records: list[dict]
    checkpoint: Path | None
    model_dir: Path | None


def prepare(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks that need the model's config or the file system, done before any worker starts.

    Local paths become absolute, so that workers whose working directory differs still find them.
    """
    try:
        hf_config = load_model_config(cfg.model.name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name: cannot load a model config from {cfg.model.name!r}: {err}") from None
    resolve_boundaries(cfg.model.boundaries, hf_config.num_hidden_layers)
    if cfg.runtime.mode == "ray":
        check_readable(cfg.model.name)  # stage workers read safetensors only: say so before they start
    # A directory the user named becomes absolute; an alias or hub id stays, so each node resolves it locally.
    local = Path(cfg.model.name)
    model = dataclasses.replace(cfg.model, name=str(local.resolve()) if local.is_dir() else cfg.model.name)
    data = cfg.data
    if not data.source.startswith("builtin:"):
        source = Path(data.source)
        if source.suffix in (".jsonl", ".json", ".parquet") and not source.is_file():
            raise ConfigError(f"data.source: file {data.source} does not exist")
        if source.exists():
            data = dataclasses.replace(data, source=str(source.resolve()))
        if source.is_file():
            from lopt_dist.data.dataset import check_local_file

            check_local_file(data)  # wrong columns fail here, not in a worker minutes later
    groups = [dataclasses.replace(g, deepspeed_config=str(Path(g.deepspeed_config).resolve()))
              for g in cfg.runtime.groups]
    runtime = dataclasses.replace(cfg.runtime, groups=groups)
    return dataclasses.replace(cfg, model=model, data=data, runtime=runtime)


def train(cfg: ExperimentConfig) -> RunResult:
    cfg = prepare(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(out / "checkpoints", cfg.checkpoint.keep_last)
    checkpoints.remove_stale()
    start_step, resume_from = 0, None
    if cfg.checkpoint.resume:
        resume_from = checkpoints.resolve(cfg.checkpoint.resume)
        start_step = read_state(resume_from, cfg)["step"]

    end_step = min(cfg.train.steps, cfg.checkpoint.stop_after or cfg.train.steps)

    def checkpoint_at(done: int) -> Path | None:
        every = cfg.checkpoint.save_every
        if done == end_step or (every and done % every == 0):
            return checkpoints.staging(done)
        return None

    runner = _LocalRunner(cfg) if cfg.runtime.mode == "local" else _RayRunner(cfg)
    records, last_checkpoint, model_dir = [], None, None
    metrics = MetricsLog(out / "metrics.jsonl", append=start_step > 0)
    tensorboard = TensorBoardLog(out / "tensorboard", start_step) if cfg.logging.tensorboard else None
    progress = Progress(cfg, start_step)
    try:
        runner.start(resume_from)
        for record, staged in runner.steps(start_step, end_step, checkpoint_at):
            metrics.write(record)
            if tensorboard is not None:
                tensorboard.write(record)
            progress.update(record)
            records.append(record)
            if staged is not None:
                last_checkpoint = checkpoints.commit(staged, record["step"] + 1, cfg)
        if cfg.checkpoint.export and end_step == cfg.train.steps:
            model_dir = export_model(runner.stage_weights(), load_model_config(cfg.model.name),
                                     load_tokenizer(cfg.model.name), out / "model")
    finally:
        progress.close()
        metrics.close()
        if tensorboard is not None:
            tensorboard.close()
        runner.close()
    return RunResult(out, records, last_checkpoint, model_dir)


class _LocalRunner:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def start(self, resume_from: Path | None) -> None:
        from lopt_dist.data import MicroBatches, build_examples
        from lopt_dist.model.loading import load_causal_lm
        from lopt_dist.train.local import LocalTrainer
        from lopt_dist.train.precision import run_dtype

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model.name)
        batches = MicroBatches(build_examples(cfg.data, tokenizer), cfg.train.micro_batch_size, cfg.data.shuffle,
                               cfg.data.seed, tokenizer.pad_token_id)
        device = _local_device(cfg)
        model = load_causal_lm(cfg.model.name, dtype=run_dtype(cfg.train),
                               attn_implementation=cfg.model.attn_implementation)
        self.trainer = LocalTrainer(cfg, model, batches, device)
        if resume_from is not None:
            self.trainer.load_state(resume_from)

    def steps(self, first: int, end: int, checkpoint_at) -> Iterator[tuple[dict, Path | None]]:
        while self.trainer.step < end:
            result = self.trainer.train_step()
            record = result.as_record()
            record["peak_mem_bytes"] = step_peak_bytes(self.trainer.memory())
            staged = checkpoint_at(result.step + 1)
            if staged is not None:
                self.trainer.save_state(staged)
            yield record, staged

    def stage_weights(self) -> list[dict[str, torch.Tensor]]:
        return self.trainer.stage_weights()

    def close(self) -> None:
        pass


class _RayRunner:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.driver = None

    def start(self, resume_from: Path | None) -> None:
        from lopt_dist.pipeline.driver import PipelineDriver

        self.driver = PipelineDriver.start(self.cfg)
        if resume_from is not None:
            self.driver.load_checkpoint(str(resume_from))

    def steps(self, first: int, end: int, checkpoint_at) -> Iterator[tuple[dict, Path | None]]:
        from lopt_dist.pipeline.driver import summarize_step

        last = time.perf_counter()
        for report in self.driver.steps(first, end, checkpoint_at):
            now = time.perf_counter()
            yield summarize_step(report, self.cfg, now - last), report.checkpoint
            last = now

    def stage_weights(self) -> list[dict[str, torch.Tensor]]:
        return self.driver.stage_weights()

    def close(self) -> None:
        if self.driver is not None:
            self.driver.shutdown()


def _local_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked but this machine has no CUDA device")
    if cfg.runtime.device == "cuda" or (cfg.runtime.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
