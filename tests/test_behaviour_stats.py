"""The rewarded behaviours beside accuracy (issue 13 part 3): full-format rate, share under reward.min_tokens and
mean completion length, tested before vs after with accuracy's machinery, and the "degenerate answers" verdict.

    python -m pytest tests/test_behaviour_stats.py -q

Known counts give known p-values, computed here independently (the pooled formula by hand, scipy's paired t).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from grpo_gsm8k.science import stats as st
from grpo_gsm8k.science import analysis

ALPHA = 0.05
FULL = "Six apples.\n#### 6"  # all three format parts
PARTIAL = "#### 6 apples"  # a #### line, but words after the number
NONE = "The answer is 6."


def pooled_p(x_tuned: int, n_tuned: int, x_base: int, n_base: int) -> float:
    pooled = (x_tuned + x_base) / (n_tuned + n_base)
    z = (x_tuned / n_tuned - x_base / n_base) / math.sqrt(pooled * (1 - pooled) * (1 / n_tuned + 1 / n_base))
    return math.erfc(abs(z) / math.sqrt(2))


def records(completions: list[str], tokens: list[int], correct: list[bool], samples: int = 1) -> list[dict]:
    """One record per answer; question i // samples, sample i % samples."""
    return [{"qid": i // samples, "sample": i % samples, "completion": c, "n_tokens": n, "correct": ok}
            for i, (c, n, ok) in enumerate(zip(completions, tokens, correct, strict=True))]


def behaviours(base: list[dict], tuned: list[dict], min_tokens: int = 50) -> dict:
    accuracy = analysis.core_tests(base, tuned, analysis.GRADINGS["primary"], ALPHA, 300, 0)
    return analysis.behaviour_tests(base, tuned, accuracy, min_tokens, ALPHA, 300, 0)


@pytest.mark.parametrize("text, full", [
    (FULL, True),
    ("Work.\n#### -3.5\n\n", True),   # trailing blank lines still end on the #### line
    (PARTIAL, False),                 # (b) fails
    ("#### 6\nDone.", False),         # (c) fails: a line after it
    (NONE, False),                    # no #### at all
])
def test_full_format_is_every_part_of_the_format_reward(text, full):
    assert analysis.full_format({"completion": text}) is full


@pytest.mark.parametrize("full_base, full_tuned, n", [
    (2, 8, 10),    # the demo's pattern: the format is learned
    (5, 5, 20),    # no change
    (12, 3, 40),   # fewer formatted after training
])
def test_full_format_rate_gets_the_pooled_z_test_of_its_counts(full_base, full_tuned, n):
    base = records([FULL] * full_base + [PARTIAL] * (n - full_base), [80] * n, [False] * n)
    tuned = records([FULL] * full_tuned + [NONE] * (n - full_tuned), [80] * n, [False] * n)
    rows = behaviours(base, tuned)["full_format"]
    assert rows["counts"] == {"base": {"count": full_base, "total": n}, "tuned": {"count": full_tuned, "total": n}}
    assert rows["two_proportion"]["p"] == pytest.approx(pooled_p(full_tuned, n, full_base, n), abs=1e-4)
    assert rows["wilson"]["tuned"] == st.wilson_interval(full_tuned, n, ALPHA)


@pytest.mark.parametrize("base_tokens, tuned_tokens, min_tokens, short_base, short_tuned", [
    ([60, 70, 80, 49, 90, 100], [10, 20, 49, 50, 51, 12], 50, 1, 4),  # 49 is short, 50 is not: the reward's gate
    ([5] * 6, [5] * 6, 4, 0, 0),                                          # nothing under a gate of 4
])
def test_short_share_counts_answers_under_the_reward_gate(base_tokens, tuned_tokens, min_tokens, short_base,
                                                           short_tuned):
    n = len(base_tokens)
    result = behaviours(records([FULL] * n, base_tokens, [False] * n), records([FULL] * n, tuned_tokens, [False] * n),
                        min_tokens)["short"]
    assert result["counts"]["base"]["count"] == short_base and result["counts"]["tuned"]["count"] == short_tuned
    assert result["min_tokens"] == min_tokens
    if short_base + short_tuned:
        assert result["two_proportion"]["p"] == pytest.approx(pooled_p(short_tuned, n, short_base, n), abs=1e-4)
    else:
        assert result["two_proportion"]["p"] == 1.0  # both 0%: no evidence of a difference


def test_mean_length_is_a_paired_test_of_per_question_means():
    # 4 questions x 2 samples; per-question means base (100, 60, 210, 40), tuned (30, 50, 80, 45)
    base = records([FULL] * 8, [90, 110, 60, 60, 200, 220, 30, 50], [False] * 8, samples=2)
    tuned = records([FULL] * 8, [20, 40, 50, 50, 70, 90, 45, 45], [False] * 8, samples=2)
    result = behaviours(base, tuned)["length"]
    t, p = scipy_stats.ttest_rel([30, 50, 80, 45], [100, 60, 210, 40])
    assert result["per_question"]["t"] == pytest.approx(t) and result["per_question"]["p_t"] == pytest.approx(p)
    assert result["means"] == {"base": 102.5, "tuned": 51.25}
    assert result["bootstrap"]["diff"] == pytest.approx(51.25 - 102.5)
    assert result["verdict"]["p"] == pytest.approx(p)


def test_cluster_bootstrap_mean_resamples_whole_questions():
    sums, counts = np.array([10.0, 40.0, 90.0]), np.array([1, 2, 3])
    result = st.cluster_bootstrap_mean(sums, counts, sums / 2, counts, 400, seed=3)
    idx = np.random.default_rng(3).integers(0, 3, size=(400, 3))  # the same draws, by hand
    base = sums[idx].sum(1) / counts[idx].sum(1)
    assert result["base"]["low"] == pytest.approx(np.quantile(base, 0.025))
    assert result["ci_low"] == pytest.approx(np.quantile(base / 2 - base, 0.025))
    assert result["diff"] == pytest.approx(140 / 6 / 2 - 140 / 6) and result["note"] == ""


def test_cluster_bootstrap_mean_flags_a_point_interval():
    result = st.cluster_bootstrap_mean([20, 40], [2, 4], [30, 50], [1, 2], 100, seed=0)
    assert "same base mean (10)" in result["note"] and result["base"] == {"low": 10.0, "high": 10.0}


@pytest.mark.parametrize("per_question, expected", [
    ({"p_t": 0.03, "p_wilcoxon": 0.2}, (0.03, "paired t-test")),
    ({"p_t": float("nan"), "p_wilcoxon": 0.001}, (0.001, "Wilcoxon signed-rank test")),  # every question +1
    ({"p_t": None, "p_wilcoxon": None}, (None, "Wilcoxon signed-rank test")),
])
def test_per_question_p_falls_back_to_wilcoxon_where_t_is_undefined(per_question, expected):
    assert st.per_question_p(per_question) == expected


def test_every_question_formatted_after_is_significant():
    # 0% -> 100% on 20 questions: every difference is +1, t is undefined, the Wilcoxon test decides
    base = records([NONE] * 20, [80] * 20, [False] * 20)
    tuned = records([FULL] * 20, [80] * 20, [False] * 20)
    verdict = behaviours(base, tuned)["full_format"]["verdict"]
    assert verdict["significant"] and verdict["direction"] == 1 and verdict["p"] < 1e-4


@pytest.mark.parametrize("diff, p, significant, direction", [
    (0.5, 0.01, True, 1),
    (-30.0, 0.001, True, -1),
    (0.5, 0.05, False, 0),     # p must be below alpha
    (0.0, 0.0, False, 0),      # no change is never a change
    (0.2, None, False, 0),     # undefined p
    (None, 0.01, False, 0),
])
def test_verdict(diff, p, significant, direction):
    result = st.verdict(diff, p, ALPHA)
    assert (result["significant"], result["direction"]) == (significant, direction)


def v(direction: int) -> dict:
    return {"direction": direction}


@pytest.mark.parametrize("accuracy, length, short, formatted, degenerate", [
    (v(0), v(-1), v(1), v(1), True),    # the GPU run: shorter, formatted, accuracy flat
    (v(0), v(0), v(0), v(1), True),     # more formatted only
    (v(0), v(0), v(1), v(0), True),     # more answers under the gate
    (v(-1), v(-1), v(0), v(0), True),   # shorter and worse
    (v(1), v(-1), v(1), v(1), False),   # shorter and formatted, but accuracy rose: it learned
    (v(0), v(1), v(0), v(0), False),    # longer: not the short-answer collapse
    (v(0), v(0), v(-1), v(-1), False),  # less formatted, fewer short answers
])
def test_degenerate_shift(accuracy, length, short, formatted, degenerate):
    assert st.degenerate_shift(accuracy, length, short, formatted)["degenerate"] is degenerate


def test_stage_flags_short_formatted_answers_without_accuracy_gain():
    n = 30
    base = records([NONE] * n, [200 + i for i in range(n)], [i < 2 for i in range(n)])
    tuned = records([FULL] * n, [20 + i % 7 for i in range(n)], [i < 3 for i in range(n)])
    result = behaviours(base, tuned)
    assert result["degenerate"] == {"shorter": True, "more_formatted": True, "accuracy_improved": False,
                                    "degenerate": True}
    learned = records([FULL] * n, [20 + i % 7 for i in range(n)], [i < 25 for i in range(n)])
    assert behaviours(base, learned)["degenerate"]["degenerate"] is False
