"""Fixtures shared across the suite: the embedded tokenizer and tiny random models saved as checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from lopt_dist.model.loading import load_tokenizer
from lopt_dist.model.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def exported_weights(model_dir: Path) -> dict:
    """Every tensor of an exported model directory, whatever its shards (the index lists them)."""
    import json

    from safetensors.torch import load_file

    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())
    weights = {}
    for file in sorted(set(index["weight_map"].values())):
        weights.update(load_file(Path(model_dir) / file))
    assert weights.keys() == index["weight_map"].keys()
    return weights


@pytest.fixture(scope="session")
def smol_tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """`tiny_model_dir(family, **overrides)` -> a saved tiny random model with the SmolLM2 tokenizer."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = save_tiny_model(family, out, smol_tokenizer, **overrides)
        return made[key]

    return make
