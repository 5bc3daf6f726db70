"""A built-in, seeded task: short multi-step arithmetic word problems in GSM8K format.

It needs no download, its answers are checkable with `extract_final_number`, and it is narrow enough that
a small model visibly improves on it within a few hundred steps: a good smoke test of a training run.
Each problem starts with a count of items and applies 2-4 steps (buy, give away, multiply, share out);
every intermediate value stays a small non-negative integer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class _Person:
    name: str
    pronoun: str  # she / he
    possessive: str  # her / his


_PEOPLE = [
    _Person("Mia", "she", "her"), _Person("Liam", "he", "his"), _Person("Ava", "she", "her"),
    _Person("Noah", "he", "his"), _Person("Zoe", "she", "her"), _Person("Omar", "he", "his"),
    _Person("Lena", "she", "her"), _Person("Ravi", "he", "his"),
]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "coins"]
_MAX_VALUE = 500  # keeps products small enough for a 135M model to multiply


@dataclass(frozen=True)
class _Step:
    sentence: str  # what the question says happens
    symbol: str  # + - * /
    operand: int


def generate_arithmetic_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` rows {"question", "answer"}, the answer ending in "#### <number>"; the same for the same seed."""
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def _problem(rng: random.Random) -> dict[str, str]:
    person = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    start = rng.randint(5, 60)
    value, steps, lines = start, [], []
    for _ in range(rng.randint(2, 4)):
        step = _next_step(rng, person, item, value)
        result = _apply(value, step)
        lines.append(f"{value} {step.symbol} {step.operand} = {result}")
        steps.append(step)
        value = result
    question = " ".join(
        [f"{person.name} has {start} {item}.", *(s.sentence for s in steps),
         f"How many {item} does {person.name} have now?"]
    )
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {value}"}


def _next_step(rng: random.Random, person: _Person, item: str, value: int) -> _Step:
    they, their = person.pronoun.capitalize(), person.possessive
    choices = ["add", "add"]  # adding is always possible; weight it so chains stay varied but small
    if value >= 2:
        choices.append("subtract")
    if value * 2 <= _MAX_VALUE:
        choices.append("multiply")
    divisors = [d for d in range(2, 7) if value % d == 0 and value // d >= 1]
    if divisors:
        choices.append("divide")
    kind = rng.choice(choices)
    if kind == "add":
        k = rng.randint(1, 30)
        sentence = rng.choice([f"{they} buys {k} more.", f"A friend gives {person.name} {k} {item}.",
                               f"{they} finds {k} more {item}."])
        return _Step(sentence, "+", k)
    if kind == "subtract":
        k = rng.randint(1, value - 1)
        sentence = rng.choice([f"{they} gives {k} {item} to a neighbour.", f"{they} loses {k} of them.",
                               f"{they} sells {k} {item}."])
        return _Step(sentence, "-", k)
    if kind == "multiply":
        m = rng.choice([m for m in (2, 3, 4) if value * m <= _MAX_VALUE])
        return _Step(f"Then {their} pile grows to {m} times its size.", "*", m)
    d = rng.choice(divisors)
    return _Step(f"{they} shares them equally among {d} bags and keeps only one bag.", "/", d)


def _apply(value: int, step: _Step) -> int:
    if step.symbol == "+":
        return value + step.operand
    if step.symbol == "-":
        return value - step.operand
    if step.symbol == "*":
        return value * step.operand
    return value // step.operand
