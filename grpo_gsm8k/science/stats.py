"""Pure statistics for comparing the base and the GRPO-tuned model on one evaluation sample.

Every function takes plain numbers or numpy arrays and returns a dict of plain floats (NaN where a statistic is
undefined, with a `note` saying why), so zero-heavy data (the CPU demo scores ~2%) never raises. The stage that
reads the completions and writes the results is `python -m stages.stats --help`.

Conventions: differences are tuned - base; tests are two-sided; a question is "majority correct" when more than
half of its samples are correct (with an even number of samples a tie counts as not correct).
Why over 300 lines: one small function per statistical test or summary, each checked against an independent
computation in tests/test_stats.py; they share the conventions above (NaN p-values with a note, seeded bootstraps).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

NAN = float("nan")
# Bootstrap replicates are drawn in blocks so a 1,319-question set x 10,000 replicates stays small in memory.
BOOTSTRAP_BLOCK = 1000


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> dict:
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    # At 0/n and n/n the closed form lands a rounding error past the proportion (1e-17 above 0, 1 - 1e-16 below 1)
    # for some n; the interval always holds its own proportion.
    proportion = successes / n
    return {"low": min(float(low), proportion), "high": max(float(high), proportion)}


def two_proportion_ztest(x_tuned: int, n_tuned: int, x_base: int, n_base: int) -> dict:
    """Pooled two-proportion z-test, as in the study (treats every answer as independent)."""
    from statsmodels.stats.proportion import proportions_ztest

    pooled = (x_tuned + x_base) / (n_tuned + n_base)
    if pooled in (0.0, 1.0):
        # Pooled variance is zero: both models identical at 0% or 100%, so there is no evidence of a difference.
        return {"z": NAN, "p": 1.0, "note": f"all answers {'correct' if pooled else 'wrong'} in both models: "
                                           "z undefined, p set to 1"}
    z, p = proportions_ztest([x_tuned, x_base], [n_tuned, n_base])
    smallest = min(pooled, 1 - pooled) * min(n_tuned, n_base)
    note = (f"smallest expected count {smallest:.1f} < 5: the normal approximation is unreliable, "
            "prefer the exact McNemar test and the Wilson intervals") if smallest < 5 else ""
    return {"z": float(z), "p": float(p), "note": note}


def paired_tests(base_scores: Sequence[float], tuned_scores: Sequence[float]) -> dict:
    """Paired t-test and Wilcoxon signed-rank test on per-question scores (one pair per question)."""
    diff = np.asarray(tuned_scores, float) - np.asarray(base_scores, float)
    result = {"n": int(diff.size), "mean_diff": float(diff.mean()) if diff.size else NAN}
    result.update(_paired_t(diff))
    result.update(_wilcoxon(diff))
    return result


def _paired_t(diff: np.ndarray) -> dict:
    if diff.size < 2:
        return {"t": NAN, "p_t": NAN, "note_t": f"{diff.size} question(s): t-test needs at least 2"}
    if np.all(diff == 0):
        return {"t": NAN, "p_t": 1.0, "note_t": "every question scored the same in both models: t undefined, "
                                                "p set to 1"}
    if np.all(diff == diff[0]):
        return {"t": NAN, "p_t": NAN, "note_t": "every question changed by the same amount (zero variance): "
                                                "t undefined"}
    t, p = scipy_stats.ttest_rel(diff, np.zeros_like(diff))
    return {"t": float(t), "p_t": float(p), "note_t": ""}


def _wilcoxon(diff: np.ndarray) -> dict:
    nonzero = diff[diff != 0]
    if nonzero.size == 0:
        return {"wilcoxon_stat": NAN, "p_wilcoxon": 1.0, "wilcoxon_method": "none",
                "note_wilcoxon": "no question changed score: statistic undefined, p set to 1"}
    ties = np.unique(np.abs(nonzero)).size < nonzero.size
    # Mirrors scipy's "auto" (n counts the zeros, which "wilcox" then drops): normal approximation above 50
    # questions, else the exact null distribution without ties/zeros, else an exhaustive permutation up to 13.
    if diff.size > 50:
        method = "asymptotic"
    elif not ties and nonzero.size == diff.size:
        method = "exact"
    else:
        method = "permutation" if diff.size <= 13 else "asymptotic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy_stats.wilcoxon(diff, zero_method="wilcox", method="auto")
    return {"wilcoxon_stat": float(res.statistic), "p_wilcoxon": float(res.pvalue), "wilcoxon_method": method,
            "note_wilcoxon": f"{diff.size - nonzero.size} zero difference(s) dropped" if nonzero.size < diff.size
            else ""}


def majority_correct(correct: Sequence[int], n: Sequence[int]) -> np.ndarray:
    return np.asarray(correct) * 2 > np.asarray(n)


def mcnemar_exact(base_majority: Sequence[bool], tuned_majority: Sequence[bool]) -> dict:
    """Exact McNemar test on per-question majority-correct pairs (binomial test on the discordant pairs)."""
    from statsmodels.stats.contingency_tables import mcnemar

    base, tuned = np.asarray(base_majority, bool), np.asarray(tuned_majority, bool)
    both, neither = int(np.sum(base & tuned)), int(np.sum(~base & ~tuned))
    only_base, only_tuned = int(np.sum(base & ~tuned)), int(np.sum(~base & tuned))
    res = mcnemar([[both, only_base], [only_tuned, neither]], exact=True)
    return {"both": both, "only_base": only_base, "only_tuned": only_tuned, "neither": neither,
            "statistic": float(res.statistic), "p": float(res.pvalue),
            "note": "" if only_base + only_tuned else "no discordant questions: p is 1"}


def gee_logistic(correct: Sequence[int], tuned: Sequence[int], cluster: Sequence[int], alpha: float = 0.05) -> dict:
    """Logistic GEE of correctness on model (tuned=1) with the question as cluster and exchangeable correlation.

    Reports the odds ratio with a Wald interval from the robust (sandwich) standard error. Never raises: a model
    that cannot be estimated (separation, one cluster, no convergence) gives NaNs and the reason in `note`.
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    y, x, groups = np.asarray(correct, float), np.asarray(tuned, float), np.asarray(cluster)
    empty = {"odds_ratio": NAN, "ci_low": NAN, "ci_high": NAN, "p": NAN, "log_odds_ratio": NAN, "se": NAN,
             "working_correlation": NAN, "converged": False}
    rates = [y[x == level].mean() if np.any(x == level) else NAN for level in (0.0, 1.0)]
    if np.unique(groups).size < 2:
        return {**empty, "note": "fewer than 2 questions: cluster-robust errors need at least 2"}
    if any(not 0.0 < rate < 1.0 for rate in rates):
        return {**empty, "note": f"a model scored 0% or 100% (base {rates[0]:.0%}, tuned {rates[1]:.0%}): "
                                 "separation, the odds ratio is not estimable"}
    model = sm.GEE(y, sm.add_constant(x), groups=groups, family=sm.families.Binomial(),
                   cov_struct=sm.cov_struct.Exchangeable())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = model.fit()
    except Exception as err:  # noqa: BLE001 - any fitting failure is a result to report, not a crash
        return {**empty, "note": f"GEE failed: {type(err).__name__}: {err}".splitlines()[0]}
    coef, se = float(fit.params[1]), float(fit.bse[1])
    messages = sorted({str(w.message).splitlines()[0] for w in caught
                       if issubclass(w.category, (ConvergenceWarning, RuntimeWarning))})
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not (math.isfinite(coef) and math.isfinite(se) and se > 0):
        return {**empty, "note": "GEE gave a non-finite estimate; " + "; ".join(messages)}
    z = scipy_stats.norm.ppf(1 - alpha / 2)
    return {"odds_ratio": math.exp(coef), "ci_low": math.exp(coef - z * se), "ci_high": math.exp(coef + z * se),
            "p": float(fit.pvalues[1]), "log_odds_ratio": coef, "se": se,
            "working_correlation": float(np.asarray(model.cov_struct.dep_params).ravel()[0]),
            "converged": converged, "note": "; ".join(messages)}


