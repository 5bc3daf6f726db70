"""LoRA stages (model.lora): only adapters and decoders train, the start is the base model, checkpoints resume
exactly, and the export is a plain Hugging Face model whose logits are the trained stages' logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt_dist.config import ConfigError, load_config
from lopt_dist.model import run_stages
from lopt_dist.model.export import export_model
from lopt_dist.model.tiny import tiny_config
from lopt_dist.train.local import LocalTrainer
from tests.train.test_local import VOCAB, RepeatedBatch

LORA = "model.lora=[{stages: [0], rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}, {stages: [1], rank: 2}]"


def _trainer(*overrides, method="lopt"):
    cfg = load_config(None, [f"train.method={method}", "train.lr=3e-3", "train.micro_batches_per_step=2",
                             "train.steps=6", *overrides])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, tie_word_embeddings=True))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return LocalTrainer(cfg, model, RepeatedBatch(), torch.device("cpu")), model.config, base


def test_lora_stages_train_adapters_and_decoders_only():
    trainer, _, base = _trainer(LORA)
    first, last = trainer.stages
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("decoder.") for n in trainable)
    assert any(n.startswith("decoder.") for n in trainable) and any("q_proj.lora_A" in n for n in trainable)
    assert not any("k_proj.lora" in n for n, _ in first.named_parameters())  # stage 0 adapts q and v only
    assert any("down_proj.lora_B" in n for n, _ in last.named_parameters())  # stage 1: the default targets
    optimized = {id(p) for g in trainer.trainables[1].optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in last.parameters() if p.requires_grad}
    # B starts at zero: the adapted stages start as the base model.
    assert all(torch.equal(v, base[k]) for w in trainer.stage_weights() for k, v in w.items() if k in base)
    results = [trainer.train_step() for _ in range(6)]
    assert results[-1].task_loss < results[0].task_loss


@pytest.mark.parametrize(("method", "dtype"), [("lopt", "float32"), ("lopt", "bfloat16"), ("e2e", "float32")])
def test_merged_export_loads_as_a_plain_model_with_the_trained_logits(tmp_path, method, dtype):
    lora = LORA if method == "lopt" else "model.lora=[{rank: 4}]"
    trainer, config, base = _trainer(lora, f"train.dtype={dtype}", method=method)
    for _ in range(3):
        trainer.train_step()
    weights = trainer.stage_weights()
    assert set().union(*weights) == set(base)  # the original names, no adapter entries
    out = export_model(weights, config, None, tmp_path / "model")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = RepeatedBatch().batch
    real = batch["attention_mask"].bool()
    modules = trainer.stages if method == "lopt" else [trainer.model]
    with torch.no_grad():
        for m in modules:
            m.eval().float()
        want = (run_stages(trainer.stages, batch) if method == "lopt" else
                trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        got = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if dtype == "float32":
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    else:  # the export holds the fp32 masters merged; the bf16 stages compute with their rounding
        assert (got[real] - want[real]).abs().max() < 0.1
    assert any(not torch.equal(v, base[k]) for w in weights for k, v in w.items())


def test_lora_checkpoint_resumes_to_the_same_weights(tmp_path):
    straight, _, _ = _trainer(LORA)
    for _ in range(4):
        straight.train_step()
    first, _, _ = _trainer(LORA)
    for _ in range(2):
        first.train_step()
    first.save_state(tmp_path)
    manifest = json.loads((tmp_path / "stage_0" / "tensors.json").read_text())["tensors"]
    merged = [t for t in manifest if "lora" in t]
    assert merged and all(".lora_" not in t["name"] and ".base_layer" not in t["name"] for t in manifest)
    (tmp_path / "state.json").write_text(json.dumps({"step": 2}))
    resumed, _, _ = _trainer(LORA)
    resumed.load_state(tmp_path)
    for _ in range(2):
        resumed.train_step()
    for want, got in zip(straight.stage_weights(), resumed.stage_weights()):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_lora_targets_that_match_nothing_are_named():
    with pytest.raises(ConfigError, match=r"model.lora: target_modules \['qkv'\] name no linear module of stage 1, "
                                          r"whose linear modules are named \[.*'q_proj'"):
        _trainer("model.lora=[{stages: [1], target_modules: [qkv]}]")
