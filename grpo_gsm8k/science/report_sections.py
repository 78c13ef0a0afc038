"""The report's narrative sections (abstract, method, training, analysis, selection, limitations) and the whole
Markdown document; the per-set tables and the swap lists are report_render.py, the number formats
report_format.py. Pure functions of the loaded inputs (`ReportInputs`); the report stage reads and writes.
"""
from __future__ import annotations

from grpo_gsm8k.contracts import SELECT_CANDIDATES
from grpo_gsm8k.science.learning_signal import no_signal_warning, signal_failures
from grpo_gsm8k.science.report_format import (fmt_count, fmt_interval, fmt_num, fmt_param, fmt_pct, fmt_pp, header,
                                              md_escape, p_is, row)
from grpo_gsm8k.science.report_render import (TRAINING_FIGURES, ReportInputs, degenerate_sentence, design_text,
                                              figure_lines, model_name, model_parameters, reward_phrase,
                                              set_results, stat_notes, swaps)
from grpo_gsm8k.science.rewards import VARIANTS, reward_names

# The published study, quoted as the reference only, never as this run's result.
PUBLISHED = ("Llama-3.1-8B-Instruct, 72-73/100 correct before and 92/100 after GRPO with length-gated rewards; "
             "two-proportion p = 0.0004, per-question p = 0.0256")
SMALL_MODEL_PARAMS = 1e9  # below this GSM8K accuracy is too low for the study's effect to show
FEW_STEPS = 100  # GRPO steps below which the adapters barely move


def demonstration_reasons(params) -> list[str]:
    """Why this run can only demonstrate the machinery (empty when it is a full-size run)."""
    reasons, size = [], model_parameters(params.model.source)
    if "smollm" in params.model.source.lower() or (size is not None and size < SMALL_MODEL_PARAMS):
        reasons.append(f"the model ({model_name(params.model.source)}) is far smaller than the study's 8B model")
    if params.train.max_steps < FEW_STEPS:
        reasons.append(f"train.max_steps={params.train.max_steps} is too few GRPO steps to move the adapters much "
                       f"(fewer than {FEW_STEPS})")
    return reasons


def abstract(inputs: ReportInputs) -> list[str]:
    s, conf = inputs.headline, inputs.confidence
    st = s.stats
    counts, wilson, boot, tp, pq, gee = (st[k] for k in ("counts", "wilson", "bootstrap", "two_proportion",
                                                         "per_question", "gee"))

    def model(m: str) -> str:
        return (f"{fmt_count(counts[m]['correct'], counts[m]['total'])} ({fmt_pct(st['proportions'][m])}, "
                f"{conf} Wilson interval {fmt_interval(wilson[m]['low'], wilson[m]['high'])})")

    text = (f"We fine-tuned {model_name(inputs.params.model.source)} with GRPO and LoRA adapters for "
            f"{inputs.summary['global_step']} steps and evaluated the adapters saved at step {inputs.select['step']}. "
            f"On the *{s.name}* set ({design_text(st)}) the base model answered {model('base')} correctly and the "
            f"tuned model {model('tuned')}: a difference of {fmt_pp(boot['diff'])} (cluster bootstrap {conf} interval "
            f"{fmt_interval(boot['ci_low'], boot['ci_high'], fmt_pp)}). Two-proportion z-test "
            f"{p_is(tp['p'], tp['note'])}; per-question paired t-test {p_is(pq['p_t'], pq['note_t'])} (Wilcoxon "
            f"{p_is(pq['p_wilcoxon'], pq['note_wilcoxon'])}); clustered GEE odds ratio {fmt_num(gee['odds_ratio'])} "
            f"{fmt_interval(gee['ci_low'], gee['ci_high'], fmt_num)}, {p_is(gee['p'], gee['note'])}.")
    lines = ["## Abstract", "", text]
    if sentence := degenerate_sentence(st):
        lines += ["", sentence]
    if no_signal_warning(inputs.summary):
        lines += ["", f"**No learning signal** in this run's training, {NOT_TRAINING}."]
    reasons = demonstration_reasons(inputs.params)
    if reasons:
        lines += ["", f"**This run demonstrates the machinery, not the study's effect**: {'; '.join(reasons)}. "
                      "Details under Limitations."]
    return lines


