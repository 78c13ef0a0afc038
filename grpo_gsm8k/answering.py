"""Answer an evaluation set: sample each question's completions, grade them, summarise, write.

The baseline and evaluate stages differ only in the model they pass here, so both are graded by the same code.
Beside the sampled answers, an optional greedy pass (temperature 0, one answer per question, same engine) and the
standard-protocol columns of grpo_gsm8k.science.protocols (maj@k, pass@k, lm-eval's strict and flexible matches).
Sampling and grading are grpo_gsm8k/generation.py's answer_set; the output files are grpo_gsm8k/contracts.py's.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from grpo_gsm8k.contracts import ANSWER_METRICS, COMPLETIONS, GREEDY
from grpo_gsm8k.generation import answer_set
from grpo_gsm8k.io import atomic_output_dir, read_jsonl, write_json, write_jsonl
from grpo_gsm8k.modeling import load_model, load_tokenizer
from grpo_gsm8k.science.protocols import greedy_protocols, sampled_protocols
from grpo_gsm8k.science.rewards import total_reward


def summarize(records: list[dict], greedy_records: list[dict] | None = None) -> dict:
    """The metrics `dvc metrics show` and `dvc exp show` list for one model on one set; greedy_records is the
    temperature-0 pass (None where evaluation.greedy is off)."""
    total = len(records)
    correct = sum(r["correct"] for r in records)
    summary = {
        "correct": correct,
        "total": total,
        "accuracy": correct / total if total else 0.0,
        "questions": len({r["qid"] for r in records}),
        "format_rate": sum(r["method"] == "hash" for r in records) / total if total else 0.0,
        "mean_tokens": sum(r["n_tokens"] for r in records) / total if total else 0.0,
        "truncated_rate": sum(r["truncated"] for r in records) / total if total else 0.0,
        # Reward-hacking audit: the format is rewarded on its own, so watch for well-formed wrong answers.
        "formatted_wrong_rate": sum(r["method"] == "hash" and not r["correct"] for r in records) / total
        if total else 0.0,
        "ambiguous": sum(r["ambiguous"] for r in records),
        "math_verify_correct": sum(r["mv_correct"] for r in records),
    }
    if records and "reward" in records[0]:
        summary["mean_reward"] = sum(r["reward"] for r in records) / total
    return {**summary, **sampled_protocols(records), **greedy_protocols(greedy_records)}


def run_answer_stage(base_dir, adapter_dir, eval_path, set_name: str, params, out_dir, reward_knobs=None) -> dict:
    """What baseline (adapter_dir=None) and evaluate share: load, answer, grade, write all-or-nothing."""
    if set_name not in params.evaluation.sets:
        raise ValueError(f"evaluation set {set_name!r} is not in evaluation.sets "
                         f"({', '.join(params.evaluation.sets)}); fix dvc.yaml or params.yaml")
    rows = read_jsonl(Path(eval_path))
    tokenizer = load_tokenizer(Path(base_dir))
    model = load_model(Path(base_dir), params.model.dtype, params.model.device,
                       adapter_dir=Path(adapter_dir) if adapter_dir else None)
    samples = params.evaluation.sets[set_name].samples
    label = "tuned" if adapter_dir else "base"
    records = answer_set(model, tokenizer, rows, samples, params.generation, params.seed, f"{label} {set_name}")
    greedy = answer_set(model, tokenizer, rows, 1, replace(params.generation, temperature=0.0), params.seed,
                        f"{label} {set_name} greedy") if params.evaluation.greedy else None
    if reward_knobs is not None:
        for record in records:
            record["reward"] = total_reward(record["completion"], record["gold"], record["n_tokens"], reward_knobs)
    metrics = summarize(records, greedy)
    with atomic_output_dir(Path(out_dir)) as tmp:
        write_jsonl(tmp / COMPLETIONS, records)
        write_jsonl(tmp / GREEDY, greedy or [])  # empty where evaluation.greedy is off: a declared out
        write_json(tmp / ANSWER_METRICS, metrics)
    return metrics
