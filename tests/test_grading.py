"""Tests for grpo_gsm8k.science.grading: extraction table, canonical numbers, gold parsing on real GSM8K, both graders."""

import json
import threading
import time
from pathlib import Path

import pytest

from grpo_gsm8k.science.grading import (
    answers_match,
    canonical_number,
    extract_answer,
    grade,
    is_correct,
    is_plain_number,
    math_verify_correct,
    normalize_gold,
    parse_gold,
)

GSM8K_TEST = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test.jsonl"

# completion, expected value, expected method, expected ambiguous
EXTRACTION_CASES = [
    ("$15", "15", "last_number", False),  # currency sign dropped
    ("15.00", "15", "last_number", False),  # trailing zeros dropped
    ("1,000", "1000", "last_number", False),  # thousands separator does not split
    ("72 clips", "72", "last_number", False),  # unit after the number
    ("#### 72", "72", "hash", False),  # the GSM8K contract
    ("The answer is 72.", "72", "answer_is", False),  # trailing period is not a decimal point
    ("**Answer:** $15", "15", "answer_is", False),  # markdown bold around "Answer:"
    ("**Answer**: 18", "18", "answer_is", False),  # bold closes before the colon
    ("#### $1,000", "1000", "hash", False),  # $ and thousands after ####
    ("#### 15.", "15", "hash", False),  # trailing period after ####
    ("The final answer is \\boxed{72}", "72", "boxed", False),  # boxed beats "answer is"
    ("#### -5", "-5", "hash", False),  # minus sign survives
    ("It dropped to −7 degrees", "-7", "last_number", False),  # unicode minus
    ("x = -3", "-3", "last_number", False),  # minus after "=" is a sign
    ("between 5-10 people", "10", "last_number", True),  # a hyphen after a digit is a range, not a sign
    ("3.5", "3.5", "last_number", False),  # decimal point kept: not 35
    ("25%", "25", "last_number", False),  # percent sign dropped
    ("so 1/2 of it", "0.5", "last_number", False),  # fraction evaluated
    ("#### 1,234,567", "1234567", "hash", False),  # several thousands groups
    ("#### 0.25", "0.25", "hash", False),  # decimal below one
    ("#### **72**", "72", "hash", False),  # bold number after ####
    ("#### 5 + 7 = 12", "12", "hash", False),  # expression after ####: value after the last "="
    ("She has 5 apples and 7 more.\n#### 12", "12", "hash", False),  # #### beats the last number
    ("#### 72\nI checked it in 3 steps.", "72", "hash", False),  # #### beats a later number
    ("The answer is 70.\n#### 72", "72", "hash", False),  # #### beats "answer is"
    ("\\boxed{70}\n#### 72", "72", "hash", False),  # #### beats \boxed
    ("#### 72\n#### 80", "80", "hash", True),  # markers disagree: last wins, flagged
    ("#### 72\n#### 72", "72", "hash", False),  # repeated identical markers are fine
    ("#### Step 1: add\nSo she has 12.", "12", "last_number", False),  # markdown heading is not a marker
    ("\\boxed{\\frac{1}{2}}", "0.5", "boxed", False),  # nested braces in a box
    ("\\boxed{1{,}000}", "1000", "boxed", False),  # LaTeX thousands separator
    ("\\boxed{15 \\text{ dollars}}", "15", "boxed", False),  # unit text inside a box
    ("\\boxed{3} then \\boxed{4}", "4", "boxed", True),  # two boxes disagree
    ("It costs \\$15.", "15", "last_number", False),  # escaped LaTeX dollar
    ("The answer is: Janet makes $18 per day", "18", "answer_is", False),  # words between marker and number
    ("Answer = 4", "4", "answer_is", False),  # "answer =" form
    ("The answer is 5. No wait, the answer is 6.", "6", "answer_is", True),  # self-correction flagged
    ("The answer is 1,000 dollars", "1000", "answer_is", False),  # thousands after "answer is"
    ("Total 5 + 3 = 8 apples", "8", "last_number", True),  # final sentence with several numbers
    ("numbers 3,4,5", "5", "last_number", True),  # a list is not a thousands number
    ("She had 3 cats. Now she has 72 clips.", "72", "last_number", False),  # one number in the last sentence
    ("no number here", None, "none", False),  # nothing to extract
    ("", None, "none", False),  # empty completion
    ("#### twelve", None, "none", False),  # marker without a number and no digits anywhere
    # Issue 12: the whole marker line is read (up to the end of its sentence), not just its leading number.
    ("#### 3, 4", None, "hash", True),  # two values: no answer, flagged
    ("#### 10-15", None, "hash", True),  # a range states two values
    ("#### 5 + 7", "12", "hash", False),  # an expression is evaluated
    ("#### 0.5 hours = 30 minutes", "30", "hash", False),  # the value after the last "="
    ("#### 1 1/2", "1.5", "hash", False),  # mixed number
    ("#### 1.2e3", "1200", "hash", False),  # scientific notation
    ("The answer: 1 000 000", "1000000", "answer_is", False),  # space-grouped thousands
    ("The answer is not 5 but 6.", None, "answer_is", True),  # two values in one statement
    ("#### 72\nSo the answer is 70.", "72", "hash", True),  # final answer contradicted later: flagged
    # Our own cases for the line rule. Rows marked "guard" already pass on the leading-number grader: they keep
    # the whole-line reading from breaking what worked (a naive "value after the last '='" would read 9 below).
    ("#### $15", "15", "hash", False),  # guard: currency sign still dropped
    ("#### 1,000", "1000", "hash", False),  # guard: thousands commas still one number
    ("#### 1 000", "1000", "hash", False),  # one space-grouped thousands group
    ("#### 72 clips", "72", "hash", False),  # guard: a unit word is not a second value
    ("#### 3 cups * 2 = 6 cups", "6", "hash", False),  # units around an expression
    ("#### 5 apples + 7 apples", None, "hash", True),  # a word splits an expression: flagged, not guessed
    ("#### (5 + 7) * 2", "24", "hash", False),  # parentheses and precedence
    ("#### 12 - 2", "10", "hash", False),  # a spaced hyphen is a minus
    ("#### 3 x 4", "12", "hash", False),  # "x" between numbers multiplies
    ("#### 3 × 4 ÷ 2", "6", "hash", False),  # unicode times and divide
    ("#### **5 + 7 = 12**", "12", "hash", False),  # guard: bold around an expression
    ("#### 5 + 7 =", "12", "hash", False),  # nothing after the last "=": the expression before it
    ("#### 72 (72 clips)", "72", "hash", False),  # guard: an aside that agrees
    ("#### 72 (8 per week)", None, "hash", True),  # an aside with another value
    ("#### 10–15", None, "hash", True),  # en-dash range
    ("#### 72 or 73", None, "hash", True),  # two alternatives
    ("#### 2^3", None, "hash", True),  # powers are not evaluated: two values
    ("#### 1e999999", None, "hash", True),  # a huge exponent is not a number (no million-digit string)
    ("#### 3 100-meter races", None, "hash", True),  # "3 100-" is no thousands group: two values
    ("#### 1/0", None, "none", False),  # guard: division by zero is no value, and does not raise
    ("#### 3, 4\n#### 4", "4", "hash", True),  # guard: last marker wins; the ambiguous earlier one disagrees
    ("#### 4\n#### 3, 4", None, "hash", True),  # the last marker's line is ambiguous
    ("#### 72\nSo the answer is 72.", "72", "hash", False),  # guard: a later statement that agrees
    ("#### 72\n\\boxed{70}", "72", "hash", True),  # a later box that disagrees
    ("\\boxed{72}\nSo the answer is 70.", "72", "boxed", True),  # box contradicted later
    ("\\boxed{3, 4}", None, "boxed", True),  # two values in a box
    ("\\boxed{5 \\times 7}", "35", "boxed", False),  # LaTeX times
    ("The answer is 12. She started with 3.", "12", "answer_is", False),  # guard: the statement ends at its sentence
    ("The answer is $18. She sells 16 - 3 - 4 = 9 eggs.", "18", "answer_is", False),  # guard: later work is not read
    ("The answer is 1 1/2 cups.", "1.5", "answer_is", False),  # mixed number after "answer is"
    ("Answer: 2.5e-1", "0.25", "answer_is", False),  # negative exponent
    ("The answer is 5, no, 6", None, "answer_is", True),  # a correction inside one statement
    ("The answer is 5 (five).", "5", "answer_is", False),  # guard: words in parentheses are not a value
    ("The answer is $1\\frac{2}{3}$ cups.", "1.666666666666666666666666667", "answer_is", False),  # LaTeX mixed
    ("\\boxed{2\\frac{1}{2}}", "2.5", "boxed", False),  # mixed number in a box: not 21/2
    ("\\boxed{\\frac12}", "0.5", "boxed", False),  # LaTeX's brace-less \frac12
    ("\\boxed{-\\frac{3}{4}}", "-0.75", "boxed", False),  # guard: a sign before \frac
    ("The answer is not obvious yet. Each shirt costs $8. She pays 24 dollars.", "24", "last_number", False),
    ("The answer is. 72", "72", "last_number", False),  # a marker sentence without a number is no marker
    ("#### 1. Cost of the shirts\n3 * 8 = 24, plus 48 gives 72.", "72", "last_number", True),  # a heading
    ("#### 2) Total\nSo she pays 72 dollars.", "72", "last_number", False),  # a heading numbered "2)"
    ("#### 72. She pays 72 dollars.", "72", "hash", False),  # guard: an answer then a sentence, not a heading
    ("#### 15. so she has 15", "15", "hash", False),  # guard: lower case reads on, not a title
    ("#### " + "9" * 30, "9" * 30, "hash", False),  # 30 digits, not rounded to decimal's default 28
]


