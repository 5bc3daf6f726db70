"""Bad configurations are refused before anything starts, with a message naming the key and what is allowed."""

from __future__ import annotations

import json

import pytest

from lopt_dist.config import ConfigError, load_config
from lopt_dist.data import DataError
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config
from lopt_dist.run import prepare
from tests.conftest import REPO


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 3e-4\nruntime:\n  mode: ray\n  groups:\n    - {workers: 2}\n"
                    "    - {workers: 2}\n")
    cfg = load_config(path, ["train.micro_batches_per_step=4", "runtime.groups.1.threads_per_worker=2"])
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert [g.workers for g in cfg.runtime.groups] == [2, 2]
    assert cfg.runtime.groups[1].threads_per_worker == 2


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_experiment_configs_load(config):
    load_config(REPO / "configs" / config)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.stepz=3"], r"train\.stepz: unknown key; allowed keys here are \[.*'steps'"),
    (["modle.name=x"], r"modle: unknown key"),
    (["train.steps=three"], r"train\.steps: expected an integer, got 'three'"),
    (["train.lr=fast"], r"train\.lr: expected a number"),
    (["data.shuffle=maybe"], r"data\.shuffle: expected true or false"),
    (["train.method=sgd"], r"train\.method: must be one of \['lopt', 'e2e'\], got 'sgd'"),
    (["train.steps=0"], r"train\.steps: must be >= 1"),
    (["train.lr=-1"], r"train\.lr: must be > 0"),
    (["train.warmup_steps=-1"], r"train\.warmup_steps: must be >= 0"),
    (["model.boundaries=[8, 4]"], r"model\.boundaries: must be strictly increasing"),
    (["runtime.groups.0.workers=0"], r"workers: must be >= 1"),
    (["runtime.mode=ray", "runtime.groups=[{workers: 2}, {workers: 3}]", "train.micro_batches_per_step=4"],
     r"train\.micro_batches_per_step: is 4 but must be a multiple of 6, the least common multiple"),
    (["runtime.mode=ray", "model.boundaries=[2, 4]"], r"runtime\.groups: has 2 groups but the model is cut into 3"),
    (["runtime.mode=ray", "train.method=e2e"], r"train\.method: the Ray pipeline trains 'lopt' only"),
    (["runtime.groups.5.workers=2"], r"runtime\.groups\.5: list index out of range"),
    (["train.steps"], r"expected key=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_boundary_outside_the_model_is_refused_before_start(tiny_model_dir):
    cfg = load_config(None, [f"model.name={tiny_model_dir('llama')}", "model.boundaries=[2, 4]"])
    with pytest.raises(ConfigError, match=r"model\.boundaries: \[4\] outside the model's layers; the model has 4"):
        prepare(cfg)


def test_missing_data_file_is_refused_before_start(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.name={tiny_model_dir('llama')}", f"data.source={tmp_path}/train.jsonl"])
    with pytest.raises(ConfigError, match=r"data\.source: file .*train\.jsonl does not exist"):
        prepare(cfg)


def _write_rows(path, rows):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize(("fmt", "message"), [
    ("gsm8k", r"lacks column\(s\) answer that format 'gsm8k' needs \(question, answer\); it has \['body', 'question'\]"),
    ("auto", r"cannot detect the data format from the columns \['body', 'question'\]"),
])
def test_data_columns_that_do_not_fit_are_refused_before_start(tiny_model_dir, tmp_path, suffix, fmt, message):
    data = _write_rows(tmp_path / f"train{suffix}", [{"question": "1+1?", "body": "2"}] * 3)
    cfg = load_config(None, [f"model.name={tiny_model_dir('llama')}", f"data.source={data}", f"data.format={fmt}"])
    with pytest.raises(DataError, match=message):
        prepare(cfg)


def test_data_columns_that_fit_pass_the_check(tiny_model_dir, tmp_path):
    data = _write_rows(tmp_path / "train.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    cfg = load_config(None, [f"model.name={tiny_model_dir('llama')}", f"data.source={data}"])
    assert prepare(cfg).data.source == str(data)


def test_missing_model_is_refused_before_start(tmp_path):
    cfg = load_config(None, [f"model.name={tmp_path}/no-model"])
    with pytest.raises(ConfigError, match=r"model\.name: cannot load a model config .*no-model looks like a local"):
        prepare(cfg)


def _ds_check(tmp_path, contents, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(contents if isinstance(contents, str) else json.dumps(contents))
    cfg = load_config(None, ["runtime.mode=ray", f"runtime.groups=[{{deepspeed_config: {path}}}, {{}}]", *overrides])
    return deepspeed_config(cfg, 0)


def test_deepspeed_json_is_completed_from_the_experiment(tmp_path):
    ds = _ds_check(tmp_path, {"zero_optimization": {"stage": 3}}, "train.micro_batch_size=3",
                   "train.micro_batches_per_step=4", "train.dtype=bfloat16", "train.grad_clip=0.5")
    assert ds["zero_optimization"] == {"stage": 3}
    sizes = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert sizes == (3, 4, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize(("zero_stage", "warned"), [(0, False), (2, True)])
def test_zero_on_a_one_worker_group_is_flagged(tmp_path, caplog, zero_stage, warned):
    _ds_check(tmp_path, {"zero_optimization": {"stage": zero_stage}})
    flagged = [r.getMessage() for r in caplog.records if "one-worker group" in r.getMessage()]
    assert bool(flagged) == warned
    if warned:
        assert "ZeRO stage 2" in flagged[0] and "zero0.json" in flagged[0]


@pytest.mark.parametrize(("contents", "message"), [
    ({"optimizer": {"type": "Lamb"}}, r"sets optimizer\.type \"Lamb\"; lopt-dist trains every stage with AdamW"),
    ({"train_micro_batch_size_per_gpu": 8}, r"sets train_micro_batch_size_per_gpu=8 but the experiment gives 4 "
                                            r"\(train\.micro_batch_size\)"),
    ({"fp16": {"enabled": True}}, r"enables fp16; use train\.dtype=bfloat16"),
    ("{not json", r"is not valid JSON"),
])
def test_deepspeed_json_that_contradicts_the_experiment_is_refused(tmp_path, contents, message):
    with pytest.raises(ConfigError, match=r"runtime\.groups\[0\]\.deepspeed_config: .*" + message):
        _ds_check(tmp_path, contents)


def test_auto_values_that_the_experiment_fills_are_filled(tmp_path):
    ds = _ds_check(tmp_path, {"train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                              "zero_optimization": {"stage": 2}}, "train.dtype=bfloat16")
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 1, 1.0)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize(("contents", "overrides", "message"), [
    ({"zero_optimization": {"stage": "auto"}}, [], r"sets zero_optimization\.stage: \"auto\", which lopt-dist does "
                                                  r"not fill"),
    ({"zero_optimization": {"allgather_bucket_size": "auto"}}, [], r"sets zero_optimization\.allgather_bucket_size: "
                                                                   r"\"auto\""),
    ({"zero_optimization": {"stage": 4}}, [], r"sets zero_optimization\.stage: 4; give 0, 1, 2 or 3"),
    ({"zero_optimization": True}, [], r"sets zero_optimization to true; it must be a JSON object"),
    ({"bf16": {"enabled": True}}, [], r"sets bf16\.enabled: true but train\.dtype is float32; set "
                                      r"train\.dtype=bfloat16"),
    ({"bfloat16": {"enabled": True}}, [], r"sets bfloat16\.enabled: true but train\.dtype is float32"),
    ({"bf16": {"enabled": False}}, ["train.dtype=bfloat16"], r"sets bf16\.enabled: false but train\.dtype is "
                                                             r"bfloat16; set train\.dtype=float32"),
    ({"amp": {"enabled": True}}, [], r"enables amp"),
])
def test_deepspeed_json_that_deepspeed_would_read_otherwise_is_refused(tmp_path, contents, overrides, message):
    with pytest.raises(ConfigError, match=r"runtime\.groups\[0\]\.deepspeed_config: .*ds\.json " + message):
        _ds_check(tmp_path, contents, *overrides)


def test_missing_deepspeed_json_is_named(tmp_path):
    cfg = load_config(None, ["runtime.mode=ray", f"runtime.groups=[{{deepspeed_config: {tmp_path}/z.json}}, {{}}]"])
    with pytest.raises(ConfigError, match=r"runtime\.groups\[0\]\.deepspeed_config: DeepSpeed config file .*z\.json"):
        deepspeed_config(cfg, 0)
