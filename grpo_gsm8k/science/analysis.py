"""The comparison of the base and the tuned model's graded answers, as pure functions of the answer records
(COMPLETION_FIELDS of grpo_gsm8k/contracts.py): accuracy with every test of grpo_gsm8k/science/stats.py, the
grading-sensitivity reruns, the rewarded behaviours beside accuracy (full-format rate, share under
reward.min_tokens, mean length), the per-question swap table, and the headline numbers `dvc metrics show` lists.
The stats stage reads the records, calls `analyse`, `swap_table` and `headline`, and writes what they return.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from grpo_gsm8k.science import stats as st
from grpo_gsm8k.science.rewards import FORMAT_PARTS, format_score

EXCERPT_CHARS = 600  # of each completion in the swap table
TAIL_CHARS = 200  # of each completion in the grading lists (the final answer sits at the end)
MODELS = ("base", "tuned")
# Ways to count an answer correct: the primary grader, then the grading-sensitivity variants.
GRADINGS: dict[str, Callable[[dict], bool]] = {
    "primary": lambda r: r["correct"],
    "ambiguous_as_correct": lambda r: r["correct"] or r["ambiguous"],
    "ambiguous_as_wrong": lambda r: r["correct"] and not r["ambiguous"],  # the study's "conservative" count
    "math_verify": lambda r: r["mv_correct"],
}


def check_same_questions(base: list[dict], tuned: list[dict], base_path: Path, tuned_path: Path) -> None:
    base_qids, tuned_qids = {r["qid"] for r in base}, {r["qid"] for r in tuned}
    if base_qids != tuned_qids:
        raise ValueError(f"{tuned_path}: answers {len(tuned_qids - base_qids)} question(s) not in {base_path} and "
                         f"misses {len(base_qids - tuned_qids)}; evaluate both models on the same set")


@dataclass(frozen=True)
class Paired:
    """Per-question correct counts and sample counts of both models, aligned on sorted question ids."""
    qids: np.ndarray
    base_correct: np.ndarray
    base_n: np.ndarray
    tuned_correct: np.ndarray
    tuned_n: np.ndarray

    @property
    def base_scores(self) -> np.ndarray:
        return self.base_correct / self.base_n

    @property
    def tuned_scores(self) -> np.ndarray:
        return self.tuned_correct / self.tuned_n


def per_question(records: list[dict], value_of: Callable[[dict], float]) -> pd.DataFrame:
    """Per question id (sorted): the sum of value_of over its answers and its number of answers."""
    frame = pd.DataFrame({"qid": [r["qid"] for r in records], "value": [value_of(r) for r in records]})
    return frame.groupby("qid")["value"].agg(["sum", "count"]).sort_index()


def pair_by_question(base: list[dict], tuned: list[dict], correct_of: Callable[[dict], bool]) -> Paired:
    b, t = (per_question(records, lambda r: int(bool(correct_of(r)))) for records in (base, tuned))
    return Paired(b.index.to_numpy(), b["sum"].to_numpy(int), b["count"].to_numpy(int),
                  t["sum"].to_numpy(int), t["count"].to_numpy(int))


def core_tests(base: list[dict], tuned: list[dict], correct_of: Callable[[dict], bool], alpha: float,
               bootstrap_samples: int, seed: int) -> dict:
    """The tests the grading-sensitivity analysis repeats under each way of counting correct answers."""
    p = pair_by_question(base, tuned, correct_of)
    counts = {"base": {"correct": int(p.base_correct.sum()), "total": int(p.base_n.sum())},
              "tuned": {"correct": int(p.tuned_correct.sum()), "total": int(p.tuned_n.sum())}}
    return {
        "counts": counts,
        "proportions": {m: c["correct"] / c["total"] for m, c in counts.items()},
        "two_proportion": st.two_proportion_ztest(counts["tuned"]["correct"], counts["tuned"]["total"],
                                                  counts["base"]["correct"], counts["base"]["total"]),
        "per_question": st.paired_tests(p.base_scores, p.tuned_scores),
        "bootstrap": st.cluster_bootstrap(p.base_correct, p.base_n, p.tuned_correct, p.tuned_n,
                                          bootstrap_samples, seed, alpha),
    }


def full_format(record: dict) -> bool:
    """The completion earns the whole format reward (every part; with parts of weight 1 the sum is exact)."""
    return format_score(record["completion"], format_max=FORMAT_PARTS) == FORMAT_PARTS


def proportion_tests(base: list[dict], tuned: list[dict], has: Callable[[dict], bool], alpha: float,
                     bootstrap_samples: int, seed: int) -> dict:
    """A rewarded behaviour's rate before vs after, by accuracy's machinery (z-test, paired tests, intervals)."""
    result = core_tests(base, tuned, has, alpha, bootstrap_samples, seed)
    result["counts"] = {m: {"count": c["correct"], "total": c["total"]} for m, c in result["counts"].items()}
    result["wilson"] = {m: st.wilson_interval(c["count"], c["total"], alpha) for m, c in result["counts"].items()}
    result["verdict"] = st.verdict(result["bootstrap"]["diff"], st.per_question_p(result["per_question"])[0], alpha)
    return result


def mean_length_tests(base: list[dict], tuned: list[dict], alpha: float, bootstrap_samples: int,
                      seed: int) -> dict:
    """Mean completion length (reward tokens) before vs after: paired tests on per-question means and the
    cluster-bootstrap interval of the difference in means per answer."""
    # Paired per question rather than Welch on answers: both models answer the same questions and a long problem
    # gets long solutions from both, so pairing removes that spread; and Welch would count a question's samples as
    # independent answers, overstating the evidence as the pooled z-test does (see the ICC).
    b, t = (per_question(records, lambda r: r["n_tokens"]) for records in (base, tuned))
    tests = st.paired_tests(b["sum"] / b["count"], t["sum"] / t["count"])
    bootstrap = st.cluster_bootstrap_mean(b["sum"], b["count"], t["sum"], t["count"], bootstrap_samples, seed,
                                          alpha)
    return {"means": {"base": float(b["sum"].sum() / b["count"].sum()),
                      "tuned": float(t["sum"].sum() / t["count"].sum())},
            "per_question": tests, "bootstrap": bootstrap,
            "verdict": st.verdict(bootstrap["diff"], st.per_question_p(tests)[0], alpha)}


def behaviour_tests(base: list[dict], tuned: list[dict], accuracy: dict, min_tokens: int, alpha: float,
                    bootstrap_samples: int, seed: int) -> dict:
    """The rewarded behaviours beside accuracy, and whether they moved while accuracy did not (`degenerate`).
    Lengths are the records' n_tokens: generated ids up to and including EOS, what the reward's
    len(completion_ids) counts, so `short` is exactly the reward's `n_tokens < reward.min_tokens` gate."""
    result = {"full_format": proportion_tests(base, tuned, full_format, alpha, bootstrap_samples, seed),
              "short": {**proportion_tests(base, tuned, lambda r: r["n_tokens"] < min_tokens, alpha,
                                           bootstrap_samples, seed), "min_tokens": min_tokens},
              "length": mean_length_tests(base, tuned, alpha, bootstrap_samples, seed)}
    result["accuracy_verdict"] = st.verdict(accuracy["bootstrap"]["diff"],
                                            st.per_question_p(accuracy["per_question"])[0], alpha)
    result["degenerate"] = st.degenerate_shift(result["accuracy_verdict"], result["length"]["verdict"],
                                               result["short"]["verdict"], result["full_format"]["verdict"])
    return result


