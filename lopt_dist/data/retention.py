"""General text for measuring what a model keeps of its language modelling while it learns a task.

The default is the pydoc topics of the standard library: English prose about Python that ships with every
interpreter, so it exists offline and no task data can have leaked into it. `lopt-eval` and the evaluation
during training (`eval.retention`) read the same text the same way.
"""

from __future__ import annotations

import importlib
import importlib.util

from transformers import PreTrainedTokenizerBase

PYDOC_TOPICS = "pydoc_data.topics"


def pydoc_topics() -> tuple[str, str]:
    """(text, where it came from); LookupError when this Python has no pydoc topics."""
    spec = importlib.util.find_spec(PYDOC_TOPICS)
    if spec is None or spec.origin is None:
        raise LookupError(f"this Python has no {PYDOC_TOPICS} module")
    topics = importlib.import_module(PYDOC_TOPICS).topics
    # Sorted keys: a dict literal's order is the file's, but sorting does not rely on that.
    return "\n\n".join(topics[key] for key in sorted(topics)), spec.origin


def token_windows(tokenizer: PreTrainedTokenizerBase, text: str, window: int, count: int) -> list[list[int]]:
    """The first `count` non-overlapping windows of `window` tokens of `text` (fewer if the text runs out)."""
    # verbose=False: the text is longer than the model's context on purpose; it is cut into windows here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return [ids[i * window:(i + 1) * window] for i in range(min(count, len(ids) // window))]
