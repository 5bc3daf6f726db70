"""Teacher-forced figures: the answer loss on held-out problems and the perplexity of general text.

Both are a sum of token negative log-likelihoods divided by the number of predicted tokens, pooled over the
whole set, so a long answer weighs by its tokens, exactly as the training loss pools a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lopt_dist.data import IGNORE_INDEX, encode_example

from .batching import chunks, pad, progress
from .config import EvalError
from .sources import Problem


@dataclass(kw_only=True)
class NllSum:
    """Summed negative log-likelihood and how many tokens it covers."""

    nll: float = 0.0
    tokens: int = 0

    def add(self, other: NllSum) -> None:
        self.nll += other.nll
        self.tokens += other.tokens

    @property
    def mean(self) -> float:
        return self.nll / self.tokens


@dataclass(kw_only=True)
class AnswerLoss:
    loss: float  # mean cross-entropy per answer token (nats)
    tokens: int
    examples: int
    skipped_too_long: int  # problems whose prompt alone fills max_seq_length


@dataclass(kw_only=True)
class Perplexity:
    perplexity: float
    mean_nll: float
    tokens: int  # predicted tokens: each window's first token has no context and is not scored
    windows: int


def token_nll(model: PreTrainedModel, rows: list[list[int]], labels: list[list[int]], pad_id: int) -> NllSum:
    """NLL of `labels` (aligned with `rows`, IGNORE_INDEX where unscored) given every earlier token."""
    device = model.device
    ids, mask = pad(rows, pad_id, "right", device)
    targets, _ = pad(labels, IGNORE_INDEX, "right", device)
    # Logits at position t predict token t + 1; scoring in float32 keeps bfloat16 runs comparable.
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = targets[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return NllSum(nll=nll.item(), tokens=int((targets != IGNORE_INDEX).sum()))


def answer_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
    max_seq_length: int, batch_size: int, show_progress: bool = False,
) -> AnswerLoss:
    """Mean cross-entropy over the answer tokens (prompt masked, eos included), as training computes it."""
    encoded = [encode_example(tokenizer, p.messages, p.completion, max_seq_length) for p in problems]
    examples = [e for e in encoded if e is not None]
    if not examples:
        raise EvalError(f"every prompt fills max_seq_length={max_seq_length}; raise --max-seq-length")
    total = NllSum()
    with progress("answer loss", len(examples), "example", show_progress) as bar:
        for batch in chunks(examples, batch_size):
            rows = [e["input_ids"] for e in batch]
            total.add(token_nll(model, rows, [e["labels"] for e in batch], tokenizer.pad_token_id))
            bar.update(len(batch))
    return AnswerLoss(loss=total.mean, tokens=total.tokens, examples=len(examples),
                      skipped_too_long=len(encoded) - len(examples))


def retention_perplexity(
    model: PreTrainedModel, windows: list[list[int]], batch_size: int, pad_id: int, show_progress: bool = False
) -> Perplexity:
    """exp(mean NLL) over every predicted token of the windows."""
    total = NllSum()
    with progress("retention", len(windows), "window", show_progress) as bar:
        for batch in chunks(windows, batch_size):
            total.add(token_nll(model, list(batch), list(batch), pad_id))
            bar.update(len(batch))
    return Perplexity(perplexity=math.exp(total.mean), mean_nll=total.mean, tokens=total.tokens,
                      windows=len(windows))
