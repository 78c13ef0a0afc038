"""Answer extraction, normalisation and grading for GSM8K: the one grader shared by reward, baseline and evaluation.

Primary grader: the hand-written extractor below (`extract_answer` + `answers_match`). It knows the GSM8K
contract (the system prompt asks for a final `#### N` line), ranks markers `####` > `\\boxed{}` > "the answer is"
> last number, reports *which* marker it used and whether a reader could disagree, and runs in tens of
microseconds, so it is safe on every completion during training.

Audit grader: math-verify (`math_verify_correct`). It is a strong general LaTeX/expression parser but does not
know about `####` (in "#### 72\\nChecked in 3 steps." it picks 3; an earlier "the answer is 70" beats a final
"#### 72"), and costs ~1 ms per completion (tens of ms on a cold LaTeX path). So it only cross-checks:
`Grade.graders_agree` flags completions where the two graders differ, which is where extraction bugs or reward
hacking hide. The reward calls `is_correct` (primary only); evaluation calls `grade` (both).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

ANSWER_TOLERANCE = Decimal("1e-6")
# math-verify runs without its signal-based timeout (see math_verify_correct); the answer sits at the end, so
# only the tail is parsed, which bounds the time a pathological completion can take.
MATH_VERIFY_MAX_CHARS = 2000
MAX_BOX_CHARS = 500

# One number as people write it: optional sign and $, thousands groups ("1,000"), decimals, an optional "/den".
# The look-behind keeps "x2", the "5" of "3.5" and the "10" of "5-10" from reading as a number or a negative.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−])?\$?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:[ \t]*/[ \t]*(?P<den>\d+(?:\.\d+)?))?"
)
_PLAIN_NUMBER = re.compile(r"[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_HASH_MARKER = re.compile(r"####[ \t]*([^\n]*)")
_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
# The rest of the line is read in a look-ahead so "the answer is 5, no, the answer is 6" yields both markers;
# capped at 200 characters so a degenerate "answer is answer is ..." line stays linear.
_ANSWER_IS = re.compile(r"\banswer\b[*_]*\s*(?:is\b|[:=])[ \t*_:]*(?=([^\n]{0,200}))", re.IGNORECASE)
# An expression keeps going after the first number ("5 + 7 = 12"): then the value is the one after the last "=".
_EXPRESSION_CONTINUES = re.compile(r"\s*[-+*/×÷x^]\s*[\d(]")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_MARKER_PADDING = " \t*_:#"
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_REPLACEMENTS = (("{,}", ","), ("\\$", "$"), ("\\%", "%"), ("\\,", ""), ("\\!", ""))


@dataclass(frozen=True)
class Extraction:
    value: str | None  # canonical number string ("15", "-3.5"); None if nothing found
    method: str  # "hash", "boxed", "answer_is", "last_number" or "none"
    ambiguous: bool  # a careful reader could pick a different number
    reason: str  # why it is ambiguous, else ""


@dataclass(frozen=True)
class Grade:
    extracted: str | None
    method: str
    correct: bool
    ambiguous: bool
    reason: str
    mv_correct: bool  # math-verify's verdict
    graders_agree: bool  # correct == mv_correct


def _clean_latex(text: str) -> str:
    """Rewrite the LaTeX number spellings models use ("1{,}000", "\\frac{1}{2}", "\\$5") as plain text."""
    if "\\" not in text and "{," not in text:
        return text  # fast path: almost every GSM8K completion
    for latex, plain in _LATEX_REPLACEMENTS:
        text = text.replace(latex, plain)
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    return _LATEX_TEXT.sub(r" \1", text)


def _format_decimal(value: Decimal) -> str:
    """Shortest plain spelling: 15.50 -> "15.5", 1E+3 -> "1000", -0 -> "0"."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _match_to_canonical(match: re.Match) -> str | None:
    try:
        value = Decimal(match["num"].replace(",", ""))
        if match["den"] is not None:
            value = value / Decimal(match["den"])  # "1/2" -> 0.5; "/0" raises and reads as no number
    except (InvalidOperation, ZeroDivisionError):
        return None
    return _format_decimal(-value if match["sign"] else value)


def canonical_number(text: str) -> str | None:
    """The number that `text` starts with, canonical ("$1,000.00" -> "1000", "72 clips" -> "72"); else None."""
    cleaned = _clean_latex(text).lstrip(" \t\n*_")
    match = _NUMBER.match(cleaned)
    return _match_to_canonical(match) if match else None


def is_plain_number(text: str) -> bool:
    """True when `text` is only a number, optionally with sign, "$" and thousands commas (the `#### N` contract)."""
    return _PLAIN_NUMBER.fullmatch(text.strip()) is not None


def parse_gold(gsm8k_answer: str) -> str:
    """Canonical number after the last "####" of a GSM8K answer; ValueError if there is none."""
    if "####" not in gsm8k_answer:
        raise ValueError(f"GSM8K answer has no '#### N' line: {gsm8k_answer[-80:]!r}")
    tail = gsm8k_answer.rsplit("####", 1)[1].strip()
    value = canonical_number(tail)
    if value is None:
        raise ValueError(f"GSM8K answer's '####' is not followed by a number: {tail[:80]!r}")
    return value


def normalize_gold(gold: str | int | float) -> str:
    """Accept either a full GSM8K answer ("... #### 72") or a bare number; return the canonical number."""
    gold_text = str(gold)
    if "####" in gold_text:
        return parse_gold(gold_text)
    value = canonical_number(gold_text)
    if value is None:
        raise ValueError(f"gold answer is not a number: {gold_text[:80]!r}")
    return value


