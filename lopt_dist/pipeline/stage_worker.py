"""The Ray actor that trains one stage as one data-parallel rank of its group.

Per micro-batch: take the input (from the data on the first stage, from the channel otherwise), run the
stage's forward, post the detached boundary to the next stage *before* the backward so the next stage can
start at once, then backward and (at the step's last micro-batch) the DeepSpeed optimizer step. Nothing
ever comes back from the next stage.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lopt_dist.config import ExperimentConfig
from lopt_dist.model import BOUNDARY_KEYS
from lopt_dist.model.stage_loader import LoadReport, load_stage
from lopt_dist.pipeline.deepspeed_engine import build_engine, zero3_partitioner
from lopt_dist.pipeline.worker_group import WorkerBase
from lopt_dist.telemetry.memory import memory_snapshot, reset_peak
from lopt_dist.train.precision import run_dtype
from lopt_dist.transport import ActivationReceiver, ActivationSender, BoundaryLayout, create_boundary_group


@dataclass
class WorkerStepStats:
    """What one worker did in one optimizer step; the driver sums these over workers."""

    stage: int
    rank: int
    step: int
    micro_batches: int = 0
    loss_sum: float = 0.0  # stage metric summed over this worker's micro-batches
    tokens: int = 0
    busy_s: float = 0.0  # forward, backward and optimizer step
    recv_wait_s: float = 0.0  # blocked waiting for the previous stage (this worker's bubble)
    send_wait_s: float = 0.0  # blocked because the next stage is `channel_depth` micro-batches behind
    bytes_sent: int = 0
    bytes_received: int = 0
    max_outstanding: int = 0  # channel depth reached on this worker's sends
    wall_s: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BoundaryAddress:
    """Where boundary b's group rendezvouses: its TCPStore lives on stage b's worker 0."""

    host: str
    port: int


class StageWorker(WorkerBase):
    def __init__(self, cfg: ExperimentConfig, stage_index: int) -> None:
        self.cfg = cfg
        self.stage_index = stage_index
        self.num_stages = len(cfg.runtime.groups)
        self.group = cfg.runtime.groups[stage_index]
        self.engine = None
        self.load_report: LoadReport | None = None
        self.sender: ActivationSender | None = None
        self.receiver: ActivationReceiver | None = None
        self.batches = None

    def __repr__(self) -> str:
        # Ray prefixes this worker's log lines with it and the state API reports it as `repr_name`; Ray reads
        # it when the actor starts, before the group hands out ranks, so only the stage is known.
        return f"StageWorker(stage={self.stage_index})"

    # ---- start-up ----

    def setup(
        self, master_addr: str, master_port: int, boundaries: list[BoundaryAddress], backend: str, ds_config: dict
    ) -> int:
        """Join the group's process group, build the engine, then join the boundary groups. Returns #params."""
        device = self.claim_device(self.group.threads_per_worker)
        self.init_torch_distributed(master_addr, master_port, "nccl" if device.type == "cuda" else "gloo")
        torch.manual_seed(self.cfg.train.seed)
        partition = zero3_partitioner(ds_config, run_dtype(self.cfg.train))
        stage, self.load_report = load_stage(self.cfg, self.stage_index, device, partition)
        self.engine = build_engine(stage, self.cfg, self.stage_index, ds_config)
        self.device = device
        if self.stage_index == 0:
            self._build_data()
        self._join_boundaries(boundaries, backend)
        return self.load_report.parameters

    def _build_data(self) -> None:
        from lopt_dist.data import MicroBatches, build_examples
        from lopt_dist.model.loading import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.model.name)
        examples = build_examples(self.cfg.data, tokenizer)
        self.batches = MicroBatches(examples, self.cfg.train.micro_batch_size, self.cfg.data.shuffle,
                                    self.cfg.data.seed, tokenizer.pad_token_id)

    def _join_boundaries(self, boundaries: list[BoundaryAddress], backend: str) -> None:
        # Incoming boundary first, then outgoing: stage s waits for stage s-1 to join boundary s-1 only after
        # that stage has joined its own incoming one, so the rendezvous proceeds front to back, never in a cycle.
        timeout = datetime.timedelta(seconds=self.cfg.runtime.boundary_timeout_s)
        rank = self.rank_info.rank
        groups = self.cfg.runtime.groups
        if self.stage_index > 0:
            layout = self._layout(self.stage_index - 1)
            addr = boundaries[self.stage_index - 1]
            pg = create_boundary_group(addr.host, addr.port, layout.receiver_rank(rank), layout.world_size,
                                       backend, timeout, name=f"b{self.stage_index - 1}", device=self.device)
            self.in_layout, self.receiver = layout, ActivationReceiver(pg, BOUNDARY_KEYS, self.device)
        if self.stage_index < len(groups) - 1:
            layout = self._layout(self.stage_index)
            addr = boundaries[self.stage_index]
            pg = create_boundary_group(addr.host, addr.port, layout.sender_rank(rank), layout.world_size,
                                       backend, timeout, name=f"b{self.stage_index}", device=self.device)
            self.out_layout = layout
            self.sender = ActivationSender(pg, BOUNDARY_KEYS, self.cfg.runtime.channel_depth)

    def _layout(self, boundary: int) -> BoundaryLayout:
        groups = self.cfg.runtime.groups
        return BoundaryLayout(senders=groups[boundary].workers, receivers=groups[boundary + 1].workers)

    # ---- training ----

    def train_step(self, step: int) -> WorkerStepStats:
        """One optimizer step: this worker's share of micro-batches step*M .. (step+1)*M - 1."""
        per_step = self.cfg.train.micro_batches_per_step
        stats = WorkerStepStats(stage=self.stage_index, rank=self.rank_info.rank, step=step)
        reset_peak(self.device)
        start = time.perf_counter()
        sent0 = self.sender.stats.snapshot() if self.sender else None
        recv0 = self.receiver.stats.snapshot() if self.receiver else None
        workers = self.group.workers
        for m in range(step * per_step, (step + 1) * per_step):
            if m % workers != self.rank_info.rank:
                continue
            batch = self._next_input(m)
            t0 = time.perf_counter()
            out = self.engine(batch)
            if self.sender is not None:
                self.sender.send(out.boundary, self.out_layout.receiver_rank(self.out_layout.consumer(m)), m)
                stats.max_outstanding = max(stats.max_outstanding, self.sender.outstanding)
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            stats.busy_s += time.perf_counter() - t0
            stats.micro_batches += 1
            stats.loss_sum += float(out.metric)
            stats.tokens += int(batch["attention_mask"].sum())
        if self.sender is not None:
            delta = self.sender.stats.since(sent0)
            stats.send_wait_s, stats.bytes_sent = delta.blocked_s, delta.bytes
            stats.busy_s -= delta.blocked_s  # a send blocked on backpressure is waiting, not computing
        if self.receiver is not None:
            delta = self.receiver.stats.since(recv0)
            stats.recv_wait_s, stats.bytes_received = delta.blocked_s, delta.bytes
        stats.wall_s = time.perf_counter() - start
        stats.memory = memory_snapshot(self.device)
        return stats

    def _next_input(self, m: int) -> dict[str, torch.Tensor]:
        if self.receiver is None:
            return {k: v.to(self.device) for k, v in self.batches.get(m).items()}
        src = self.in_layout.sender_rank(self.in_layout.producer(m))
        return self.receiver.recv(src, m)

    def residency(self) -> dict:
        """What this worker holds of its stage's parameters: whole tensors (`held_elements`) and ZeRO-3
        partitions (`partition_elements`), against the stage's size; and how it was loaded (`LoadReport`)."""
        params = list(self.engine.module.parameters())
        partitions = [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]
        return {"held_elements": sum(p.data.numel() for p in params),
                "partition_elements": sum(t.numel() for t in partitions),
                "stage_elements": self.load_report.parameters, "load": dataclasses.asdict(self.load_report)}

    # ---- checkpoints and export ----

    def save_checkpoint(self, directory: str) -> None:
        """This stage's DeepSpeed checkpoint (a collective over the group) plus this rank's RNG states."""
        if self.sender is not None:
            self.sender.flush()
        path = Path(directory) / f"stage_{self.stage_index}"
        self.engine.save_checkpoint(str(path), tag="state")
        torch.save(_rng_state(), path / f"rng_rank{self.rank_info.rank}.pt")

    def load_checkpoint(self, directory: str) -> None:
        path = Path(directory) / f"stage_{self.stage_index}"
        loaded, _ = self.engine.load_checkpoint(str(path), tag="state")
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint for stage {self.stage_index} in {path}")
        _set_rng_state(torch.load(path / f"rng_rank{self.rank_info.rank}.pt", weights_only=False))

    def stage_weights(self) -> dict[str, torch.Tensor] | None:
        """Full weights of this stage under the model's names, on rank 0 (every rank must call: ZeRO-3 gathers)."""
        import deepspeed

        stage = self.engine.module
        with deepspeed.zero.GatheredParameters(list(stage.parameters()), modifier_rank=None):
            weights = {k: v.detach().cpu().clone() for k, v in stage.hf_state_dict().items()}
        return weights if self.rank_info.rank == 0 else None

    def close(self) -> None:
        if self.sender is not None:
            self.sender.flush()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
