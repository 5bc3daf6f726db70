"""Former home of the worker-group code, kept so that existing imports keep working.

The concepts now live one per module, as in Ray Train v2: worker.py (WorkerBase, ranks), group.py
(WorkerGroup: create / execute / shutdown), placement.py (placement groups, fit checks, boundary columns),
futures.py (`wait_all`), errors.py (typed errors). Import from those in new code.
"""

from lopt_dist.pipeline.futures import wait_all
from lopt_dist.pipeline.group import WorkerGroup
from lopt_dist.pipeline.worker import NodeInfo, RankInfo, WorkerBase, assign_ranks

__all__ = ["NodeInfo", "RankInfo", "WorkerBase", "WorkerGroup", "assign_ranks", "wait_all"]
