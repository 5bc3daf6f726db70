"""End-to-end data parallelism with DeepSpeed ZeRO-2: every worker holds the whole model, shards gradients and
optimizer states, and trains on its share of each step's micro-batches.

This is what most teams run when the model fits on each device, so it is the bar a pipeline has to clear.
Worker r takes micro-batches m with m mod W == r, the routing lopt-dist's stage groups use. On a CPU,
DeepSpeed's comms logger times every collective (they block there anyway), which splits each worker's step
into computing and communicating; on a GPU the logger would make collectives blocking and slow the row, so
it stays off and only the total is reported.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lopt_dist.model import causal_lm_loss
from lopt_dist.model.loading import load_causal_lm
from lopt_dist.pipeline.worker import WorkerBase
from lopt_dist.train.optim import build_optimizer, build_scheduler

from .config import BenchConfig
from .data import SyntheticBatches
from .experiment import experiment_config
from lopt_dist.telemetry.memory import reset_peak

from .measure import EventLog, WorkerRecord, device_name, peak_memory
from .models import ModelInfo


class CausalLMWithLoss(nn.Module):
    """The whole model with the loss the other rows use, so DeepSpeed's engine returns it from forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model(input_ids=input_ids).logits, labels)


class DataParallelWorker(WorkerBase):
    def __init__(self, cfg: BenchConfig, model: ModelInfo, ds_config: dict) -> None:
        self.cfg = cfg
        self.model = model
        self.ds_config = ds_config

    def setup(self, master_addr: str, master_port: int, backend: str) -> None:
        import deepspeed

        self.device = self.claim_device(self.cfg.threads_per_worker)
        self.log = EventLog(keep_step=self.cfg.total_steps - 1, device=self.device)
        self.init_torch_distributed(master_addr, master_port, backend)
        torch.manual_seed(self.cfg.seed)
        module = CausalLMWithLoss(load_causal_lm(self.model.path)).to(self.device)
        optimizer = build_optimizer(module, self.cfg.lr, 0.0)
        scheduler = build_scheduler(optimizer, experiment_config(self.cfg, self.model, method="e2e").train)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config)
        self.profiled = bool(self.ds_config.get("comms_logger", {}).get("enabled"))
        self.mem_at_start = reset_peak(self.device)

    def run(self) -> WorkerRecord:
        rank, workers, per_step = self.rank_info.rank, self.cfg.workers, self.cfg.micro_batches
        batches = SyntheticBatches(self.cfg.micro_batch_size, self.cfg.seq_len, self.model.vocab_size, self.cfg.seed)
        record = WorkerRecord(label=f"rank {rank} (whole model)", device=device_name(self.device), loss_sums=[])
        peak = 0
        for step in range(self.cfg.total_steps):
            self._collective_totals()  # drop what set-up and earlier steps logged
            self.log.begin_step(step)
            reset_peak(self.device)
            start, loss_sum = time.time(), 0.0
            for m in range(step * per_step, (step + 1) * per_step):
                if m % workers != rank:
                    continue
                batch = {k: v.to(self.device) for k, v in batches.get(m).items()}
                with self.log.span("forward", m):
                    loss = self.engine(batch["input_ids"], batch["labels"])
                with self.log.span("backward", m):
                    self.engine.backward(loss)
                with self.log.span("optimizer", m):
                    self.engine.step()  # steps the optimizer only at the step's last micro-batch
                loss_sum += float(loss)
            end = time.time()
            comm_s, comm_bytes = self._collective_totals()
            record.windows.append((start, end))
            peak = max(peak, peak_memory(self.device)[0])
            record.busy_s.append(end - start - comm_s if comm_s is not None else self.log.compute_s)
            record.comm_s.append(comm_s)
            record.bytes_sent.append(comm_bytes)
            record.bytes_received.append(comm_bytes)
            record.loss_sums.append(loss_sum)
        record.peak_mem_bytes, record.mem_kind = peak, peak_memory(self.device)[1]
        record.mem_at_start_bytes = self.mem_at_start
        return record

    def _collective_totals(self) -> tuple[float | None, int | None]:
        """(seconds, payload bytes) of the collectives logged since the last call, then clear the log."""
        if not self.profiled:
            return None, None
        from deepspeed import comm

        seconds = sum(timer.elapsed(reset=True) for timer in comm.comm.timers.get_timers().values()) / 1000.0
        log = comm.comms_logger.comms_dict
        payload = sum(size * entry[0] for sizes in log.values() for size, entry in sizes.items())
        log.clear()
        return seconds, payload
