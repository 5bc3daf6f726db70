"""DeepSpeed JSONs as users bring them from the HF Trainer and DeepSpeed's own docs: "auto" filled from the
experiment, optimizer and scheduler blocks checked against it (and then replaced by lopt-dist's own), every
contradiction refused naming the key. The fixtures follow the shape of the documented examples (ZeRO-2 with
optimizer offload, ZeRO-3, ZeRO-3 with optimizer and parameter offload; a DeepSpeed-style ZeRO-2 with concrete
values). tests/pipeline/test_equivalence.py trains with two of them and gets the single-process updates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lopt_dist.config import ConfigError, load_config
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config
from lopt_dist.preflight import check_deepspeed

FIXTURES = Path(__file__).parent / "deepspeed_json"
HF = ("hf_zero2.json", "hf_zero3.json", "hf_zero3_offload.json")


def _config(tiny, json_file, *overrides, workers=1):
    groups = f"[{{deepspeed_config: {json_file}, workers: {workers}}}, {{deepspeed_config: {json_file}}}]"
    return load_config(None, [f"model.name={tiny}", "runtime.mode=ray", f"runtime.groups={groups}",
                              "train.steps=20", "train.warmup_steps=2", "train.lr=3e-4", "train.lr_first=1e-4",
                              "train.micro_batch_size=2", f"train.micro_batches_per_step={2 * workers}",
                              *overrides])


def _leaves(tree, prefix=""):
    for name, value in tree.items():
        yield from _leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [(f"{prefix}{name}", value)]


@pytest.mark.parametrize("name", HF)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_trainer_jsons_are_filled_from_the_experiment(tiny_model_dir, name, dtype, caplog):
    cfg = _config(tiny_model_dir("llama"), FIXTURES / name, f"train.dtype={dtype}", workers=2)
    with caplog.at_level(logging.WARNING):
        check_deepspeed(cfg)
    scheduler = json.loads((FIXTURES / name).read_text())["scheduler"]["type"]
    warned = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert len(warned) == 2 and all(f"its scheduler {scheduler} is not used" in w for w in warned)
    assert "linear warm-up over train.warmup_steps=2 steps, then a cosine decay" in warned[0]
    for stage in (0, 1):
        ds = deepspeed_config(cfg, stage)
        assert "optimizer" not in ds and "scheduler" not in ds  # lopt-dist passes its own AdamW and schedule
        assert [k for k, v in _leaves(ds) if v == "auto"] == []
        assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (2, 8, 1.0)
        assert ds["gradient_accumulation_steps"] == (2 if stage == 0 else 4)  # 4 micro-batches a step, over 2 or 1 workers
        assert ds["bf16"]["enabled"] is (dtype == "bfloat16") and ds["fp16"]["enabled"] is False
        zero = ds["zero_optimization"]
        if zero["stage"] == 3:  # as the HF integration fills them, from the tiny model's hidden size 64
            sizes = (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
                     zero["stage3_param_persistence_threshold"])
            assert sizes == (64 * 64, int(0.9 * 64 * 64), 640)
        offloaded = zero.get("offload_optimizer", {}).get("device") == "cpu"
        assert ds.get("zero_force_ds_cpu_optimizer", True) is not offloaded  # torch's AdamW on the offloaded state


def test_a_deepspeed_style_json_with_the_experiments_values_is_accepted(tiny_model_dir):
    cfg = _config(tiny_model_dir("llama"), FIXTURES / "deepspeed_zero2.json", "train.lr=2e-4", "train.lr_first=null",
                  "train.warmup_steps=10", "train.steps=100", "train.weight_decay=0.01", workers=2)
    ds = deepspeed_config(cfg, 0)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8


@pytest.mark.parametrize(("edit", "message"), [
    ({"optimizer": {"params": {"lr": 1e-3}}},
     r"sets optimizer\.params\.lr=0\.001 but the experiment gives 0\.0001 \(train\.lr for the last stage, "
     r"train\.lr_first for the others\)"),
    ({"optimizer": {"params": {"betas": [0.9, 0.999]}}},
     r"sets optimizer\.params\.betas=\[0\.9, 0\.999\] but the experiment gives \[0\.9, 0\.95\] \(train\.adam_betas\)"),
    ({"optimizer": {"params": {"weight_decay": 0.1}}}, r"sets optimizer\.params\.weight_decay=0\.1 .*train\.weight_decay"),
    ({"optimizer": {"type": "Lamb"}}, r"sets optimizer\.type \"Lamb\"; lopt-dist trains every stage with AdamW"),
    ({"optimizer": {"params": {"adam_w_mode": False}}}, r"sets optimizer\.params\.adam_w_mode: false"),
    ({"optimizer": {"params": {"max_coeff": 10}}}, r"sets optimizer\.params\.max_coeff, which lopt-dist's AdamW "
                                                   r"cannot apply"),
    ({"scheduler": {"params": {"warmup_num_steps": 100}}},
     r"sets scheduler\.params\.warmup_num_steps=100 but the experiment gives 2 \(train\.warmup_steps\)"),
    ({"scheduler": {"params": {"total_num_steps": 50}}},
     r"sets scheduler\.params\.total_num_steps=50 but the experiment gives 20 \(train\.steps\)"),
    ({"scheduler": {"params": {"warmup_type": "log"}}}, r"sets scheduler\.params\.warmup_type: \"log\"; lopt-dist's "
                                                        r"warm-up is linear"),
    ({"scheduler": {"type": "OneCycle"}}, r"sets scheduler\.type \"OneCycle\"; lopt-dist schedules every stage"),
    ({"gradient_clipping": 0.5}, r"sets gradient_clipping=0\.5 but the experiment gives 1\.0 \(train\.grad_clip\)"),
    ({"zero_optimization": {"stage3_max_live_parameters": "auto"}},
     r"sets zero_optimization\.stage3_max_live_parameters: \"auto\", which lopt-dist does not fill"),
])
def test_values_that_contradict_the_experiment_are_refused(tiny_model_dir, tmp_path, edit, message):
    ds = json.loads((FIXTURES / "hf_zero3.json").read_text())
    for section, values in edit.items():
        if isinstance(values, dict):
            ds[section] = {**ds[section], **{k: ({**ds[section][k], **v} if isinstance(v, dict) else v)
                                             for k, v in values.items()}}
        else:
            ds[section] = values
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = _config(tiny_model_dir("llama"), tmp_path / "ds.json", "train.lr=1e-4", "train.lr_first=null")
    with pytest.raises(ConfigError, match=r"runtime\.groups\[0\]\.deepspeed_config: .*ds\.json " + message):
        check_deepspeed(cfg)


def test_each_stage_is_checked_against_its_own_learning_rate(tiny_model_dir, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}))
    cfg = _config(tiny_model_dir("llama"), tmp_path / "ds.json")  # stage 0 learns at lr_first=1e-4, stage 1 at 3e-4
    deepspeed_config(cfg, 1)
    with pytest.raises(ConfigError, match=r"groups\[0\].* sets optimizer\.params\.lr=0\.0003 but the experiment "
                                          r"gives 0\.0001"):
        deepspeed_config(cfg, 0)
