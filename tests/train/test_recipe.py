"""The reference recipe's training options: AdamW betas and eps, warm-up as a ratio, the decoder's start."""

import math

import pytest
import torch

from lopt_dist.config import ConfigError, load_config
from lopt_dist.model.decoder import ReconstructionDecoder
from lopt_dist.train.optim import build_optimizer, lr_multiplier


def test_adam_betas_and_eps_reach_the_optimizer():
    train = load_config(None, ["train.adam_betas=[0.9, 0.999]", "train.adam_eps=1e-6"]).train
    optimizer = build_optimizer(torch.nn.Linear(4, 4), 1e-3, 0.0, train)
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    default = build_optimizer(torch.nn.Linear(4, 4), 1e-3, 0.0)
    assert default.param_groups[0]["betas"] == (0.9, 0.95)


def test_warmup_ratio_is_rounded_up_and_exclusive_with_steps():
    train = load_config(None, ["train.steps=25", "train.warmup_ratio=0.1"]).train
    assert train.warmup == 3  # ceil(2.5), as the HF Trainer rounds
    assert [lr_multiplier(s, train) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    with pytest.raises(ConfigError, match="train.warmup_ratio: cannot be combined with train.warmup_steps"):
        load_config(None, ["train.warmup_ratio=0.1", "train.warmup_steps=2"])


def test_xavier_decoder_init_is_seeded_with_gain_0_1():
    a, b = ReconstructionDecoder(64, seed=3, init="xavier"), ReconstructionDecoder(64, seed=3, init="xavier")
    assert torch.equal(a.up.weight, b.up.weight) and torch.equal(a.down.weight, b.down.weight)
    bound = 0.1 * math.sqrt(6 / (64 + 16))  # xavier-uniform bound of the 64 -> 16 layer, gain 0.1
    assert a.up.weight.abs().max() <= bound and a.up.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(a.up.bias) == 0
    normal = ReconstructionDecoder(64, seed=3)
    assert float(normal.up.weight.std()) == pytest.approx(0.02, rel=0.15)
    with torch.device("meta"):  # the stage loader's skeleton: initialised once memory exists, to the same values
        empty = ReconstructionDecoder(64, seed=3, init="xavier")
    empty.to_empty(device="cpu")
    empty.reset_parameters()
    assert torch.equal(empty.up.weight, a.up.weight)


def test_reference_config_sets_the_reference_values():
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "reference.yaml")
    assert (cfg.train.adam_betas, cfg.train.adam_eps, cfg.train.decoder_init) == ([0.9, 0.999], 1e-8, "xavier")
    assert (cfg.data.format, cfg.data.prompt_format, cfg.data.truncation) == ("query_response", "plain", "left")
    assert cfg.train.warmup_ratio is not None and cfg.train.warmup_steps == 0