def answer_row(model: str, record: dict) -> dict:
    keys = ("qid", "sample", "gold", "extracted", "method", "correct", "mv_correct", "ambiguous", "reason")
    return {"model": model, **{k: record.get(k) for k in keys},
            "completion_tail": record["completion"][-TAIL_CHARS:]}


def grading_summary(by_model: dict[str, list[dict]], alpha: float, bootstrap_samples: int, seed: int) -> dict:
    answers = [(m, r) for m in MODELS for r in sorted(by_model[m], key=lambda r: (r["qid"], r["sample"]))]
    agreement = st.cohens_kappa([r["correct"] for _, r in answers], [r["mv_correct"] for _, r in answers])
    return {
        "agreement": agreement["agreement"], "kappa": agreement["kappa"], "kappa_note": agreement["note"],
        "n_answers": len(answers),
        "n_ambiguous": sum(r["ambiguous"] for _, r in answers),
        "per_model": {m: {"correct": sum(r["correct"] for r in by_model[m]),
                          "mv_correct": sum(r["mv_correct"] for r in by_model[m]),
                          "ambiguous": sum(r["ambiguous"] for r in by_model[m])} for m in MODELS},
        "disagreements": [answer_row(m, r) for m, r in answers if r["correct"] != r["mv_correct"]],
        "ambiguous_answers": [answer_row(m, r) for m, r in answers if r["ambiguous"]],
        "sensitivity": {name: core_tests(by_model["base"], by_model["tuned"], GRADINGS[name], alpha,
                                         bootstrap_samples, seed) for name in GRADINGS if name != "primary"},
    }


