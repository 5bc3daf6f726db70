"""Single-device rows: lopt-dist's own `LocalTrainer`, end to end (`e2e`) or LoPT stage by stage (`lopt`).

The worker gets all the threads (or the one GPU) the multi-worker rows share out, so that on a CPU the
comparison is between the same cores used two ways.
"""

from __future__ import annotations

import time

import torch

from lopt_dist.model.loading import load_causal_lm
from lopt_dist.pipeline.worker import WorkerBase
from lopt_dist.train.local import LocalTrainer

from .config import BenchConfig
from .data import bench_batches
from .experiment import experiment_config
from lopt_dist.telemetry.memory import reset_peak

from .measure import WorkerRecord, device_name, peak_memory
from .models import ModelInfo


class SingleDeviceWorker(WorkerBase):
    def __init__(self, cfg: BenchConfig, model: ModelInfo, method: str) -> None:
        self.cfg = cfg
        self.model = model
        self.method = method
        self.trainer: LocalTrainer | None = None

    def setup(self) -> None:
        device = self.claim_device(self.cfg.single_device_threads)
        torch.manual_seed(self.cfg.seed)
        hf_model = load_causal_lm(self.model.path)
        batches = bench_batches(self.cfg, self.model, self.cfg.micro_batch_size)
        experiment = experiment_config(self.cfg, self.model, method=self.method)
        self.trainer = LocalTrainer(experiment, hf_model, batches, device)
        self.mem_at_start = reset_peak(device)

    def run(self) -> WorkerRecord:
        device = self.trainer.device
        record = WorkerRecord(label=f"{self.method} on one device", device=device_name(device), loss_sums=[],
                              tokens=[] if self.cfg.data is not None else None)
        peak = 0
        for _ in range(self.cfg.total_steps):
            start = time.time()
            result = self.trainer.train_step()  # resets the memory peak when it begins
            peak = max(peak, peak_memory(device)[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            end = time.time()
            record.windows.append((start, end))
            record.busy_s.append(end - start)  # nothing to wait for: one device does everything
            record.comm_s.append(0.0)
            record.bytes_sent.append(0)
            record.bytes_received.append(0)
            record.loss_sums.append(result.task_loss * self.cfg.micro_batches)
            if record.tokens is not None:
                record.tokens.append(result.tokens)
        record.peak_mem_bytes, record.mem_kind = peak, peak_memory(device)[1]
        record.mem_at_start_bytes = self.mem_at_start
        return record
