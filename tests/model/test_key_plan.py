"""Stage-only loading of checkpoints that transformers converts at load (key_plan.py): each MoE family's
`save_pretrained` layout (experts one matrix per expert, Mixtral's `block_sparse_moe`, Granite-MoE's
`input_linear`) loads each stage exactly as `from_pretrained` + `split_model` does, reading only that stage's
checkpoint keys; in-memory layouts keep loading; a conversion no stage can make alone is refused up front."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lopt_dist.config import ConfigError, load_config
from lopt_dist.model import split_model
from lopt_dist.model.key_plan import KeyPlan
from lopt_dist.model.stage_loader import empty_model, load_stage, materialise
from lopt_dist.model.tiny import tiny_config
from lopt_dist.model.weights import INDEX_FILE, WeightFiles, check_readable

VOCAB = 256
CPU = torch.device("cpu")
# The MoE families the start-up self-check verifies (README's family table); Llama-4 stores its in-memory names.
MOE_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "granitemoe", "qwen3_next", "llama4_text"]
# Twelve experts: stacked in the order 0, 1, 2, ..., 10, 11, not in the names' string order (0, 1, 10, 11, 2, ...).
_OVERRIDES = {"qwen3_moe": {"num_experts": 12}}


def _model(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, VOCAB, **_OVERRIDES.get(family, {})))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(family)`: a tiny random model written by save_pretrained in many shards (one layer spans several)."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            _model(family).save_pretrained(made[family], max_shard_size="40KB")
        return made[family]

    return get


def _cfg(model_dir, dtype="float32"):
    return load_config(None, [f"model.name={model_dir}", f"train.dtype={dtype}", "model.attn_implementation=eager"])


def _reference(model_dir, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return split_model(model, None, lambda_aux=10.0, seed=0)


def _stage_keys(files, stage_index, num_layers=4) -> set[str]:
    """The checkpoint keys of a stage, by the checkpoint's own names: its layers' keys, the embedding or the
    final norm and head."""
    layers = range(0, num_layers // 2) if stage_index == 0 else range(num_layers // 2, num_layers)
    keys = {k for k in files.weight_map if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m[1]) in layers}
    return keys | ({"model.embed_tokens.weight"} if stage_index == 0 else {"model.norm.weight", "lm_head.weight"})


def _assert_equal_states(stage, want, dtype=torch.float32):
    got_state, want_state = stage.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor.to(dtype)), name


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_saved_moe_checkpoint_loads_each_stage_as_from_pretrained(saved, family):
    model_dir = saved(family)
    files = WeightFiles(str(model_dir))
    in_memory = set(_model(family).state_dict())
    if family != "llama4_text":  # the checkpoint is in the layout transformers converts at load
        assert set(files.weight_map) - in_memory and in_memory - set(files.weight_map)
    assert len(set(files.weight_map.values())) > 4
    reference = _reference(model_dir)
    for stage_index in (0, 1):
        files = WeightFiles(str(model_dir))
        skeleton = empty_model(AutoConfig.from_pretrained(model_dir), torch.float32, "eager")
        plan = KeyPlan(skeleton, files.weight_map, files.location)
        with init_empty_weights(include_buffers=False):  # as load_stage: the decoder starts empty too
            [stage] = split_model(skeleton, None, 10.0, 0, only=stage_index)
        partitioned = []

        def partition(unit):  # as ZeRO-3 does: each unit is whole when handed over, the next ones untouched
            partitioned.append(unit)
            assert not any(p.is_meta for p in unit.parameters())
            done = {id(p) for u in partitioned for p in u.parameters()}
            assert all(p.is_meta for p in stage.parameters() if id(p) not in done)

        materialise(stage, plan, files, torch.float32, CPU, partition)
        assert set(files.tensors_read) == _stage_keys(files, stage_index)
        assert len(files.tensors_read) == len(set(files.tensors_read))  # each read once
        assert set(files.files_opened) == {files.weight_map[k] for k in files.tensors_read}
        stage_params = {id(p) for p in stage.parameters()}
        for name, param in skeleton.named_parameters():
            assert param.is_meta != (id(param) in stage_params), name  # materialised exactly when in the stage
        stage.train()
        _assert_equal_states(stage, reference[stage_index])


def test_converted_family_loads_into_a_bf16_run(saved):
    stage, report = load_stage(_cfg(saved("mixtral"), "bfloat16"), 1, CPU)
    assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
    assert "model.layers.3.block_sparse_moe.experts.3.w1.weight" in report.tensors_read
    # float32 on disk: each expert matrix read once, in float32, and stacked in bf16
    assert report.bytes_read == sum(p.numel() * 4 for n, p in stage.named_parameters() if not n.startswith("decoder"))
    _assert_equal_states(stage, _reference(saved("mixtral"), torch.bfloat16)[1], torch.bfloat16)


def test_checkpoint_in_the_in_memory_layout_keeps_loading(saved, tmp_path):
    """Written under the in-memory names (as lopt-dist's export writes): fused experts, read as they are."""
    source = saved("mixtral")
    model = AutoModelForCausalLM.from_pretrained(source)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    stage, report = load_stage(_cfg(tmp_path), 1, CPU)
    assert "model.layers.2.mlp.experts.gate_up_proj" in report.tensors_read
    assert not any("block_sparse_moe" in k for k in report.tensors_read)
    _assert_equal_states(stage, _reference(source)[1])


def test_without_transformers_conversions_every_tensor_is_its_own_key(saved, monkeypatch):
    """transformers 4 has no conversion mapping: the plan is the identity (and cannot fuse experts)."""
    llama, mixtral = saved("llama"), saved("mixtral")
    want = _reference(llama)[0]
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # its import fails, as on 4.x
    stage, report = load_stage(_cfg(llama), 0, CPU)
    assert set(report.tensors_read) == _stage_keys(WeightFiles(str(llama)), 0)
    _assert_equal_states(stage, want)
    with pytest.raises(ConfigError, match=r"has no tensor 'model\.layers\.0\.mlp\.gate\.weight'"):
        load_stage(_cfg(mixtral), 0, CPU)


def test_checkpoint_that_does_not_match_its_config_names_the_tensor(saved, tmp_path):
    for file in saved("mixtral").iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 3}))
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.0\.mlp\.gate\.weight has shape \[4, 64\] in the "
                                          r"checkpoint, the model's config\.json makes it \[3, 64\]"):
        load_stage(_cfg(tmp_path), 0, CPU)