@pytest.mark.parametrize(("completion", "value", "method", "ambiguous"), EXTRACTION_CASES)
def test_extract_answer(completion, value, method, ambiguous):
    extraction = extract_answer(completion)
    assert (extraction.value, extraction.method, extraction.ambiguous) == (value, method, ambiguous)
    assert bool(extraction.reason) == ambiguous  # a reason exactly when ambiguous


# completion, gold, correct: what the reward and evaluation pay (issue 12's table, then regressions)
CORRECTNESS_CASES = [
    ("#### 3, 4", "3", False),  # an ambiguous line is not paid, whichever value is gold
    ("#### 3, 4", "4", False),  # ... the other value neither
    ("#### 10-15", "10", False),  # a range is not paid
    ("#### 5 + 7", "12", True),  # expression evaluated
    ("#### 0.5 hours = 30 minutes", "30", True),  # value after the last "="
    ("#### 1 1/2", "1.5", True),  # mixed number
    ("#### 1.2e3", "1200", True),  # scientific notation
    ("The answer: 1 000 000", "1000000", True),  # space-grouped thousands
    ("The answer is not 5 but 6.", "6", False),  # two values: not paid
    ("#### 72\nso the answer is 70", "72", True),  # #### still wins (flagged, see the extraction table)
    ("$15", "15", True),  # regression: currency
    ("#### 1,000", "1000", True),  # regression: thousands commas
    ("#### 5 + 7", "5", False),  # the leading number is no longer read
    ("The answer is $1\\frac{2}{3}$ cups.", "4", False),  # regression: read as 12/3
    ("#### 2\\frac{1}{3}", "7", False),  # regression: read as 21/3
    ("\\boxed{\\frac12}", "12", False),  # regression: read as 12
    ("The answer is not obvious yet. Each shirt costs $8. She pays 24 dollars.", "24", True),  # regression: 8
    ("#### 1. Cost of the shirts\n3 * 8 = 24, plus 48 gives 72.", "72", True),  # regression: 1
]


