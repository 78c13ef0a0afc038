"""Tests for grpo_gsm8k.science.stats: every statistic against an independent hand computation, plus degenerate data.

    python -m pytest tests/test_stats.py -q
"""
import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats as scipy_stats
from statsmodels.stats.inter_rater import cohens_kappa as sm_cohens_kappa

from grpo_gsm8k.science import stats as st


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


@pytest.mark.parametrize("x_tuned, n_tuned, x_base, n_base", [
    (92, 100, 73, 100),  # the study
    (30, 50, 20, 50),
    (5, 40, 1, 40),
    (10, 120, 30, 200),  # tuned worse, unequal sizes
])
def test_two_proportion_matches_pooled_formula(x_tuned, n_tuned, x_base, n_base):
    pooled = (x_tuned + x_base) / (n_tuned + n_base)
    z = (x_tuned / n_tuned - x_base / n_base) / math.sqrt(pooled * (1 - pooled) * (1 / n_tuned + 1 / n_base))
    result = st.two_proportion_ztest(x_tuned, n_tuned, x_base, n_base)
    assert result["z"] == pytest.approx(z, rel=1e-9)
    assert abs(result["p"] - normal_two_sided_p(z)) < 1e-4


def test_two_proportion_reproduces_the_study_p_value():
    assert abs(st.two_proportion_ztest(92, 100, 73, 100)["p"] - 0.0004) < 1e-4


@pytest.mark.parametrize("x, n", [(0, 100), (100, 100)])
def test_two_proportion_with_zero_variance_reports_p_one(x, n):
    result = st.two_proportion_ztest(x, n, x, n)
    assert math.isnan(result["z"]) and result["p"] == 1.0 and result["note"]


@pytest.mark.parametrize("successes, n, alpha", [(73, 100, 0.05), (92, 100, 0.05), (0, 20, 0.05), (20, 20, 0.05),
                                                 (1, 3, 0.1)])
def test_wilson_interval_matches_closed_form(successes, n, alpha):
    z = scipy_stats.norm.ppf(1 - alpha / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    interval = st.wilson_interval(successes, n, alpha)
    assert interval["low"] == pytest.approx(centre - half, abs=1e-12)
    assert interval["high"] == pytest.approx(centre + half, abs=1e-12)


@pytest.mark.parametrize("n", range(1, 200))
def test_wilson_interval_holds_its_own_proportion_at_0_and_100_percent(n):
    """Rounding put the interval's end a hair past 0/n or n/n for some n (7, 9, 14, 18, 20, ...): the accuracy
    figure's error bars went negative and the stats stage crashed on an all-wrong or all-right set."""
    for successes in (0, n):
        interval = st.wilson_interval(successes, n)
        assert 0.0 <= interval["low"] <= successes / n <= interval["high"] <= 1.0, (successes, n, interval)


def test_power_when_accuracy_flips_from_0_to_100_percent_is_reported_not_raised():
    result = st.power_analysis(0.0, 1.0, 5, 0.0, 20)
    assert result["questions_needed"] is None and result["note"], result


@pytest.mark.parametrize("seed, n", [(0, 20), (1, 5), (2, 40)])
def test_paired_t_matches_hand_formula(seed, n):
    rng = np.random.default_rng(seed)
    base, tuned = rng.integers(0, 6, n) / 5, rng.integers(0, 6, n) / 5
    diff = tuned - base
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(n))
    p = 2 * scipy_stats.t.sf(abs(t), df=n - 1)
    result = st.paired_tests(base, tuned)
    assert result["t"] == pytest.approx(t, rel=1e-9)
    assert result["p_t"] == pytest.approx(p, rel=1e-9)
    assert result["mean_diff"] == pytest.approx(diff.mean())