def reward_text(r) -> str:
    """The variant's rewards in words. Only the built-in variants are known here; one of the user's own is named
    by the reward functions it returned, not described by a guess."""
    if r.variant not in VARIANTS:
        names = ", ".join(f"`{name}`" for name in reward_names(r))
        return f"- **Rewards** (reward.variant = `{r.variant}`, a variant of this run's own): {names}."
    parts = [f"correctness {fmt_param(r.correct_value)} for a correct final answer at any length (no length gate)"]
    if r.variant == "study":
        band = "" if r.min_tokens == r.full_tokens else (
            f"{fmt_param(r.correct_value - r.short_penalty)} (short penalty {fmt_param(r.short_penalty)}) from "
            f"{r.min_tokens} to {r.full_tokens - 1} tokens, ")
        parts = [f"correctness {fmt_param(r.correct_value)} for a correct final answer of at least {r.full_tokens} "
                 f"tokens, {band}and 0 under {r.min_tokens} tokens (the length gates) or when wrong"]
    if r.variant != "correctness_only":
        parts.append(f"format up to {fmt_param(r.format_max)} in three equal parts (a line starting with `####`, a "
                     "plain number after the last `####`, that line being the last)")
    return f"- **Rewards** (reward.variant = {r.variant}): " + "; ".join(parts) + "."


def method(inputs: ReportInputs) -> list[str]:
    p, summary = inputs.params, inputs.summary
    t, g, design = p.train, p.generation, inputs.headline.stats["design"]
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes
    resumed = f"resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else "no resume"
    where = f"uploaded to `{summary['remote']}` (steps {fmt_param(summary['uploaded_steps'])})" \
        if summary["remote"] else "kept locally only"
    sets = "; ".join(f"*{s.name}*: {design_text(s.stats)} (questions: {p.evaluation.sets[s.name].questions}, "
                     f"samples: {p.evaluation.sets[s.name].samples})" for s in inputs.sets)
    return ["## Method", "",
            f"- **Model**: `{p.model.source}` (revision {p.model.revision}, {p.model.dtype}, device {p.model.device}).",
            f"- **LoRA adapters**: rank {t.lora.r}, alpha {t.lora.alpha}, dropout {fmt_param(t.lora.dropout)}, "
            f"target modules {fmt_param(t.lora.target_modules)}.",
            f"- **GRPO** (TRL): {t.per_device_train_batch_size} completions per device x "
            f"{t.gradient_accumulation_steps} gradient-accumulation steps x {t.num_processes} process(es) = "
            f"{per_step} completions per optimizer step, i.e. {per_step // t.num_generations} prompts x "
            f"{t.num_generations} generations; {t.max_steps} steps at learning rate {fmt_param(t.learning_rate)} "
            f"({t.lr_scheduler_type}, {t.warmup_steps} warm-up steps); KL coefficient beta {fmt_param(t.beta)}; loss "
            f"type {t.loss_type}; completions up to {t.max_completion_length} tokens at temperature "
            f"{fmt_param(t.temperature)}; truncated completions {'masked' if t.mask_truncated_completions else 'kept'}"
            f" in the loss. Training prompts: GSM8K train ({p.data.train_questions} questions); seed {p.seed}.",
            f"- **Checkpointing**: every {t.save_steps} steps, the newest {t.keep_checkpoints} kept beside step "
            f"{p.select.step}, {where}. This run: {summary['global_step']} steps ({resumed}), mean logged training loss "
            f"{fmt_num(summary['mean_loss'], 4)}, mean training reward {fmt_num(summary['mean_reward'], 3)} (last "
            f"logged {fmt_num(summary['final_reward'], 3)}), run id `{summary['run_id']}`.",
            reward_text(p.reward),
            f"- **Generation** (baseline and evaluation): engine {g.engine}, up to {g.max_new_tokens} new tokens, "
            f"temperature {fmt_param(g.temperature)}, top-p {fmt_param(g.top_p)}, batches of {g.batch_size}.",
            f"- **Evaluation design**: {sets}. The base model and the tuned model answer the same questions.",
            "- **Grading**: the primary grader is the GSM8K extractor (markers `####`, then `\\boxed{}`, then "
            "\"the answer is\", then the last number; numeric match), which also flags answers a reader could grade "
            "differently as ambiguous. math-verify grades every answer again as an audit.",
            f"- **Statistics** (alpha {fmt_param(design['alpha'])}): Wilson intervals; pooled two-proportion z-test; "
            "paired t-test and Wilcoxon signed-rank test on per-question scores; logistic GEE with questions as "
            f"clusters (exchangeable correlation, robust errors); cluster bootstrap ({design['bootstrap_samples']} "
            f"resamples of questions, seed {design['seed']}); exact McNemar test on per-question majority verdicts; "
            f"power from Cohen's h with the ICC design effect (target {fmt_pct(design['power_target'])})."]


