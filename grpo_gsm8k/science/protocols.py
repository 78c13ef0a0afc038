"""Standard GSM8K protocols over one model's answers: lm-eval's two filters, maj@k, pass@k, published figures.

Pure code (no torch), called by grpo_gsm8k.answering for the baseline and evaluate stages' metrics.json.

lm-evaluation-harness: both filters and the grading are reimplemented from its task file
lm_eval/tasks/gsm8k/gsm8k.yaml (EleutherAI/lm-evaluation-harness, version 3.0 of the task), with the regex filter
of lm_eval/filters/extraction.py (RegexFilter: `findall`, take the match `group_select` picks, the first non-empty
group of a tuple, `.strip()`, "[invalid]" when nothing matches) and exact_match of lm_eval/api/metrics.py
(exact_match_hf_evaluate: each of `regexes_to_ignore` deleted in order from prediction and reference, then
ignore_case lowercases; ignore_punctuation is false, so nothing else is removed). It is *string* equality:
"15.00" is not "15". Departure: lm-eval prompts 5-shot "Question: ... Answer:" and decodes greedily; here the
filters read this project's zero-shot chat completions (sampled or greedy), so the figures are comparable in
grading, not in prompting.

maj@k and pass@k read the answers as the project's grader (grpo_gsm8k.science.grading) extracts them.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from grpo_gsm8k.science.grading import answers_match

# gsm8k.yaml filter_list: "strict-match" takes the first `#### N`; "flexible-extract" the last number-like run.
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_FALLBACK = "[invalid]"  # RegexFilter's default when nothing matches
# gsm8k.yaml metric_list: exact_match with these regexes_to_ignore, in this order, ignore_case: true.
LM_EVAL_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
    """lm-eval's RegexFilter on one response."""
    matches = pattern.findall(text)
    if not matches:
        return LM_EVAL_FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = next((group for group in match if group), LM_EVAL_FALLBACK)
    return match.strip()


def strict_match(completion: str) -> str:
    """The number after the *first* `#### ` (lm-eval's strict-match filter)."""
    return _regex_filter(STRICT_PATTERN, completion, group_select=0)


def flexible_extract(completion: str) -> str:
    """The *last* number-like run of the completion (lm-eval's flexible-extract filter)."""
    return _regex_filter(FLEXIBLE_PATTERN, completion, group_select=-1)


def lm_eval_normalize(text: str) -> str:
    """What lm-eval's exact_match compares: ",", "$", everything up to "#### " and a final "." removed; lowercased."""
    for pattern in LM_EVAL_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    return lm_eval_normalize(prediction) == lm_eval_normalize(reference)


def majority_answer(answers: list[str | None]) -> str | None:
    """The most frequent answer; None (no answer) never votes. Ties go to the tied answer sampled first."""
    votes = Counter(answer for answer in answers if answer is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(answer for answer in answers if answer is not None and votes[answer] == top)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021 (Codex, eq. 1) unbiased estimator of P(at least one of k draws is correct), n samples,
    c correct: 1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    missed = 1.0
    for i in range(n - c + 1, n + 1):
        missed *= 1.0 - k / i
    return 1.0 - missed


def _by_question(records: list[dict]) -> list[list[dict]]:
    """Records grouped by qid, in first-seen order; each group in sample order."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["qid"], []).append(record)
    return [sorted(group, key=lambda r: r["sample"]) for group in groups.values()]


def sampled_protocols(records: list[dict]) -> dict:
    """metrics.json fields computed from the k sampled answers per question (records as answering writes them)."""
    groups = _by_question(records)
    k = min((len(group) for group in groups), default=0)
    majority_correct = sum(answers_match(majority_answer([r["extracted"] for r in group]), group[0]["gold"])
                           for group in groups)
    pass_k = [pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in groups] if k else []
    pass_1 = [pass_at_k(len(g), sum(r["correct"] for r in g), 1) for g in groups] if k else []
    strict = sum(lm_eval_exact_match(strict_match(r["completion"]), r["gold"]) for r in records)
    flexible = sum(lm_eval_exact_match(flexible_extract(r["completion"]), r["gold"]) for r in records)
    total, questions = len(records), len(groups)
    return {
        "samples_per_question": k,
        "maj_at_k_correct": majority_correct,
        "maj_at_k_accuracy": majority_correct / questions if questions else 0.0,
        "pass_at_k_accuracy": sum(pass_k) / questions if questions else 0.0,
        "pass_at_1_accuracy": sum(pass_1) / questions if questions else 0.0,
        "lm_eval_strict_correct": strict,
        "lm_eval_strict_accuracy": strict / total if total else 0.0,
        "lm_eval_flexible_correct": flexible,
        "lm_eval_flexible_accuracy": flexible / total if total else 0.0,
    }


def greedy_protocols(greedy_records: list[dict] | None) -> dict:
    """metrics.json fields of the greedy pass (one temperature-0 answer per question); None where it was off."""
    if greedy_records is None:
        return {"greedy_correct": None, "greedy_accuracy": None}
    correct = sum(r["correct"] for r in greedy_records)
    return {"greedy_correct": correct, "greedy_accuracy": correct / len(greedy_records) if greedy_records else 0.0}


@dataclass(frozen=True)
class PublishedFigure:
    model_id: str  # hub id, as model.source names it
    accuracy: float  # a fraction
    protocol: str
    source: str  # where the figure is published


# Published GSM8K test accuracies (all 1,319 questions); never this run's numbers.
PUBLISHED = (
    PublishedFigure("meta-llama/Llama-3.1-8B-Instruct", 0.845, "8-shot CoT, em_maj1@1",
                    "Meta's model card, https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct"),
)


def published_figure(model_id: str) -> PublishedFigure | None:
    """The published figure of the model params name (hub ids compare case-insensitively), else None."""
    return next((f for f in PUBLISHED if f.model_id.lower() == model_id.strip().lower()), None)
