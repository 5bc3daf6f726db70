"""The rule that tells a local path from a hub id, for model.name and data.source."""

from __future__ import annotations

import pytest

from lopt_dist.model.loading import resolve_model_path
from lopt_dist.paths import local_path_reason


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