class PairedNormsConfig(LlamaConfig):
    """A family whose checkpoints store layers 0 and 1's input norms as one tensor in layer 0."""

    model_type = "lopt-test-paired-norms"


class PairedNormsForCausalLM(LlamaForCausalLM):
    config_class = PairedNormsConfig


def test_conversion_no_stage_can_make_alone_is_refused_before_start(tmp_path):
    pytest.importorskip("transformers.conversion_mapping")  # transformers 5: conversions a user can register
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Chunk, WeightConverter

    AutoConfig.register(PairedNormsConfig.model_type, PairedNormsConfig, exist_ok=True)
    AutoModelForCausalLM.register(PairedNormsConfig, PairedNormsForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(PairedNormsConfig.model_type, [WeightConverter(
        "layers.0.paired_norms.weight", ["layers.0.input_layernorm.weight", "layers.1.input_layernorm.weight"],
        operations=[Chunk(dim=0)])], overwrite=True)
    values = {k: v for k, v in tiny_config("llama", VOCAB).to_diff_dict().items() if k != "model_type"}
    torch.manual_seed(0)
    model = PairedNormsForCausalLM(PairedNormsConfig(**values))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    norms = [state.pop(f"model.layers.{i}.input_layernorm.weight") for i in (0, 1)]
    state["model.layers.0.paired_norms.weight"] = torch.cat(norms)
    save_file(state, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    # transformers itself loads it (the mapping is right), but only by converting two layers' tensors at once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[1].input_layernorm.weight, norms[1])
    message = (r"model\.name: .*: transformers makes \['model\.layers\.0\.input_layernorm\.weight', "
               r"'model\.layers\.1\.input_layernorm\.weight'\] \(model\.layers\.0, model\.layers\.1\) together from "
               r"checkpoint tensors model\.layers\.0\.paired_norms\.weight, so no stage can load its own part alone; "
               r"train it with runtime\.mode=local")
    with pytest.raises(ConfigError, match=message):
        check_readable(str(tmp_path))  # what preflight runs before any worker starts: names only
    with pytest.raises(ConfigError, match=message):
        load_stage(_cfg(tmp_path), 1, CPU)


def test_missing_converted_tensor_is_named_before_start(saved, tmp_path):
    for file in saved("qwen3_moe").iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    down = [k for k in index["weight_map"] if re.fullmatch(r"model\.layers\.3\.mlp\.experts\.\d+\.down_proj\.\w+", k)]
    assert len(down) == 12
    for key in down:
        del index["weight_map"][key]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"has no tensor 'model\.layers\.3\.mlp\.experts\.down_proj' \(nor tensors "
                                          r"that transformers converts into it\)"):
        check_readable(str(tmp_path))
