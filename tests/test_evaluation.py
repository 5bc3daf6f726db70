"""Evaluation during training: when it runs, what it holds out, what it writes, and that it changes nothing.

The Ray pipeline's evaluation is compared with these single-process numbers in tests/pipeline/test_equivalence.py.
"""

from __future__ import annotations

import math

import pytest

from lopt_dist.config import ConfigError, load_config
from lopt_dist.evaluation import due, split_holdout
from lopt_dist.run import prepare, train

TRAINING = ("task_loss", "recon_loss_0", "grad_norm_0", "grad_norm_1", "lr_0", "lr_1", "tokens")


def _config(model_dir, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"output_dir={out}", "runtime.mode=local", "train.steps=3",
                              "train.micro_batch_size=2", "train.micro_batches_per_step=2", "train.lr=2e-3",
                              "data.builtin_samples=48", "data.max_seq_length=128", "logging.progress=false",
                              *extra])


def test_evaluation_runs_when_due():
    cfg = load_config(None, ["train.steps=5", "eval.every=2", "eval.retention=true"])
    assert [done for done in range(1, 6) if due(cfg, done)] == [2, 4, 5]  # and after the last step
    assert not any(due(load_config(None, ["train.steps=5"]), done) for done in range(1, 6))


def test_holdout_is_a_seeded_disjoint_split():
    cfg = load_config(None, ["eval.holdout=0.25", "eval.every=1"])
    examples = [{"input_ids": [i]} for i in range(40)]
    kept, held = split_holdout(examples, cfg)
    assert len(held) == 10 and len(kept) == 30
    assert sorted(e["input_ids"][0] for e in kept + held) == list(range(40))
    assert split_holdout(examples, cfg) == (kept, held)  # the same on every worker and after a resume
    other = load_config(None, ["eval.holdout=0.25", "eval.every=1", "data.seed=1"])
    assert split_holdout(examples, other)[1] != held
    assert split_holdout(examples, load_config(None, []))[1] is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.every=5"], r"eval\.every: evaluates nothing: give eval\.source .* or eval\.retention: true"),
    (["eval.holdout=0.1", "eval.source=x.jsonl"], r"eval\.holdout: .* cannot be combined with eval\.source"),
    (["eval.holdout=1"], r"eval\.holdout: must be in \[0, 1\)"),
])
def test_evaluation_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_split_of_a_local_file_is_refused_before_start(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    cfg = _config(tiny_model_dir("llama"), tmp_path / "run", f"data.source={data}", "eval.every=1", "eval.split=test")
    with pytest.raises(ConfigError, match=r"eval\.split: 'test' names a split of a hub dataset, but data\.source .* "
                                          r"is a file; give the held-out data in eval\.source"):
        prepare(cfg)


def test_evaluation_leaves_training_untouched(tiny_model_dir, tmp_path):
    """Evaluating after step 1 changes nothing step 2 computes (weights, schedule, RNG streams): same losses and
    gradient norms, bit for bit."""
    model, short = tiny_model_dir("llama"), ["train.steps=2", "checkpoint.export=false"]
    plain = train(_config(model, tmp_path / "plain", *short))
    evaluated = train(_config(model, tmp_path / "eval", *short, "eval.every=1", "eval.source=builtin:arithmetic",
                              "eval.retention=true", "eval.micro_batches=2"))
    for ref, got in zip(plain.records, evaluated.records, strict=True):
        assert {k: got[k] for k in TRAINING} == {k: ref[k] for k in TRAINING}
    first, last = evaluated.records
    assert {"eval_task_loss", "eval_recon_loss_0", "retention_task_loss", "retention_recon_loss_0",
            "eval_seconds"} <= last.keys()
    assert last["retention_ppl"] == pytest.approx(math.exp(last["retention_task_loss"]))
    assert first["eval_task_loss"] != last["eval_task_loss"]  # the model moved between the two


def test_holdout_leaves_examples_out_and_e2e_is_evaluated(tiny_model_dir, tmp_path):
    model, e2e = tiny_model_dir("llama"), ["train.method=e2e", "train.steps=1", "checkpoint.export=false"]
    held = train(_config(model, tmp_path / "held", *e2e, "eval.every=1", "eval.holdout=0.5", "eval.retention=true",
                         "eval.micro_batches=1")).records[0]
    assert {"eval_task_loss", "retention_task_loss", "retention_ppl", "lr_0", "grad_norm_0"} <= held.keys()
    assert "retention_recon_loss_0" not in held and "lr_1" not in held  # e2e: one model, one rate
    plain = train(_config(model, tmp_path / "plain", *e2e)).records[0]
    assert held["task_loss"] != plain["task_loss"]  # other examples in the batches: half are held out
