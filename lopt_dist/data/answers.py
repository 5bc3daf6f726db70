"""Reading the final numeric answer out of a worked solution (GSM8K style), for training data and evaluation.

GSM8K answers end with `#### <number>`; model generations may or may not keep that marker, so we fall back
to the last number in the text. Numbers are normalized so that equal values compare equal as strings:
"1,234" -> "1234", "$3.50" -> "3.5", "4.0" -> "4", "-0" -> "0".
"""

from __future__ import annotations

import re

# A minus sign counts only when it touches the number and does not follow a word or a closing bracket,
# so "7-3" and "7 - 3" read as 3, not -3. Commas count only as whole thousands groups.
_NUMBER = re.compile(
    r"(?<![\w)\]])(?P<sign>-)?\$?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?"
)
_MARKER = "####"


def extract_final_number(text: str) -> str | None:
    """The number after the last `####`, else the last number in `text`, normalized; None if there is none."""
    if _MARKER in text:
        after = text.rsplit(_MARKER, 1)[1]
        match = _NUMBER.search(after)
        if match:
            return _normalize(match)
    matches = list(_NUMBER.finditer(text))
    return _normalize(matches[-1]) if matches else None


def _normalize(match: re.Match[str]) -> str:
    integer = str(int(match["int"].replace(",", "")))
    fraction = (match["frac"] or "").rstrip("0")
    number = f"{integer}.{fraction}" if fraction else integer
    return number if number == "0" or not match["sign"] else f"-{number}"
