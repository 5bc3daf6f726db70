"""The start-up self-check: verified families pass, a family whose glue the split misses is refused before start."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM, PhiConfig

from lopt_dist.cli import train_main
from lopt_dist.config import load_config
from lopt_dist.model import ModelStructureError
from lopt_dist.model.loading import load_model_config
from lopt_dist.model.selfcheck import FamilyCheckError, check_family, main, small_config
from lopt_dist.model.tiny import tiny_config
from lopt_dist.run import prepare
from tests.model.test_stages import FAMILIES

VOCAB = 96


class ScaledLlamaConfig(LlamaConfig):
    """A family option the split knows nothing about: the model multiplies its logits by `output_scale`."""

    model_type = "lopt-test-scaled-llama"
    output_scale: float = 3.0


class ScaledLlamaForCausalLM(LlamaForCausalLM):
    config_class = ScaledLlamaConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.output_scale
        return out


AutoConfig.register(ScaledLlamaConfig.model_type, ScaledLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(ScaledLlamaConfig, ScaledLlamaForCausalLM, exist_ok=True)


def _scaled_config() -> ScaledLlamaConfig:
    values = {k: v for k, v in tiny_config("llama", VOCAB).to_diff_dict().items() if k != "model_type"}
    return ScaledLlamaConfig(**values)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tested_family_passes(family, tmp_path):
    attn = "eager" if family == "gemma2" else "sdpa"  # Gemma-2 has no sdpa kernel in transformers 5.24
    verdict = check_family(tiny_config(family, VOCAB), [2], attn, cache_root=tmp_path)
    assert verdict.ok and not verdict.cached
    assert "split and export reproduce the model" in verdict.message


def test_a_family_without_the_asked_attention_kernel_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FamilyCheckError, match=r"model\.attn_implementation: Gemma2ForCausalLM does not support "
                                               r"'sdpa' .*; set model\.attn_implementation=eager$"):
        check_family(tiny_config("gemma2", VOCAB), [2], "sdpa", cache_root=tmp_path)


def test_smollm2_config_passes(tmp_path):
    verdict = check_family(load_model_config("smollm2-135m"), [15], cache_root=tmp_path)
    assert verdict.ok and verdict.family.startswith("LlamaForCausalLM")


def test_a_family_whose_glue_the_split_ignores_is_refused(tmp_path):
    expected = (r"^ScaledLlamaForCausalLM \(model_type 'lopt-test-scaled-llama'\): the LoPT split does not reproduce "
                r"this family .* stages at layers \[2\] of 4\): the composed stages' logits differ from the unsplit "
                r"model's by up to \d+\.\d+ \(tolerance 1e-05\).* train\.method=e2e\), and please report it$")
    with pytest.raises(FamilyCheckError, match=expected):
        check_family(_scaled_config(), [2], cache_root=tmp_path)


@pytest.mark.parametrize(("config", "message"), [
    (GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB),
     r"GPT2LMHeadModel lacks transformer\.embed_tokens, transformer\.layers, transformer\.norm.*use such a model"),
    (PhiConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=VOCAB),
     r"PhiForCausalLM lacks model\.norm\."),
])
def test_structure_errors_are_refused_in_prepare(tmp_path, monkeypatch, config, message):
    monkeypatch.setenv("LOPT_DIST_CACHE", str(tmp_path / "cache"))
    config.save_pretrained(tmp_path / "model")  # the config alone: the check needs no weights
    cfg = load_config(None, [f"model.name={tmp_path / 'model'}"])
    with pytest.raises(ModelStructureError, match=message):
        prepare(cfg)


def test_verdicts_are_cached_per_config_and_boundaries(tmp_path):
    config = tiny_config("mixtral", VOCAB)
    assert not check_family(config, [2], cache_root=tmp_path).cached
    [path] = (tmp_path / "selfcheck").glob("*.json")
    # The cached verdict is what the second call returns: rewrite it to prove it is read, not recomputed.
    verdict = json.loads(path.read_text())
    path.write_text(json.dumps({**verdict, "message": "from the cache"}))
    again = check_family(config, [2], cache_root=tmp_path)
    assert again.cached and again.message == "from the cache"
    assert not check_family(config, [1], cache_root=tmp_path).cached  # other boundaries: another verdict
    assert not check_family(tiny_config("mixtral", VOCAB, num_experts_per_tok=1), [2], cache_root=tmp_path).cached


def test_a_refusal_is_cached_and_repeated(tmp_path):
    with pytest.raises(FamilyCheckError) as first:
        check_family(_scaled_config(), [2], cache_root=tmp_path)
    [path] = (tmp_path / "selfcheck").glob("*.json")
    assert json.loads(path.read_text())["ok"] is False
    with pytest.raises(FamilyCheckError) as second:
        check_family(_scaled_config(), [2], cache_root=tmp_path)
    assert str(second.value) == str(first.value)


def test_lopt_train_refuses_a_broken_family_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOPT_DIST_CACHE", str(tmp_path / "cache"))
    _scaled_config().save_pretrained(tmp_path / "model")
    assert not ray.is_initialized()
    code = train_main(["--set", f"model.name={tmp_path / 'model'}", "--set", f"output_dir={tmp_path / 'out'}",
                       "--set", "runtime.mode=ray", "--set", "logging.progress=false"])
    assert code == 2
    assert not ray.is_initialized(), "Ray was started for a model the self-check refuses"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lopt-train: error:")]
    assert len(errors) == 1
    assert "ScaledLlamaForCausalLM" in errors[0] and "differ from the unsplit model's by up to" in errors[0]
    assert not (tmp_path / "out").exists()


def test_small_instance_keeps_every_kind_of_layer_in_each_stage():
    # Gemma-3's pattern: five local layers, then a global one; cut mid-model.
    kinds = (["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2
    config = tiny_config("gemma3_text", VOCAB, num_hidden_layers=26, layer_types=kinds)
    small, boundaries = small_config(config, [13])
    [cut] = boundaries
    assert small.num_hidden_layers < 10 and small.hidden_size == 64
    first, second = small.layer_types[:cut], small.layer_types[cut:]
    assert set(first) == set(second) == {"sliding_attention", "full_attention"}
    assert (first[-1], second[0]) == (kinds[12], kinds[13])  # the layers on both sides of the boundary


def test_small_llama4_keeps_rope_and_chunking_per_layer():
    config = tiny_config("llama4_text", VOCAB, num_hidden_layers=12)
    small, boundaries = small_config(config, [6])  # layers 3, 7 and 11 are global
    # Stage 0 keeps 0, 3 (first global), 5; stage 1 keeps 6, 7 (first global), 11.
    chunked, full = "chunked_attention", "full_attention"
    assert (small.layer_types, boundaries) == ([chunked, full, chunked, chunked, full, full], [3])
    for kind, rope in zip(small.layer_types, small.no_rope_layers):
        assert (kind == "chunked_attention") == bool(rope)  # Llama-4: the no-rope layers are the global ones
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small)  # a consistent config


def test_the_check_runs_by_hand_before_a_run(tmp_path, capsys):
    assert main(["--default-config", "granite", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("checked in ")
    assert main(["--default-config", "granite", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("cached in ")
    assert main(["--default-config", "gpt2", "--cache-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.startswith("refused: GPT2LMHeadModel lacks transformer.embed_tokens")
