"""Answer extraction, normalisation and grading for GSM8K: the one grader shared by reward, baseline and evaluation.

Primary grader: the hand-written extractor below (`extract_answer` + `answers_match`). It knows the GSM8K
contract (the system prompt asks for a final `#### N` line), ranks markers `####` > `\\boxed{}` > "the answer is"
> last number, reports *which* marker it used and whether a reader could disagree, and runs in tens of
microseconds, so it is safe on every completion during training.

A marker's whole statement is read (its line, up to the end of the sentence), not just its leading number: one
number or one arithmetic expression is evaluated ("5 + 7" -> 12; "0.5 hours = 30 minutes" -> the value after the
last "=", 30; "1 1/2", "1.2e3", "1 000 000", "$1,000"). Arithmetic is + - * / and parentheses, parsed by `ast`
and walked with a whitelist, never eval'd. A statement holding values that disagree ("3, 4", "10-15", "not 5 but
6") has no answer: value None, flagged, so neither the reward nor evaluation pays it. A final answer that a later,
lower-ranked marker contradicts ("#### 72" then "so the answer is 70") keeps its value and is flagged.

Audit grader: math-verify (`math_verify_correct`). It is a strong general LaTeX/expression parser but does not
know about `####` (in "#### 72\\nChecked in 3 steps." it picks 3; an earlier "the answer is 70" beats a final
"#### 72"), and costs ~1 ms per completion (tens of ms on a cold LaTeX path). So it only cross-checks:
`Grade.graders_agree` flags completions where the two graders differ, which is where extraction bugs or reward
hacking hide. The reward calls `is_correct` (primary only); evaluation calls `grade` (both).
Why over 300 lines: one grader serves the reward and both evaluations, so every rule of reading an answer lives
here, next to the others it must not contradict; the table tests in tests/test_grading.py follow its order.
"""

from __future__ import annotations

import ast
import functools
import logging
import operator
import re
import threading
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation, localcontext
from typing import NamedTuple

