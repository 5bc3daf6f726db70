"""The embedded SmolLM2 tokenizer, shared by the data tests (converted into the cache on first use)."""

import pytest

from lopt_dist.model.loading import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture
def plain_tokenizer():
    """The same tokenizer without a chat template, for the plain-text prompt path."""
    tok = load_tokenizer("smollm2-135m")
    tok.chat_template = None
    return tok
