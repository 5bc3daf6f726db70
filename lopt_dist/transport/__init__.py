"""The activation channel: detached boundary activations flow from one stage's workers to the next's.

Per boundary, `create_boundary_group` builds a process group beside (never instead of) each worker's
default DeepSpeed group; `BoundaryLayout` says who sends which micro-batch to whom; `ActivationSender` and
`ActivationReceiver` move the payloads with bounded look-ahead.
"""

from lopt_dist.transport.boundary_group import (
    create_boundary_group,
    destroy_boundary_group,
    find_free_port,
    pick_backend,
)
from lopt_dist.transport.channel import ActivationReceiver, ActivationSender, ChannelStats
from lopt_dist.transport.header import ChannelError
from lopt_dist.transport.routing import BoundaryLayout, Transfer, step_micro_batches

__all__ = [
    "ActivationReceiver",
    "ActivationSender",
    "BoundaryLayout",
    "ChannelError",
    "ChannelStats",
    "Transfer",
    "create_boundary_group",
    "destroy_boundary_group",
    "find_free_port",
    "pick_backend",
    "step_micro_batches",
]