def signal_text(summary: dict) -> str:
    """In words: did the groups carry reward spread, and how far did the adapter move from its initialisation. A
    run without signal is named by the cause (or causes) seen, never by one it did not see."""
    share, norm = summary["zero_std_share"], summary["lora_update_norm"]
    if share is None and norm is None:
        return ("No learning-signal diagnostics were logged (frac_reward_zero_std, lora/update_norm), so this report "
                "cannot say whether training had a signal.")
    moved = "n/a" if norm is None else f"{norm:.3g}"
    spread = (f"{'An unknown share' if share is None else fmt_pct(share)} of groups had identical rewards "
              "(frac_reward_zero_std, averaged over the logged steps)")
    flat, still = signal_failures(summary)
    if flat or still:
        causes = ([f"{spread}: their advantages are zero, so GRPO had almost nothing to learn from"] if flat else []) \
            + ([f"the adapter did not move from its initialisation (LoRA update norm {moved})"] if still else [])
        return f"**No learning signal**: {'; and '.join(causes)}."
    rest = "" if share is None else ", so the rest carried a learning signal"
    return f"{spread}{rest}; the adapter moved from its initialisation to a LoRA update norm of {moved}."


NOT_TRAINING = ("so a difference between the base and the tuned model here is not an effect of training; see "
                "Training")


def training(inputs: ReportInputs) -> list[str]:
    """The learning-signal diagnostics of the train stage's summary, in words, a table and the figures."""
    summary = inputs.summary
    lines = ["## Training", "", signal_text(summary), "",
             "The norm is ||scale · B · A||_F summed over the LoRA layers: 0 at initialisation (peft starts B at 0), "
             "so it says how far the adapter moved.", "", *header("Diagnostic (mean over logged steps)", "Value"),
             row("Groups with identical rewards (frac_reward_zero_std)", fmt_pct(summary["zero_std_share"])),
             row("Completions cut at max_completion_length (clipped_ratio)", fmt_pct(summary["clipped_share"])),
             row("Mean completion length (tokens)", fmt_num(summary["mean_completion_length"], 1))]
    for name, component in sorted(summary["rewards"].items()):
        lines.append(row(f"Reward `{name}`: mean (spread within groups)",
                         f"{fmt_num(component['mean'], 3)} ({fmt_num(component['std'], 3)})"))
    lines.append(row("LoRA update norm (last logged step)", fmt_num(summary["lora_update_norm"], 4)))
    s = inputs.headline
    return lines + figure_lines(s, [f for f in TRAINING_FIGURES if f in s.stats["figures"]], "training")