def _resampled_ratios(values: Sequence[Sequence[float]], counts: Sequence[Sequence[float]], samples: int,
                      seed: int) -> list[np.ndarray]:
    """Per model, `samples` ratios sum(value) / sum(count) over questions drawn with replacement; the same draws
    serve every model, so each question keeps its base and tuned answers together."""
    arrays = [(np.asarray(v, float), np.asarray(c, float)) for v, c in zip(values, counts)]
    size = arrays[0][0].size
    rng = np.random.default_rng(seed)
    drawn: list[list[np.ndarray]] = [[] for _ in arrays]
    for start in range(0, samples, BOOTSTRAP_BLOCK):
        idx = rng.integers(0, size, size=(min(BOOTSTRAP_BLOCK, samples - start), size))
        for out, (v, c) in zip(drawn, arrays):
            out.append(v[idx].sum(1) / c[idx].sum(1))
    return [np.concatenate(out) for out in drawn]


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _bootstrap_result(base: np.ndarray, tuned: np.ndarray, diff: float, samples: int, seed: int, alpha: float,
                      notes: list[str]) -> dict:
    diff_low, diff_high = _percentile_interval(tuned - base, alpha)
    base_low, base_high = _percentile_interval(base, alpha)
    tuned_low, tuned_high = _percentile_interval(tuned, alpha)
    return {"diff": float(diff), "ci_low": diff_low, "ci_high": diff_high,
            "base": {"low": base_low, "high": base_high}, "tuned": {"low": tuned_low, "high": tuned_high},
            "samples": int(samples), "seed": int(seed), "method": "percentile, questions resampled",
            "note": "; ".join(notes)}


