"""Each pipeline stage's compute time measured alone, with one worker's threads (or one GPU).

This is what a stage costs when nothing else competes for the device and nothing waits on a neighbour. The
slowest stage bounds any pipeline over these stages: a bubble-free one finishes a step in (slowest stage's
time per step), so tokens per step / that time is the throughput it could reach at best. Both cuts are timed
on the same layers: the LoPT stages (each with its reconstruction decoder and loss) and the end-to-end chunks
of the one-stage-per-rank pipeline schedules (forward, then backward from the gradient the next stage sends).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from lopt_dist.model import causal_lm_loss, split_model
from lopt_dist.model.loading import load_causal_lm
from lopt_dist.pipeline.worker import WorkerBase
from lopt_dist.train.optim import build_optimizer

from .chunks import chunk_forward
from .config import BenchConfig
from .data import SyntheticBatches
from .experiment import experiment_config
from .measure import device_name
from .models import ModelInfo


@dataclass(frozen=True)
class StageTimes:
    """Seconds per micro-batch (median over the measured ones), and per optimizer step."""

    stage: int
    layers: tuple[int, int]
    lopt_s: float  # LoPT forward + backward
    e2e_forward_s: float
    e2e_backward_s: float
    optimizer_s: float
    device: str


class StageAloneWorker(WorkerBase):
    def __init__(self, cfg: BenchConfig, model: ModelInfo) -> None:
        self.cfg = cfg
        self.model = model

    def setup(self) -> None:
        self.device = self.claim_device(self.cfg.threads_per_worker)
        torch.manual_seed(self.cfg.seed)
        experiment = experiment_config(self.cfg, self.model)
        self.stages = split_model(load_causal_lm(self.model.path), experiment.model.boundaries,
                                  experiment.train.lambda_aux, self.cfg.seed)
        for stage in self.stages:
            stage.to(self.device).train()
        self.optimizers = [build_optimizer(stage, self.cfg.lr, 0.0) for stage in self.stages]

    def run(self) -> list[StageTimes]:
        """Warm-up steps, then one measured step: its micro-batches give the per-micro-batch medians."""
        batches = SyntheticBatches(self.cfg.micro_batch_size, self.cfg.seq_len, self.model.vocab_size, self.cfg.seed)
        for step in range(self.cfg.warmup_steps + 1):
            samples = self._step(batches, step)  # the last step's samples are the measured ones
        name, median = device_name(self.device), statistics.median
        return [StageTimes(stage=i, layers=s.layer_range, lopt_s=median(samples["lopt"][i]),
                           e2e_forward_s=median(samples["forward"][i]), e2e_backward_s=median(samples["backward"][i]),
                           optimizer_s=median(samples["optimizer"][i]), device=name)
                for i, s in enumerate(self.stages)]

    def _step(self, batches: SyntheticBatches, step: int) -> dict[str, list[list[float]]]:
        """One optimizer step of both cuts; seconds per stage, one sample per micro-batch (or per update)."""
        samples = {key: [[] for _ in self.stages] for key in ("lopt", "forward", "backward", "optimizer")}
        for m in range(step * self.cfg.micro_batches, (step + 1) * self.cfg.micro_batches):
            batch = {k: v.to(self.device) for k, v in batches.get(m).items()}
            for i, seconds in enumerate(self._lopt_micro(batch)):
                samples["lopt"][i].append(seconds)
            for i, (forward, backward) in enumerate(self._e2e_micro(batch)):
                samples["forward"][i].append(forward)
                samples["backward"][i].append(backward)
        for i, optimizer in enumerate(self.optimizers):
            samples["optimizer"][i].append(self._timed(lambda: _update(optimizer)))
        return samples

    def _lopt_micro(self, batch: dict[str, torch.Tensor]) -> list[float]:
        times, inputs = [], batch
        for stage in self.stages:
            start = time.perf_counter()
            out = stage(inputs)
            (out.loss / self.cfg.micro_batches).backward()
            self._sync()
            times.append(time.perf_counter() - start)
            inputs = out.boundary
        return times

    def _e2e_micro(self, batch: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
        # Each chunk starts from a detached copy of the previous output, as a pipeline rank receives it, so that
        # each chunk's backward can be timed on its own.
        inputs, outputs, forward = [], [], []
        hidden = batch["input_ids"]
        for stage in self.stages:
            if not stage.is_first:
                hidden = hidden.detach().requires_grad_()
            inputs.append(hidden)
            start = time.perf_counter()
            hidden = chunk_forward(stage, hidden)
            self._sync()
            forward.append(time.perf_counter() - start)
            outputs.append(hidden)
        backward = [0.0] * len(self.stages)
        loss = causal_lm_loss(outputs[-1], batch["labels"]) / self.cfg.micro_batches
        backward[-1] = self._timed(loss.backward)
        for i in range(len(self.stages) - 2, -1, -1):
            backward[i] = self._timed(lambda: outputs[i].backward(inputs[i + 1].grad))
        return list(zip(forward, backward))

    def _timed(self, work) -> float:
        start = time.perf_counter()
        work()
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _update(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