@pytest.mark.parametrize(("completion", "gold", "correct"), CORRECTNESS_CASES)
def test_is_correct_reads_the_whole_line(completion, gold, correct):
    assert is_correct(completion, gold) is correct
    result = grade(completion, gold)  # evaluation's verdict is the reward's verdict
    assert result.correct is correct


# completion, words the ambiguity reason must contain
REASON_CASES = [
    ("#### 3, 4", "3, 4"),  # the values that disagree are named
    ("The answer is not 5 but 6.", "5, 6"),
    ("#### 72\nSo the answer is 70.", "70"),  # the contradicting value is named
]


@pytest.mark.parametrize(("completion", "words"), REASON_CASES)
def test_ambiguity_reason_names_the_values(completion, words):
    assert words in extract_answer(completion).reason


# text, canonical number
CANONICAL_CASES = [
    ("$1,000.00", "1000"),  # currency, thousands and zero decimals
    ("15.50", "15.5"),  # trailing zero dropped
    ("-3", "-3"),  # negative kept
    ("72 clips", "72"),  # unit ignored
    ("1/2", "0.5"),  # fraction evaluated
    (".5", "0.5"),  # leading decimal point
    ("-0", "0"),  # no negative zero
    ("1000", "1000"),  # not 1E+3
    ("abc", None),  # not a number
    ("about 72", None),  # must start with the number
    ("1/0", None),  # division by zero is no number
]


