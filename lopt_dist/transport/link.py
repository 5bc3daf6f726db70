"""A boundary group that can be replaced while the training thread uses it, and the handshake on a new one.

When the stage on the other side of a boundary is restarted alone (pipeline/stage_restart.py), this worker's
control thread joins a new boundary group with the restarted workers and installs it here (`detach`, then
`install`), while the training thread waits: an operation on the old group fails when its peer dies
(PeerLostError), and the training thread then waits for the replacement (`wait_replaced`) and goes on with
the new group. `generation` counts the groups installed, so a sender knows when to replay what the new peers
still need (channel.py). Nothing is replaced unless the driver asks: a Link is one group otherwise.

The handshake (`exchange_cursors`): on every new group each receiving worker tells each of its senders the
first micro-batch it still needs (its cursor), so a sender resumes exactly there: a surviving sender replays
from its log what a restarted receiver needs again, a restarted sender skips what a surviving receiver has.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from lopt_dist.transport.boundary_group import BoundaryGroup
from lopt_dist.transport.header import PeerLostError
from lopt_dist.transport.routing import BoundaryLayout
from lopt_dist.transport.warmup import peers_of


class Link:
    def __init__(self, group: BoundaryGroup, cursors: dict[int, int] | None = None,
                 replace_timeout_s: float = 0.0) -> None:
        """`replace_timeout_s`: how long an operation that lost its peer waits for a replacement group (0: it
        fails at once, for a link nobody replaces)."""
        self._cond = threading.Condition()
        self._group: BoundaryGroup | None = group
        self.cursors = dict(cursors or {})  # peer rank -> first micro-batch it needs (senders' view)
        self.generation = 0
        self._busy = False  # the training thread is inside an operation on the group
        self._broken: str | None = None  # why no replacement will come
        self.replace_timeout_s = replace_timeout_s
        self.name, self.moves_cuda = group.name, group.moves_cuda  # the same for every replacement

    @contextlib.contextmanager
    def use(self) -> Iterator[tuple[BoundaryGroup, int]]:
        """The current group and its generation, held for one operation (a replacement waits for it to end)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._group is not None or self._broken, self.replace_timeout_s):
                raise PeerLostError("the boundary group was detached for a replacement that did not come in time")
            if self._broken:
                raise PeerLostError(self._broken)
            self._busy = True
            group, generation = self._group, self.generation
        try:
            yield group, generation
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def wait_replaced(self, generation: int) -> bool:
        """After an operation of `generation` lost its peer: wait for a newer group; False if none came in time."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generation > generation or self._broken, self.replace_timeout_s) \
                and not self._broken

    def detach(self, timeout_s: float) -> None:
        """(Control thread) take the group away once the current operation on it ends; TimeoutError if it does not."""
        with self._cond:
            old, self._group = self._group, None  # no operation starts from now on
            if not self._cond.wait_for(lambda: not self._busy, timeout_s):
                self._group = old
                raise TimeoutError(f"boundary {old.name}: the training thread did not leave the old group within "
                                   f"{timeout_s:g} s")
        # The old group is dropped, not shut down: its peers are dead and a sender may still hold its unfinished
        # works, which must not be waited on.

    def install(self, group: BoundaryGroup, cursors: dict[int, int]) -> None:
        """(Control thread) the new group, and the cursors its receivers sent in the handshake."""
        with self._cond:
            self._group, self.cursors = group, dict(cursors)
            self.generation += 1
            self._cond.notify_all()

    def abandon(self, reason: str) -> None:
        """(Control thread) no replacement will come: operations waiting for one fail with `reason`."""
        with self._cond:
            self._broken = reason
            self._cond.notify_all()


def exchange_cursors(group: BoundaryGroup, layout: BoundaryLayout, cursor: int) -> dict[int, int]:
    """Receivers send `cursor` (the first micro-batch they still need) to each of their senders; senders return
    {receiver rank: its cursor}. Every member of a new group calls this once, right after the warm-up."""
    sending = group.rank < layout.senders
    received = {}
    for peer in peers_of(layout, group.rank):
        value = torch.tensor([cursor], dtype=torch.int64)
        if sending:
            group.irecv(value, peer).wait()
            received[peer] = int(value.item())
        else:
            group.isend(value, peer).wait()
    return received