def analysis(inputs: ReportInputs) -> list[str]:
    lines = ["## Statistical analysis", "", "Which test answers which question:", "",
             "- *Is the tuned model right more often, if every answer counted as independent?* The pooled "
             "two-proportion z-test, the study's headline test. Answers to the same question are correlated, so when "
             "each question is sampled several times this test overstates the evidence.",
             "- *Does the typical question improve?* The paired t-test and the Wilcoxon signed-rank test compare each "
             "question's score (the fraction of its samples answered correctly) under both models: one pair per "
             "question, so the number of questions is the sample size.",
             "- *Are the odds of a correct answer higher, allowing for easy and hard questions?* Logistic GEE on every "
             "answer with the question as the cluster and robust standard errors.",
             "- *How uncertain is the difference in accuracy?* The cluster bootstrap resamples whole questions, "
             "keeping each question's base and tuned answers together.",
             "- *Do more questions flip to right than to wrong?* The exact McNemar test on each question's majority "
             "verdict (the swap tables list them).",
             "- *Could this design have detected the difference?* Power from the observed effect, with the sample "
             "shrunk by the design effect 1 + (k - 1) x ICC for k samples per question.", "", "In this run:", ""]
    for s in inputs.sets:
        design, power = s.stats["design"], s.stats["power"]
        if design["samples_per_question"] > 1:
            lines.append(f"- *{s.name}* ({design_text(s.stats)}): the answers are {design['questions']} clusters "
                         f"(ICC {fmt_num(power['icc'])}, design effect {fmt_num(power['design_effect'])}, worth "
                         f"{fmt_num(power['effective_n_in_study'], 1)} independent answers), so the per-question and "
                         "clustered tests are the honest ones; the z-test is shown to compare with the study.")
        else:
            lines.append(f"- *{s.name}* ({design_text(s.stats)}): each question is answered once, so the answers "
                         "are independent and the answer-level tests are valid too.")
    return lines


def selection(inputs: ReportInputs) -> list[str]:
    """Which checkpoint was evaluated and why, beside the candidates the rules give, each with its validation
    accuracy (the held-out train questions), and the figure with the curves."""
    sel, validation = inputs.select, inputs.summary["validation"]
    if sel["rule_step"] is None:
        verdict = "found no reward curve to apply to."
    elif sel["rule_step"] == sel["step"]:
        verdict = f"picks step {sel['rule_step']}, the same checkpoint."
    else:
        verdict = f"picks step {sel['rule_step']}; it is reported beside the choice, not used."
    lines = ["## Checkpoint selection", "",
             f"The evaluated adapters come from step {sel['step']} (`{sel['checkpoint']}`). Reason: "
             f"{md_escape(sel['reason'])}. The training-reward rule ({md_escape(sel['rule'])}) {verdict} "
             f"Saved checkpoints: steps {fmt_param(sel['saved_steps'])}."]
    if not sel["validation_points"]:
        asked = inputs.params.data.validation_questions
        return lines + ["", f"No validation curve was logged (data.validation_questions: {asked}"
                        + ("" if asked == 0 else ", but no pass reached the training curves") + "), so no choice "
                        "here was checked on held-out questions."]
    labels = ("select.step (the study's rule: by hand)", f"validation rule ({md_escape(sel['validation_rule'])})",
              "training-reward rule")
    steps = dict(zip(labels, (inputs.params.select.step, sel["validation_step"], sel["rule_step"])))
    accuracies = [sel["validation_accuracy"][key] for key in SELECT_CANDIDATES]  # by key: select.json is sorted
    lines += ["", f"Every {inputs.params.train.eval_steps} steps the adapters answered {validation['questions']} "
              "held-out questions of the training split (never trained on) greedily; the validation accuracy at "
              "each candidate step:", "", *header("Candidate", "Step", "Validation accuracy", "Evaluated")]
    for (label, step), accuracy in zip(steps.items(), accuracies):
        lines.append(row(label, "none" if step is None else str(step),
                         "not validated" if accuracy is None else fmt_pct(accuracy),
                         "yes" if step == sel["step"] else "no"))
    # What the passes cost is in results/train/summary.json; wall-clock time here would break the report's
    # byte-for-byte reproducibility.
    lines += ["", "The time the passes took, and its share of the training time, is the train summary's "
              "`validation` entry (`dvc metrics show`)."]
    if inputs.selection_figure:
        lines += ["", f"![selection]({inputs.selection_figure})", "",
                  "*Figure selection: validation accuracy and mean training reward by step, with each candidate "
                  "step marked (solid: the evaluated one).*"]
    return lines


