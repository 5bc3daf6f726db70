"""The Ray actor that trains one stage as one data-parallel rank of its group.

Per micro-batch: take the input (from the data on the first stage, from the channel otherwise), run the
stage's forward, post the detached boundary to the next stage *before* the backward so the next stage can
start at once, then backward and (at the step's last micro-batch) the DeepSpeed optimizer step. Nothing
ever comes back from the next stage.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lopt_dist.checkpoint import deepspeed_state
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ExperimentConfig
from lopt_dist.evaluation import build_eval_sets, plan, set_names, split_holdout
from lopt_dist.model import BOUNDARY_KEYS
from lopt_dist.model.stage_loader import LoadReport, load_stage
from lopt_dist.pipeline.deepspeed_engine import build_engine, zero3_partitioner
from lopt_dist.pipeline.worker import WorkerBase
from lopt_dist.telemetry.memory import memory_snapshot, reset_peak
from lopt_dist.telemetry.timing import BusyClock
from lopt_dist.telemetry.worker_logs import printed_to, route_library_output, worker_log_path
from lopt_dist.train.precision import global_norm, run_dtype
from lopt_dist.transport import ActivationReceiver, ActivationSender, BoundaryLayout, create_boundary_group, warm_up
from lopt_dist.transport.header import evaluation_micro_batch


@dataclass
class WorkerStepStats:
    """What one worker did in one optimizer step; the driver sums these over workers."""

    stage: int
    rank: int
    step: int
    micro_batches: int = 0
    loss_sum: float = 0.0  # stage metric summed over this worker's micro-batches
    router_aux_sum: float | None = None  # MoE: this stage's router load-balancing loss, summed likewise
    lr: float = 0.0  # the stage's learning rate in this step (the same on every worker of the group)
    grad_norm: float = 0.0  # the group's global gradient norm before clipping (the same on every worker)
    tokens: int = 0
    busy_s: float = 0.0  # forward, backward and optimizer step (CUDA events on GPU)
    recv_wait_s: float = 0.0  # blocked waiting for the previous stage (this worker's bubble)
    send_wait_s: float = 0.0  # blocked because the next stage is `channel_depth` micro-batches behind
    bytes_sent: int = 0
    bytes_received: int = 0
    max_outstanding: int = 0  # channel depth reached on this worker's sends
    wall_s: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)


@dataclass
class WorkerEvalStats:
    """What one worker computed in one evaluation (lopt_dist/evaluation.py); the driver sums these over workers."""

    stage: int
    rank: int
    sums: dict[str, float]  # evaluation set -> the stage's metric summed over this worker's micro-batches of it
    wall_s: float = 0.0


@dataclass(frozen=True)
class BoundaryAddress:
    """Where boundary b's group rendezvouses (its TCPStore lives on stage b's worker 0) and its backend."""

    host: str
    port: int
    backend: str = "gloo"  # decided by the driver from every member's device (lopt_dist.device)


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
        self.eval_sets: dict = {}  # first stage: evaluation set name -> its micro-batches

    def __repr__(self) -> str:
        # Ray prefixes this worker's log lines with it and the state API reports it as `repr_name`; Ray reads
        # it when the actor starts, before the group hands out ranks, so only the stage is known.
        return f"StageWorker(stage={self.stage_index})"

    # ---- start-up ----

    def setup(
        self, master_addr: str, master_port: int, boundaries: list[BoundaryAddress], backend: str, ds_config: dict
    ) -> int:
        """Join the group's process group (`backend`), build the engine, then join and warm up the boundary
        groups. Returns #params."""
        device = self.claim_device(self.group.threads_per_worker)
        log = route_library_output(worker_log_path(self.cfg.output_dir, self.stage_index, self.rank_info.rank),
                                   device.type)
        self.init_torch_distributed(master_addr, master_port, backend, self.cfg.runtime.collective_timeout_s)
        torch.manual_seed(self.cfg.train.seed)
        with printed_to(log):
            partition = zero3_partitioner(ds_config, run_dtype(self.cfg.train))
            stage, self.load_report = load_stage(self.cfg, self.stage_index, device, partition)
            self.engine = build_engine(stage, self.cfg, self.stage_index, ds_config)
        self.device = device
        if self.stage_index == 0:
            self._build_data()
        self._join_boundaries(boundaries)
        return self.load_report.parameters

    def _build_data(self) -> None:
        from lopt_dist.data import build_examples, micro_batches
        from lopt_dist.model.loading import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.model.name)
        examples, held_out = split_holdout(build_examples(self.cfg.data, tokenizer), self.cfg)
        self.batches = micro_batches(examples, self.cfg, tokenizer.pad_token_id)
        sets = build_eval_sets(self.cfg, tokenizer, held_out) if self.cfg.eval.every else []
        self.eval_sets = {s.name: s.batches for s in sets}

    def _join_boundaries(self, boundaries: list[BoundaryAddress]) -> None:
        # Incoming boundary first, then outgoing: stage s waits for stage s-1 to join boundary s-1 only after
        # that stage has joined its own incoming one, so the rendezvous proceeds front to back, never in a cycle.
        # Each join ends with a warm-up exchange, so connection errors surface here, not in step 0.
        if self.stage_index > 0:
            self.in_layout = self._layout(self.stage_index - 1)
            link = self._join(boundaries, self.stage_index - 1, self.in_layout.receiver_rank(self.rank_info.rank))
            self.receiver = ActivationReceiver(link, BOUNDARY_KEYS, self.device)
        if self.stage_index < self.num_stages - 1:
            self.out_layout = self._layout(self.stage_index)
            link = self._join(boundaries, self.stage_index, self.out_layout.sender_rank(self.rank_info.rank))
            self.sender = ActivationSender(link, BOUNDARY_KEYS, self.cfg.runtime.channel_depth)

    def _join(self, boundaries: list[BoundaryAddress], boundary: int, rank: int):
        addr, layout = boundaries[boundary], self._layout(boundary)
        listener = self.take_listener(addr.port) if rank == 0 else None  # stage b's worker 0 hosts the store
        link = create_boundary_group(addr.host, addr.port, rank, layout.world_size, addr.backend,
                                     datetime.timedelta(seconds=self.cfg.runtime.boundary_timeout_s),
                                     name=f"b{boundary}", device=self.device, listener=listener,
                                     bind_host=self.rank_info.node_ip)
        warm_up(link, layout, self.device)
        return link

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
        busy = BusyClock(self.device)
        # Summed on the device and read once after the loop: a float() per micro-batch would stall the host.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        router_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        has_router = False  # MoE stages report their routers' balancing loss too
        stats.lr = self.engine.get_lr()[0]  # before the step's optimizer step moves the schedule on
        own_norm = None
        workers = self.group.workers
        for m in range(step * per_step, (step + 1) * per_step):
            if m % workers != self.rank_info.rank:
                continue
            batch = self._next_input(m)
            with busy.span():
                out = self.engine(batch)
            if self.sender is not None:  # before the backward, so the next stage can start at once
                self.sender.send(out.boundary, self.out_layout.receiver_rank(self.out_layout.consumer(m)), m)
                stats.max_outstanding = max(stats.max_outstanding, self.sender.outstanding)
            with busy.span():
                self.engine.backward(out.loss)
                if self.engine.is_gradient_accumulation_boundary() and self._norm_is_ours:
                    own_norm = global_norm([p.grad for p in self.engine.module.parameters() if p.grad is not None])
                self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            stats.micro_batches += 1
            loss_sum += out.metric.detach()
            if out.router_aux is not None:
                router_sum += out.router_aux.detach()
                has_router = True
            tokens += batch["attention_mask"].sum()
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float64).to(self.device)
        sums = torch.stack([loss_sum, tokens.double(), router_sum.double(), norm]).tolist()  # one host sync
        stats.loss_sum, stats.tokens = sums[0], int(sums[1])
        stats.router_aux_sum = sums[2] if has_router else None
        stats.grad_norm = sums[3]
        stats.busy_s = busy.total_s()
        if self.sender is not None:
            delta = self.sender.stats.since(sent0)
            stats.send_wait_s, stats.bytes_sent = delta.blocked_s, delta.bytes
        if self.receiver is not None:
            delta = self.receiver.stats.since(recv0)
            stats.recv_wait_s, stats.bytes_received = delta.blocked_s, delta.bytes
        stats.wall_s = time.perf_counter() - start
        stats.memory = memory_snapshot(self.device)
        return stats

    @property
    def _norm_is_ours(self) -> bool:
        """DeepSpeed's ZeRO and bf16 optimizers record the global gradient norm; without them (ZeRO-0 in float32)
        the engine clips torch's way and keeps no norm, so the worker takes it from the reduced gradients just
        before the step, as the clipping sees them."""
        return not hasattr(self.engine.optimizer, "_global_grad_norm")

    def _next_input(self, m: int) -> dict[str, torch.Tensor]:
        if self.receiver is None:
            return {k: v.to(self.device) for k, v in self.batches.get(m).items()}
        src = self.in_layout.sender_rank(self.in_layout.producer(m))
        return self.receiver.recv(src, m)

    # ---- evaluation (lopt_dist/evaluation.py) ----

    @torch.no_grad()
    def evaluate(self) -> WorkerEvalStats:
        """This worker's share of the evaluation micro-batches through its stage, without gradients and in eval mode:
        read (first stage) or received, then sent on, as training micro-batches are but numbered apart from them
        (`evaluation_micro_batch`), so the training stream's order and routing are untouched. The driver queues it
        on every worker between two steps."""
        start = time.perf_counter()
        names = set_names(self.cfg)
        sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in names}
        self.engine.eval()
        try:
            for e, (name, index) in enumerate(plan(self.cfg)):
                if e % self.group.workers != self.rank_info.rank:
                    continue
                out = self.engine(self._eval_input(e, name, index))
                if self.sender is not None:
                    dst = self.out_layout.receiver_rank(self.out_layout.consumer(e))
                    self.sender.send(out.boundary, dst, evaluation_micro_batch(e))
                sums[name] += out.metric.double()
        finally:
            self.engine.train()
        values = torch.stack(list(sums.values())).tolist() if sums else []  # one host sync
        return WorkerEvalStats(self.stage_index, self.rank_info.rank, dict(zip(names, values)),
                               time.perf_counter() - start)

    def _eval_input(self, e: int, name: str, index: int) -> dict[str, torch.Tensor]:
        if self.receiver is None:
            return {k: v.to(self.device) for k, v in self.eval_sets[name].get(index).items()}
        src = self.in_layout.sender_rank(self.in_layout.producer(e))
        return self.receiver.recv(src, evaluation_micro_batch(e))

    def residency(self) -> dict:
        """What this worker holds of its stage's parameters: whole tensors (`held_elements`) and ZeRO-3
        partitions (`partition_elements`), against the stage's size; and how it was loaded (`LoadReport`)."""
        params = list(self.engine.module.parameters())
        partitions = [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]
        return {"held_elements": sum(p.data.numel() for p in params),
                "partition_elements": sum(t.numel() for t in partitions),
                "stage_elements": self.load_report.parameters, "load": dataclasses.asdict(self.load_report)}

    # ---- checkpoints and export (lopt_dist/checkpoint/deepspeed_state.py; each call is collective) ----

    def save_checkpoint(self, directory: str) -> None:
        """This stage's DeepSpeed state plus this rank's RNG states, into `directory`/stage_<i>."""
        if self.sender is not None:
            self.sender.flush()
        path = Path(directory) / f"stage_{self.stage_index}"
        deepspeed_state.save_stage(self.engine, path, self.rank_info.rank, self.device)

    def load_checkpoint(self, directory: str) -> None:
        path = Path(directory) / f"stage_{self.stage_index}"
        deepspeed_state.load_stage(self.engine, path, self.rank_info.rank, self.device)

    def export_shards(self, directory: str, max_bytes: int, dtype: torch.dtype) -> list[Shard] | None:
        """This stage's part of the final model as safetensors shards in `directory`; their metadata on rank 0."""
        return deepspeed_state.export_stage(self.engine, Path(directory), self.stage_index, self.rank_info.rank == 0,
                                            max_bytes, dtype)

    def stage_weights(self) -> dict[str, torch.Tensor] | None:
        """This stage's fp32 master weights under the model's names, on rank 0 (one tensor gathered at a time)."""
        return deepspeed_state.stage_weights(self.engine, self.rank_info.rank == 0)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.flush()
