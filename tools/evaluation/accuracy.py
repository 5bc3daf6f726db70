"""Task accuracy: greedy answers to held-out problems, scored by exact match of the final number."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lopt_dist.data import encode_prompt, extract_final_number

from .batching import chunks, pad, progress
from .sources import Problem

# Generations are kept for audit; their head shows the reasoning and their tail the answer that was read.
KEEP_HEAD, KEEP_TAIL = 300, 200


@dataclass(kw_only=True)
class Record:
    """One scored problem, enough for a reader to check the verdict by eye."""

    index: int
    question: str
    reference: str | None  # final number of the reference completion
    predicted: str | None  # final number of the generation; None when it wrote no number
    correct: bool
    generated: str  # the generation, its middle cut out when long


@dataclass(kw_only=True)
class Accuracy:
    accuracy: float
    correct: int
    problems: int
    unscorable: int  # references without a number: counted as wrong, listed so that a reader notices
    records: list[Record]

    def records_json(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def score(problem: Problem, generated: str) -> Record:
    reference = extract_final_number(problem.completion)
    predicted = extract_final_number(generated)
    return Record(index=problem.index, question=problem.question, reference=reference, predicted=predicted,
                  correct=reference is not None and predicted == reference, generated=_shorten(generated))


def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], max_new_tokens: int
) -> list[str]:
    """The decoded continuation of each problem's prompt, built with the chat template as training builds it."""
    prompts = [encode_prompt(tokenizer, p.messages) for p in problems]
    ids, mask = pad(prompts, tokenizer.pad_token_id, "left", model.device)
    # A full config, not keyword overrides: sampling settings in the model's generation_config must not leak in.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    # Left padding puts every prompt's end at the same column, so the new tokens start there for all rows.
    return tokenizer.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)


def gsm8k_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], max_new_tokens: int,
    batch_size: int, show_progress: bool = False,
) -> Accuracy:
    records: list[Record] = []
    with progress("accuracy", len(problems), "problem", show_progress) as bar:
        for batch in chunks(problems, batch_size):
            answers = greedy_answers(model, tokenizer, list(batch), max_new_tokens)
            records.extend(score(p, text) for p, text in zip(batch, answers))
            bar.update(len(batch))
    correct = sum(r.correct for r in records)
    return Accuracy(accuracy=correct / len(records), correct=correct, problems=len(records),
                    unscorable=sum(r.reference is None for r in records), records=records)


def _shorten(text: str) -> str:
    if len(text) <= KEEP_HEAD + KEEP_TAIL:
        return text
    # No count in the marker: a reader re-parsing the record must not find a number that was never written.
    return f"{text[:KEEP_HEAD]} [...] {text[-KEEP_TAIL:]}"
