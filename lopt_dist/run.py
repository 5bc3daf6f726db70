"""A training run from config to exported model: validate, build, train (with checkpoints), export, close.

The same loop serves both runtimes: `local` (one process, stage after stage) and `ray` (one worker group
per stage). Each yields per-step records; this module logs them, checkpoints and exports. A Ray run recovers
from worker failures by itself: the driver restarts the failed stage alone where it can (pipeline/driver.py),
and this loop restarts every stage from the newest checkpoint otherwise, as far as recovery/policy.py allows.
SIGTERM and SIGINT stop a run at a checkpoint (recovery/signals.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lopt_dist.checkpoint import ResumePoint, RunCheckpoints
from lopt_dist.checkpoint.export import write_weights
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ExperimentConfig
from lopt_dist.device import local_device
from lopt_dist.errors import caused_by_user
from lopt_dist.evaluation import build_eval_sets, due, eval_record, split_holdout
from lopt_dist.model.loading import load_model_config, load_tokenizer
from lopt_dist.pipeline.errors import Failure, PipelineFailure, WorkerFailedError, WorkerGroupError
from lopt_dist.preflight import prepare
from lopt_dist.recovery import FailureJournal, RetryPolicy, RunFailedError, RunStopped, StopSignals
from lopt_dist.recovery.signals import GraceExpired
from lopt_dist.telemetry.memory import step_peak_bytes
from lopt_dist.telemetry.progress import Progress
from lopt_dist.telemetry.sinks import Sinks

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    records: list[dict]
    checkpoint: Path | None  # the newest committed checkpoint
    model_dir: Path | None


def train(cfg: ExperimentConfig) -> RunResult:
    """Train, checkpoint and export. Raises RunFailedError when workers failed beyond what the run recovers
    from, RunStopped after SIGTERM/SIGINT (with a checkpoint if one could be written in the grace period)."""
    started = time.perf_counter()
    cfg = prepare(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("output: %s", out)
    checkpoints = RunCheckpoints(cfg, load_model_config(cfg.model.name).num_hidden_layers)
    resume = checkpoints.open()  # before any worker starts: a bad checkpoint or a used output_dir fails here
    return _Run(cfg, checkpoints, resume, checks_s=time.perf_counter() - started).train()


class _Run:
    """One invocation of `train`: its records and sinks, its checkpoints and its attempts."""

    def __init__(self, cfg: ExperimentConfig, checkpoints: RunCheckpoints, resume: ResumePoint | None,
                 checks_s: float) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.checkpoints = checkpoints
        self.resume = resume
        self.end_step = min(cfg.train.steps, cfg.checkpoint.stop_after or cfg.train.steps)
        self.done = resume.step if resume is not None else 0  # steps trained and recorded
        self.started = False  # the pipeline of this invocation started (set up, checkpoint loaded) once
        self.checks_s = checks_s  # the checks before start, for the set-up line
        self.records: list[dict] = []
        self.sinks = Sinks(cfg, self.out, self.done)  # metrics.jsonl and logging.report_to; a resume drops what it redoes
        self.progress: Progress | None = None  # created once the first attempt has started: its rate counts steps
        self.journal = FailureJournal(self.out, resumed=resume is not None)
        self.policy = RetryPolicy(cfg.runtime.max_failures)
        self.signals = StopSignals(cfg.runtime.preemption_grace_s)
        self.runner: _LocalRunner | _RayRunner | None = None

    def train(self) -> RunResult:
        model_dir = None
        try:
            if self.cfg.runtime.mode == "ray":
                from lopt_dist.pipeline.driver import connect_ray

                connect_ray(self.cfg)  # before our handlers: ray.init installs its own
            self.signals.install()
            point = self.resume
            while True:
                try:
                    self._attempt(point)
                    break
                except RunFailedError:
                    raise  # decided already (a failure the driver asked about, see `admit`)
                except WorkerGroupError as err:
                    point = self._recover(err)
            if self.cfg.checkpoint.export and self.end_step == self.cfg.train.steps:
                model_dir = self.checkpoints.export(self.runner.export_shards)
        except KeyboardInterrupt:
            if self.signals.aborting or not self.signals.requested:
                raise
            raise self._stopped(saved=False) from None  # a signal while starting: nothing new to save
        except GraceExpired as err:
            logger.warning("the grace period ran out %s", err)
            raise self._stopped(saved=False) from None
        finally:
            self._close()
        return RunResult(self.out, self.records, self._newest(), model_dir)

    # ---- one attempt: start the runner, train to the end ----

    def _attempt(self, point: ResumePoint | None) -> None:
        self.runner = _LocalRunner(self.cfg) if self.cfg.runtime.mode == "local" else _RayRunner(self.cfg)
        with self.signals.interruptible():
            self.runner.start(point)
        _log_setup({"checks": self.checks_s, **self.runner.setup_times} if not self.started else self.runner.setup_times)
        if self.progress is None:
            self.progress = Progress(self.cfg, self.done)
        self.started = True
        for record, staged in self.runner.steps(self.done, self.end_step, self._checkpoint_at, self.signals, self):
            self._write(record)
            if staged is not None:
                self.checkpoints.commit(staged, record["step"] + 1)
        if self.signals.requested and self.done < self.end_step:
            self._stop_at_checkpoint()

    def _checkpoint_at(self, done: int) -> Path | None:
        every = self.cfg.checkpoint.save_every
        if done == self.end_step or (every and done % every == 0):
            return self.checkpoints.staging(done)
        return None

    def _write(self, record: dict) -> None:
        self.sinks.write(record)
        self.progress.update(record)
        self.records.append(record)
        self.done = record["step"] + 1

    # ---- failures ----

    def _recover(self, err: WorkerGroupError) -> ResumePoint | None:
        """Record the failure; restart every stage from the newest checkpoint, or raise when it is not retried."""
        if self.signals.requested:  # stopping anyway: a failure now only means no new checkpoint
            logger.warning("a worker failed while the run was stopping: %s", err)
            raise self._stopped(saved=False) from err
        if not self.started and not isinstance(err, WorkerFailedError):
            raise err  # the pipeline cannot start as asked (resources); the message says what to change
        failure = err.failure if isinstance(err, PipelineFailure) else _start_failure(err)
        decision = self.policy.decide(failure, started=self.started)
        self._close_runner()
        self.checkpoints.abort()  # staging directories of the failed attempt are not checkpoints
        point = self.checkpoints.latest_point() if decision.retry else None
        where = point.path.name if point is not None else "step 0 (no checkpoint yet)"
        action = f"restart every stage from {where}: {decision.reason}" if decision.retry else \
            f"stop: {decision.reason}"
        self._note(self.journal.record(failure, "; ".join([action, *failure.notes])))
        if not decision.retry:
            if not self.started:
                raise err
            raise RunFailedError(failure, decision.reason, self._newest(), self.journal.count) from err
        self._rewind(point.step if point is not None else 0)
        return point

    # ---- what the driver asks before restarting one stage alone (pipeline/driver.py: Recovery) ----

    def latest(self) -> tuple[Path, int] | None:
        newest = self.checkpoints.store.latest()
        return (newest.path, newest.step) if newest is not None else None

    def admit(self, failure: Failure, action: str) -> None:
        decision = self.policy.decide(failure, started=self.started)
        self._note(self.journal.record(failure, f"{action}: {decision.reason}" if decision.retry else
                                       f"stop: {decision.reason}"))
        if not decision.retry:
            raise RunFailedError(failure, decision.reason, self._newest(), self.journal.count)

    def _rewind(self, step: int) -> None:
        """Records of steps from `step` on will be written again: drop them everywhere, so none appears twice."""
        self.sinks.rewind(step)
        if self.progress is not None:
            self.progress.rewind(step)
        self.records = [r for r in self.records if r["step"] < step]
        self.done = step

    # ---- stopping on a signal ----

    def _stop_at_checkpoint(self) -> None:
        """After SIGTERM/SIGINT the queued steps are done: save their state if no checkpoint has it yet."""
        newest = self.checkpoints.store.latest()
        saved = newest is not None and newest.step == self.done
        if not saved and self.signals.remaining_s() > 0:
            staged = self.checkpoints.staging(self.done)
            try:
                self.runner.save(staged, self.done, self.signals)
                self.checkpoints.commit(staged, self.done)
                saved = True
            except (GraceExpired, WorkerGroupError) as err:
                logger.warning("no checkpoint of step %d could be written before stopping: %s", self.done,
                               " ".join(str(err).split())[:300])
        raise self._stopped(saved)

    def _note(self, line: str) -> None:
        """A failure and what the run does about it: above the progress bar (the journal has logged it already)."""
        if self.progress is not None:
            self.progress.note(line)

    def _stopped(self, saved: bool) -> RunStopped:
        return RunStopped(self.signals.received or "a signal", self.done, self._newest(), saved)

    def _newest(self) -> Path | None:
        newest = self.checkpoints.store.latest()
        return newest.path if newest is not None else None

    def _close_runner(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.sinks.close()
        self._close_runner()
        self.checkpoints.abort()  # staging directories left by a failure are not checkpoints
        self.signals.uninstall()


def _log_setup(times: dict[str, float]) -> None:
    """One line: how long the run (or a restart) took to start, and where that time went."""
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
    logger.info("set-up took %.1f s (%s); training starts", sum(times.values()), parts)


def _start_failure(err: WorkerGroupError) -> Failure:
    """A failure to start the groups again (e.g. resources that did not come back in time), as a Failure."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return Failure(worker="the pipeline", kind="raised", cause=first, phase="start-up", step=None,
                   user_error=caused_by_user(err))


