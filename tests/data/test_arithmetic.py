import re

from lopt_dist.data import extract_final_number, generate_arithmetic_rows

_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_rows_are_deterministic_per_seed():
    assert generate_arithmetic_rows(20, seed=3) == generate_arithmetic_rows(20, seed=3)
    assert generate_arithmetic_rows(20, seed=3) != generate_arithmetic_rows(20, seed=4)
    # A smaller count is a prefix, so max_samples keeps "the first N rows".
    assert generate_arithmetic_rows(5, seed=3) == generate_arithmetic_rows(20, seed=3)[:5]


def test_answers_are_correct():
    """Recompute every worked step and check it chains from the question's start to the #### answer."""
    for row in generate_arithmetic_rows(300, seed=0):
        *steps, final = row["answer"].split("\n")
        assert final.startswith("#### ") and 2 <= len(steps) <= 4
        question_numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
        value = question_numbers[0]
        operands = []
        for line in steps:
            a, op, b, result = _STEP.match(line).groups()
            assert int(a) == value
            exact = _OPS[op](int(a), int(b))
            assert exact == int(result) and exact >= 0, line
            value = int(result)
            operands.append(int(b))
        assert question_numbers[1:] == operands  # the question states each step's number, in order
        assert extract_final_number(row["answer"]) == str(value)


def test_problems_vary():
    rows = generate_arithmetic_rows(200, seed=1)
    assert len({r["question"] for r in rows}) > 190
    ops = {line.split()[1] for r in rows for line in r["answer"].split("\n")[:-1]}
    assert ops == {"+", "-", "*", "/"}
