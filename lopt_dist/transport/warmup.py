"""One small exchange with every peer during set-up, so that connection errors surface before training.

NCCL creates a point-to-point communicator lazily at the first send to a peer, and gloo connects pairs on
first use; without a warm-up a wrong interface, a firewall or a GPU that NCCL cannot reach would first fail
inside step 0, after every model was built. Each worker greets the peers routing will pair it with, in the
order of the first micro-batch of each pair; both ends order their pairs by the same key, so the blocking
communicator set-ups can never wait on each other in a cycle. The greeting carries the sender's rank, which
the receiver checks: both ends must agree on the layout.
"""

from __future__ import annotations

import torch

from lopt_dist.transport.boundary_group import BoundaryGroup
from lopt_dist.transport.header import ChannelError
from lopt_dist.transport.routing import BoundaryLayout


def warm_up(group: BoundaryGroup, layout: BoundaryLayout, device: torch.device) -> list[int]:
    """Greet every peer of this worker (boundary rank `group.rank`); returns the peers greeted, in order."""
    if group.world_size != layout.world_size:
        raise ChannelError(f"boundary {group.name}: group of {group.world_size} ranks, layout of {layout.world_size}")
    sending = group.rank < layout.senders
    peers = peers_of(layout, group.rank)
    # The data tensor travels on the backend that will carry activations (NCCL on GPUs); the CPU one on gloo.
    data_device = device if group.moves_cuda else torch.device("cpu")
    for peer in peers:
        if sending:
            tensors = [torch.tensor([group.rank]), torch.tensor([group.rank], device=data_device)]
            works = [group.isend(t, peer) for t in tensors]
        else:
            tensors = [torch.tensor([-1]), torch.tensor([-1], device=data_device)]
            works = [group.irecv(t, peer) for t in tensors]
        for work in works:
            work.wait()
        got = [int(t.item()) for t in tensors]
        if not sending and got != [peer, peer]:
            raise ChannelError(f"boundary {group.name}: warm-up from rank {peer} carried {got}; the ends disagree")
    return peers


def peers_of(layout: BoundaryLayout, rank: int) -> list[int]:
    """The boundary ranks `rank` ever exchanges micro-batches with, in the order both ends greet each other."""
    first = range(layout.period)  # every pair that ever talks does so within one period
    if rank < layout.senders:
        transfers = layout.sends(rank, first)
    else:
        transfers = layout.receives(rank - layout.senders, first)
    return list(dict.fromkeys(t.peer for t in transfers))
