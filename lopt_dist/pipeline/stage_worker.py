"""The Ray actor that trains one stage as one data-parallel rank of its group.

Per micro-batch: take the input (from the data on the first stage, from the channel otherwise), run the
stage's forward, post the detached boundary to the next stage *before* the backward so the next stage can
start at once, then backward and (at the step's last micro-batch) the DeepSpeed optimizer step. Nothing
ever comes back from the next stage.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from lopt_dist.checkpoint import deepspeed_state
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ExperimentConfig
from lopt_dist.evaluation import build_eval_sets, plan, set_names, split_holdout
from lopt_dist.model.stage_loader import LoadReport, load_stage
from lopt_dist.pipeline.activity import Activity, WorkerStatus
from lopt_dist.pipeline.boundaries import BoundaryAddress, StageLinks
from lopt_dist.pipeline.deepspeed_engine import build_engine, zero3_partitioner
from lopt_dist.pipeline.faults import FaultInjector
from lopt_dist.pipeline.worker import CONTROL_GROUP, WorkerBase
from lopt_dist.telemetry.memory import memory_snapshot, reset_peak
from lopt_dist.telemetry.timing import BusyClock
from lopt_dist.telemetry.worker_logs import printed_to, route_library_output, worker_log_path
from lopt_dist.train.precision import global_norm, run_dtype
from lopt_dist.transport import ActivationReceiver, ActivationSender
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


class StageWorker(WorkerBase):
    concurrency_groups = {CONTROL_GROUP: 1}  # `status` answers while a step or a save blocks

    def __init__(self, cfg: ExperimentConfig, stage_index: int) -> None:
        self.cfg = cfg
        self.stage_index = stage_index
        self.num_stages = len(cfg.runtime.groups)
        self.group = cfg.runtime.groups[stage_index]
        self.engine = None
        self.load_report: LoadReport | None = None
        self.links: StageLinks | None = None
        self.sender: ActivationSender | None = None
        self.receiver: ActivationReceiver | None = None
        self.batches = None
        self.eval_sets: dict = {}  # first stage: evaluation set name -> its micro-batches
        self.activity = Activity()
        self.faults: FaultInjector | None = None

    def __repr__(self) -> str:
        # Ray prefixes this worker's log lines with it and the state API reports it as `repr_name`; Ray reads
        # it when the actor starts, before the group hands out ranks, so only the stage is known.
        return f"StageWorker(stage={self.stage_index})"

    # ---- start-up ----

    def setup(
        self, master_addr: str, master_port: int, boundaries: list[BoundaryAddress], backend: str, ds_config: dict,
        first_step: int = 0,
    ) -> int:
        """Join the group's process group (`backend`), build the engine, then join and warm up the boundary
        groups. `first_step`: the step this worker trains first (a stage restarted alone starts at its
        checkpoint, its neighbours elsewhere). Returns #params."""
        self.activity.set("setting up")
        self.faults = FaultInjector(self.stage_index, self.rank_info.rank)
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
        self.activity.set("joining the boundaries (waits for the neighbouring stages' workers)", waits_on_peer=True)
        self.links = StageLinks(self.cfg, self.stage_index, self.rank_info, device, self.take_listener)
        self.links.join(boundaries, first_step)
        self.in_layout, self.out_layout = self.links.in_layout, self.links.out_layout
        self.receiver, self.sender = self.links.receiver, self.links.sender
        self.activity.set("idle after set-up")
        return self.load_report.parameters

    def _build_data(self) -> None:
        from lopt_dist.data import build_examples, micro_batches
        from lopt_dist.model.loading import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.model.name)
        examples, held_out = split_holdout(build_examples(self.cfg.data, tokenizer), self.cfg)
        self.batches = micro_batches(examples, self.cfg, tokenizer.pad_token_id)
        sets = build_eval_sets(self.cfg, tokenizer, held_out) if self.cfg.eval.every else []
        self.eval_sets = {s.name: s.batches for s in sets}

    # ---- training ----

    def train_step(self, step: int) -> WorkerStepStats:
        """One optimizer step: this worker's share of micro-batches step*M .. (step+1)*M - 1."""
        per_step = self.cfg.train.micro_batches_per_step
        stats = WorkerStepStats(stage=self.stage_index, rank=self.rank_info.rank, step=step)
        self.activity.begin_step(step)
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
            self.activity.set(f"forward of micro-batch {m}")
            with busy.span():
                out = self.engine(batch)
            if self.sender is not None:  # before the backward, so the next stage can start at once
                consumer = self.out_layout.consumer(m)
                self.activity.set(f"sending micro-batch {m} to stage {self.stage_index + 1} worker {consumer}",
                                  waits_on_peer=True)
                self.sender.send(out.boundary, self.out_layout.receiver_rank(consumer), m)
                stats.max_outstanding = max(stats.max_outstanding, self.sender.outstanding)
            self.faults.maybe_fire("train_step", step)
            self.activity.set(f"backward and optimizer step of micro-batch {m}")
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
        self.activity.end_step()
        return stats

    def _next_input(self, m: int) -> dict[str, torch.Tensor]:
        if self.receiver is None:
            self.activity.set(f"reading micro-batch {m} from the data")
            return {k: v.to(self.device) for k, v in self.batches.get(m).items()}
        producer = self.in_layout.producer(m)
        self.activity.set(f"receiving micro-batch {m} from stage {self.stage_index - 1} worker {producer}",
                          waits_on_peer=True)
        return self.receiver.recv(self.in_layout.sender_rank(producer), m)

    @property
    def _norm_is_ours(self) -> bool:
        """DeepSpeed's ZeRO and bf16 optimizers record the global gradient norm; without them (ZeRO-0 in float32)
        the engine clips torch's way and keeps no norm, so the worker takes it from the reduced gradients just
        before the step, as the clipping sees them."""
        return not hasattr(self.engine.optimizer, "_global_grad_norm")

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
        self.activity.set("evaluating")
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
            self.activity.set(f"idle after step {self.activity.step}")
        values = torch.stack(list(sums.values())).tolist() if sums else []  # one host sync
        return WorkerEvalStats(self.stage_index, self.rank_info.rank, dict(zip(names, values)),
                               time.perf_counter() - start)

    def _eval_input(self, e: int, name: str, index: int) -> dict[str, torch.Tensor]:
        if self.receiver is None:
            return {k: v.to(self.device) for k, v in self.eval_sets[name].get(index).items()}
        src = self.in_layout.sender_rank(self.in_layout.producer(e))
        return self.receiver.recv(src, evaluation_micro_batch(e))

    # ---- health and one-stage restarts (control thread: answers while a step or a save blocks) ----

    @ray.method(concurrency_group=CONTROL_GROUP)
    def status(self) -> WorkerStatus:
        replay_from = self.sender.log.complete_from if self.sender is not None and self.sender.log.max_bytes else None
        return self.activity.status(replay_from)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def reserve_boundary_port(self) -> int:
        """A port for a new boundary store hosted here (`_reserve_port`, answered while a step blocks)."""
        return self._reserve_port()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def rejoin_boundary(self, boundary: int, address: BoundaryAddress) -> None:
        """The stage across `boundary` was restarted alone: join a new group with it (pipeline/boundaries.py)."""
        self.links.rejoin(boundary, address)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def trim_replay(self, step: int) -> None:
        """The checkpoint of `step` is committed: a restarted next stage never needs older activations again."""
        if self.sender is not None:
            self.sender.log.trim(step * self.cfg.train.micro_batches_per_step)

    def resend(self) -> None:
        """After the next stage was restarted alone: send it, from the replay log, what it needs again, and wait
        until it has taken everything sent so far. Queued behind the steps this worker already has."""
        if self.sender is not None:
            self.activity.set(f"replaying activations to the restarted stage {self.stage_index + 1}",
                              waits_on_peer=True)
            self.sender.flush()
            self.activity.set(f"idle after step {self.activity.step}")

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
            self.activity.set(f"waiting for stage {self.stage_index + 1} to take the step's last micro-batches "
                              "before a checkpoint", waits_on_peer=True)
            self.sender.flush()
        self.activity.set(f"writing a checkpoint into {directory}")
        self.faults.maybe_fire("save_checkpoint", self.activity.step + 1)  # named by the step of its state
        path = Path(directory) / f"stage_{self.stage_index}"
        deepspeed_state.save_stage(self.engine, path, self.rank_info.rank, self.device)
        self.activity.set(f"idle after a checkpoint of step {self.activity.step}")

    def load_checkpoint(self, directory: str) -> None:
        self.activity.set(f"loading the checkpoint {directory}")
        path = Path(directory) / f"stage_{self.stage_index}"
        deepspeed_state.load_stage(self.engine, path, self.rank_info.rank, self.device)
        self.activity.checkpoint_loads += 1
        self.activity.set(f"idle after loading {directory}")

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
