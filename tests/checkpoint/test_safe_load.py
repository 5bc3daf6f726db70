"""Checkpoint files are never unpickled: a planted pickle does not run, and the real files still load."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

from lopt_dist.checkpoint.files import CheckpointError
from lopt_dist.checkpoint.rng import load_rng, save_rng
from lopt_dist.checkpoint.safe_load import load_tensors_file


class Payload:
    """Unpickling this calls Path.touch(marker): proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant_pickle(path: pathlib.Path, marker: pathlib.Path) -> None:
    """Replace a checkpoint file with a torch file whose unpickling would create `marker`."""
    torch.save({"optimizer": Payload(marker), "weights": torch.zeros(2)}, path)


def test_planted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "optimizer.pt", marker)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt cannot be read: it holds Python objects other than "
                                              r"tensors, which lopt-dist never unpickles \(refused: getattr\)"):
        load_tensors_file(tmp_path / "optimizer.pt")
    assert not marker.exists()


def test_plain_state_and_truncated_files(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None}]}
    torch.save(state, tmp_path / "ok.pt")
    assert load_tensors_file(tmp_path / "ok.pt")["param_groups"][0]["betas"] == (0.9, 0.95)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt cannot be read: it is truncated"):
        load_tensors_file(tmp_path / "cut.pt")


def test_rng_states_round_trip_as_plain_tensors(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    save_rng(tmp_path / "rng.safetensors", torch.device("cpu"))
    want = (random.random(), torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    load_rng(tmp_path / "rng.safetensors", torch.device("cpu"))
    got = (random.random(), torch.rand(3))
    assert got[0] == want[0] and torch.equal(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_is_saved_and_restored(tmp_path):
    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(1)
    save_rng(tmp_path / "rng.safetensors", device)
    want = torch.rand(3, device=device)
    torch.cuda.manual_seed(2)
    load_rng(tmp_path / "rng.safetensors", device)
    assert torch.equal(torch.rand(3, device=device), want)