def length_summary(records: list[dict]) -> dict:
    tokens = np.array([r["n_tokens"] for r in records], float)
    correct = np.array([r["correct"] for r in records], bool)
    return {"n": int(tokens.size), "mean": float(tokens.mean()), "median": float(np.median(tokens)),
            "std": float(tokens.std(ddof=1)) if tokens.size > 1 else math.nan,
            "min": float(tokens.min()), "max": float(tokens.max()),
            "truncated_rate": float(np.mean([bool(r.get("truncated", False)) for r in records])),
            "mean_correct": float(tokens[correct].mean()) if correct.any() else math.nan,
            "mean_wrong": float(tokens[~correct].mean()) if (~correct).any() else math.nan}


def analyse(base: list[dict], tuned: list[dict], *, alpha: float, bootstrap_samples: int, seed: int,
            power_target: float, min_tokens: int) -> dict:
    by_model = {"base": base, "tuned": tuned}
    result = core_tests(base, tuned, GRADINGS["primary"], alpha, bootstrap_samples, seed)
    p = pair_by_question(base, tuned, GRADINGS["primary"])
    n_questions = int(p.qids.size)
    result["wilson"] = {m: st.wilson_interval(c["correct"], c["total"], alpha) for m, c in result["counts"].items()}
    result["mcnemar"] = st.mcnemar_exact(st.majority_correct(p.base_correct, p.base_n),
                                         st.majority_correct(p.tuned_correct, p.tuned_n))
    answers = [(i, m, r) for i, m in enumerate(MODELS) for r in by_model[m]]
    result["gee"] = st.gee_logistic([r["correct"] for _, _, r in answers], [i for i, _, _ in answers],
                                    [r["qid"] for _, _, r in answers], alpha)
    clusters = {(m, q): [] for m in MODELS for q in p.qids}
    for _, m, r in answers:
        clusters[(m, r["qid"])].append(float(r["correct"]))
    icc = st.icc_anova(list(clusters.values()), [m for m, _ in clusters])
    k = (p.base_n.sum() + p.tuned_n.sum()) / (2 * n_questions)  # mean samples per question
    result["power"] = {**st.power_analysis(result["proportions"]["base"], result["proportions"]["tuned"], k,
                                           icc["icc"], n_questions, alpha, power_target),
                       "icc_raw": icc["raw"], "icc_note": icc["note"],
                       "icc_method": "one-way ANOVA estimator on model x question clusters, each model centred "
                                     "on its own mean (Donner 1986); negative values truncated to 0"}
    result["grading"] = grading_summary(by_model, alpha, bootstrap_samples, seed)
    result["lengths"] = {m: length_summary(by_model[m]) for m in MODELS}
    result["behaviours"] = behaviour_tests(base, tuned, result, min_tokens, alpha, bootstrap_samples, seed)
    result["design"] = {"questions": n_questions, "samples_per_question": float(k), "alpha": alpha,
                        "bootstrap_samples": bootstrap_samples, "seed": seed, "power_target": power_target}
    return result