ANSWER_TOLERANCE = Decimal("1e-6")
EXACT_PRECISION = 400  # digits: a difference of two canonical numbers (magnitudes up to 1e100) is exact within it
# math-verify runs without its signal-based timeout (see math_verify_correct); the answer sits at the end, so
# only the tail is parsed, which bounds the time a pathological completion can take.
MATH_VERIFY_MAX_CHARS = 2000
MAX_BOX_CHARS = 500
MATH_VERIFY_TIMEOUT = 5  # seconds, per parse and per verify
# A power whose exponent is itself a power, or has more than 6 digits: beyond what sympy computes in bounded time.
_UNBOUNDED_POWER = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*[\w.]*\s*(?:\^|\*\*)|(?:\^|\*\*)\s*[{(]?\s*\d{7}")

# One number as people write it: optional sign and $, thousands groups ("1,000"), decimals, an optional "/den".
# The look-behind keeps "x2", the "5" of "3.5" and the "10" of "5-10" from reading as a number or a negative.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−])?\$?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:[ \t]*/[ \t]*(?P<den>\d+(?:\.\d+)?))?"
)
_PLAIN_NUMBER = re.compile(r"[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A numbered markdown heading ("#### 1. Cost of the shirts", "#### 2) Total": a title without digits, more text
# below) is no marker; "#### 72. She pays 72 dollars." and a last line "#### 72. Done" still are.
_HASH_MARKER = re.compile(r"####(?![ \t]*\d{1,2}[.)][ \t]+[A-Z][^\d\n]*\n\s*\S)[ \t]*([^\n]*)")
_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
# The rest of the line is read in a look-ahead so "the answer is 5, no, the answer is 6" yields both markers;
# capped at 200 characters so a degenerate "answer is answer is ..." line stays linear.
_ANSWER_IS = re.compile(r"\banswer\b[*_]*\s*(?:is\b|[:=])[ \t*_:]*(?=([^\n]{0,200}))", re.IGNORECASE)
# A token of a marker's statement. Numbers as written on an answer line: scientific ("1.2e3", exponent of at most
# two digits so no million-digit string), mixed ("1 1/2"), thousands by commas or spaces ("1,000", "1 000 000").
_LINE_TOKEN = re.compile(
    r"(?<![.\d])\$?(?:(?P<sci>\d+(?:\.\d+)?[eE][-+]?\d{1,2})(?!\w)"
    r"|(?P<whole>\d+)[ \t](?P<numer>\d+)/(?P<den>\d+)(?![\d/])"
    r"|(?P<plain>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d{1,3}(?:[ \xa0\u2009\u202f]\d{3})+(?![-\d/])(?:\.\d+)?"
    r"|\d+(?:\.\d+)?|\.\d+))"
    r"|(?P<op>[-+*/×÷−])|(?P<open>\()|(?P<close>\))|(?P<word>[^\W\d_]+)|(?P<other>\S)"
)
_GROUP_SEPARATORS = str.maketrans("", "", ", \xa0\u2009\u202f")
_OPERATORS = {"-": "-", "−": "-", "+": "+", "*": "*", "×": "*", "x": "*", "X": "*", "/": "/", "÷": "/"}
_AST_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_MAX_MAGNITUDE = 100  # powers of ten: bigger values are no GSM8K answer, and would print as huge strings
_STATEMENT_END = re.compile(r"[.!?](?!\d)")  # "3.5" and "$1,000.00" do not end a sentence
_HASH_ANSWER_START = re.compile(r"[-−+]?\s*\(?\s*\$?\.?\d")  # "#### Step 2" is a heading, not an answer
MAX_STATEMENT_CHARS = 200
_DIGIT = re.compile(r"\d")
_SIMPLE_STATEMENT = re.compile(r"[ \t*_:#]*(-?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)[*_]*\.?[ \t]*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_MARKER_PADDING = " \t*_:#"
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)(\d)")  # LaTeX's brace-less "\frac12"
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_REPLACEMENTS = (("{,}", ","), ("\\$", "$"), ("\\%", "%"), ("\\,", ""), ("\\!", ""), ("\\times", "*"),
                       ("\\cdot", "*"), ("\\div", "/"))
_MARKER_NAMES = {"hash": "####", "boxed": "\\boxed", "answer_is": "'the answer is'"}


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


class _Marker(NamedTuple):  # a NamedTuple: built for every marker of every completion, and cheaper than a dataclass
    kind: str  # "hash", "boxed" or "answer_is"
    position: int  # where it starts in the cleaned completion
    values: tuple[str, ...]  # distinct canonical values its statement holds, in reading order (none: ignored)


def _clean_latex(text: str) -> str:
    """Rewrite the LaTeX number spellings models use ("1{,}000", "\\frac{1}{2}", "\\$5") as plain text."""
    if "\\" not in text and "{," not in text:
        return text  # fast path: almost every GSM8K completion
    for latex, plain in _LATEX_REPLACEMENTS:
        text = text.replace(latex, plain)
    # A space before the fraction, so "1\frac{2}{3}" reads as the mixed number "1 2/3", not as "12/3".
    text = _LATEX_FRAC_DIGITS.sub(r" \1/\2", _LATEX_FRAC.sub(r" \1/\2", text))
    return _LATEX_TEXT.sub(r" \1", text)


def _format_decimal(value: Decimal) -> str:
    """Shortest plain spelling: 15.50 -> "15.5", 1E+3 -> "1000", -0 -> "0"; every digit kept (the default context
    would round to 28)."""
    if value == 0:
        return "0"
    return format(value.normalize(Context(prec=max(28, len(value.as_tuple().digits)))), "f")


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


def _token_value(match: re.Match) -> Decimal | None:
    """The number a `_LINE_TOKEN` number match spells; None for "1 1/0"."""
    if match["sci"]:
        return Decimal(match["sci"])
    if match["whole"]:
        if int(match["den"]) == 0:
            return None
        return Decimal(match["whole"]) + Decimal(match["numer"]) / Decimal(match["den"])
    return Decimal(match["plain"].translate(_GROUP_SEPARATORS))


@functools.lru_cache(maxsize=1024)
def _parse_shape(shape: str) -> ast.expr | None:
    """The tree of an expression shape such as "n0 + n1 * ( n2 )" (numbers are names), or None if malformed."""
    try:
        return ast.parse(shape, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError):
        return None


def _evaluate(node: ast.expr, numbers: list[Decimal]) -> Decimal:
    """Walk the tree with a whitelist: our number names, unary +/-, and + - * /; anything else raises."""
    if isinstance(node, ast.Name):
        return numbers[int(node.id[1:])]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, numbers)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPERATORS:
        return _AST_OPERATORS[type(node.op)](_evaluate(node.left, numbers), _evaluate(node.right, numbers))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def _expression_values(tokens: list[tuple[str, object]]) -> list[Decimal]:
    """Values of one run of number/operator/parenthesis tokens: one if it is arithmetic, else each number alone."""
    while tokens and (tokens[0][0] == "close" or tokens[0][1] in ("*", "/")):
        tokens = tokens[1:]  # a dangling ")" or binary operator at the start
    while tokens and tokens[-1][0] in ("op", "open"):
        tokens = tokens[:-1]
    numbers = [value for kind, value in tokens if kind == "number"]
    if len(tokens) <= 2 and len(numbers) == 1:  # fast path: "72" or "-5"
        return [-numbers[0] if tokens[0][1] == "-" else numbers[0]]
    opens, closes = sum(kind == "open" for kind, _ in tokens), sum(kind == "close" for kind, _ in tokens)
    if opens != closes:
        tokens = [token for token in tokens if token[0] not in ("open", "close")]  # "(9" is 9
    names = iter(range(len(numbers)))
    shape = " ".join(f"n{next(names)}" if kind == "number" else str(value) for kind, value in tokens)
    tree = _parse_shape(shape) if numbers else None
    try:
        return [_evaluate(tree, numbers)] if tree is not None else numbers
    except ArithmeticError:  # "1/0" has no value
        return []
    except (ValueError, RecursionError):
        return numbers


def _line_tokens(text: str) -> list[tuple[str, object]]:
    """(kind, value) tokens; a "-" between two digits ("10-15"), a word and any other sign are "break"s."""
    tokens = []
    for match in _LINE_TOKEN.finditer(text[:MAX_STATEMENT_CHARS]):
        kind = match.lastgroup
        if kind in ("sci", "whole", "numer", "den", "plain"):
            value = _token_value(match)
            tokens.append(("break", None) if value is None else ("number", value))
        elif kind == "op":
            before, after = text[match.start() - 1 : match.start()], text[match.end() : match.end() + 1]
            is_range = match[0] == "-" and before.isdigit() and after.isdigit()
            tokens.append(("break", None) if is_range else ("op", _OPERATORS[match[0]]))
        elif kind in ("open", "close"):
            tokens.append((kind, match[0]))
        elif kind == "word" and match[0] in _OPERATORS:
            tokens.append(("op?", "*"))  # "3 x 4": an operator only between two operands
        else:
            tokens.append(("break", None))
    return tokens


def _statement_values(statement: str) -> tuple[str, ...]:
    """Distinct canonical values a marker's statement holds; one value when it is one number or expression."""
    if simple := _SIMPLE_STATEMENT.fullmatch(statement):  # fast path: "72", "$1,000.", "**-3.5**"
        return (_format_decimal(Decimal(simple[1] + simple[2].replace(",", ""))),)
    statement = statement.replace("**", " ").replace("__", " ").lstrip(_MARKER_PADDING)
    if (end := _STATEMENT_END.search(statement)) is not None:
        statement = statement[: end.start()]
    if _DIGIT.search(statement) is None:  # "The answer is not obvious yet." states nothing: no marker
        return ()
    for part in reversed(statement.split("=")):  # "0.5 hours = 30 minutes": the value after the last "="
        values = _part_values(_line_tokens(part))
        if values:
            return values
    return ()


def _part_values(tokens: list[tuple[str, object]]) -> tuple[str, ...]:
    """Split the tokens into expressions at breaks and where two operands meet ("72 (8)"), then evaluate each."""
    values, run = [], []
    for index, (kind, value) in enumerate(tokens):
        operand_before = bool(run) and run[-1][0] in ("number", "close")
        if kind == "op?":
            operand_after = index + 1 < len(tokens) and tokens[index + 1][0] in ("number", "open")
            kind = "op" if operand_before and operand_after else "break"
        starts_operand = kind in ("number", "open")
        if kind == "break" or (starts_operand and operand_before):  # "3, 4" or "72 (8 per week)": a new value
            values += _expression_values(run)
            run = []
        if kind != "break":
            run.append((kind, value))
    values += _expression_values(run)
    canonical = (_format_decimal(value) for value in values if abs(value.adjusted()) <= _MAX_MAGNITUDE)
    return tuple(dict.fromkeys(canonical))


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(start, contents) of every closed \\boxed{...}, nested braces balanced (\\boxed{\\frac{1}{2}}); one pass."""
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
    return sorted(contents)  # reading order; closing order puts inner boxes first


def _find_markers(kind: str, text: str, after: int) -> list[_Marker]:
    """Markers of one kind starting after `after` that state a value, in reading order."""
    if kind == "hash":
        found = [(m.start(), m[1]) for m in _HASH_MARKER.finditer(text, after)
                 if _HASH_ANSWER_START.match(m[1].lstrip(_MARKER_PADDING))]
    elif kind == "boxed":
        found = [box for box in _boxed_contents(text) if box[0] > after] if "boxed" in text or "fbox" in text else []
    else:
        found = [(m.start(), m[1]) for m in _ANSWER_IS.finditer(text, after)]
    markers = (_Marker(kind, position, _statement_values(statement)) for position, statement in found)
    return [marker for marker in markers if marker.values]


def _markers(text: str) -> list[_Marker]:
    """Markers by rank; once a kind is found, lower kinds are read only after its last marker (only a later
    statement can contradict the final answer), which also keeps the common "#### N" completion fast."""
    markers, after = [], 0
    for kind in _MARKER_NAMES:
        found = _find_markers(kind, text, after)
        if found and not markers:
            after = found[-1].position
        markers += found
    return markers


def _from_markers(same: list[_Marker], lower: list[_Marker]) -> Extraction:
    """The last marker of the top-ranked kind wins; flagged when it, an earlier one or a later lower one disagrees."""
    kind, last = same[-1].kind, same[-1]
    name = _MARKER_NAMES[kind]
    if len(last.values) > 1:
        return Extraction(None, kind, True, f"the {name} statement holds different values: {', '.join(last.values)}")
    value = last.values[0]
    if any(v != value for marker in same[:-1] for v in marker.values):
        stated = dict.fromkeys(v for marker in same for v in marker.values)
        return Extraction(value, kind, True, f"{len(same)} {name} markers give different values: {', '.join(stated)}")
    for later in lower:
        if later.position > last.position and later.values != (value,):
            said = ", ".join(later.values)
            reason = f"final answer {value} ({name}) is contradicted later: {_MARKER_NAMES[later.kind]} gives {said}"
            return Extraction(value, kind, True, reason)
    return Extraction(value, kind, False, "")


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
    markers = _markers(text)
    if not markers:
        return _from_last_number(text)
    kind = markers[0].kind  # the top-ranked kind found; the others are lower and later
    return _from_markers([m for m in markers if m.kind == kind], [m for m in markers if m.kind != kind])


def answers_match(extracted: str | None, gold: str) -> bool:
    """Numeric equality within 1e-6 (exact decimal arithmetic, so 1000000007 != 1000000008)."""
    if extracted is None:
        return False
    extracted_value, gold_value = canonical_number(extracted), canonical_number(gold)
    if extracted_value is None or gold_value is None:
        return False
    with localcontext(Context(prec=EXACT_PRECISION)):  # exact for any number the extractor returns
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
    """math-verify's independent verdict; False on any failure (or where it cannot finish), never raises.

    sympy evaluates a power tower ("9^{9^{9}}", "2^{2^{40}}") exactly: minutes of CPU and gigabytes of memory
    inside one big-integer operation, which no alarm interrupts. Such a completion is not verified at all. The
    timeouts math-verify offers use signal.alarm, which raises outside the main thread (TRL's async reward loop,
    dataloader workers): they are on in the main thread (the baseline, evaluate and validation passes) only.
    """
    tail = completion[-MATH_VERIFY_MAX_CHARS:]
    if _UNBOUNDED_POWER.search(tail):
        return False
    timeout = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import parse, verify  # imported lazily: sympy import costs ~1 s

        gold_parsed = parse(normalize_gold(gold), parsing_timeout=timeout)
        predicted = parse(tail, parsing_timeout=timeout)
        if not gold_parsed or not predicted:
            return False
        return bool(verify(gold_parsed, predicted, timeout_seconds=timeout))
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