def cluster_bootstrap(base_correct: Sequence[int], base_n: Sequence[int], tuned_correct: Sequence[int],
                      tuned_n: Sequence[int], samples: int, seed: int, alpha: float = 0.05) -> dict:
    """Percentile intervals from resampling questions with replacement (each question keeps its base and tuned
    answers together), for each model's accuracy and for the difference tuned - base."""
    bc, bn, tc, tn = (np.asarray(a, float) for a in (base_correct, base_n, tuned_correct, tuned_n))
    base_acc, tuned_acc = _resampled_ratios((bc, tc), (bn, tn), samples, seed)
    notes = ["one question: every resample is identical, the interval is a point"] if bc.size == 1 else []
    notes += [f"{model} scored {acc:.0%}: its resamples cannot vary, so its interval is a point (use Wilson)"
              for model, acc in (("base", bc.sum() / bn.sum()), ("tuned", tc.sum() / tn.sum())) if acc in (0, 1)]
    return _bootstrap_result(base_acc, tuned_acc, tc.sum() / tn.sum() - bc.sum() / bn.sum(), samples, seed, alpha,
                             notes)


def cluster_bootstrap_mean(base_sum: Sequence[float], base_n: Sequence[int], tuned_sum: Sequence[float],
                           tuned_n: Sequence[int], samples: int, seed: int, alpha: float = 0.05) -> dict:
    """cluster_bootstrap for a mean per answer (e.g. tokens): each question contributes the sum of its answers'
    values and its number of answers, so the resampled statistic is the answer-weighted mean, as reported."""
    bs, bn, ts, tn = (np.asarray(a, float) for a in (base_sum, base_n, tuned_sum, tuned_n))
    base_mean, tuned_mean = _resampled_ratios((bs, ts), (bn, tn), samples, seed)
    notes = ["one question: every resample is identical, the interval is a point"] if bs.size == 1 else []
    notes += [f"every question has the same {model} mean ({values[0]:g}): its resamples cannot vary, so its "
              "interval is a point" for model, values in (("base", bs / bn), ("tuned", ts / tn))
              if values.size > 1 and np.all(values == values[0])]
    return _bootstrap_result(base_mean, tuned_mean, ts.sum() / tn.sum() - bs.sum() / bn.sum(), samples, seed,
                             alpha, notes)