def test_wilcoxon_with_ties_and_zeros_matches_tie_corrected_normal_approximation():
    # 20 questions scored in fifths: many ties and zero differences, the normal case for the study's design.
    base = np.array([3, 2, 4, 5, 1, 0, 2, 3, 4, 4, 2, 1, 3, 5, 0, 2, 3, 4, 1, 2]) / 5
    tuned = np.array([4, 4, 4, 5, 3, 1, 3, 5, 5, 3, 4, 2, 3, 5, 2, 4, 4, 5, 3, 2]) / 5
    d = (tuned - base)[tuned != base]
    ranks = scipy_stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    n = d.size
    _, tie_sizes = np.unique(np.abs(d), return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24 - (tie_sizes ** 3 - tie_sizes).sum() / 48
    z = (w_plus - n * (n + 1) / 4) / math.sqrt(variance)
    result = st.paired_tests(base, tuned)
    assert result["wilcoxon_method"] == "asymptotic"
    assert result["wilcoxon_stat"] == pytest.approx(min(w_plus, ranks[d < 0].sum()))
    assert result["p_wilcoxon"] == pytest.approx(normal_two_sided_p(z), rel=1e-9)
    assert "zero difference" in result["note_wilcoxon"]


# base scores, tuned scores, expected p_t (None = NaN), expected p_wilcoxon (None = NaN)
DEGENERATE_PAIRS = [
    ([0.0] * 20, [0.0] * 20, 1.0, 1.0),  # all wrong in both models (the CPU demo's usual result)
    ([1.0] * 20, [1.0] * 20, 1.0, 1.0),  # all correct
    ([0.0] * 10, [0.2] * 10, None, "any"),  # every question +0.2: zero variance, t undefined
    ([0.4], [0.8], None, "any"),  # one question
]


@pytest.mark.parametrize("base, tuned, p_t, p_w", DEGENERATE_PAIRS)
def test_paired_tests_on_degenerate_data_do_not_crash(base, tuned, p_t, p_w):
    result = st.paired_tests(base, tuned)
    assert math.isnan(result["t"]) and result["note_t"]
    assert math.isnan(result["p_t"]) if p_t is None else result["p_t"] == p_t
    if p_w != "any":
        assert result["p_wilcoxon"] == p_w and result["note_wilcoxon"]


@pytest.mark.parametrize("only_base, only_tuned", [(0, 5), (2, 8), (3, 3), (0, 0), (1, 10), (7, 0)])
def test_mcnemar_exact_matches_binomial_closed_form(only_base, only_tuned):
    both, neither = 4, 6
    base = [True] * both + [True] * only_base + [False] * only_tuned + [False] * neither
    tuned = [True] * both + [False] * only_base + [True] * only_tuned + [False] * neither
    n = only_base + only_tuned
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_base, only_tuned) + 1)) / 2 ** n)
    result = st.mcnemar_exact(base, tuned)
    assert (result["both"], result["only_base"], result["only_tuned"], result["neither"]) == (
        both, only_base, only_tuned, neither)
    assert result["p"] == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("correct, n, expected", [
    ([3, 2, 5, 0], [5, 5, 5, 5], [True, False, True, False]),
    ([2, 1], [4, 4], [False, False]),  # an even split is not a majority
    ([1], [1], [True]),
])
def test_majority_correct(correct, n, expected):
    assert st.majority_correct(correct, n).tolist() == expected


def independent_questions(n_questions: int, p_base: float, p_tuned: float, seed: int):
    rng = np.random.default_rng(seed)
    base = (rng.random(n_questions) < p_base).astype(int)
    tuned = (rng.random(n_questions) < p_tuned).astype(int)
    ones = np.ones(n_questions, int)
    return base, ones, tuned, ones


def test_cluster_bootstrap_is_seeded():
    data = independent_questions(20, 0.4, 0.7, seed=3)
    first, again = st.cluster_bootstrap(*data, 300, seed=7), st.cluster_bootstrap(*data, 300, seed=7)
    other = st.cluster_bootstrap(*data, 300, seed=8)
    assert first == again
    assert (first["ci_low"], first["ci_high"], first["base"]) != (other["ci_low"], other["ci_high"], other["base"])


def test_cluster_bootstrap_matches_wald_on_independent_answers():
    base, base_n, tuned, tuned_n = independent_questions(400, 0.3, 0.5, seed=11)
    p_b, p_t = base.mean(), tuned.mean()
    half = 1.959964 * math.sqrt(p_b * (1 - p_b) / 400 + p_t * (1 - p_t) / 400)
    result = st.cluster_bootstrap(base, base_n, tuned, tuned_n, 4000, seed=0)
    assert result["diff"] == pytest.approx(p_t - p_b)
    assert result["ci_low"] == pytest.approx(p_t - p_b - half, abs=0.02)
    assert result["ci_high"] == pytest.approx(p_t - p_b + half, abs=0.02)
    half_base = 1.959964 * math.sqrt(p_b * (1 - p_b) / 400)
    assert result["base"]["low"] == pytest.approx(p_b - half_base, abs=0.015)


