"""The activation channel: detached boundary activations flow from one stage's workers to the next's.

Per boundary, `create_boundary_group` builds a process group beside (never instead of) each worker's
default DeepSpeed group, on stores bound to the node's address (rendezvous.py); `BoundaryLayout` says who
sends which micro-batch to whom; `warm_up` greets every peer during set-up; `ActivationSender` and
`ActivationReceiver` move the payloads with bounded look-ahead, through pinned host memory when CUDA tensors
cross a gloo group (staging.py). Which backend a boundary uses is decided in `lopt_dist.device`.
"""

from lopt_dist.transport.boundary_group import BoundaryGroup, create_boundary_group, destroy_boundary_group
from lopt_dist.transport.channel import ActivationReceiver, ActivationSender, ChannelStats
from lopt_dist.transport.header import ChannelError, PeerLostError
from lopt_dist.transport.rendezvous import Listener, find_free_port
from lopt_dist.transport.routing import BoundaryLayout, Transfer, step_micro_batches
from lopt_dist.transport.warmup import warm_up

__all__ = [
    "ActivationReceiver",
    "ActivationSender",
    "BoundaryGroup",
    "BoundaryLayout",
    "ChannelError",
    "ChannelStats",
    "Listener",
    "PeerLostError",
    "Transfer",
    "create_boundary_group",
    "destroy_boundary_group",
    "find_free_port",
    "step_micro_batches",
    "warm_up",
]
