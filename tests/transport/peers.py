"""A Ray actor that plays one worker at a stage boundary, and the payloads the tests send through it."""

from __future__ import annotations

import datetime
import time

import ray
import torch
import torch.distributed as dist

from lopt_dist.transport import (
    ActivationReceiver,
    ActivationSender,
    BoundaryGroup,
    BoundaryLayout,
    ChannelStats,
    create_boundary_group,
    destroy_boundary_group,
    find_free_port,
    warm_up,
)

KEYS = ("hidden_states", "attention_mask", "position_ids", "labels")
TIMEOUT = datetime.timedelta(seconds=30)


def make_payload(micro_batch: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A payload whose every value encodes its micro-batch, with a sequence length that varies with it."""
    seq = 3 + (7 * micro_batch) % 11
    hidden = torch.arange(2 * seq * 8, dtype=torch.float32).reshape(2, seq, 8) / 8 + micro_batch
    positions = torch.arange(seq).expand(2, seq).contiguous()
    return {
        "hidden_states": hidden.to(dtype),
        "attention_mask": torch.ones(2, seq, dtype=torch.int64),
        "position_ids": positions,
        "labels": torch.full((2, seq), micro_batch, dtype=torch.int64),
    }


def join_all(peers: list, name: str) -> int:
    """Build one boundary group over `peers` (their list index is their boundary rank); returns its port."""
    port = find_free_port()
    calls = [p.join.remote("127.0.0.1", port, rank, len(peers), name) for rank, p in enumerate(peers)]
    ray.get(calls, timeout=60)
    return port


@ray.remote(num_cpus=0)
class BoundaryPeer:
    def __init__(self) -> None:
        torch.set_num_threads(1)  # two cores serve all the peers
        self._groups: dict[str, BoundaryGroup] = {}
        self._unflushed: ActivationSender | None = None

    def init_default_group(self, port: int) -> None:
        """What DeepSpeed does in each worker: a default gloo group (here of one worker)."""
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    def default_group_state(self) -> dict:
        if not dist.is_initialized():
            return {"initialized": False}
        total = torch.ones(1)
        dist.all_reduce(total)
        groups = dist.distributed_c10d._world.pg_map
        return {
            "initialized": True,
            "world_size": dist.get_world_size(),
            "all_reduce": total.item(),
            "boundary_groups_registered": sum(g.pg in groups for g in self._groups.values()),
        }

    def join(self, host: str, port: int, rank: int, world_size: int, name: str, backend: str = "gloo") -> None:
        self._groups[name] = create_boundary_group(host, port, rank, world_size, backend, TIMEOUT, name=name,
                                                   device=torch.device("cpu"), bind_host=host)

    def warm_up(self, name: str, senders: int, receivers: int) -> list[int]:
        return warm_up(self._groups[name], BoundaryLayout(senders=senders, receivers=receivers), torch.device("cpu"))

    def leave(self, name: str) -> None:
        destroy_boundary_group(self._groups.pop(name))

    def send_all(
        self, name: str, transfers: list, depth: int, dtype: torch.dtype = torch.float32, flush: bool = True,
        replay_bytes: int = 0,
    ) -> dict:
        """Send make_payload(m) to each (m, dst) in order; reports the in-flight count after every send."""
        sender = ActivationSender(self._groups[name], KEYS, depth, replay_bytes)
        outstanding = []
        for m, dst in transfers:
            sender.send(make_payload(m, dtype), dst, m)
            outstanding.append(sender.outstanding)
        self._sender = sender
        if flush:
            sender.flush()
        else:
            self._unflushed = sender  # dropping a gloo send's work object cancels the send
        return {
            "outstanding": outstanding,
            "peak": sender.peak_outstanding,
            "stats": sender.stats,
            "left": sender.outstanding,
        }

    def replay_log_micro_batches(self) -> list[int]:
        """The micro-batches the last sender keeps for a replay."""
        return [m.micro_batch for m in self._sender.log.after(-1)]

    def cursor(self) -> int:
        """The last receiver's next expected training micro-batch."""
        return self._receiver.next_micro_batch

    def recv_all(self, name: str, transfers: list, delay_s: float = 0.0) -> tuple[list, ChannelStats]:
        """Receive each (m, src) in order, pausing `delay_s` before each as a slow consumer would."""
        receiver = ActivationReceiver(self._groups[name], KEYS)
        self._receiver = receiver
        received = []
        for m, src in transfers:
            time.sleep(delay_s)
            received.append((m, receiver.recv(src, m)))
        return received, receiver.stats
