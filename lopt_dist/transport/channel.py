"""Sending and receiving boundary activations over a boundary process group.

A message is one micro-batch's payload: a dict of tensors whose keys, and their order, both ends agree on
when they build the channel (for example hidden_states, attention_mask, position_ids, labels). Each message
is a header (dtypes and shapes, see header.py) followed by one point-to-point send per tensor. Tensors
travel in the dtype they have: bfloat16 hidden states stay bfloat16 on the wire.

The sender is asynchronous but bounded: at most `depth` messages in flight, so a fast stage runs at most
`depth` micro-batches ahead of a slow one and then waits; nothing is dropped or buffered without bound.
On gloo a send completes only once the receiver has posted the matching receive, which is what makes the
bound real backpressure. CUDA tensors on a gloo group pass through pinned host memory (staging.py). Both
ends must follow `routing.BoundaryLayout`, or they wait on each other until the group's timeout.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lopt_dist.transport.boundary_group import BoundaryGroup
from lopt_dist.transport.header import ChannelError, Header, PeerLostError, decode_header, encode_header, header_length
from lopt_dist.transport.link import Link
from lopt_dist.transport.replay import Message, ReplayLog
from lopt_dist.transport.staging import from_wire, receive_buffers, to_wire


@dataclass(kw_only=True)
class ChannelStats:
    """Counters of one end of a channel, cumulative since it was built.

    blocked_s is time the caller's thread spent stopped by the channel: the sender waiting for a free slot
    (or in flush), the receiver waiting for its data. On CUDA the receiver's wait only covers the header;
    the payload lands asynchronously on NCCL's stream, which the compute stream is then made to wait for.
    """

    messages: int = 0
    bytes: int = 0
    blocked_s: float = 0.0

    def since(self, earlier: ChannelStats) -> ChannelStats:
        """The counts accumulated after `earlier` (a copy taken with `snapshot`), e.g. over one step."""
        return ChannelStats(
            messages=self.messages - earlier.messages,
            bytes=self.bytes - earlier.bytes,
            blocked_s=self.blocked_s - earlier.blocked_s,
        )

    def snapshot(self) -> ChannelStats:
        return ChannelStats(messages=self.messages, bytes=self.bytes, blocked_s=self.blocked_s)


@dataclass
class _InFlight:
    micro_batch: int
    dst: int
    works: list[dist.Work]
    # The tensors being sent; torch must not free or reuse them until the works complete.
    tensors: list[torch.Tensor] = field(repr=False)

    def wait(self, group: BoundaryGroup) -> None:
        # The header (on gloo) comes first: its completion means the receiver has started taking this message.
        with _peer_errors(group, f"sending micro-batch {self.micro_batch} to rank {self.dst}"):
            for work in self.works:
                work.wait()


@contextlib.contextmanager
def _peer_errors(group: BoundaryGroup, doing: str) -> Iterator[None]:
    """The backend's errors (a peer that died, a broken connection, the group's timeout) as PeerLostError."""
    try:
        yield
    except ChannelError:
        raise
    except RuntimeError as err:
        raise PeerLostError(f"boundary {group.name}: {doing}: {' '.join(str(err).split())}") from err


class ActivationSender:
    """The sending end: one per worker per boundary it sends across (workers of non-last stages).

    Every message goes through a ReplayLog (replay.py): posted in order, at most `depth` in flight, and kept
    for a replay up to `replay_bytes` (0: not kept). When the link's group is replaced (link.py: the receiving
    stage was restarted), the sender starts again on the new group from each receiver's cursor: it replays from
    the log what a restarted receiver needs again, and skips what a surviving receiver already has.

    Flush before dropping it: gloo cancels a send whose work object is freed before it completes, so the
    messages still in flight would silently never arrive.
    """

    def __init__(self, link: Link | BoundaryGroup, keys: Sequence[str], depth: int, replay_bytes: int = 0) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct and non-empty, got {list(keys)}")
        self.link = link if isinstance(link, Link) else Link(link)
        self._keys = tuple(keys)
        self._depth = depth
        self.log = ReplayLog(replay_bytes)
        self._in_flight: deque[_InFlight] = deque()
        self._generation = self.link.generation  # the group the in-flight messages were posted on
        self._posted_upto = -1  # the last micro-batch posted (or skipped) on that group
        self.peak_outstanding = 0
        self.stats = ChannelStats()

    @property
    def outstanding(self) -> int:
        """Messages posted whose completion has not yet been waited for."""
        return len(self._in_flight)

    def send(self, payload: dict[str, torch.Tensor], dst: int, micro_batch: int) -> None:
        """Post `payload` for boundary rank `dst`; returns once it is posted, blocking first while `depth`
        messages are still in flight. The caller must not modify the payload's tensors afterwards."""
        if tuple(payload) != self._keys:
            raise ChannelError(f"payload keys {list(payload)} differ from the channel's {list(self._keys)}")
        tensors = [payload[key].detach().contiguous() for key in self._keys]
        header = encode_header(micro_batch, _single_device_type(tensors), tensors)
        wire = to_wire(tensors, self.link.moves_cuda)
        if micro_batch < 0:  # an evaluation micro-batch (header.evaluation_micro_batch)
            self._post_evaluation(Message(micro_batch, dst, header, wire, None, tensors[0].device))
        else:
            self.log.add(micro_batch, dst, header, wire)
            self._pump(drain=False)
        self.peak_outstanding = max(self.peak_outstanding, len(self._in_flight))
        self.stats.messages += 1
        self.stats.bytes += sum(t.numel() * t.element_size() for t in (header, *tensors))

    def flush(self) -> None:
        """Wait until every posted message has been taken; call before a checkpoint and at shutdown."""
        self._pump(drain=True)

    def _pump(self, drain: bool) -> None:
        """Post what the log holds beyond what was posted (everything from the receivers' cursors after the group
        was replaced), then with `drain` wait for all of it. A lost peer waits for the replacement group."""
        while True:
            with self.link.use() as (group, generation):
                try:
                    if generation != self._generation:  # a new group: its receivers said where to resume
                        self._restart_on(generation)
                    for message in self.log.after(self._posted_upto):
                        if message.micro_batch >= self.link.cursors.get(message.dst, 0):
                            while len(self._in_flight) >= self._depth:
                                self._wait_oldest(group)
                            self._post(group, message)
                        self.log.posted(message)
                        self._posted_upto = message.micro_batch
                    while drain and self._in_flight:
                        self._wait_oldest(group)
                    return
                except PeerLostError as err:
                    lost, lost_generation = err, generation
            if not self.link.wait_replaced(lost_generation):
                raise lost

    def _post_evaluation(self, message: Message) -> None:
        """Evaluation micro-batches go out at once, behind every training message (`send` posted those already),
        and are never kept: evaluation is not replayed, since a run that evaluates restarts every stage after a
        failure (pipeline/stage_restart.py). A lost peer here fails the evaluation."""
        with self.link.use() as (group, _):
            while len(self._in_flight) >= self._depth:
                self._wait_oldest(group)
            self._post(group, message)

    def _restart_on(self, generation: int) -> None:
        needed = min(self.link.cursors.values(), default=0)
        if self.log.complete_from > needed:
            raise ChannelError(f"boundary {self.link.name}: a receiver needs micro-batch {needed} again, but the "
                               f"replay log holds only those from {self.log.complete_from} on "
                               "(runtime.replay_buffer_size)")
        self._in_flight.clear()  # posted on the old group, whose peers are gone; the log has them
        self._generation, self._posted_upto = generation, -1

    def _post(self, group: BoundaryGroup, message: Message) -> None:
        wire = message.tensors_to_send()
        # gloo fails a post at once when the connection to `dst` is already closed (its process died): that is
        # a lost peer too. What was posted before is dropped with the old group; the log still has the message.
        with _peer_errors(group, f"sending micro-batch {message.micro_batch} to rank {message.dst}"):
            works = [group.isend(message.header, message.dst)]
            # gloo may not accept zero-byte messages; the receiver knows the empty shape from the header.
            works += [group.isend(t, message.dst) for t in wire if t.numel() > 0]
        self._in_flight.append(_InFlight(message.micro_batch, message.dst, works, [message.header, *wire]))

    def _wait_oldest(self, group: BoundaryGroup) -> None:
        start = time.perf_counter()
        self._in_flight[0].wait(group)
        self._in_flight.popleft()
        self.stats.blocked_s += time.perf_counter() - start


