"""The bf16 policy: what DeepSpeed is told, and the single-process trainer's masters and accumulators."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from lopt_dist.config import ConfigError, load_config
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config
from lopt_dist.train.optim import build_optimizer
from lopt_dist.train.precision import MasterWeights, cast_parameters


def _ds(tmp_path, contents, dtype="bfloat16", workers=1):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(contents))
    cfg = load_config(None, ["runtime.mode=ray", f"train.dtype={dtype}", "train.micro_batches_per_step=2",
                             f"runtime.groups=[{{deepspeed_config: {path}, workers: {workers}}}, {{}}]"])
    return deepspeed_config(cfg, 0)


@pytest.mark.parametrize(("stage", "runs_as"), [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_bf16_groups_accumulate_in_fp32_and_zero0_runs_as_bf16_optimizer(tmp_path, caplog, stage, runs_as):
    with caplog.at_level(logging.WARNING):
        ds = _ds(tmp_path, {"zero_optimization": {"stage": stage}})
    assert ds["bf16"]["enabled"] is True and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["stage"] == runs_as
    warned = [r.getMessage() for r in caplog.records if "one-worker group" in r.getMessage()]
    assert bool(warned) == (stage > 0)  # only about a stage the user chose, never the one we switched to


def test_float32_groups_are_left_as_configured(tmp_path):
    ds = _ds(tmp_path, {"zero_optimization": {"stage": 0}}, dtype="float32")
    assert ds["bf16"]["enabled"] is False and "data_types" not in ds and ds["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize(("contents", "message"), [
    ({"data_types": {"grad_accum_dtype": "bf16"}}, r"sets data_types\.grad_accum_dtype='bf16', but .* in fp32"),
    ({"bf16": {"bf16_master_weights_and_grads": True}}, r"sets bf16\.bf16_master_weights_and_grads, but"),
    ({"fp16": {"enabled": True}}, r"enables fp16; use train\.dtype=bfloat16"),
])
def test_json_that_contradicts_the_policy_is_refused(tmp_path, contents, message):
    with pytest.raises(ConfigError, match=r"runtime\.groups\[0\]\.deepspeed_config: .*ds\.json " + message):
        _ds(tmp_path, contents)


def _module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def test_masters_accumulate_bf16_gradients_in_fp32_and_round_back():
    module = _module()
    masters = MasterWeights(module)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in masters.master.parameters()} == {torch.float32}
    for param, master in masters.pairs:
        assert torch.equal(master, param.float())  # masters start from the bf16 values, as DeepSpeed's
    optimizer = build_optimizer(masters.master, lr=1e-2, weight_decay=0.1)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = [torch.zeros_like(m) for _, m in masters.pairs]
    for micro in x.split(2):
        (module(micro).float().pow(2).mean() / 3).backward()
        for acc, (param, _) in zip(expected, masters.pairs):
            acc += param.grad.float()  # each micro-batch's bf16 gradient, added in fp32
        masters.accumulate()
        assert all(p.grad is None for p in module.parameters())
    for acc, (_, master) in zip(expected, masters.pairs):
        assert torch.equal(master.grad, acc)
    norm = torch.stack([g.norm() for g in expected]).norm()
    reference = [nn.Parameter(m.detach().clone()) for _, m in masters.pairs]
    ref_opt = build_optimizer(nn.ParameterList(reference), lr=1e-2, weight_decay=0.1)
    for ref, acc in zip(reference, expected):
        ref.grad = acc * min(1.0, 0.5 / (float(norm) + 1e-6))
    masters.step(optimizer, max_norm=0.5)
    ref_opt.step()
    for ref, (param, master) in zip(reference, masters.pairs):
        torch.testing.assert_close(master, ref, rtol=1e-6, atol=1e-9)
        assert torch.equal(param, master.to(torch.bfloat16)) and master.grad is None


def test_a_step_with_a_non_finite_gradient_is_skipped():
    module = _module()
    masters = MasterWeights(module)
    before = [m.detach().clone() for _, m in masters.pairs]
    module[0].weight.grad = torch.full_like(module[0].weight, float("inf"))
    masters.accumulate()
    masters.step(build_optimizer(masters.master, lr=1e-2, weight_decay=0.0), max_norm=1.0)
    assert all(torch.equal(b, m) for b, (_, m) in zip(before, masters.pairs))
    assert all(m.grad is None for _, m in masters.pairs)


def test_cast_keeps_buffers():
    module = nn.BatchNorm1d(4)
    cast_parameters(module, torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16 and module.running_mean.dtype == torch.float32
