"""The lopt-dist row: the decoupled pipeline exactly as `lopt-train` runs it, fed the benchmark's samples.

`BenchStageWorker` is lopt-dist's `StageWorker` with two changes: the first stage reads the fixed-length
synthetic batches instead of a tokenized dataset, and the engine and channel ends are wrapped so that each
call is logged for the timeline. The training step itself is lopt-dist's own, as is the driver that queues
the steps; the per-step figures are the workers' own `WorkerStepStats`.
"""

from __future__ import annotations

import time

from lopt_dist.config import ExperimentConfig
from lopt_dist.pipeline.driver import PipelineDriver
from lopt_dist.pipeline.stage_worker import StageWorker
from lopt_dist.pipeline.futures import wait_all

from .config import BenchConfig
from .data import bench_batches
from .experiment import experiment_config
from lopt_dist.telemetry.memory import reset_peak, step_peak_bytes

from .measure import EventLog, WorkerRecord, device_name, peak_memory
from .models import ModelInfo


class _TimedEngine:
    """A DeepSpeed engine whose forward, backward and step are logged; everything else passes through."""

    def __init__(self, engine, log: EventLog) -> None:
        self._engine, self._log = engine, log

    def __call__(self, batch):
        with self._log.span("forward"):
            return self._engine(batch)

    def backward(self, loss):
        with self._log.span("backward"):
            return self._engine.backward(loss)

    def step(self):
        with self._log.span("optimizer"):
            return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


class _TimedSender:
    """Splits each send into the wait for a free slot (backpressure) and the posting of the message."""

    def __init__(self, sender, log: EventLog) -> None:
        self._sender, self._log = sender, log

    def send(self, payload, dst: int, micro_batch: int) -> None:
        blocked_before, start = self._sender.stats.blocked_s, time.time()
        self._sender.send(payload, dst, micro_batch)
        end = time.time()
        posted = start + (self._sender.stats.blocked_s - blocked_before)
        self._log.record("send_wait", start, posted, micro_batch)
        self._log.record("send", posted, end, micro_batch)

    def __getattr__(self, name):
        return getattr(self._sender, name)


class _TimedReceiver:
    def __init__(self, receiver, log: EventLog) -> None:
        self._receiver, self._log = receiver, log

    def recv(self, src: int, micro_batch: int):
        with self._log.span("recv_wait", micro_batch):
            return self._receiver.recv(src, micro_batch)

    def __getattr__(self, name):
        return getattr(self._receiver, name)


class BenchStageWorker(StageWorker):
    def __init__(self, cfg: ExperimentConfig, stage_index: int, bench: BenchConfig, model: ModelInfo) -> None:
        super().__init__(cfg, stage_index)
        self.bench = bench
        self.model_info = model
        self.windows: list[tuple[float, float]] = []

    def _build_data(self) -> None:
        self.batches = bench_batches(self.bench, self.model_info, self.cfg.train.micro_batch_size)

    def setup(self, *args) -> int:
        parameters = super().setup(*args)
        self.log = EventLog(keep_step=self.bench.total_steps - 1, device=self.device)
        self.engine = _TimedEngine(self.engine, self.log)
        if self.sender is not None:
            self.sender = _TimedSender(self.sender, self.log)
        if self.receiver is not None:
            self.receiver = _TimedReceiver(self.receiver, self.log)
        self.mem_at_start = reset_peak(self.device)
        return parameters

    def train_step(self, step: int):
        self.log.begin_step(step)
        start = time.time()
        stats = super().train_step(step)
        self.windows.append((start, time.time()))
        return stats

    def bench_record(self) -> WorkerRecord:
        """What the step stats lack: step windows, the timeline step's events, memory at the end of set-up."""
        record = WorkerRecord(label=f"stage {self.stage_index} worker {self.rank_info.rank}",
                              device=device_name(self.device), windows=list(self.windows), events=self.log.kept)
        record.mem_kind = peak_memory(self.device)[1]
        record.mem_at_start_bytes = self.mem_at_start
        return record


def run_lopt_dist(bench: BenchConfig, model: ModelInfo, gpu: bool) -> list[WorkerRecord]:
    experiment = experiment_config(bench, model, mode="ray")
    experiment.runtime.device = "cuda" if gpu else "cpu"
    driver = PipelineDriver.start(experiment, BenchStageWorker, (bench, model))
    try:
        reports = list(driver.steps(0, bench.total_steps, checkpoint_at=lambda done: None))
        refs = {}
        for group in driver.groups:
            refs.update(group.label_refs(group.execute_async("bench_record")))
        records = list(wait_all(refs, timeout_s=experiment.runtime.boundary_timeout_s).values())
    finally:
        driver.shutdown()
    last_stage = len(experiment.runtime.groups) - 1
    for index, record in enumerate(records):
        stats = [report.workers[index] for report in reports]  # stage-major, as the records
        record.busy_s = [s.busy_s for s in stats]
        record.comm_s = [s.recv_wait_s + s.send_wait_s for s in stats]
        record.bytes_sent = [s.bytes_sent for s in stats]
        record.bytes_received = [s.bytes_received for s in stats]
        record.loss_sums = [s.loss_sum for s in stats] if stats[0].stage == last_stage else None
        if bench.data is not None and stats[0].stage == 0:  # every stage sees the same tokens: count them once
            record.tokens = [s.tokens for s in stats]
        record.peak_mem_bytes = max(step_peak_bytes(s.memory) for s in stats)  # each step's own peak
    return records