def per_question_p(per_question: dict) -> tuple[float | None, str]:
    """The p of the per-question comparison and its test: the paired t-test's, or the Wilcoxon signed-rank's where t
    is undefined (every question changed by the same amount, e.g. 0% -> 100% formatted: the clearest change)."""
    p_t = per_question.get("p_t")
    if p_t is not None and math.isfinite(p_t):
        return float(p_t), "paired t-test"
    p_w = per_question.get("p_wilcoxon")
    return (float(p_w) if p_w is not None and math.isfinite(p_w) else None), "Wilcoxon signed-rank test"


def verdict(diff: float | None, p: float | None, alpha: float) -> dict:
    """Did a before -> after change pass the test at alpha, and which way: direction is +1, -1 or 0."""
    finite = diff is not None and math.isfinite(diff) and p is not None and math.isfinite(p)
    significant = bool(finite and p < alpha and diff != 0)
    return {"diff": diff, "p": p, "alpha": alpha, "significant": significant,
            "direction": int(np.sign(diff)) if significant else 0}


def degenerate_shift(accuracy: dict, mean_length: dict, short_share: dict, full_format: dict) -> dict:
    """The seed study's failure, from four verdicts: answers significantly shorter (mean length down, or more of
    them under reward.min_tokens) or more often fully formatted, while accuracy did not significantly improve."""
    shorter = mean_length["direction"] < 0 or short_share["direction"] > 0
    more_formatted = full_format["direction"] > 0
    improved = accuracy["direction"] > 0
    return {"shorter": shorter, "more_formatted": more_formatted, "accuracy_improved": improved,
            "degenerate": (shorter or more_formatted) and not improved}


def icc_anova(clusters: Sequence[Sequence[float]], strata: Sequence[object]) -> dict:
    """Intraclass correlation of answers within a cluster, one-way ANOVA estimator (unbalanced, Donner 1986).

    Each stratum (model) is centred on its own mean, so the model effect does not count as clustering:
    ICC = (MSB - MSW) / (MSB + (k0 - 1) MSW), k0 = (N - sum_s sum_i n_i^2 / N_s) / (G - S). Negative values
    (less alike than chance) are truncated to 0 so the design effect is at least 1.
    """
    values = [np.asarray(c, float) for c in clusters]
    sizes = np.array([v.size for v in values], float)
    n_total, n_groups, n_strata = sizes.sum(), len(values), len(set(strata))
    if n_groups - n_strata < 1 or n_total - n_groups < 1:
        return {"icc": 0.0, "raw": NAN, "note": "needs 2+ questions per model and 2+ samples per question; "
                                                "ICC taken as 0"}
    ssb = ssw = sum_sq_over_stratum = 0.0
    for stratum in sorted(set(strata), key=str):
        members = [v for v, s in zip(values, strata) if s == stratum]
        mean = np.concatenate(members).mean()
        ssb += sum(v.size * (v.mean() - mean) ** 2 for v in members)
        ssw += sum(((v - v.mean()) ** 2).sum() for v in members)
        sum_sq_over_stratum += sum(v.size ** 2 for v in members) / sum(v.size for v in members)
    msb, msw = ssb / (n_groups - n_strata), ssw / (n_total - n_groups)
    k0 = (n_total - sum_sq_over_stratum) / (n_groups - n_strata)
    denominator = msb + (k0 - 1) * msw
    if denominator == 0:
        return {"icc": 0.0, "raw": NAN, "note": "no variation in correctness; ICC taken as 0"}
    raw = (msb - msw) / denominator
    return {"icc": max(0.0, float(raw)), "raw": float(raw), "note": "negative estimate truncated to 0" if raw < 0
            else ""}