def test_cluster_bootstrap_keeps_each_questions_pair_together():
    # Tuned = base + 1 on every question: resampling questions (not models separately) leaves no spread at all.
    rng = np.random.default_rng(4)
    base = rng.integers(0, 4, 30)
    result = st.cluster_bootstrap(base, np.full(30, 5), base + 1, np.full(30, 5), 500, seed=0)
    assert result["ci_low"] == pytest.approx(0.2) and result["ci_high"] == pytest.approx(0.2)
    assert result["base"]["high"] - result["base"]["low"] > 0.1


def test_cluster_bootstrap_weights_questions_by_their_samples():
    # Unequal samples per question: accuracy is pooled answers, not the mean of per-question scores.
    result = st.cluster_bootstrap([1, 0], [1, 3], [2, 3], [2, 3], 100, seed=0)
    assert result["diff"] == pytest.approx(5 / 5 - 1 / 4)


def test_cluster_bootstrap_with_one_question_is_a_point():
    result = st.cluster_bootstrap([2], [5], [4], [5], 200, seed=0)
    assert result["ci_low"] == result["ci_high"] == pytest.approx(0.4) and "one question" in result["note"]


def long_format(base_by_question, tuned_by_question):
    """Per-answer arrays (correct, tuned flag, question) from per-question 0/1 lists."""
    y, x, g = [], [], []
    for flag, table in ((0, base_by_question), (1, tuned_by_question)):
        for qid, answers in enumerate(table):
            y += list(answers)
            x += [flag] * len(answers)
            g += [qid] * len(answers)
    return np.array(y), np.array(x), np.array(g)


@pytest.mark.parametrize("samples, seed", [(1, 0), (1, 1), (5, 2)])
def test_gee_reduces_to_the_log_odds_ratio_of_ordinary_logistic_regression(samples, seed):
    # A saturated mean model on balanced clusters solves to the marginal proportions whatever the working
    # correlation, so the coefficient is the plain log odds ratio (k=1 is the ordinary-logistic case).
    rng = np.random.default_rng(seed)
    base = (rng.random((40, samples)) < 0.4).astype(int)
    tuned = (rng.random((40, samples)) < 0.7).astype(int)
    y, x, g = long_format(base, tuned)
    p_b, p_t = base.mean(), tuned.mean()
    log_or = math.log(p_t / (1 - p_t)) - math.log(p_b / (1 - p_b))
    logit = sm.Logit(y, sm.add_constant(x.astype(float))).fit(disp=0)
    result = st.gee_logistic(y, x, g)
    assert result["log_odds_ratio"] == pytest.approx(log_or, abs=1e-6)
    assert result["log_odds_ratio"] == pytest.approx(logit.params[1], abs=1e-6)
    assert result["odds_ratio"] == pytest.approx(math.exp(log_or), rel=1e-6)
    assert result["ci_low"] < result["odds_ratio"] < result["ci_high"] and 0 < result["p"] < 1
    assert result["converged"] and result["note"] == ""


@pytest.mark.parametrize("base, tuned, reason", [
    ([[0] * 5] * 20, [[0] * 5] * 20, "separation"),  # all wrong
    ([[1] * 5] * 20, [[1] * 5] * 20, "separation"),  # all correct
    ([[0] * 5] * 20, [[1, 0, 0, 0, 0]] * 2 + [[0] * 5] * 18, "separation"),  # the CPU demo: base 0%, tuned 2%
    ([[1, 0, 1, 0, 0]], [[1, 1, 1, 0, 1]], "fewer than 2 questions"),
])
def test_gee_on_degenerate_data_reports_why(base, tuned, reason):
    result = st.gee_logistic(*long_format(base, tuned))
    assert math.isnan(result["odds_ratio"]) and math.isnan(result["p"]) and not result["converged"]
    assert reason in result["note"]


