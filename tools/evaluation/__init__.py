"""Evaluating a post-trained model: task fit (answer loss), task accuracy, and retention of general text."""

from .accuracy import Accuracy, Record, gsm8k_accuracy
from .config import DEFAULT_DATA, EvalConfig, EvalError
from .likelihood import AnswerLoss, Perplexity, answer_loss, retention_perplexity
from .runner import evaluate
from .sources import Problem, RetentionText, load_problems, load_retention_text, retention_windows

__all__ = [
    "DEFAULT_DATA", "Accuracy", "AnswerLoss", "EvalConfig", "EvalError", "Perplexity", "Problem", "Record",
    "RetentionText", "answer_loss", "evaluate", "gsm8k_accuracy", "load_problems", "load_retention_text",
    "retention_perplexity", "retention_windows",
]