def representative(records: list[dict], verdict: bool) -> dict:
    """The lowest-numbered sample whose correctness matches the model's majority verdict on the question."""
    ordered = sorted(records, key=lambda r: r["sample"])
    chosen = next((r for r in ordered if r["correct"] == verdict), ordered[0])
    text = chosen["completion"]
    return {"sample": chosen["sample"], "correct": chosen["correct"], "extracted": chosen.get("extracted"),
            "completion": text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"}


def swap_table(base: list[dict], tuned: list[dict]) -> list[dict]:
    """Each question's category by majority-correct (only_tuned, only_base, both, neither) with one answer each."""
    p = pair_by_question(base, tuned, GRADINGS["primary"])
    base_major = st.majority_correct(p.base_correct, p.base_n)
    tuned_major = st.majority_correct(p.tuned_correct, p.tuned_n)
    order = ("only_tuned", "only_base", "both", "neither")
    rows = []
    for i, qid in enumerate(p.qids.tolist()):
        b, t = bool(base_major[i]), bool(tuned_major[i])
        category = "both" if b and t else "only_base" if b else "only_tuned" if t else "neither"
        base_q = [r for r in base if r["qid"] == qid]
        rows.append({"qid": qid, "category": category, "question": base_q[0]["question"], "gold": base_q[0]["gold"],
                     "base_score": float(p.base_scores[i]), "tuned_score": float(p.tuned_scores[i]),
                     "base_correct": int(p.base_correct[i]), "base_samples": int(p.base_n[i]),
                     "tuned_correct": int(p.tuned_correct[i]), "tuned_samples": int(p.tuned_n[i]),
                     "base_answer": representative(base_q, b),
                     "tuned_answer": representative([r for r in tuned if r["qid"] == qid], t)})
    return sorted(rows, key=lambda row: (order.index(row["category"]), row["qid"]))


def plain(value):
    """JSON-ready copy: numpy scalars to Python, NaN/inf to None (so json.dumps(allow_nan=False) holds)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def headline(result: dict) -> dict:
    """The few numbers `dvc metrics show` / `dvc exp show` list per set (the full analysis stays in --out)."""
    return plain({
        "accuracy_base": result["proportions"]["base"], "accuracy_tuned": result["proportions"]["tuned"],
        "difference": result["bootstrap"]["diff"], "difference_ci_low": result["bootstrap"]["ci_low"],
        "difference_ci_high": result["bootstrap"]["ci_high"], "p_two_proportion": result["two_proportion"]["p"],
        "p_paired_t": result["per_question"]["p_t"], "p_wilcoxon": result["per_question"]["p_wilcoxon"],
        "p_gee": result["gee"]["p"], "p_mcnemar": result["mcnemar"]["p"],
        "mean_tokens_base": result["lengths"]["base"]["mean"], "mean_tokens_tuned": result["lengths"]["tuned"]["mean"],
        **behaviour_headline(result["behaviours"]),
    })


HEADLINE_BEHAVIOURS = {"full_format": "full_format_rate", "short": "short_share"}  # behaviour -> metrics key


def behaviour_headline(behaviours: dict) -> dict:
    """Rates and p-values of the rewarded behaviours (p_<name>: the per-question p its verdict used), and whether
    the answers degenerated, for `dvc exp show` and the reward-variant comparison."""
    numbers = {"p_mean_tokens": behaviours["length"]["verdict"]["p"],
               "p_accuracy_per_question": behaviours["accuracy_verdict"]["p"],
               "degenerate": behaviours["degenerate"]["degenerate"]}
    for name, key in HEADLINE_BEHAVIOURS.items():
        rows = behaviours[name]
        numbers.update({f"{key}_base": rows["proportions"]["base"], f"{key}_tuned": rows["proportions"]["tuned"],
                        f"p_{key}_two_proportion": rows["two_proportion"]["p"], f"p_{key}": rows["verdict"]["p"]})
    return numbers