def _number_after_marker(rest: str, *, must_start_with_number: bool) -> str | None:
    """Value stated after a marker: the leading number, or the one after the last "=" of an expression."""
    stripped = rest.lstrip(_MARKER_PADDING)
    leading = _NUMBER.match(stripped)
    if leading and not _EXPRESSION_CONTINUES.match(stripped, leading.end()):
        return _match_to_canonical(leading)
    if must_start_with_number and not leading:
        return None  # "#### Step 2: ..." is a markdown heading, not an answer
    if "=" in stripped:
        stripped = stripped.rsplit("=", 1)[1]
    found = _NUMBER.search(stripped)
    return _match_to_canonical(found) if found else None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every closed \\boxed{...}, nested braces balanced (\\boxed{\\frac{1}{2}}); one linear pass."""
    box_starts = {opening.end() - 1 for opening in _BOXED_OPEN.finditer(text)}
    open_braces, contents = [], []
    for brace in _BRACE.finditer(text):
        position = brace.start()
        if brace[0] == "{":
            open_braces.append(position)
        elif open_braces:
            start = open_braces.pop()
            # A box holding hundreds of characters is not a final answer; skipping it keeps nesting linear.
            if start in box_starts and position - start <= MAX_BOX_CHARS:
                contents.append((start, text[start + 1 : position]))
    return [content for _, content in sorted(contents)]  # reading order; closing order puts inner boxes first


def _from_markers(values: list[str | None], method: str, marker_name: str) -> Extraction | None:
    """Last marker with a number wins; markers that disagree make the answer ambiguous."""
    found = [value for value in values if value is not None]
    if not found:
        return None
    distinct = list(dict.fromkeys(found))
    if len(distinct) > 1:
        reason = f"{len(found)} {marker_name} markers give different values: {', '.join(distinct)}"
        return Extraction(found[-1], method, True, reason)
    return Extraction(found[-1], method, False, "")


def _from_last_number(text: str) -> Extraction:
    """No marker: take the last number; ambiguous when the final sentence states several different numbers."""
    numbers = [_match_to_canonical(match) for match in _NUMBER.finditer(text)]
    numbers = [number for number in numbers if number is not None]
    if not numbers:
        return Extraction(None, "none", False, "")
    sentences = [sentence for sentence in _SENTENCE_BREAK.split(text.strip()) if sentence.strip()]
    final_sentence = sentences[-1] if sentences else ""
    in_final = list(dict.fromkeys(_match_to_canonical(m) for m in _NUMBER.finditer(final_sentence)))
    in_final = [number for number in in_final if number is not None]
    if len(in_final) > 1:
        return Extraction(numbers[-1], "last_number", True, f"no answer marker; final sentence has {', '.join(in_final)}")
    return Extraction(numbers[-1], "last_number", False, "")


def extract_answer(completion: str) -> Extraction:
    """The completion's final answer by precedence: last `#### N` > last \\boxed{} > "the answer is N" > last number."""
    text = _clean_latex(completion)
    if "####" in text:
        hash_values = [
            _number_after_marker(m[1], must_start_with_number=True) for m in _HASH_MARKER.finditer(text)
        ]
        if (result := _from_markers(hash_values, "hash", "####")) is not None:
            return result
    if "boxed" in completion or "fbox" in completion:
        # Boxes are read on the raw text: cleaning turned \frac{a}{b} into a/b, which the box parser handles too.
        box_values = [
            _number_after_marker(_clean_latex(content), must_start_with_number=False)
            for content in _boxed_contents(completion)
        ]
        if (result := _from_markers(box_values, "boxed", "\\boxed")) is not None:
            return result
    answer_values = [_number_after_marker(m[1], must_start_with_number=False) for m in _ANSWER_IS.finditer(text)]
    if (result := _from_markers(answer_values, "answer_is", "'the answer is'")) is not None:
        return result
    return _from_last_number(text)


def answers_match(extracted: str | None, gold: str) -> bool:
    """Numeric equality within 1e-6 (exact decimal arithmetic, so 1000000007 != 1000000008)."""
    if extracted is None:
        return False
    extracted_value, gold_value = canonical_number(extracted), canonical_number(gold)
    if extracted_value is None or gold_value is None:
        return False
    return abs(Decimal(extracted_value) - Decimal(gold_value)) <= ANSWER_TOLERANCE


def is_correct(completion: str, gold: str) -> bool:
    """Fast primary verdict for the reward (no math-verify): extracted answer equals the gold number."""
    return answers_match(extract_answer(completion).value, normalize_gold(gold))


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that timeouts are off; we turn them off on purpose (see math_verify_correct)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_DropTimeoutDisabledWarning())


def math_verify_correct(completion: str, gold: str) -> bool:
    """math-verify's independent verdict; False on any failure, never raises.

    Timeouts are disabled (parsing_timeout=None, timeout_seconds=None) because math-verify implements them with
    signal.alarm, which raises outside the main thread (dataloader workers, TRL's async reward loop).
    """
    try:
        from math_verify import parse, verify  # imported lazily: sympy import costs ~1 s

        gold_parsed = parse(normalize_gold(gold), parsing_timeout=None)
        predicted = parse(completion[-MATH_VERIFY_MAX_CHARS:], parsing_timeout=None)
        if not gold_parsed or not predicted:
            return False
        return bool(verify(gold_parsed, predicted, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - an audit grader must never take the run down
        return False


def grade(completion: str, gold: str) -> Grade:
    """Full verdict for evaluation: primary extraction and correctness plus math-verify's audit."""
    extraction = extract_answer(completion)
    correct = answers_match(extraction.value, normalize_gold(gold))
    mv_correct = math_verify_correct(completion, gold)
    return Grade(
        extracted=extraction.value,
        method=extraction.method,
        correct=correct,
        ambiguous=extraction.ambiguous,
        reason=extraction.reason,
        mv_correct=mv_correct,
        graders_agree=correct == mv_correct,
    )
