"""Placement arithmetic: which workers are boundary peers, which bundles keep them on one node, what never fits."""

from __future__ import annotations

from lopt_dist.pipeline.placement import GroupRequest, boundary_columns, plan_bundles, shortfall


def test_columns_are_the_sets_of_workers_that_exchange_activations():
    assert boundary_columns([1, 1]) == [[(0, 0), (1, 0)]]
    assert boundary_columns([2, 2]) == [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    # 2 -> 1: both senders feed the one receiver. 2 -> 4: sender i feeds receivers i and i + 2.
    assert boundary_columns([2, 1]) == [[(0, 0), (1, 0), (0, 1)]]
    assert boundary_columns([2, 4]) == [[(0, 0), (1, 0), (1, 2)], [(0, 1), (1, 1), (1, 3)]]
    # Through a middle stage: 2 -> 2 -> 2 gives two columns of three.
    assert boundary_columns([2, 2, 2]) == [[(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1), (2, 1)]]
    assert boundary_columns([3]) == [[(0, 0)], [(0, 1)], [(0, 2)]]


def _requests(sizes, cpus=1, gpus=1.0):
    return [GroupRequest(f"stage {i}", n, cpus, gpus) for i, n in enumerate(sizes)]


def test_columns_become_bundles_when_a_node_holds_one():
    nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    bundles, index, kept = plan_bundles(_requests([2, 2]), nodes)
    assert kept and bundles == [{"CPU": 2.0, "GPU": 2.0}] * 2
    assert index == [[0, 1], [0, 1]]  # stage s worker i sits in bundle i: peers share a node
    # Two stages sharing one GPU: a column of two half-GPU workers is one GPU.
    bundles, index, kept = plan_bundles(_requests([1, 1], gpus=0.5), [{"CPU": 4, "GPU": 1}])
    assert kept and bundles == [{"CPU": 2.0, "GPU": 1.0}] and index == [[0], [0]]


def test_columns_larger_than_any_node_fall_back_to_one_bundle_per_worker_in_column_order():
    nodes = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]
    bundles, index, kept = plan_bundles(_requests([1, 1]), nodes)
    assert not kept and bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2 and index == [[0], [1]]
    # Waiting for an autoscaler's GPU nodes: today's nodes say nothing about them, columns are kept.
    assert plan_bundles(_requests([1, 1], cpus=8), [{"CPU": 4}], nodes_may_come=True)[2]


def test_shortfall_names_what_the_cluster_lacks():
    nodes = [{"CPU": 4, "GPU": 2}]
    total = {"CPU": 4, "GPU": 2}
    assert shortfall([{"CPU": 2, "GPU": 1}] * 2, total, nodes) is None
    assert shortfall([{"CPU": 1, "GPU": 1}] * 3, total, nodes) == "the cluster has only 2 GPU"
    two_nodes = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert shortfall([{"CPU": 2, "GPU": 2}], {"CPU": 8, "GPU": 2}, two_nodes) == "no single node has 2 CPU, 2 GPU"