def limitations(inputs: ReportInputs) -> list[str]:
    """Caveats derived from the data: run size, power, undefined or unreliable statistics, grading, selection."""
    lines, reasons = ["## Limitations", ""], demonstration_reasons(inputs.params)
    if reasons:
        lines.append(f"- **This run demonstrates the machinery, not the study's effect**: {'; '.join(reasons)}. "
                     "Its numbers show that the pipeline runs end to end; they are no evidence for or against "
                     "length-gated GRPO.")
    if no_signal_warning(inputs.summary):
        lines.append(f"- Training had no learning signal, {NOT_TRAINING}.")
    lines.append(f"- Published reference (the study's own figures, not this run's result): {PUBLISHED}.")
    for s in inputs.sets:
        power, diff = s.stats["power"], s.stats["bootstrap"]["diff"]
        if power["achieved_power"] < power["target_power"]:
            needed = power["questions_needed"]
            # Where no sample size is found, the power note below says why.
            lines.append(f"- *{s.name}*: the design had {fmt_pct(power['achieved_power'])} power to detect the "
                         f"observed difference ({fmt_pp(diff)})" + (
                             f"; about {needed} questions per model would give {fmt_pct(power['target_power'])}."
                             if needed is not None else "."))
        for test, note, undefined in stat_notes(s.stats):
            lines.append(f"- *{s.name}*, {test}: {'p-value undefined; ' if undefined else ''}"
                         f"{md_escape(note) or 'no reason recorded'}.")
        disagreements = len(s.stats["grading"]["disagreements"])
        if disagreements:
            lines.append(f"- *{s.name}*: the extractor and math-verify disagree on {disagreements} answers; the "
                         "grading table shows whether a conclusion depends on the grader.")
    sel = inputs.select
    by_hand = inputs.params.select.rule == "step"
    if by_hand and sel["rule_step"] is not None and sel["rule_step"] != sel["step"]:
        lines.append(f"- The evaluated checkpoint (step {sel['step']}) was chosen by hand; the training-reward rule "
                     f"would pick step {sel['rule_step']}.")
    if not sel["validation_points"]:
        lines.append("- No validation curve was logged: the evaluated checkpoint was not checked on held-out "
                     "questions before the evaluation (set data.validation_questions above 0).")
    elif sel["validation_step"] is not None and sel["validation_step"] != sel["step"]:
        lines.append(f"- The validation rule would pick step {sel['validation_step']}, not the evaluated step "
                     f"{sel['step']} (select.rule: validation uses it).")
    lines.append(f"- One training run with one seed ({inputs.params.seed}): the variation between GRPO runs is "
                 "not measured.")
    return lines


def render_markdown(inputs: ReportInputs) -> str:
    params = inputs.params
    title = f"GRPO with {reward_phrase(params.reward.variant)} on GSM8K: {model_name(params.model.source)}"
    parts = [[f"# {title}"], abstract(inputs), method(inputs), training(inputs),
             *[set_results(inputs, s) for s in inputs.sets],
             analysis(inputs), *[swaps(s) for s in inputs.sets], selection(inputs), limitations(inputs)]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"
