"""Safetensors written tensor by tensor read back by the safetensors library itself; shards stay bounded."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lopt_dist.checkpoint.safetensors_io import ShardedWriter, TensorSpec, plan_shards, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=gen), "b.weight": torch.randn(7, generator=gen).bfloat16(),
            "c.count": torch.tensor(3), "d.mask": torch.tensor([True, False]), "e.empty": torch.zeros(0, 4)}


def test_streamed_file_reads_back_bit_for_bit_with_its_metadata(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "x.safetensors", tensors, {"note": "kept"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}


def test_shards_hold_at_most_the_bound_and_a_bigger_tensor_alone():
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]  # 40,40,120,20,20 B
    assert [[s.name for s in shard] for shard in plan_shards(specs, 80)] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_sharded_writer_refuses_tensors_out_of_plan(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, "stage00", specs, max_bytes=16)
    with pytest.raises(ValueError, match="expected .*a.weight"):
        writer.write("b.weight", tensors["b.weight"])
