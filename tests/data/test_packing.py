"""Sequence packing: rows are a pure function of (examples, seed, index), and a packed micro-batch gives exactly
the loss of the same examples unpacked (token-weighted mean over their supervised tokens), for both trainers'
paths (LoPT stages, the family's own forward for e2e) and both CPU attention kernels."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt_dist.config import DataConfig
from lopt_dist.data import IGNORE_INDEX, MicroBatches, build_examples
from lopt_dist.data.packing import PackedMicroBatches, pack_rows
from lopt_dist.model import causal_lm_loss, split_model
from lopt_dist.model.selfcheck import FamilyCheckError, check_family
from lopt_dist.model.tiny import tiny_config

MAX_LEN = 384  # about three arithmetic problems (with the chat template) per row


@pytest.fixture(scope="module")
def examples(tokenizer):
    return build_examples(DataConfig(builtin_samples=24, max_seq_length=MAX_LEN), tokenizer).examples


def test_pack_rows_first_fit_within_capacity():
    assert pack_rows([5, 4, 3, 6, 2], capacity=9) == [[0, 1], [2, 3], [4]]
    assert pack_rows([5, 4, 3, 6, 2], capacity=9, open_rows=1) == [[0, 1], [2, 3], [4]]
    assert pack_rows([6, 6, 3, 3], capacity=9, open_rows=2) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10], capacity=9)


def test_packed_micro_batches_are_deterministic_and_cover_each_epoch(examples):
    def make():
        return PackedMicroBatches(examples, 2, shuffle=True, seed=3, pad_token_id=0, max_seq_length=MAX_LEN)

    first, again = make(), make()
    later = [again.get(i) for i in range(9, -1, -1)][::-1]  # any order, e.g. a resumed run starting at 9
    seen = []
    for i in range(10):
        batch = first.get(i)
        assert all(torch.equal(batch[k], later[i][k]) for k in batch)
        assert batch["input_ids"].shape[1] <= MAX_LEN
        assert int(batch["attention_mask"].sum()) == first.tokens(i)
        seen += first.example_indices(i)
    per_epoch = len(examples)
    assert sorted(seen[:per_epoch]) == list(range(per_epoch))  # epoch 0: every example once, before epoch 1
    assert len(first.rows(0)[0]) > 1  # short arithmetic problems: several per row


def test_packed_row_layout(examples):
    batches = PackedMicroBatches(examples, 1, shuffle=False, seed=0, pad_token_id=0, max_seq_length=MAX_LEN)
    [row] = batches.rows(0)
    batch = batches.get(0)
    start = 0
    for i in row:
        n = len(examples[i]["input_ids"])
        assert batch["position_ids"][0, start:start + n].tolist() == list(range(n))
        assert batch["input_ids"][0, start:start + n].tolist() == examples[i]["input_ids"]
        assert batch["labels"][0, start] == IGNORE_INDEX  # nothing before an example predicts its first token
        assert batch["labels"][0, start + 1:start + n].tolist() == examples[i]["labels"][1:]
        start += n
    assert batch["position_ids"][0, start:].tolist() == list(range(batch["input_ids"].shape[1] - start))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_unpacked_loss_of_the_same_examples(examples, attn):
    """The losses are token-weighted means over the micro-batch's real (recon) and supervised (task) tokens,
    so the same examples give the same losses whether padded one per row or packed several per row."""
    packed_batches = PackedMicroBatches(examples, 1, shuffle=True, seed=0, pad_token_id=0, max_seq_length=MAX_LEN)
    packed = packed_batches.get(0)
    chosen = [examples[i] for i in packed_batches.example_indices(0)]
    unpacked = MicroBatches(chosen, len(chosen), shuffle=False, seed=0, pad_token_id=0).get(0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 49152), attn_implementation=attn).eval()
    with torch.no_grad():
        losses = []
        for batch, is_packed in ((unpacked, False), (packed, True)):
            stages = split_model(model, None, lambda_aux=1.0, seed=0, packed=is_packed)
            first = stages[0](batch)
            losses.append((first.metric, stages[1](first.boundary).metric))
        own_packed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
        own = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"])
    (recon, task), (recon_packed, task_packed) = losses
    assert float(recon_packed) == pytest.approx(float(recon), rel=1e-5)
    assert float(task_packed) == pytest.approx(float(task), rel=1e-5)
    e2e = causal_lm_loss(own.logits, unpacked["labels"])
    assert float(causal_lm_loss(own_packed.logits, packed["labels"])) == pytest.approx(float(e2e), rel=1e-5)
    assert float(e2e) == pytest.approx(float(task), rel=1e-5)  # the split model is the model


def test_packing_is_refused_where_it_cannot_be_verified(tmp_path):
    with pytest.raises(FamilyCheckError, match="data.packing: model.attn_implementation='flash_attention_2'"):
        check_family(tiny_config("llama", 128), [2], "flash_attention_2", tmp_path, packed=True)
    # Linear-attention layers carry state from one example into the next: the check sees it and refuses.
    with pytest.raises(FamilyCheckError, match="on packed sequences the stages' logits differ"):
        check_family(tiny_config("qwen3_next", 128), [2], "sdpa", tmp_path, packed=True)