class ActivationReceiver:
    """The receiving end: one per worker per boundary it receives across (workers of non-first stages).

    `next_micro_batch` is its cursor: every micro-batch it consumes below it has arrived (link.py sends it to
    the senders of a replaced group). A receive that loses its peer waits for the replacement group and asks
    the new one for the same micro-batch.
    """

    def __init__(
        self, link: Link | BoundaryGroup, keys: Sequence[str], device: torch.device | str = "cpu",
        next_micro_batch: int = 0,
    ) -> None:
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct and non-empty, got {list(keys)}")
        self.link = link if isinstance(link, Link) else Link(link)
        self._keys = tuple(keys)
        self._device = torch.device(device)
        self.next_micro_batch = next_micro_batch
        self.stats = ChannelStats()

    def recv(self, src: int, micro_batch: int) -> dict[str, torch.Tensor]:
        """Receive micro-batch `micro_batch` from boundary rank `src`, into fresh tensors the caller owns.

        Raises ChannelError when the message that arrives is not the one expected (a routing bug)."""
        while True:
            with self.link.use() as (group, generation):
                try:
                    tensors = self._recv_on(group, src, micro_batch)
                    break
                except PeerLostError as err:
                    lost, lost_generation = err, generation
            if not self.link.wait_replaced(lost_generation):
                raise lost
        if micro_batch >= 0:  # evaluation micro-batches (negative) are not part of the replayed stream
            self.next_micro_batch = micro_batch + 1
        return dict(zip(self._keys, tensors))

    def _recv_on(self, group: BoundaryGroup, src: int, micro_batch: int) -> list[torch.Tensor]:
        start = time.perf_counter()
        header_buf = torch.empty(header_length(len(self._keys)), dtype=torch.int64)
        with _peer_errors(group, f"receiving micro-batch {micro_batch} from rank {src}"):
            group.irecv(header_buf, src).wait()
            header = decode_header(header_buf, len(self._keys))
            self._check(header, src, micro_batch)
            buffers = receive_buffers(header.tensors, self._device, group.moves_cuda)
            works = [group.irecv(t, src) for t in buffers if t.numel() > 0]
            for work in works:
                work.wait()
        tensors = from_wire(buffers, self._device)
        self.stats.blocked_s += time.perf_counter() - start
        self.stats.messages += 1
        self.stats.bytes += sum(t.numel() * t.element_size() for t in (header_buf, *tensors))
        return tensors

    def _check(self, header: Header, src: int, micro_batch: int) -> None:
        if header.micro_batch != micro_batch:
            raise ChannelError(
                f"expected micro-batch {micro_batch} from boundary rank {src}, got {header.micro_batch}: "
                "sender and receiver do not follow the same routing"
            )
        if header.device_type != self._device.type:
            raise ChannelError(
                f"boundary rank {src} sends from {header.device_type}, "
                f"this receiver expects {self._device.type}"
            )


def _single_device_type(tensors: list[torch.Tensor]) -> str:
    # Each device type travels over its own backend; the receiver posts every buffer on one device.
    types = {t.device.type for t in tensors}
    if len(types) != 1:
        raise ChannelError(f"a payload's tensors must share one device type, got {sorted(types)}")
    return types.pop()
