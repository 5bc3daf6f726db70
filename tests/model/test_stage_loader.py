"""Stage-only loading: a stage reads and materialises exactly its own tensors, and they equal what a full
`from_pretrained` + `split_model` gives (weights, rotary tables, untied head, seeded decoder)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lopt_dist.config import ConfigError, load_config
from lopt_dist.model import split_model
from lopt_dist.model import weights as weights_module
from lopt_dist.model.key_plan import KeyPlan
from lopt_dist.model.stage_loader import empty_model, load_stage, materialise
from lopt_dist.model.tiny import tiny_config
from lopt_dist.model.weights import INDEX_FILE, WeightFiles
from lopt_dist.run import prepare

VOCAB = 256
CPU = torch.device("cpu")
ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _save(path, dtype=torch.float32, shard="60KB", **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, **overrides)).to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """An untied tiny Llama in many float32 shards, with llama3 rope scaling (inv_freq is not the default)."""
    return _save(tmp_path_factory.mktemp("sharded"), rope_parameters=ROPE_LLAMA3)


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory):
    """A tied-embedding tiny Llama saved in bf16 as one file (no lm_head.weight in it)."""
    return _save(tmp_path_factory.mktemp("tied"), dtype=torch.bfloat16, shard="50GB", tie_word_embeddings=True)


def _cfg(model_dir, dtype="float32"):
    return load_config(None, [f"model.name={model_dir}", f"train.dtype={dtype}", "model.attn_implementation=eager"])


def _reference(model_dir, dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return split_model(model, None, lambda_aux=10.0, seed=0)


def _expected_keys(model_dir, stage_index, num_layers=4):
    files = WeightFiles(str(model_dir))
    lo, hi = (0, num_layers // 2) if stage_index == 0 else (num_layers // 2, num_layers)
    keys = {k for k in files.weight_map if any(k.startswith(f"model.layers.{i}.") for i in range(lo, hi))}
    if stage_index == 0:
        keys.add("model.embed_tokens.weight")
    else:
        keys |= {"model.norm.weight", "lm_head.weight" if "lm_head.weight" in files else "model.embed_tokens.weight"}
    return keys


@pytest.mark.parametrize("stage_index", [0, 1])
def test_only_the_stages_tensors_are_read_and_materialised(sharded, stage_index):
    cfg = _cfg(sharded)
    files = WeightFiles(str(sharded))
    assert len(set(files.weight_map.values())) > 4  # several shards
    skeleton = empty_model(AutoConfig.from_pretrained(sharded), torch.float32, "eager")
    plan = KeyPlan(skeleton, files.weight_map, files.location)
    [stage] = split_model(skeleton, None, 10.0, 0, only=stage_index)
    materialise(stage, plan, files, torch.float32, CPU)
    assert set(files.tensors_read) == _expected_keys(sharded, stage_index)
    assert len(files.tensors_read) == len(set(files.tensors_read))  # each read once
    stage_params = {id(p) for p in stage.parameters()}
    for name, param in skeleton.named_parameters():
        assert param.is_meta != (id(param) in stage_params), name  # materialised exactly when in the stage
    assert not any(p.is_meta for p in stage.parameters())
    opened = set(files.files_opened)
    assert opened == {files.weight_map[k] for k in files.tensors_read}  # no shard opened for nothing
    _, report = load_stage(cfg, stage_index, CPU)  # the worker's entry point reads the same
    assert report.tensors_read == files.tensors_read


@pytest.mark.parametrize("stage_index", [0, 1])
def test_loaded_stage_equals_the_full_model_split(sharded, stage_index):
    """Weights, the seeded decoder, and the rotary tables (non-persistent buffers, llama3 scaling)."""
    stage, report = load_stage(_cfg(sharded), stage_index, CPU)
    want = _reference(sharded, torch.float32)[stage_index]
    assert stage.training
    got_state, want_state = stage.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    assert torch.equal(stage.rotary.inv_freq, want.rotary.inv_freq)
    assert torch.equal(stage.rotary.original_inv_freq, want.rotary.original_inv_freq)
    assert stage.rotary.inv_freq.dtype == torch.float32
    assert stage.rotary.attention_scaling == want.rotary.attention_scaling
    assert report.parameters == sum(p.numel() for p in want.parameters())


def test_tied_checkpoint_in_bf16_fills_the_untied_head_from_the_embedding(tied_bf16):
    with open(tied_bf16 / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert "lm_head.weight" not in header and header["model.embed_tokens.weight"]["dtype"] == "BF16"
    stage, report = load_stage(_cfg(tied_bf16, "bfloat16"), 1, CPU)
    assert report.tensors_read[-1] == "model.embed_tokens.weight"  # read for the head, last
    assert "lm_head.weight" not in report.tensors_read
    want = _reference(tied_bf16, torch.bfloat16)[1]
    assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
    for name, tensor in want.state_dict().items():
        expected = tensor.to(torch.bfloat16) if name.startswith("decoder") else tensor
        assert torch.equal(stage.state_dict()[name], expected), name
    # bf16 on disk, bf16 run: bytes read are the stage's bf16 bytes, nothing converted through float32.
    assert report.bytes_read == sum(p.numel() * 2 for n, p in stage.named_parameters())


def test_float32_file_loads_into_a_bf16_run_chunk_by_chunk(sharded, monkeypatch):
    monkeypatch.setattr(weights_module, "CHUNK_BYTES", 1024)  # several chunks per matrix
    stage, _ = load_stage(_cfg(sharded, "bfloat16"), 0, CPU)
    want = _reference(sharded, torch.bfloat16)[0]
    assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
    assert stage.rotary.inv_freq.dtype == torch.float32
    for name, tensor in want.state_dict().items():
        assert torch.equal(stage.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_checkpoint_without_safetensors_names_the_fix(tmp_path):
    model_dir = _save(tmp_path / "m")
    for file in model_dir.glob("*.safetensors*"):
        file.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    message = r"model\.name: .* has no model\.safetensors or .*pytorch_model\.bin.*save_pretrained"
    with pytest.raises(ConfigError, match=message):
        load_stage(_cfg(model_dir), 0, CPU)
    with pytest.raises(ConfigError, match=message):  # a Ray run refuses it before any worker starts
        prepare(load_config(None, [f"model.name={model_dir}", "runtime.mode=ray"]))


def test_checkpoint_missing_a_tensor_names_it(tmp_path):
    model_dir = _save(tmp_path / "m")
    index = json.loads((model_dir / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (model_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_stage(_cfg(model_dir), 0, CPU)