class _LocalRunner:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.setup_times: dict[str, float] = {}

    def start(self, point: ResumePoint | None) -> None:
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
        if point is not None:
            self.trainer.load_state(point.path)
        self.setup_times["data and model"] = time.perf_counter() - started

    def steps(self, first: int, end: int, checkpoint_at, stop: StopSignals,
              recovery=None) -> Iterator[tuple[dict, Path | None]]:
        while self.trainer.step < end and not stop.requested:
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

    def save(self, directory: Path, step: int, stop: StopSignals) -> None:
        self.trainer.save_state(directory)

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

    def start(self, point: ResumePoint | None) -> None:
        from lopt_dist.pipeline.driver import PipelineDriver

        self.driver = PipelineDriver.start(self.cfg)
        self.setup_times.update(self.driver.setup_times)
        if point is not None:
            started = time.perf_counter()
            self.driver.load_checkpoint(str(point.path), point.step)
            self.setup_times["resume"] = time.perf_counter() - started

    def steps(self, first: int, end: int, checkpoint_at, stop: StopSignals,
              recovery=None) -> Iterator[tuple[dict, Path | None]]:
        from lopt_dist.pipeline.driver import summarize_step

        last = time.perf_counter()
        for report in self.driver.steps(first, end, checkpoint_at, stop, recovery,
                                        evaluate_at=lambda done: due(self.cfg, done)):
            now = time.perf_counter()
            yield summarize_step(report, self.cfg, now - last), report.checkpoint
            last = now

    def save(self, directory: Path, step: int, stop: StopSignals) -> None:
        bound = min(self.driver.deadlines.save_bound(), stop.remaining_s())
        self.driver.save_checkpoint(str(directory), step, bound, stop)

    def export_shards(self, directory: Path, max_bytes: int, dtype: torch.dtype) -> list[Shard]:
        return self.driver.export_shards(directory, max_bytes, dtype)

    def close(self) -> None:
        if self.driver is not None:
            self.driver.shutdown()