def test_gee_records_a_fitting_failure(monkeypatch):
    def broken_fit(self, *args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(sm.GEE, "fit", broken_fit)
    y, x, g = long_format([[1, 0, 1]] * 6, [[1, 1, 0]] * 6)
    result = st.gee_logistic(y, x, g)
    assert math.isnan(result["odds_ratio"]) and "LinAlgError: Singular matrix" in result["note"]


def test_gee_records_non_convergence(monkeypatch):
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    original = sm.GEE.fit

    def warning_fit(self, *args, **kwargs):
        import warnings
        warnings.warn("Iteration limit reached prior to convergence", ConvergenceWarning)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sm.GEE, "fit", warning_fit)
    y, x, g = long_format([[1, 0, 1]] * 6, [[1, 1, 0]] * 6 + [[1, 1, 1]])
    result = st.gee_logistic(y, x, g)
    assert not result["converged"] and "Iteration limit" in result["note"]


@pytest.mark.parametrize("seed, k", [(0, 5), (1, 3), (2, 8)])
def test_icc_matches_anova_f_on_balanced_clusters(seed, k):
    rng = np.random.default_rng(seed)
    cluster_p = rng.uniform(0.1, 0.9, 25)
    clusters = [(rng.random(k) < p).astype(float) for p in cluster_p]
    f = scipy_stats.f_oneway(*clusters).statistic
    result = st.icc_anova(clusters, ["base"] * len(clusters))
    assert result["raw"] == pytest.approx((f - 1) / (f + k - 1), rel=1e-9)
    assert result["icc"] == max(0.0, result["raw"])


def test_icc_ignores_the_difference_between_models():
    rng = np.random.default_rng(5)
    clusters = [(rng.random(4) < p).astype(float) for p in rng.uniform(0.1, 0.9, 15)]
    alone = st.icc_anova(clusters, ["base"] * 15)
    shifted = st.icc_anova(clusters + [c + 0.5 for c in clusters], ["base"] * 15 + ["tuned"] * 15)
    assert shifted["raw"] == pytest.approx(alone["raw"], rel=1e-9)


@pytest.mark.parametrize("clusters, strata", [
    ([[1.0], [0.0], [1.0]], ["b", "b", "b"]),  # one sample per question: no within-question variance
    ([[1.0, 0.0, 1.0]], ["b"]),  # one question
    ([[0.0] * 5] * 4, ["b"] * 4),  # all wrong
])
def test_icc_degenerate_is_zero_with_a_note(clusters, strata):
    result = st.icc_anova(clusters, strata)
    assert result["icc"] == 0.0 and result["note"]


def hand_questions_needed(p_base, p_tuned, k, icc, alpha, power):
    h = 2 * math.asin(math.sqrt(p_tuned)) - 2 * math.asin(math.sqrt(p_base))
    z_a, z_b = scipy_stats.norm.ppf(1 - alpha / 2), scipy_stats.norm.ppf(power)
    n_per_group = 2 * ((z_a + z_b) / h) ** 2  # var(2 asin sqrt p) = 1/n per group, two groups
    return n_per_group, n_per_group * (1 + (k - 1) * icc) / k


@pytest.mark.parametrize("p_base, p_tuned, k, icc, alpha, power", [
    (0.45, 0.65, 1, 0.0, 0.05, 0.8),
    (0.73, 0.92, 5, 0.0, 0.05, 0.8),
    (0.73, 0.92, 5, 0.3, 0.05, 0.8),
    (0.02, 0.10, 5, 0.1, 0.05, 0.9),
])
def test_power_matches_normal_formula_with_design_effect(p_base, p_tuned, k, icc, alpha, power):
    n_eff, questions = hand_questions_needed(p_base, p_tuned, k, icc, alpha, power)
    result = st.power_analysis(p_base, p_tuned, k, icc, 20, alpha, power)
    assert result["design_effect"] == pytest.approx(1 + (k - 1) * icc)
    assert result["effective_n_needed"] == pytest.approx(n_eff, rel=1e-3)
    assert result["questions_needed"] == math.ceil(questions - 1e-6)


def test_power_matches_cohen_table():
    # Cohen (1988) table 6.4.1: h = 0.40, two-sided alpha 0.05, power 0.80 -> n = 98 per group.
    p_base = 0.3
    p_tuned = math.sin((0.40 + 2 * math.asin(math.sqrt(p_base))) / 2) ** 2  # makes h exactly 0.40
    result = st.power_analysis(p_base, p_tuned, 1, 0.0, 98)
    assert result["effect_size_h"] == pytest.approx(0.40)
    assert result["questions_needed"] in (98, 99)
    assert result["achieved_power"] == pytest.approx(0.80, abs=0.005)


