"""A sender's outbox: the messages it sent, kept until the receiving stage has a checkpoint past them.

Nothing flows backward, so a restarted receiving stage can redo its steps from its last checkpoint with the
very activations it had then, if its senders kept them: the log keeps every message from the micro-batch of
that checkpoint on (`trim` drops older ones once a newer checkpoint is committed), up to `max_bytes` of host
memory per sender. Beyond that it drops its oldest messages and says from where it is complete
(`complete_from`): a restart that would need more falls back to restarting every stage. `max_bytes` 0 keeps no
message once it was sent. On CPU the log holds the sent tensors themselves (the channel's caller hands them over
for good); CUDA tensors are kept as host copies, so the log never holds GPU memory.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class Message:
    micro_batch: int
    dst: int  # the receiver's boundary rank
    header: torch.Tensor
    wire: list[torch.Tensor] | None  # what the backend sends (None once posted, when kept as host copies only)
    host: list[torch.Tensor] | None  # the copies kept for a replay (the wire tensors themselves on CPU)
    device: torch.device  # where the wire tensors live

    @property
    def nbytes(self) -> int:
        tensors = self.host if self.host is not None else (self.wire or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def tensors_to_send(self) -> list[torch.Tensor]:
        if self.wire is not None:
            return self.wire
        return [t.to(self.device) for t in self.host]


class ReplayLog:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._messages: deque[Message] = deque()
        self._bytes = 0
        self._lock = threading.Lock()  # the control thread trims while the training thread appends
        self.complete_from = 0  # every message from this micro-batch on is in the log (or not sent yet)

    def add(self, micro_batch: int, dst: int, header: torch.Tensor, wire: list[torch.Tensor]) -> Message:
        on_host = all(t.device.type == "cpu" for t in wire)
        host = wire if on_host else ([t.to("cpu") for t in wire] if self.max_bytes > 0 else None)
        message = Message(micro_batch, dst, header, wire, host, wire[0].device if wire else torch.device("cpu"))
        with self._lock:
            self._messages.append(message)
            self._bytes += message.nbytes
        return message

    def posted(self, message: Message) -> None:
        """`message` went out (or was skipped: its receiver had it): keep it for a replay, as host copies, within
        `max_bytes`; older messages go first, and none at all is kept when `max_bytes` is 0."""
        with self._lock:
            if message.host is not None and message.wire is not message.host:
                message.wire = None  # the in-flight send holds the device tensors until it completes
            while self._messages and self._bytes > self.max_bytes and \
                    self._messages[0].micro_batch <= message.micro_batch:
                self._drop_oldest()

    def trim(self, below: int) -> None:
        """Forget the messages of micro-batches below `below` (a checkpoint past them was committed)."""
        with self._lock:
            while self._messages and self._messages[0].micro_batch < below:
                self._drop_oldest()
            self.complete_from = max(self.complete_from, below)

    def after(self, micro_batch: int) -> list[Message]:
        """The messages of micro-batches after `micro_batch`, in order."""
        with self._lock:
            return [m for m in self._messages if m.micro_batch > micro_batch]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _drop_oldest(self) -> None:
        dropped = self._messages.popleft()
        self._bytes -= dropped.nbytes
        self.complete_from = dropped.micro_batch + 1
