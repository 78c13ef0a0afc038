"""Render the study report (Markdown, then self-contained HTML) from the pipeline's results.

Pure functions: they take already-loaded JSON and params and return text; `python -m stages.report` reads the
files and writes the outputs. Every number in the text comes from those inputs; the only typed-in figures are
the published study's, always labelled as published. The number formats (`fmt_p`, `fmt_pct`, `fmt_pp`,
`fmt_num`, `fmt_count`) are public so tests can check that the report shows exactly the stats stage's numbers.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from grpo_gsm8k.contracts import FIGURES
from grpo_gsm8k.science.report_format import (fmt_count, fmt_interval, fmt_num, fmt_p, fmt_pct, fmt_pp,
                                              header, md_escape, p_is, row)

LIST_ALL_QUESTIONS_UP_TO = 50  # bigger sets list only the questions that swapped, to keep the report readable
EXCERPT_CHARS = 150
CATEGORIES = {"only_tuned": "swap-in: only the tuned model is majority-correct",
              "only_base": "swap-out: only the base model is majority-correct",
              "both": "both models majority-correct", "neither": "neither model majority-correct"}
CAPTIONS = {
    FIGURES["proportion"]: "Accuracy per model with Wilson (answers independent) and cluster-bootstrap "
                           "(questions resampled) intervals.",
    FIGURES["difference"]: "Per-question change in accuracy (tuned - base), sorted, with the mean difference and "
                           "its cluster-bootstrap interval.",
    FIGURES["paired"]: "Each question's score under the base model against its score under the tuned model.",
    FIGURES["lengths"]: "Completion lengths in tokens, per model and by correctness.",
    FIGURES["training"]: "GRPO training curves from the dvclive log, against the optimizer step.",
    FIGURES["signal"]: "Learning signal per logged step: share of groups whose completions all got the same "
                       "reward (no advantage, nothing to learn) and of completions cut at the length cap; each "
                       "reward component's mean (band: its spread); mean completion length; norm of the LoRA "
                       "update.",
}
TRAINING_FIGURES = (FIGURES["signal"], FIGURES["training"])  # shown once, in the training section
SENSITIVITY = {"primary": "primary extractor", "ambiguous_as_correct": "ambiguous answers counted correct",
               "ambiguous_as_wrong": "ambiguous answers counted wrong",
               "math_verify": "math-verify instead of the extractor"}


@dataclass(frozen=True)
class SetResults:
    """One evaluation set's inputs; `figures` maps each figure name to its path relative to the report."""
    name: str
    base: dict
    tuned: dict
    stats: dict
    swaps: list
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReportInputs:
    params: object  # grpo_gsm8k.params.Params
    summary: dict
    select: dict
    sets: list
    selection_figure: str = ""  # the select stage's figure, relative to the report

    @property
    def headline(self) -> SetResults:
        """The set the abstract quotes: the study's design if present, else the first set."""
        return next((s for s in self.sets if s.name == "study"), self.sets[0])

    @property
    def confidence(self) -> str:
        return f"{1 - self.headline.stats['design']['alpha']:.0%}"