def test_achieved_power_brackets_the_questions_needed():
    result = st.power_analysis(0.73, 0.92, 5, 0.2, 20)
    needed = result["questions_needed"]
    assert st.power_analysis(0.73, 0.92, 5, 0.2, needed)["achieved_power"] >= 0.8
    assert st.power_analysis(0.73, 0.92, 5, 0.2, needed - 1)["achieved_power"] < 0.8


def test_power_with_no_difference_needs_no_finite_sample():
    result = st.power_analysis(0.0, 0.0, 5, 0.0, 20)
    assert result["questions_needed"] is None and result["achieved_power"] == pytest.approx(0.05)
    assert result["note"]


@pytest.mark.parametrize("a, b", [
    ([1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 1]),
    ([1] * 10 + [0] * 90, [1] * 8 + [0] * 92),
    ([1, 0, 1, 0], [0, 1, 0, 1]),  # perfect disagreement
])
def test_cohens_kappa_matches_statsmodels(a, b):
    a, b = np.array(a, bool), np.array(b, bool)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    result = st.cohens_kappa(a, b)
    assert result["agreement"] == pytest.approx(np.mean(a == b))
    assert result["kappa"] == pytest.approx(sm_cohens_kappa(table).kappa, abs=1e-12)


def test_cohens_kappa_undefined_when_every_label_is_the_same():
    result = st.cohens_kappa([False] * 50, [False] * 50)
    assert result["agreement"] == 1.0 and math.isnan(result["kappa"]) and result["note"]


@pytest.mark.parametrize("x_tuned, x_base, warns", [(4, 0, True), (92, 73, False), (10, 3, False)])
def test_two_proportion_flags_small_expected_counts(x_tuned, x_base, warns):
    assert bool(st.two_proportion_ztest(x_tuned, 100, x_base, 100)["note"]) == warns


def test_cluster_bootstrap_flags_a_model_at_zero():
    result = st.cluster_bootstrap([0] * 20, [5] * 20, [1] + [0] * 19, [5] * 20, 100, seed=0)
    assert result["base"] == {"low": 0.0, "high": 0.0} and "base scored 0%" in result["note"]


# Between-seed spread, by hand; t quantiles from a printed table: t(0.975; 1) = 12.7062, t(0.975; 2) = 4.3027,
# t(0.95; 3) = 2.3534.
@pytest.mark.parametrize("values, alpha, expected, note", [
    # mean 0.2; sd = sqrt((0.01 + 0 + 0.01) / 2) = 0.1; half width 4.3027 * 0.1 / sqrt(3) = 0.24841
    ([0.1, 0.2, 0.3], 0.05, (3, 0.2, 0.1, 0.1, 0.3, -0.04841, 0.44841, 2), ""),
    # differences of the variants test: 0.4, 0.2, 0.5; mean 0.36667, sd sqrt(0.046667 / 2) = 0.15275, half 0.37946
    ([0.4, 0.2, 0.5], 0.05, (3, 0.36667, 0.15275, 0.2, 0.5, -0.01279, 0.74612, 2), ""),
    # 4 seeds at alpha 0.1: mean 0.2, sd sqrt(4 * 0.01 / 3) = 0.11547, half 2.3534 * 0.11547 / 2 = 0.13587
    ([0.1, 0.3, 0.1, 0.3], 0.1, (4, 0.2, 0.11547, 0.1, 0.3, 0.06413, 0.33587, 3), ""),
    # 2 seeds: sd 0.5 / sqrt(2) = 0.35355, half 12.7062 * 0.35355 / sqrt(2) = 3.17655: honest, and wide
    ([0.0, 0.5], 0.05, (2, 0.25, 0.35355, 0.0, 0.5, -2.92655, 3.42655, 1), "1 degree of freedom"),
    ([-0.05, -0.05, -0.05], 0.05, (3, -0.05, 0.0, -0.05, -0.05, -0.05, -0.05, 2), "the same value"),
    ([0.4], 0.05, (1, 0.4, math.nan, 0.4, 0.4, math.nan, math.nan, 0), "1 seed"),
])
def test_between_seed_spread_matches_hand_computation(values, alpha, expected, note):
    result = st.between_seed_spread(values, alpha)
    keys = ("n", "mean", "sd", "min", "max", "low", "high", "df")
    assert tuple(result[k] for k in keys) == pytest.approx(expected, abs=1e-4, nan_ok=True)
    assert (note in result["note"]) if note else result["note"] == ""
