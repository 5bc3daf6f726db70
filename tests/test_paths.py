"""The rule that tells a local path from a hub id, for model.name and data.source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lopt_dist.config import ConfigError, load_config
from lopt_dist.model.loading import resolve_model_path
from lopt_dist.paths import RAY_JOB_CONFIG_ENV, anchor_inputs, local_path_reason, output_location


@pytest.mark.parametrize(("name", "local"), [
    ("gpt2", False), ("HuggingFaceTB/SmolLM2-135M", False), ("openai/gsm8k", False), ("Qwen/Qwen2.5-0.5B", False),
    ("./tiny", True), ("../tiny", True), ("/abs/tiny", True), ("~/tiny", True), (".", True),
    ("models/tiny/", True), ("a\\b", True), ("a/b/c", True), ("my model", True), ("a--b/c", True),
    ("-name", True), ("models/tiny-lama", True),  # models/ exists (made below)
])
def test_local_path_rule(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert (local_path_reason(name) is not None) == local


def test_a_missing_local_looking_model_is_an_error_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"did you mean models/tiny-llama\?"):
        resolve_model_path("models/tiny-lama")
    with pytest.raises(FileNotFoundError, match=r"\./nothing looks like a local path"):
        resolve_model_path("./nothing")
    (tmp_path / "weights.gguf").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"weights\.gguf is a file, not a model directory"):
        resolve_model_path("weights.gguf")
    assert resolve_model_path("models/tiny-llama") == "models/tiny-llama"
    assert resolve_model_path("someone/tiny-lama") == "someone/tiny-lama"  # no someone/ here: a hub id


def test_yaml_input_paths_are_relative_to_the_yaml_file(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    (exp / "data").mkdir(parents=True)
    (exp / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (exp / "run.yaml").write_text(
        "model: {name: models/tiny}\n"
        "data: {source: data/train.jsonl}\n"
        "eval: {source: ../held/test.jsonl}\n"
        "output_dir: runs/x\n"
        "runtime:\n  groups: [{deepspeed_config: ds.json}, {deepspeed_config: /abs/zero0.json}]\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(exp / "run.yaml", ["runtime.groups.1.workers=2"])
    assert cfg.model.name == str(exp / "models" / "tiny")
    assert cfg.data.source == str(exp / "data" / "train.jsonl")  # a file need not exist yet to be a path
    assert cfg.eval.source == str(tmp_path / "held" / "test.jsonl")
    assert [g.deepspeed_config for g in cfg.runtime.groups] == [str(exp / "ds.json"), "/abs/zero0.json"]
    assert cfg.output_dir == "runs/x"  # what a run writes is relative to where it runs (or storage_path)
    # --set values are relative to the current directory
    cfg = load_config(exp / "run.yaml", ["data.source=mine.jsonl", "runtime.groups=[{deepspeed_config: d.json}, {}]"])
    assert cfg.data.source == "mine.jsonl" and cfg.runtime.groups[0].deepspeed_config == "d.json"


@pytest.mark.parametrize(("name", "data", "anchored"), [
    ("smollm2-135m", False, False), ("HuggingFaceTB/SmolLM2-135M", False, False), ("openai/gsm8k", True, False),
    ("builtin:arithmetic", True, False), ("./local-model", False, True), ("~/models/x", False, False),
    ("rows.parquet", True, True), ("models/tiny-lama", False, True),  # models/ exists next to the YAML file
])
def test_aliases_and_hub_ids_in_a_yaml_stay_as_written(tmp_path, name, data, anchored):
    (tmp_path / "models").mkdir()
    tree = {"data": {"source": name}} if data else {"model": {"name": name}}
    anchor_inputs(tree, tmp_path)
    value = tree["data"]["source"] if data else tree["model"]["name"]
    assert value == (os.path.normpath(tmp_path / name) if anchored else name)


def test_output_goes_to_storage_path_and_a_submitted_job_needs_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV, raising=False)
    assert output_location("runs/x", None, "output_dir") == tmp_path / "runs/x"
    assert output_location("runs/x", "/shared", "output_dir") == Path("/shared/runs/x")
    assert output_location("/abs/x", "/shared", "output_dir") == Path("/abs/x")
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}')
    assert output_location("runs/x", "/shared", "output_dir") == Path("/shared/runs/x")
    with pytest.raises(ValueError, match=r"output_dir: runs/x is relative, but under `ray job submit` the current "
                                         r"directory .* is Ray's temporary copy of the working directory.* set "
                                         r"storage_path="):
        output_location("runs/x", None, "output_dir")
    with pytest.raises(ConfigError, match=r"storage_path: must be an absolute directory"):
        load_config(None, ["storage_path=shared"])
