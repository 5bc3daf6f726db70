import pytest

from lopt_dist.data import extract_final_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72", "72"),
        ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "10"),
        ("#### 1,234", "1234"),
        ("The total is 12,345,678 dollars", "12345678"),
        ("He is left with -5 apples", "-5"),
        ("#### -12", "-12"),
        ("It costs $3.50 in total", "3.5"),
        ("So the answer is 4.0", "4"),
        ("-$4.00 was lost", "-4"),
        ("x = -0", "0"),
        ("The answer is 42.", "42"),
        ("7 - 3", "3"),  # a subtraction, not a negative number
        ("first 3 then 9 and finally 11 apples", "11"),
        ("#### 5\nbut later it says 9", "5"),  # the marker wins over a later number
        ("#### none here, but 8 before", "8"),  # no number after the marker: last number in the text
        ("no number at all", None),
        ("", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected
