"""End-to-end pipeline parallelism with PyTorch's own `torch.distributed.pipelining` schedules.

One rank per worker, in one torch.distributed default group (gloo on CPU, NCCL on GPU) brought up inside the
Ray actors. GPipe and 1F1B put one stage on each rank; the interleaved and zero-bubble schedules put two
("virtual stages"), the model then being cut into 2 x workers chunks. Every rank times its own forward,
backward and optimizer work through a `PipelineStage` subclass; whatever else a step takes is point-to-point
communication and waiting for it, which the schedules do not let us split apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import pipelining

from lopt_dist.model import causal_lm_loss, split_model
from lopt_dist.model.loading import load_causal_lm
from lopt_dist.pipeline.worker import WorkerBase
from lopt_dist.train.optim import build_optimizer

from .chunks import E2EChunk
from .config import BenchConfig
from .data import SyntheticBatches
from .experiment import pipeline_boundaries
from lopt_dist.telemetry.memory import reset_peak

from .measure import EventLog, WorkerRecord, device_name, peak_memory
from .models import ModelInfo, even_boundaries


@dataclass(frozen=True)
class ScheduleSpec:
    cls: type
    stages_per_rank: int
    placement: str  # "loop": chunk i on rank i % W; "v": down the ranks, then back up


SCHEDULE_SPECS = {
    "gpipe": ScheduleSpec(pipelining.ScheduleGPipe, 1, "loop"),
    "1f1b": ScheduleSpec(pipelining.Schedule1F1B, 1, "loop"),
    "interleaved-1f1b": ScheduleSpec(pipelining.ScheduleInterleaved1F1B, 2, "loop"),
    "zbv": ScheduleSpec(pipelining.ScheduleZBVZeroBubble, 2, "v"),
    "interleaved-zb": ScheduleSpec(pipelining.ScheduleInterleavedZeroBubble, 2, "loop"),
}


def chunk_ranks(schedule: str, workers: int) -> list[int]:
    """The rank that runs each chunk, in model order."""
    spec = SCHEDULE_SPECS[schedule]
    chunks = range(workers * spec.stages_per_rank)
    if spec.placement == "loop":
        return [i % workers for i in chunks]
    return [i if i < workers else 2 * workers - 1 - i for i in chunks]


def chunk_boundaries(cfg: BenchConfig, model: ModelInfo, schedule: str) -> list[int]:
    # One stage per rank: the same cut as lopt-dist. Two per rank: an even cut into twice as many chunks.
    if SCHEDULE_SPECS[schedule].stages_per_rank == 1:
        return pipeline_boundaries(cfg, model)
    return even_boundaries(model.num_layers, cfg.workers * SCHEDULE_SPECS[schedule].stages_per_rank)


class TimedPipelineStage(pipelining.PipelineStage):
    """A PipelineStage that logs how long each of its compute calls takes."""

    log: EventLog

    def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
        with self.log.span("forward", fwd_chunk_id, self.stage_index):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id, *args, **kwargs):
        # Zero-bubble schedules split the backward: input gradients first, weight gradients later.
        kind = "backward" if kwargs.get("full_backward", True) else "backward_input"
        with self.log.span(kind, bwd_chunk_id, self.stage_index):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id, *args, **kwargs):
        with self.log.span("backward_weight", bwd_chunk_id, self.stage_index):
            return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)


class PipelineWorker(WorkerBase):
    def __init__(self, cfg: BenchConfig, model: ModelInfo, schedule: str) -> None:
        self.cfg = cfg
        self.model = model
        self.schedule_name = schedule

    def setup(self, master_addr: str, master_port: int, backend: str) -> None:
        self.device = self.claim_device(self.cfg.threads_per_worker)
        self.log = EventLog(keep_step=self.cfg.total_steps - 1, device=self.device)
        self.init_torch_distributed(master_addr, master_port, backend)
        ranks = chunk_ranks(self.schedule_name, self.cfg.workers)
        self.mine = [i for i, r in enumerate(ranks) if r == self.rank_info.rank]
        modules = self._build_chunks()
        self.stages = []
        for index, module in zip(self.mine, modules):
            stage = TimedPipelineStage(module, index, len(ranks), self.device)
            stage.log = self.log
            self.stages.append(stage)
        spec = SCHEDULE_SPECS[self.schedule_name]
        target = self.stages if spec.stages_per_rank > 1 else self.stages[0]
        self.schedule = spec.cls(target, self.cfg.micro_batches, loss_fn=causal_lm_loss)
        self.optimizer = build_optimizer(nn.ModuleList(modules), self.cfg.lr, 0.0)
        self.traffic = self._traffic_per_step(ranks)
        self.mem_at_start = reset_peak(self.device)

    def _build_chunks(self) -> list[E2EChunk]:
        """This rank's chunks of the model, on its device; the rest of the model is dropped."""
        torch.manual_seed(self.cfg.seed)
        cut = chunk_boundaries(self.cfg, self.model, self.schedule_name)
        stages = split_model(load_causal_lm(self.model.path), cut, lambda_aux=0.0, seed=self.cfg.seed)
        return [E2EChunk(stages[i]).to(self.device) for i in self.mine]

    def _traffic_per_step(self, ranks: list[int]) -> tuple[int, int]:
        """(bytes sent, bytes received) per step, from the shapes: an activation forward and its gradient back
        across every boundary between two ranks."""
        element = torch.finfo(torch.float32).bits // 8
        one = self.cfg.micro_batch_size * self.cfg.seq_len * self.model.hidden_size * element
        sent = received = 0
        for i in self.mine:
            if i + 1 < len(ranks) and ranks[i + 1] != ranks[i]:
                sent, received = sent + one, received + one
            if i > 0 and ranks[i - 1] != ranks[i]:
                sent, received = sent + one, received + one
        return sent * self.cfg.micro_batches, received * self.cfg.micro_batches

    def run(self) -> WorkerRecord:
        record = WorkerRecord(label=self._label(), device=device_name(self.device))
        batches = SyntheticBatches(self.cfg.micro_batch_size, self.cfg.seq_len, self.model.vocab_size, self.cfg.seed)
        is_first, is_last = any(s.is_first for s in self.stages), any(s.is_last for s in self.stages)
        record.loss_sums = [] if is_last else None
        peak = 0
        for step in range(self.cfg.total_steps):
            batch = {k: v.to(self.device) for k, v in batches.step(step, self.cfg.micro_batches).items()}
            losses: list[torch.Tensor] = []
            self.log.begin_step(step)
            reset_peak(self.device)
            start = time.time()
            args = (batch["input_ids"],) if is_first else ()
            kwargs = {"target": batch["labels"], "losses": losses} if is_last else {}
            self.schedule.step(*args, **kwargs)
            with self.log.span("optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            end = time.time()
            record.windows.append((start, end))
            peak = max(peak, peak_memory(self.device)[0])
            record.busy_s.append(self.log.compute_s)
            record.comm_s.append(end - start - self.log.compute_s)
            record.bytes_sent.append(self.traffic[0])
            record.bytes_received.append(self.traffic[1])
            if is_last:
                record.loss_sums.append(sum(float(loss) for loss in losses))
        record.peak_mem_bytes, record.mem_kind = peak, peak_memory(self.device)[1]
        record.mem_at_start_bytes = self.mem_at_start
        record.events = self.log.kept
        return record

    def _label(self) -> str:
        return f"rank {self.rank_info.rank} (stage{'s' if len(self.mine) > 1 else ''} {', '.join(map(str, self.mine))})"