@pytest.mark.parametrize(("text", "expected"), CANONICAL_CASES)
def test_canonical_number(text, expected):
    assert canonical_number(text) == expected


# text, is a plain number
PLAIN_NUMBER_CASES = [
    ("72", True),  # bare integer
    (" -3.5 ", True),  # sign, decimal, padding
    ("$1,000", True),  # dollar and thousands
    ("72 clips", False),  # unit
    ("15.", False),  # trailing period
    ("1,00", False),  # malformed thousands group
    ("", False),  # nothing
]


@pytest.mark.parametrize(("text", "expected"), PLAIN_NUMBER_CASES)
def test_is_plain_number(text, expected):
    assert is_plain_number(text) is expected


# extracted, gold, match
MATCH_CASES = [
    ("72", "72", True),  # equal
    ("72.0000001", "72", True),  # within 1e-6
    ("72.00001", "72", False),  # outside 1e-6
    ("1000000007", "1000000008", False),  # large integers compared exactly
    ("1,000", "1000", True),  # non-canonical input tolerated
    (None, "72", False),  # nothing extracted
    ("-5", "5", False),  # sign matters
    ("100000000000000000000000000001", "100000000000000000000000000000", False),  # past decimal's 28 digits too
]


@pytest.mark.parametrize(("extracted", "gold", "expected"), MATCH_CASES)
def test_answers_match(extracted, gold, expected):
    assert answers_match(extracted, gold) is expected


# bad GSM8K answer text, words the error must contain
BAD_GOLD_CASES = [
    ("She has 72 clips.", "####"),  # marker missing
    ("so...\n#### many", "not followed by a number"),  # marker without a number
]


@pytest.mark.parametrize(("answer", "message"), BAD_GOLD_CASES)
def test_parse_gold_rejects(answer, message):
    with pytest.raises(ValueError, match=message):
        parse_gold(answer)


def test_parse_gold_takes_last_marker_and_separators():
    assert parse_gold("first #### 3\nthen\n#### 1,000") == "1000"


def test_normalize_gold_accepts_full_answer_or_number():
    assert (normalize_gold("... #### 72"), normalize_gold("72"), normalize_gold(72)) == ("72", "72", "72")


