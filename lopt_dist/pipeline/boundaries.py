"""A stage worker's ends of its boundaries: the receiver from the previous stage and the sender to the next,
joined at set-up, and joined again when the stage on the other side is restarted alone.

A join creates the boundary's process group (its store on stage b's worker 0, on a port that worker reserved),
greets every routed peer (warm-up, so connection problems surface at set-up) and exchanges cursors: each
receiver tells its senders the first micro-batch it still needs (transport/link.py). A rejoin runs on the
worker's control thread while its training thread waits on the old group: it takes the old group away once the
training thread has left it, joins the new one with the restarted stage's workers and hands it over.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lopt_dist.config import ExperimentConfig
from lopt_dist.model import BOUNDARY_KEYS
from lopt_dist.pipeline.worker import RankInfo
from lopt_dist.transport import ActivationReceiver, ActivationSender, BoundaryLayout, create_boundary_group, warm_up
from lopt_dist.transport.link import Link, exchange_cursors


@dataclass(frozen=True)
class BoundaryAddress:
    """Where boundary b's group rendezvouses (its TCPStore lives on stage b's worker 0) and its backend."""

    host: str
    port: int
    backend: str = "gloo"  # decided by the driver from every member's device (lopt_dist.device)


class StageLinks:
    def __init__(self, cfg: ExperimentConfig, stage: int, rank_info: RankInfo, device: torch.device,
                 take_listener: Callable[[int], object]) -> None:
        self.cfg = cfg
        self.stage = stage
        self.rank = rank_info.rank
        self.node_ip = rank_info.node_ip
        self.device = device
        self._take_listener = take_listener
        groups = cfg.runtime.groups
        self.in_layout = BoundaryLayout(senders=groups[stage - 1].workers, receivers=groups[stage].workers) \
            if stage > 0 else None
        self.out_layout = BoundaryLayout(senders=groups[stage].workers, receivers=groups[stage + 1].workers) \
            if stage < len(groups) - 1 else None
        self.receiver: ActivationReceiver | None = None
        self.sender: ActivationSender | None = None
        runtime = cfg.runtime
        # Waiting for a replacement group makes sense only when the driver restarts single stages.
        self._replace_timeout_s = runtime.boundary_timeout_s if runtime.restart_stage_only else 0.0
        self._replay_bytes = runtime.replay_buffer_bytes if runtime.restart_stage_only else 0

    def join(self, addresses: list[BoundaryAddress], first_step: int) -> None:
        """Join both boundaries. Incoming first, then outgoing: stage s waits for stage s-1 to join boundary s-1
        only after that stage has joined its own incoming one, so the rendezvous proceeds front to back, never
        in a cycle. `first_step`: the step this worker starts from (its receiver's cursor)."""
        if self.in_layout is not None:
            cursor = first_step * self.cfg.train.micro_batches_per_step
            group, _ = self._group(addresses[self.stage - 1], self.stage - 1, cursor)
            self.receiver = ActivationReceiver(Link(group, replace_timeout_s=self._replace_timeout_s), BOUNDARY_KEYS,
                                               self.device, next_micro_batch=cursor)
        if self.out_layout is not None:
            group, cursors = self._group(addresses[self.stage], self.stage, 0)
            link = Link(group, cursors, replace_timeout_s=self._replace_timeout_s)
            self.sender = ActivationSender(link, BOUNDARY_KEYS, self.cfg.runtime.channel_depth, self._replay_bytes)

    def rejoin(self, boundary: int, address: BoundaryAddress) -> None:
        """(Control thread) the stage across `boundary` was restarted: move this end to a new group with it."""
        end = self.sender if boundary == self.stage else self.receiver
        end.link.detach(self.cfg.runtime.boundary_timeout_s)
        try:
            cursor = self.receiver.next_micro_batch if end is self.receiver else 0
            group, cursors = self._group(address, boundary, cursor)
        except BaseException as err:
            end.link.abandon(f"boundary b{boundary} could not be joined again: {type(err).__name__}: {err}")
            raise
        end.link.install(group, cursors)

    def _group(self, address: BoundaryAddress, boundary: int, cursor: int):
        layout = self.out_layout if boundary == self.stage else self.in_layout
        rank = layout.sender_rank(self.rank) if boundary == self.stage else layout.receiver_rank(self.rank)
        listener = self._take_listener(address.port) if rank == 0 else None  # stage b's worker 0 hosts the store
        group = create_boundary_group(address.host, address.port, rank, layout.world_size, address.backend,
                                      datetime.timedelta(seconds=self.cfg.runtime.boundary_timeout_s),
                                      name=f"b{boundary}", device=self.device, listener=listener,
                                      bind_host=self.node_ip)
        warm_up(group, layout, self.device)
        return group, exchange_cursors(group, layout, cursor)