def model_name(source: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'Llama-3.1-8B-Instruct'; a .gguf file loses its extension."""
    return re.sub(r"\.gguf$", "", source.rstrip("/").rsplit("/", 1)[-1].removeprefix("pypi:"))


def model_parameters(source: str) -> float | None:
    """Parameter count read from a name like '...-135M-...' or '...-8B-...', else None."""
    match = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)([MB])(?![a-zA-Z])", model_name(source), re.IGNORECASE)
    return float(match[1]) * (1e6 if match[2].upper() == "M" else 1e9) if match else None


def reward_phrase(variant: str) -> str:
    return {"study": "length-gated rewards", "naive": "ungated correctness and format rewards",
            "correctness_only": "a correctness-only reward"}.get(variant, f"the {variant} reward")


def design_text(stats: dict) -> str:
    design = stats["design"]
    k = design["samples_per_question"]
    k_text = str(int(k)) if float(k).is_integer() else fmt_num(k, 1)
    total = stats["counts"]["base"]["total"]
    return f"{design['questions']} questions x {k_text} sample{'' if k == 1 else 's'} = {total} answers per model"


def stat_notes(stats: dict) -> list[tuple[str, str, bool]]:
    """(test, note, p undefined) for every statistic that carries a caveat."""
    checks = [("two-proportion z-test", stats["two_proportion"], "note", "p"),
              ("paired t-test", stats["per_question"], "note_t", "p_t"),
              ("Wilcoxon test", stats["per_question"], "note_wilcoxon", "p_wilcoxon"),
              ("GEE", stats["gee"], "note", "p"), ("McNemar test", stats["mcnemar"], "note", "p"),
              ("cluster bootstrap", stats["bootstrap"], "note", None), ("power", stats["power"], "note", None),
              ("ICC", stats["power"], "icc_note", None), ("grader agreement", stats["grading"], "kappa_note", None)]
    notes = [(name, part.get(key) or "", p_key is not None and part.get(p_key) is None)
             for name, part, key, p_key in checks]
    notes += [("training log", note, False) for note in stats["training"]["notes"]]
    return [(name, note, undefined) for name, note, undefined in notes if note or undefined]


def tests_table(st: dict, conf: str) -> list[str]:
    tp, pq, gee, mc, boot = (st[k] for k in ("two_proportion", "per_question", "gee", "mcnemar", "bootstrap"))
    return [*header("Test", "Unit", "Estimate", f"{conf} interval", "p"),
            row("Two-proportion z-test", "answers, as if independent", f"z = {fmt_num(tp['z'])}", "-",
                fmt_p(tp["p"], tp["note"])),
            row("Paired t-test", f"{pq['n']} questions", f"mean change {fmt_pp(pq['mean_diff'])}, t = "
                f"{fmt_num(pq['t'])}", "-", fmt_p(pq["p_t"], pq["note_t"])),
            row("Wilcoxon signed-rank", f"{pq['n']} questions", f"W = {fmt_num(pq['wilcoxon_stat'], 1)} "
                f"({pq['wilcoxon_method']})", "-", fmt_p(pq["p_wilcoxon"], pq["note_wilcoxon"])),
            row("Logistic GEE", "answers clustered by question", f"odds ratio {fmt_num(gee['odds_ratio'])}",
                fmt_interval(gee["ci_low"], gee["ci_high"], fmt_num), fmt_p(gee["p"], gee["note"])),
            row("Exact McNemar", "questions, majority verdict", f"{mc['only_tuned']} gained vs {mc['only_base']} "
                f"lost ({mc['both']} both, {mc['neither']} neither)", "-", fmt_p(mc["p"], mc["note"])),
            row("Cluster bootstrap", "questions resampled", f"difference {fmt_pp(boot['diff'])}",
                fmt_interval(boot["ci_low"], boot["ci_high"], fmt_pp), "-")]


def sensitivity_table(st: dict, conf: str) -> list[str]:
    variants = {"primary": st, **st["grading"]["sensitivity"]}
    lines = header("Grading", "Base", "Tuned", "Difference", "Two-proportion p", "Paired t p", "Wilcoxon p",
                   f"Bootstrap {conf} interval")
    for name, v in variants.items():
        c, pq, boot = v["counts"], v["per_question"], v["bootstrap"]
        lines.append(row(SENSITIVITY.get(name, name), fmt_count(c["base"]["correct"], c["base"]["total"]),
                         fmt_count(c["tuned"]["correct"], c["tuned"]["total"]), fmt_pp(boot["diff"]),
                         fmt_p(v["two_proportion"]["p"], v["two_proportion"]["note"]),
                         fmt_p(pq["p_t"], pq["note_t"]), fmt_p(pq["p_wilcoxon"], pq["note_wilcoxon"]),
                         fmt_interval(boot["ci_low"], boot["ci_high"], fmt_pp)))
    return lines


def _rate_cell(rows: dict, model: str) -> str:
    c, w = rows["counts"][model], rows["wilson"][model]
    return f"{fmt_count(c['count'], c['total'])} ({fmt_pct(rows['proportions'][model])}) " \
           f"{fmt_interval(w['low'], w['high'])}"


def behaviours_table(st: dict, conf: str) -> list[str]:
    """Accuracy and the rewarded behaviours, each before vs after with the same tests."""
    b = st["behaviours"]
    lines = header("Behaviour", f"Base ({conf} Wilson)", f"Tuned ({conf} Wilson)", f"Difference ({conf} bootstrap)",
                   "Two-proportion p", "Paired t p", "Wilcoxon p")
    accuracy = {"counts": {m: {"count": c["correct"], "total": c["total"]} for m, c in st["counts"].items()},
                "proportions": st["proportions"], "wilson": st["wilson"]}
    named = [("Correct answers (accuracy)", accuracy, st), ("Full format (all three format-reward parts)",
                                                             b["full_format"], b["full_format"]),
             (f"Shorter than reward.min_tokens = {b['short']['min_tokens']} tokens", b["short"], b["short"])]
    for label, rates, tests in named:
        boot, pq = tests["bootstrap"], tests["per_question"]
        lines.append(row(label, _rate_cell(rates, "base"), _rate_cell(rates, "tuned"),
                         f"{fmt_pp(boot['diff'])} {fmt_interval(boot['ci_low'], boot['ci_high'], fmt_pp)}",
                         fmt_p(tests["two_proportion"]["p"], tests["two_proportion"]["note"]),
                         fmt_p(pq["p_t"], pq["note_t"]), fmt_p(pq["p_wilcoxon"], pq["note_wilcoxon"])))
    length = b["length"]
    boot, pq = length["bootstrap"], length["per_question"]
    tokens = functools.partial(fmt_num, digits=1)
    lines.append(row("Mean completion length (tokens; per-question means paired)", tokens(length["means"]["base"]),
                     tokens(length["means"]["tuned"]),
                     f"{boot['diff']:+.1f} {fmt_interval(boot['ci_low'], boot['ci_high'], tokens)}", "-",
                     fmt_p(pq["p_t"], pq["note_t"]), fmt_p(pq["p_wilcoxon"], pq["note_wilcoxon"])))
    return lines


def _change_text(rows: dict, fmt=fmt_pct, before: str = "", after: str = "") -> str:
    verdict = rows["verdict"]
    base, tuned = (rows["means"] if "means" in rows else rows["proportions"]).values()
    return f"{before}{fmt(base)} → {fmt(tuned)}{after}, per-question {p_is(verdict['p'])}"


def degenerate_sentence(st: dict) -> str:
    """In words, when answers got significantly shorter or more formatted while accuracy did not improve; else ""."""
    b = st["behaviours"]
    if not b["degenerate"]["degenerate"]:
        return ""
    shorter = []
    if b["length"]["verdict"]["direction"] < 0:
        shorter.append(_change_text(b["length"], lambda x: fmt_num(x, 1), "mean ", " tokens"))
    if b["short"]["verdict"]["direction"] > 0:
        shorter.append(_change_text(b["short"], before=f"under reward.min_tokens = {b['short']['min_tokens']} "
                                                       "tokens: "))
    changes = [f"significantly shorter ({'; '.join(shorter)})"] if shorter else []
    if b["degenerate"]["more_formatted"]:
        changes.append(f"significantly more often fully formatted ({_change_text(b['full_format'])})")
    accuracy = b["accuracy_verdict"]
    worse = "got significantly worse" if accuracy["direction"] < 0 else "did not significantly improve"
    return (f"**Short, degenerate answers**: the tuned model's answers got {' and '.join(changes)} while accuracy "
            f"{worse} ({fmt_pct(st['proportions']['base'])} → {fmt_pct(st['proportions']['tuned'])}, per-question "
            f"{p_is(accuracy['p'])}): the reward was earned by the answers' form, not by solving more problems, the "
            "seed study's \"short, degenerate answers\". Per-question p: the paired t-test, or the Wilcoxon test "
            "where every question changed alike.")


def set_results(inputs: ReportInputs, s: SetResults) -> list[str]:
    st, conf = s.stats, inputs.confidence
    metrics = {"base": s.base, "tuned": s.tuned}
    both = [(m, metrics[m], st["lengths"][m]) for m in ("base", "tuned")]
    lines = [f"## Results: {s.name}", "", f"{design_text(st)}.", "", *header("", "Base", "Tuned"),
             row("Correct answers", *(fmt_count(st["counts"][m]["correct"], st["counts"][m]["total"])
                                      for m, _, _ in both)),
             row(f"Accuracy ({conf} Wilson interval)", *(f"{fmt_pct(st['proportions'][m])} "
                 f"{fmt_interval(st['wilson'][m]['low'], st['wilson'][m]['high'])}" for m, _, _ in both)),
             row(f"Accuracy {conf} cluster bootstrap interval", *(fmt_interval(st["bootstrap"][m]["low"],
                 st["bootstrap"][m]["high"]) for m, _, _ in both)),
             row("Answers graded from a `####` marker (format rate)", *(fmt_pct(x["format_rate"]) for _, x, _ in both)),
             row("Mean / median tokens", *(f"{fmt_num(x['mean_tokens'], 1)} / {fmt_num(n['median'], 1)}"
                                           for _, x, n in both)),
             row("Truncated", *(fmt_pct(x["truncated_rate"]) for _, x, _ in both)),
             row("Ambiguous (extractor)", *(str(x["ambiguous"]) for _, x, _ in both)),
             row("Correct by math-verify", *(fmt_count(x["math_verify_correct"], x["total"]) for _, x, _ in both))]
    if "mean_reward" in s.tuned:
        lines.append(row("Mean reward (reward.variant)", fmt_num(s.base.get("mean_reward")),
                         fmt_num(s.tuned["mean_reward"])))
    power, grading = st["power"], st["grading"]
    needed = power["questions_needed"]
    lines += ["", f"### Rewarded behaviours beside accuracy: {s.name}", "",
              "What the reward pays for, tested like accuracy: the share of completions earning the whole format "
              "reward, the share under the length gate (tokens counted as the reward counts them, EOS included) "
              "and the mean length.", "", *behaviours_table(st, conf)]
    if sentence := degenerate_sentence(st):
        lines += ["", sentence]
    lines += ["", f"### Tests: {s.name}", "", *tests_table(st, conf), "",
              f"**Power**: effect size h = {fmt_num(power['effect_size_h'])}, ICC = {fmt_num(power['icc'])} (design "
              f"effect {fmt_num(power['design_effect'])}, effective sample {fmt_num(power['effective_n_in_study'], 1)} "
              f"answers per model); achieved power {fmt_pct(power['achieved_power'])}; questions per model needed for "
              f"{fmt_pct(power['target_power'])} power: {needed if needed is not None else 'n/a (no finite number)'}.",
              "", f"### Grading: {s.name}", "",
              f"The extractor and math-verify agree on {fmt_pct(grading['agreement'])} of {grading['n_answers']} "
              f"answers (Cohen's kappa {fmt_num(grading['kappa'])}); they disagree on {len(grading['disagreements'])} "
              f"and the extractor flags {grading['n_ambiguous']} as ambiguous. Each result under each way of "
              "counting:", "", *sensitivity_table(st, conf)]
    # The figures in reading order (accuracy first), any unknown ones after them.
    order = sorted((f for f in st["figures"] if f not in TRAINING_FIGURES),
                   key=lambda name: (list(CAPTIONS).index(name) if name in CAPTIONS else len(CAPTIONS), name))
    return lines + figure_lines(s, order, s.name)


def figure_lines(s: SetResults, names, label: str) -> list[str]:
    lines = []
    for number, name in enumerate(names, 1):
        lines += ["", f"![{name}]({s.figures[name]})", "", f"*Figure {label}-{number}: {CAPTIONS.get(name, name)}*"]
    return lines


def excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    flat = " ".join(str(text).split())
    return md_escape(flat if len(flat) <= chars else flat[:chars].rstrip() + "…")


def answer_cell(answer: dict) -> str:
    extracted = answer.get("extracted")
    return f"{excerpt(answer['completion'])} (extracted: {md_escape(extracted) if extracted else 'none'})"


def swaps(s: SetResults) -> list[str]:
    """Counts per category, then one row per question (only the swapped ones on a big set)."""
    counts = {name: sum(r["category"] == name for r in s.swaps) for name in CATEGORIES}
    lines = [f"## Swap-ins and swap-outs: {s.name}", "",
             "Each question is placed by whether each model answers it correctly in more than half of its samples.",
             "", *header("Category", "Questions", "Meaning"),
             *(row(f"`{name}`", counts[name], meaning) for name, meaning in CATEGORIES.items())]
    listed = s.swaps if len(s.swaps) <= LIST_ALL_QUESTIONS_UP_TO else \
        [r for r in s.swaps if r["category"] in ("only_tuned", "only_base")]
    if len(listed) < len(s.swaps):
        lines += ["", f"{len(s.swaps) - len(listed)} questions where both or neither model is majority-correct "
                      f"are not listed (more than {LIST_ALL_QUESTIONS_UP_TO} questions); see "
                      f"`results/stats/{s.name}-swaps.json`."]
    if not listed:
        return lines
    lines += ["", *header("Question", "Category", "Gold", "Base", "Tuned", "Base answer (excerpt)",
                          "Tuned answer (excerpt)")]
    for r in listed:
        lines.append(row(f"{r['qid']}: {excerpt(r['question'], 100)}", f"`{r['category']}`", md_escape(r["gold"]),
                         fmt_count(r["base_correct"], r["base_samples"]),
                         fmt_count(r["tuned_correct"], r["tuned_samples"]),
                         answer_cell(r["base_answer"]), answer_cell(r["tuned_answer"])))
    return lines
