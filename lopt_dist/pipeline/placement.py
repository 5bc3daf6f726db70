"""Where the workers go: one Ray placement group for a pipeline (or a lone group), its bundles and fit checks.

Policy (README, "GPUs"): the workers that exchange activations across the stage boundaries form *columns*
(with equal group sizes n, column i is worker i of every stage; in general the connected sets of the routing's
sender/receiver pairs). Each column is reserved as one bundle, and Ray keeps a bundle on one node, so boundary
peers always share a node, whose NVLink / PCIe (or memory, on CPUs) carries their activations. With PACK, Ray
puts the columns on as few nodes as it can, so a pipeline that fits one node runs on one node. When a column
is larger than every node, each worker gets its own bundle instead, in column order, and PACK keeps peers
together where it can; a warning says so. A group whose workers then span nodes runs its ZeRO collectives
across nodes: with large groups, size nodes so that columns fit.

A request that can never fit the cluster as it is fails at once, saying what was asked and what there is.
The exception is `wait_for_gpus` (runtime.device: cuda) on a cluster short of the GPUs asked for: an autoscaling
cluster that starts with no GPU nodes gets them (and their CPUs) only once a placement group asks, so the start
waits up to its timeout instead, with columns kept whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lopt_dist.pipeline.errors import WorkerGroupStartError

logger = logging.getLogger(__name__)

_FIX_HINT = "Fix: ask for fewer workers or fewer CPUs (threads) per worker, or start a bigger cluster."
_EPS = 1e-9


@dataclass(frozen=True)
class GroupRequest:
    """What one worker group asks for."""

    name: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError(f"worker group '{self.name}': resources per worker must be >= 0")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(f"worker group '{self.name}': gpus_per_worker above 1 must be whole, "
                             f"got {self.gpus_per_worker}")
        if not self.resources:
            raise ValueError(f"worker group '{self.name}' asks for no resources per worker: give CPUs or GPUs")

    @property
    def resources(self) -> dict[str, float]:
        wanted = {"CPU": float(self.cpus_per_worker), "GPU": float(self.gpus_per_worker)}
        return {key: amount for key, amount in wanted.items() if amount > 0}


@dataclass
class Placement:
    """A ready placement group and the bundle of every worker: `bundles[group][worker]`."""

    pg: PlacementGroup | None
    bundles: tuple[tuple[int, ...], ...]
    columns_kept: bool  # boundary peers share a bundle (hence a node)

    def strategy(self, group: int, worker: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                placement_group_bundle_index=self.bundles[group][worker])

    def release(self) -> None:
        """Free the reservation; safe to call twice."""
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def boundary_columns(sizes: Sequence[int]) -> list[list[tuple[int, int]]]:
    """The sets of (stage, worker) that exchange activations, directly or through each other, in worker order.

    Micro-batch m goes from stage s worker m % n_s to stage s+1 worker m % n_{s+1} (transport/routing.py), so
    the pairs of one boundary repeat every lcm(n_s, n_{s+1}) micro-batches.
    """
    parent = {(s, w): (s, w) for s, n in enumerate(sizes) for w in range(n)}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s in range(len(sizes) - 1):
        for m in range(math.lcm(sizes[s], sizes[s + 1])):
            a, b = root((s, m % sizes[s])), root((s + 1, m % sizes[s + 1]))
            parent[max(a, b)] = min(a, b)
    columns: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for member in sorted(parent, key=lambda x: (x[1], x[0])):
        columns.setdefault(root(member), []).append(member)
    return sorted(columns.values(), key=lambda c: min((w, s) for s, w in c))


def plan_bundles(
    requests: Sequence[GroupRequest], nodes: Sequence[Mapping[str, float]], nodes_may_come: bool = False
) -> tuple[list[dict[str, float]], list[list[int]], bool]:
    """Bundles, each worker's bundle index ([group][worker]), and whether the columns were kept whole.

    Columns are kept when each fits on one of `nodes`, or always when `nodes_may_come` (an autoscaler will add
    nodes of its own types, which today's nodes say nothing about).
    """
    columns = boundary_columns([r.workers for r in requests])
    column_bundles = [_sum_resources(requests[s].resources for s, _ in column) for column in columns]
    keep = len(requests) > 1 and (nodes_may_come or all(_fits_some_node(b, nodes) for b in column_bundles))
    index: list[list[int]] = [[0] * r.workers for r in requests]
    if keep:
        for b, column in enumerate(columns):
            for s, w in column:
                index[s][w] = b
        return column_bundles, index, True
    bundles = []
    for column in columns:
        for s, w in column:
            index[s][w] = len(bundles)
            bundles.append(dict(requests[s].resources))
    return bundles, index, False


def shortfall(bundles: Sequence[Mapping[str, float]], total: Mapping[str, float],
              nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why `bundles` can never be placed on the cluster as it is (PACK), or None when they could once free."""
    need = _sum_resources(bundles)
    for key, amount in need.items():
        if amount > total.get(key, 0.0) + _EPS:
            return f"the cluster has only {total.get(key, 0.0):g} {key}"
    for bundle in bundles:
        if not _fits_some_node(bundle, nodes):
            return f"no single node has {_format_resources(bundle)}"
    return None


def reserve(requests: Sequence[GroupRequest], timeout_s: float, *, wait_for_gpus: bool = False) -> Placement:
    """A ready placement group for `requests` (one group, or a pipeline's groups in stage order).

    Raises WorkerGroupStartError at once when the request can never fit, or after `timeout_s` when the
    resources stay taken (or, with `wait_for_gpus`, when no autoscaler brought the GPUs).
    """
    total, nodes = ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus_needed = sum(r.workers * r.gpus_per_worker for r in requests)
    waiting = wait_for_gpus and gpus_needed > total.get("GPU", 0.0) + _EPS
    bundles, index, kept = plan_bundles(requests, nodes, nodes_may_come=waiting)
    asked = _describe_request(requests)
    # Fail fast when waiting cannot help; GPU nodes an autoscaler adds may bring the missing CPUs too.
    problem = None if waiting else shortfall(bundles, total, nodes)
    if problem:
        raise WorkerGroupStartError(f"{asked}, but {problem}. {_describe_cluster()}. {_FIX_HINT}")
    if len(requests) > 1 and not kept:
        logger.warning("boundary peers may land on different nodes: a column of peers (%s) fits on no node, so "
                       "each worker is placed on its own (README, 'GPUs': placement)",
                       _format_resources(_column_need(requests)))
    if waiting:
        logger.warning("waiting up to %g s for %g GPUs; the cluster has %g now (an autoscaling cluster adds GPU "
                       "nodes on demand)", timeout_s, gpus_needed, total.get("GPU", 0.0))
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        why = ("no GPUs came: if this cluster does not autoscale, use runtime.device: auto or cpu"
               if waiting else "other groups or tasks may hold them")
        raise WorkerGroupStartError(
            f"{asked}, and did not get them within {timeout_s:g} s; {why}. {_describe_cluster()}. {_FIX_HINT}"
        ) from None
    return Placement(pg, tuple(tuple(i) for i in index), kept)


def _column_need(requests: Sequence[GroupRequest]) -> dict[str, float]:
    columns = boundary_columns([r.workers for r in requests])
    sums = [_sum_resources(requests[s].resources for s, _ in column) for column in columns]
    return max(sums, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)))


