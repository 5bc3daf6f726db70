"""Bad input is refused before Ray starts: `lopt-train` exits with 2 and one line naming the file, key or row.

Each case runs the real command line in this process, so `ray.is_initialized()` afterwards tells whether
anything was started. Rows of issue 14 that need a checkpoint are tested with the checkpoint code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time

import pytest
import ray
from transformers import GPT2Config

from lopt_dist.cli import train_main
from lopt_dist.config import ConfigError, load_config
from lopt_dist.model.errors import ModelStructureError
from lopt_dist.preflight import prepare
from tests.conftest import REPO

ZERO0 = REPO / "configs/deepspeed/zero0.json"
GOOD = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}


def _jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _deepspeed(path, values):
    path.write_text(json.dumps(values))
    return f"runtime.groups=[{{deepspeed_config: {path}}}, {{deepspeed_config: {ZERO0}}}]"


def _yaml_syntax(tmp, tiny):
    (tmp / "exp.yaml").write_text("train:\n  steps: 3\n  lr 1e-4\nmodel:\n  name: x\n")
    return [str(tmp / "exp.yaml")], [], r"exp\.yaml, line 4, column 1 \(in what starts at line 3\): not valid YAML"


def _set_syntax(tmp, tiny):
    return [], ["model.boundaries=[1,"], r"--set model\.boundaries=\[1,: the value '\[1,' is not valid YAML"


def _output_dir_under_a_file(tmp, tiny):
    (tmp / "afile").write_text("x")
    return [], [f"output_dir={tmp}/afile/run"], r"output_dir: cannot create .*/afile/run: .*/afile is a file"


def _output_dir_is_a_file(tmp, tiny):
    (tmp / "afile").write_text("x")
    return [], [f"output_dir={tmp}/afile"], r"output_dir: .*/afile is a file; give a directory"


def _zero_stage_auto(tmp, tiny):
    group = _deepspeed(tmp / "ds.json", {"zero_optimization": {"stage": "auto"}})
    return [], [group], r"ds\.json sets zero_optimization\.stage: \"auto\", which lopt-dist does not fill"


def _bf16_in_a_float32_run(tmp, tiny):
    group = _deepspeed(tmp / "ds.json", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}})
    return [], [group], r"ds\.json sets bf16\.enabled: true but train\.dtype is float32"


def _fp16(tmp, tiny):
    group = _deepspeed(tmp / "ds.json", {"fp16": {"enabled": True}})
    return [], [group], r"runtime\.groups\[0\]\.deepspeed_config: .*ds\.json enables fp16"


def _gpt2(tmp, tiny):
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0).save_pretrained(tmp)
    return [], [f"model.name={tmp}"], r"GPT2LMHeadModel lacks transformer\.embed_tokens"


def _quantized_checkpoint(tmp, tiny):
    model = tmp / "fp8"
    model.mkdir()
    for item in tiny.iterdir():
        os.symlink(item, model / item.name)
    config = json.loads((tiny / "config.json").read_text())
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    return [], [f"model.name={model}"], r"model\.name: .*fp8 is a quantized checkpoint \(quant_method 'fp8'\)"


def _model_path_typo(tmp, tiny):
    (tmp / "models").mkdir()
    os.symlink(tiny, tmp / "models" / "tiny-llama")
    os.chdir(tmp)
    return [], ["model.name=models/tiny-lama"], (r"model\.name: .*models/tiny-lama looks like a local path \(its "
                                                r"directory models/ exists here\).*did you mean models/tiny-llama\?")


def _bad_json_line(tmp, tiny):
    data = _jsonl(tmp / "train.jsonl", [GOOD, GOOD, '{"question": "x", "answer": }', GOOD])
    return [], [f"data.source={data}"], (r"train\.jsonl row 2 \(line 3\): not valid JSON \(Expecting value at "
                                         r"column \d+\)\. Fix the row, or set data\.skip_bad_rows: true")


def _row_lacking_a_column(tmp, tiny):
    data = _jsonl(tmp / "train.jsonl", [GOOD, GOOD, {"question": "x"}, GOOD])
    return [], [f"data.source={data}"], (r"train\.jsonl line 3: row 2 does not fit format 'gsm8k': column 'answer' "
                                         r"is missing")


def _all_rows_too_long(tmp, tiny):
    data = _jsonl(tmp / "train.jsonl", [{"question": "word " * 40, "answer": "#### 1"}] * 3)
    return [], [f"data.source={data}", "data.max_seq_length=16"], (
        r"no usable examples in all 3 rows of data\.source .*train\.jsonl; 3 have prompts that fill "
        r"data\.max_seq_length=16 \(the shortest has \d+ tokens\): raise data\.max_seq_length above \d+")


def _data_path_typo(tmp, tiny):
    (tmp / "data").mkdir()
    os.chdir(tmp)
    return [], ["data.source=data/trian"], r"data\.source: data/trian looks like a local path"


CASES = [_yaml_syntax, _set_syntax, _output_dir_under_a_file, _output_dir_is_a_file, _zero_stage_auto,
         _bf16_in_a_float32_run, _fp16, _gpt2, _quantized_checkpoint, _model_path_typo, _bad_json_line, _row_lacking_a_column,
         _all_rows_too_long, _data_path_typo]


def _argv(tmp_path, model, files, overrides):
    base = [f"model.name={model}", "runtime.mode=ray", f"output_dir={tmp_path}/run", "logging.progress=false",
            "train.steps=1", "data.builtin_samples=8", "data.max_seq_length=128",
            f"runtime.groups=[{{deepspeed_config: {ZERO0}}}, {{deepspeed_config: {ZERO0}}}]"]
    return files + [f"--set={item}" for item in base + overrides]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_is_one_line_and_exit_2_before_ray_starts(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cases that change directory are undone after the test
    files, overrides, message = case(tmp_path, tiny_model_dir("llama"))
    capsys.readouterr()  # drop what making the tiny model printed
    code = train_main(_argv(tmp_path, tiny_model_dir("llama"), files, overrides))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lopt-train: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert not ray.is_initialized()


def test_debug_shows_the_traceback_too(tiny_model_dir, tmp_path, capsys):
    code = train_main(["--debug", f"--set=model.name={tiny_model_dir('llama')}", "--set=model.boundaries=[1,"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("lopt-train: error: --set model.boundaries=[1,")


def test_unreachable_ray_address_fails_within_start_timeout(tiny_model_dir, tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    code = train_main(_argv(tmp_path, tiny_model_dir("llama"), [], [
        f"runtime.ray_address=127.0.0.1:{port}", "runtime.start_timeout_s=3"]))
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"runtime.ray_address: nothing answers at 127.0.0.1:{port}" in err and "after 3 s" in err
    assert took < 3 + 15  # the timeout, plus the pre-start checks on a busy machine
    assert not ray.is_initialized()


def _prepared(tiny_model_dir, tmp_path, *overrides):
    cfg = load_config(None, [f"model.name={tiny_model_dir('llama')}", f"output_dir={tmp_path}/run", *overrides])
    return prepare(cfg)


def test_skipped_dropped_and_cut_rows_are_counted_in_one_line(tiny_model_dir, tmp_path, caplog):
    numbers = " ".join(str(i) for i in range(60))  # digits are single tokens: about 170 tokens
    long_prompt = {"question": f"Add {numbers}.", "answer": "#### 1770"}
    long_answer = {"question": "1 + 1?", "answer": f"{numbers[:80]} #### 2"}
    data = _jsonl(tmp_path / "train.jsonl", [GOOD, "{oops", long_prompt, {"question": "no answer"}, long_answer])
    with caplog.at_level(logging.INFO, logger="lopt_dist.preflight"):
        _prepared(tiny_model_dir, tmp_path, f"data.source={data}", "data.skip_bad_rows=true",
                  "data.max_seq_length=96")
    [line] = [r.getMessage() for r in caplog.records if r.name == "lopt_dist.preflight"]
    assert ("5 rows read, format gsm8k: 2 examples, 1 of them with the answer cut to data.max_seq_length=96; 1 rows "
            "dropped because the prompt alone fills data.max_seq_length (data.truncation=left keeps them, cutting "
            "the prompt); 2 bad rows skipped (data.skip_bad_rows)") in line
    caplog.clear()
    # left: the long prompt is kept and the long answer whole, both by cutting their prompts from the start
    with caplog.at_level(logging.INFO, logger="lopt_dist.preflight"):
        _prepared(tiny_model_dir, tmp_path, f"data.source={data}", "data.skip_bad_rows=true",
                  "data.max_seq_length=96", "data.truncation=left")
    [line] = [r.getMessage() for r in caplog.records if r.name == "lopt_dist.preflight"]
    assert ("5 rows read, format gsm8k: 3 examples, 2 of them with the prompt cut from its start to fit "
            "data.max_seq_length=96 (data.truncation=left); 2 bad rows skipped (data.skip_bad_rows)") in line


def test_a_dataset_directory_is_checked_on_its_first_rows(tiny_model_dir, tmp_path, caplog):
    # A directory that `datasets` reads stands for a hub dataset here (the tests run offline).
    (tmp_path / "ds").mkdir()
    _jsonl(tmp_path / "ds" / "train.jsonl", [GOOD] * 150 + [{"question": "no answer"}])
    with caplog.at_level(logging.INFO, logger="lopt_dist.preflight"):
        cfg = _prepared(tiny_model_dir, tmp_path, f"data.source={tmp_path}/ds")
    assert cfg.data.source == str(tmp_path / "ds")
    assert any("its first 100 rows; the workers check the rest" in r.getMessage() for r in caplog.records)


def test_lora_targets_and_packing_are_checked_before_start(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora: target_modules \['qkv_proj'\] name no linear module of "
                                          r"the decoder layers of .*, whose linear modules are named \[.*'q_proj'"):
        _prepared(tiny_model_dir, tmp_path, "model.lora=[{stages: [1], target_modules: [qkv_proj]}]")
    with pytest.raises(ModelStructureError, match="data.packing: model.attn_implementation='flash_attention_2'"):
        _prepared(tiny_model_dir, tmp_path, "data.packing=true", "model.attn_implementation=flash_attention_2")
