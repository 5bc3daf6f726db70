"""The single-process trainer: both methods learn a repeated batch; schedule and checkpoints behave."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt_dist.config import load_config
from lopt_dist.model.tiny import tiny_config
from lopt_dist.train.local import LocalTrainer
from lopt_dist.train.optim import lr_multiplier

VOCAB = 128


class RepeatedBatch:
    """Every micro-batch index returns the same padded batch, so training must drive its loss down."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (4, 16), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100  # a "prompt" that is not supervised
        self.batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def get(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


def _trainer(method: str, *overrides: str, family: str = "llama") -> LocalTrainer:
    cfg = load_config(None, [f"train.method={method}", "train.steps=12", "train.lr=3e-3", "train.lr_first=3e-3",
                             "train.micro_batches_per_step=2", *overrides])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB, tie_word_embeddings=True))
    return LocalTrainer(cfg, model, RepeatedBatch(), torch.device("cpu"))


@pytest.mark.parametrize(("method", "dtype"), [("lopt", "float32"), ("e2e", "float32"), ("lopt", "bfloat16")])
def test_losses_go_down_on_a_repeated_batch(method, dtype):
    trainer = _trainer(method, f"train.dtype={dtype}")
    results = [trainer.train_step() for _ in range(12)]
    assert results[-1].task_loss < 0.8 * results[0].task_loss
    if method == "lopt":
        assert len(results[0].recon_losses) == 1
        assert results[-1].recon_losses[0] < results[0].recon_losses[0]
    else:
        assert results[0].recon_losses == []
    assert all(r.tokens == int(RepeatedBatch().batch["attention_mask"].sum()) * 2 for r in results)


@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_moe_router_loss_is_trained_and_logged(method):
    trainer = _trainer(method, family="mixtral")
    model = trainer.model if method == "e2e" else None
    batch = RepeatedBatch().batch
    if model is not None:  # e2e: the family's own router loss over all layers, on the step's batch
        with torch.no_grad():
            want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_router_logits=True).aux_loss
    result = trainer.train_step()
    record = result.as_record()
    stages = [0] if method == "e2e" else [0, 1]
    assert sorted(result.router_aux_losses) == stages
    assert all(record[f"router_aux_loss_{i}"] > 0 for i in stages)
    if model is not None:
        assert result.router_aux_losses[0] == pytest.approx(float(want), rel=1e-5)


def test_lopt_trains_k4_stages_with_their_own_learning_rates():
    trainer = _trainer("lopt", "model.boundaries=[1,2,3]", "train.lr_first=1e-3", "train.warmup_steps=2")
    first = trainer.train_step()
    assert len(first.recon_losses) == 3
    assert first.lrs == pytest.approx([0.5e-3, 0.5e-3, 0.5e-3, 1.5e-3])  # warm-up step 1 of 2


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = load_config(None, ["train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1"]).train
    values = [lr_multiplier(s, cfg) for s in range(10)]
    assert values[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_state_resumes_to_the_same_weights(tmp_path, dtype):
    straight = _trainer("lopt", f"train.dtype={dtype}")
    for _ in range(4):
        straight.train_step()
    first = _trainer("lopt", f"train.dtype={dtype}")
    for _ in range(2):
        first.train_step()
    first.save_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"step": 2}))
    resumed = _trainer("lopt", f"train.dtype={dtype}")
    resumed.load_state(tmp_path)
    for _ in range(2):
        resumed.train_step()
    for want, got in zip(straight.stage_weights(), resumed.stage_weights()):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_bf16_trains_bf16_parameters_and_exports_the_fp32_masters(method):
    trainer = _trainer(method, "train.dtype=bfloat16")
    for _ in range(2):
        trainer.train_step()
    modules = trainer.stages if method == "lopt" else [trainer.model]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.bfloat16}
    exported = trainer.stage_weights()
    live = [m.hf_state_dict() if method == "lopt" else m.state_dict() for m in modules]
    for weights, params in zip(exported, live, strict=True):
        assert weights.keys() == params.keys()
        for name, value in weights.items():
            if params[name].dtype == torch.bfloat16:  # a parameter (not a float32 buffer)
                assert value.dtype == torch.float32, name
                assert torch.equal(value.to(torch.bfloat16), params[name]), name  # params are the rounded masters
    rounded = [v for w in exported for v in w.values() if v.dtype == torch.float32]
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in rounded)  # more precision than bf16