def _first_gsm8k_rows(count: int) -> list[dict]:
    with GSM8K_TEST.open() as lines:
        return [json.loads(next(lines)) for _ in range(count)]


@pytest.mark.parametrize("row", _first_gsm8k_rows(50), ids=lambda row: row["question"][:30])
def test_real_gold_parses_and_its_own_text_grades_correct(row):
    gold = parse_gold(row["answer"])
    assert gold.lstrip("-").replace(".", "").isdigit()
    result = grade(row["answer"], gold)
    assert (result.extracted, result.method, result.correct, result.ambiguous) == (gold, "hash", True, False)
    assert result.mv_correct and result.graders_agree


# completion, gold, math-verify verdict
MATH_VERIFY_CASES = [
    ("#### 72", "72", True),  # plain marker
    ("The answer is $1,000.", "1000", True),  # thousands and currency
    ("The final answer is \\boxed{\\frac{1}{2}}", "0.5", True),  # LaTeX fraction vs decimal gold
    ("#### 71", "72", False),  # wrong number
    ("no number here", "72", False),  # nothing to parse
    ("\\boxed{", "72", False),  # broken LaTeX must not raise
]


@pytest.mark.parametrize(("completion", "gold", "expected"), MATH_VERIFY_CASES)
def test_math_verify_correct(completion, gold, expected):
    assert math_verify_correct(completion, gold) is expected
    assert is_correct(completion, gold) is expected  # the primary grader agrees on these simple forms


def test_math_verify_works_outside_the_main_thread():
    # signal-based timeouts would raise in a worker thread and read as False.
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.append(math_verify_correct("#### 72", "72")))
    worker.start()
    worker.join()
    assert verdicts == [True]


# completion, gold, primary correct, math-verify correct
AGREEMENT_CASES = [
    ("So she has 72 clips.\n#### 72", "72", True, True),  # both read the marker
    ("#### 72\nChecked it in 3 steps.", "72", True, False),  # math-verify takes the later 3: graders disagree
    ("The answer is 70.\n#### 72", "72", True, False),  # math-verify prefers "answer is" over ####
    ("\\boxed{72}\n#### 70", "70", True, False),  # math-verify prefers \boxed over ####
    ("#### 71", "72", False, False),  # both say wrong: they agree
]


@pytest.mark.parametrize(("completion", "gold", "correct", "mv_correct"), AGREEMENT_CASES)
def test_grade_reports_both_graders(completion, gold, correct, mv_correct):
    result = grade(completion, gold)
    assert (result.correct, result.mv_correct, result.graders_agree) == (correct, mv_correct, correct == mv_correct)


# completion: a power sympy would compute for minutes (or until memory runs out) is not handed to math-verify
UNBOUNDED_POWER_CASES = [
    ("So the answer is $9^{9^{9}}$.", True),
    ("#### 18 (since $10^{10^{10}}$ is too big)", True),
    ("\\boxed{2^{2^{40}}}", True),
    ("2**3**4", True),
    ("2^{12345678}", True),
    ("$2^{10} = 1024$", False),  # guard: ordinary powers are still verified
    ("x^2+y^2=25, so 5", False),
    ("\\boxed{3^4}", False),
]


@pytest.mark.parametrize("completion, unbounded", UNBOUNDED_POWER_CASES)
def test_math_verify_is_never_handed_a_power_tower(completion, unbounded):
    from grpo_gsm8k.science.grading import _UNBOUNDED_POWER

    assert bool(_UNBOUNDED_POWER.search(completion)) is unbounded
    if unbounded:
        started = time.monotonic()
        assert math_verify_correct(completion, "18") is False and time.monotonic() - started < 5
    else:
        assert math_verify_correct(completion, {"$2^{10} = 1024$": "1024", "x^2+y^2=25, so 5": "5"}.get(
            completion, "81")) is True