def _fits_some_node(bundle: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> bool:
    return any(all(node.get(k, 0.0) + _EPS >= amount for k, amount in bundle.items()) for node in nodes)


def _sum_resources(bundles) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + amount
    return total


def _describe_request(requests: Sequence[GroupRequest]) -> str:
    if len(requests) == 1:
        r = requests[0]
        total = {key: amount * r.workers for key, amount in r.resources.items()}
        return (f"worker group '{r.name}' asks for {r.workers} workers x ({_format_resources(r.resources)}) = "
                f"{_format_resources(total)}")
    need = _sum_resources({k: v * r.workers for k, v in r.resources.items()} for r in requests)
    each = ", ".join(f"{r.name}: {r.workers} workers x {_format_resources(r.resources)}" for r in requests)
    return f"the worker groups need {_format_resources(need, plural=True)} ({each})"


def _describe_cluster() -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    in_all = _format_resources({key: total.get(key, 0.0) for key in ("CPU", "GPU")})
    free_now = _format_resources({key: free.get(key, 0.0) for key in ("CPU", "GPU")})
    return f"Cluster: {in_all} in all; {free_now} free now"


def _format_resources(resources: Mapping[str, float], plural: bool = False) -> str:
    return (" and " if plural else ", ").join(f"{amount:g} {key}{'s' if plural else ''}"
                                              for key, amount in resources.items())
