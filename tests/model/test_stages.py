"""Cutting real model families into LoPT stages: exact logits, isolated gradients, export round trip, router loss."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from lopt_dist.config import ConfigError
from lopt_dist.model import ModelStructureError, export_model, run_stages, split_model
from lopt_dist.model.tiny import tiny_config

# Families whose own glue the stages must redo: multipliers (granite*), logit scale (cohere*), per-type rope and
# local/global layers (gemma3_text), chunked attention and no-rope layers (llama4_text), linear attention
# (qwen3_next), MoE routers (mixtral, qwen3_moe, olmoe, granitemoe, llama4_text, qwen3_next). Their export round
# trip (exported model = unsplit model) is part of the self-check, tested on every family in test_selfcheck.py.
GLUE_FAMILIES = ["granite", "granitemoe", "cohere", "cohere2", "gemma3_text", "llama4_text", "qwen3_next",
                 "mixtral", "qwen3_moe", "olmoe"]
FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3", "olmo2", *GLUE_FAMILIES]
# Families whose *ForCausalLM adds a router loss (Qwen3-Next's is checked by the self-check's router comparison).
MOE = ["mixtral", "qwen3_moe", "olmoe", "granitemoe"]
VOCAB = 96


def _model(family: str, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, VOCAB, **overrides)).eval()


def _padded_batch(seq: int = 12):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, seq - 4:] = 0  # right padding of different lengths
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("boundaries", [None, [1, 2, 3]], ids=["k2", "k4"])
def test_composed_stages_give_the_unsplit_logits_with_padding(family, boundaries):
    model = _model(family)
    batch = _padded_batch()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        stages = split_model(model, boundaries, lambda_aux=10.0, seed=0)
        got = run_stages(stages, batch)
    assert len(stages) == (2 if boundaries is None else 4)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_are_honoured():
    # A window shorter than the sequence changes the logits; the split must reproduce that, not full attention.
    model = _model("mistral", sliding_window=3)
    batch = _padded_batch(seq=16)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = run_stages(split_model(model, None, 10.0, 0), batch)
        wide = _model("mistral", sliding_window=64)(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[0], wide[0], atol=1e-4)


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


def test_task_loss_reaches_no_earlier_stage():
    first, middle, last = split_model(_model("llama"), [1, 3], 10.0, 0)
    out0 = first(_padded_batch())
    out1 = middle(out0.boundary)
    last(out1.boundary).loss.backward()
    assert all(g is None for g in _grads(first).values())
    assert all(g is None for g in _grads(middle).values())
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(last).values())


def test_reconstruction_loss_stays_inside_its_stage():
    first, middle, last = split_model(_model("llama"), [1, 3], 10.0, 0)
    out0 = first(_padded_batch())
    out1 = middle(out0.boundary)
    out1.loss.backward()
    assert all(g is None for g in _grads(first).values())
    assert all(g is None for g in _grads(last).values())
    got = _grads(middle)
    assert all(got[n] is not None for n in got if n.startswith(("layers.", "decoder."))), "whole stage learns"
    out0.loss.backward()
    assert _grads(first)["embed.weight"] is not None  # the embedding learns from reconstruction only


def test_reconstruction_targets_the_detached_stage_input():
    first, _ = split_model(_model("llama"), None, lambda_aux=2.0, seed=0)
    batch = _padded_batch()
    out = first(batch)
    hidden = first.run_layers(first.embed(batch["input_ids"]), batch["attention_mask"], out.boundary["position_ids"])
    target = first.embed(batch["input_ids"])
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = ((first.decoder(hidden) - target) ** 2 * mask).sum() / (mask.sum() * target.shape[-1])
    torch.testing.assert_close(out.metric, want.detach())
    torch.testing.assert_close(out.loss, 2.0 * want)


def test_tied_embeddings_are_untied():
    model = _model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    first, last = split_model(model, None, 10.0, 0)
    assert last.head.weight is not first.embed.weight
    torch.testing.assert_close(last.head.weight, first.embed.weight)


def test_decoders_are_identical_in_every_process_and_differ_per_stage():
    a = split_model(_model("llama"), [1, 2], 10.0, seed=7)
    b = split_model(_model("llama"), [1, 2], 10.0, seed=7, only=1)
    torch.testing.assert_close(a[1].decoder.up.weight, b[0].decoder.up.weight)
    assert not torch.equal(a[0].decoder.up.weight, a[1].decoder.up.weight)


def test_export_round_trip_gives_the_trained_logits(tmp_path, smol_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(smol_tokenizer), tie_word_embeddings=True))
    stages = split_model(model, None, 10.0, 0)
    with torch.no_grad():  # "train": move every weight so the export cannot pass by returning the base model
        for stage in stages:
            for p in stage.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    batch = _padded_batch()
    with torch.no_grad():
        want = run_stages(stages, batch)
    out = export_model([s.hf_state_dict() for s in stages], model.config, smol_tokenizer, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.tie_word_embeddings is False
    assert not any("decoder" in name for name in loaded.state_dict())
    assert (out / "tokenizer_config.json").is_file()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_llama4_text_base_model_is_found_where_it_is_not_its_prefix():
    model = _model("llama4_text")
    assert model.base_model_prefix == "language_model" and not hasattr(model, "language_model")
    first, last = split_model(model, None, 10.0, 0)
    assert set(first.hf_state_dict()) | set(last.hf_state_dict()) == set(model.state_dict())
    assert first.layer_types == ["chunked_attention"] * 2 and last.layer_types[-1] == "full_attention"


@pytest.mark.parametrize("family", MOE)
def test_each_stage_adds_its_own_routers_load_balancing_loss(family):
    model = _model(family)
    batch = _padded_batch()
    mask = batch["attention_mask"]
    full = model(input_ids=batch["input_ids"], attention_mask=mask, output_router_logits=True)
    loss_func = sys.modules[type(model).__module__].load_balancing_loss_func
    first, last = split_model(model, None, lambda_aux=10.0, seed=0)
    out0 = first(batch)
    out1 = last(out0.boundary)
    routers0 = len(full.router_logits) // 2  # one router per layer in these tiny configs: 2 in each stage
    want0 = loss_func(full.router_logits[:routers0], model.num_experts, model.num_experts_per_tok, mask)
    want1 = loss_func(full.router_logits[routers0:], model.num_experts, model.num_experts_per_tok, mask)
    torch.testing.assert_close(out0.router_aux, want0.detach())
    torch.testing.assert_close(out1.router_aux, want1.detach())
    coef = model.router_aux_loss_coef
    assert coef > 0 and float(out0.router_aux) > 0
    torch.testing.assert_close(out0.loss, 10.0 * out0.metric + coef * want0)
    torch.testing.assert_close(out1.loss, out1.metric + coef * want1)


def _first_stage_router_grads(coef: float) -> list[torch.Tensor]:
    model = _model("mixtral")
    model.router_aux_loss_coef = coef
    first, _ = split_model(model, None, 10.0, 0)
    first(_padded_batch()).loss.backward()
    return [m.weight.grad for m in first.layers.modules() if type(m).__name__ == "MixtralTopKRouter"]


def test_router_loss_reaches_the_first_stage_routers():
    with_router_loss, without = _first_stage_router_grads(0.5), _first_stage_router_grads(0.0)
    assert len(with_router_loss) == 2
    for got, recon_only in zip(with_router_loss, without):
        assert got is not None and not torch.allclose(got, recon_only)


def test_families_without_routers_report_no_router_loss():
    first, last = split_model(_model("llama"), None, 10.0, 0)
    out0 = first(_padded_batch())
    assert out0.router_aux is None and last(out0.boundary).router_aux is None


def test_export_refuses_incomplete_stage_weights(tmp_path):
    model = _model("llama")
    first, _ = split_model(model, None, 10.0, 0)
    with pytest.raises(ValueError, match="do not cover the model"):
        export_model([first.hf_state_dict()], model.config, None, tmp_path / "model")


def test_model_without_decoder_layers_gets_a_clear_error():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB))
    expected = r"GPT2LMHeadModel lacks transformer\.embed_tokens, transformer\.layers, transformer\.norm.*such a model"
    with pytest.raises(ModelStructureError, match=expected):
        split_model(gpt2, None, 10.0, 0)


def test_layers_that_need_several_mask_helpers_are_refused():
    model = _model("llama")
    model.config.layer_types = ["full_attention", "hybrid"] * 2  # attention and a recurrent state in one layer
    with pytest.raises(ModelStructureError, match=r"LlamaForCausalLM has layers of type 'hybrid'.*train\.method=e2e"):
        split_model(model, None, 10.0, 0)


@pytest.mark.parametrize("boundaries", [[0], [4], [2, 9]])
def test_boundaries_outside_the_layers_are_rejected(boundaries):
    with pytest.raises(ConfigError, match=r"model\.boundaries.*4 layers.*between 1 and 3"):
        split_model(_model("llama"), boundaries, 10.0, 0)