def power_analysis(p_base: float, p_tuned: float, samples_per_question: float, icc: float, n_questions: int,
                   alpha: float = 0.05, target: float = 0.8) -> dict:
    """Questions per model needed to detect p_base -> p_tuned, and the power the study had.

    Two independent proportions (Cohen's h, normal approximation) with the effective sample size
    n_questions * k / (1 + (k - 1) * ICC). Both models answer the same questions, so a paired analysis has
    at least this power: the numbers are conservative.
    """
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    k = float(samples_per_question)
    design_effect = 1 + (k - 1) * icc
    h = float(proportion_effectsize(p_tuned, p_base))
    effective_n = n_questions * k / design_effect
    result = {"effect_size_h": h, "icc": float(icc), "design_effect": design_effect, "samples_per_question": k,
              "questions_in_study": int(n_questions), "effective_n_in_study": effective_n, "alpha": alpha,
              "target_power": target}
    analysis = NormalIndPower()
    if h == 0:
        return {**result, "achieved_power": float(alpha), "effective_n_needed": NAN, "questions_needed": None,
                "note": "no observed difference: no finite sample detects it"}
    achieved = analysis.power(effect_size=abs(h), nobs1=effective_n, alpha=alpha, ratio=1.0)
    try:
        needed = float(analysis.solve_power(effect_size=abs(h), alpha=alpha, power=target, ratio=1.0))
    except Exception as err:  # noqa: BLE001 - a root-finding failure is reported, not raised
        return {**result, "achieved_power": float(achieved), "effective_n_needed": NAN, "questions_needed": None,
                "note": f"solve_power failed: {err}".splitlines()[0]}
    if not math.isfinite(needed):  # e.g. 0% -> 100%: the arcsine effect is at its bound, no root to find
        return {**result, "achieved_power": float(achieved), "effective_n_needed": NAN, "questions_needed": None,
                "note": f"solve_power found no sample size (effect size h = {abs(h):.3g})"}
    return {**result, "achieved_power": float(achieved), "effective_n_needed": needed,
            "questions_needed": int(math.ceil(needed * design_effect / k - 1e-9)), "note": ""}


def cohens_kappa(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Agreement of two binary raters: raw rate and Cohen's kappa (undefined when chance agreement is 1)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.size == 0:
        return {"agreement": NAN, "kappa": NAN, "note": "no ratings"}
    observed = float(np.mean(a == b))
    chance = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    if chance == 1.0:
        return {"agreement": observed, "kappa": NAN,
                "note": "both graders gave every answer the same label: kappa undefined"}
    return {"agreement": observed, "kappa": (observed - chance) / (1 - chance), "note": ""}


def between_seed_spread(values: Sequence[float], alpha: float = 0.05) -> dict:
    """One number (an accuracy, a difference) over n seeds: mean, sample sd (n - 1), min, max, and the t interval of
    the mean with n - 1 degrees of freedom. It treats the seeds as draws from every seed the study could have run."""
    x = np.asarray(values, float)
    n, mean = int(x.size), float(x.mean())
    spread = {"n": n, "mean": mean, "min": float(x.min()), "max": float(x.max()), "df": max(n - 1, 0)}
    if n < 2:
        return {**spread, "sd": NAN, "low": NAN, "high": NAN, "note": f"{n} seed: no spread, no interval"}
    # All equal: exactly 0, not the rounding residue of a mean that is not representable (3 x 0.05).
    sd = 0.0 if spread["min"] == spread["max"] else float(x.std(ddof=1))
    t = float(scipy_stats.t.ppf(1 - alpha / 2, n - 1))
    half = t * sd / math.sqrt(n)
    note = ("every seed gave the same value: the interval is a point" if sd == 0 else
            f"2 seeds: 1 degree of freedom (t = {t:.1f}), so the interval is wide; more seeds narrow it" if n == 2
            else "")
    return {**spread, "sd": sd, "low": mean - half, "high": mean + half, "note": note}
