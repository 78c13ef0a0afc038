"""The adapter is really trained, saved and loaded, through the stages as the pipeline runs them (train.run with
the reward variant chosen in params, then select, baseline and evaluate): GRPO with the study's format reward alone, on
SmolLM2-135M-Instruct on CPU, makes the evaluated adapter write a well-formed `#### <number>` final line clearly
more often than the base model, on held-out test questions.

A 135M model cannot learn GSM8K in minutes, but it can learn the format; that is what this test relies on.
"""
from __future__ import annotations

import os

import pytest

from grpo_gsm8k.io import read_jsonl
from grpo_gsm8k.modeling import prepare_base
from grpo_gsm8k.params import load_params
from grpo_gsm8k.science.rewards import format_score
from stages import baseline, data, evaluate, select, train
from tests.conftest import ONE_BATCH, cpu_params_dict, write_params
from tests.rewards_for_tests import FORMAT_ONLY

SHORT_ANSWER_PROMPT = "Answer the math problem. Reply with the final answer only, written as '#### <number>'."
STEPS = int(os.environ.get("LEARNING_TEST_STEPS", "12"))


def full_format_rate(records: list[dict], format_max: float) -> float:
    return sum(format_score(r["completion"], format_max=format_max) == format_max for r in records) / len(records)


@pytest.mark.slow
def test_format_reward_is_learned_and_survives_save_and_load(tmp_path, smollm_dir):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**{
        "model.source": str(smollm_dir), "data.system_prompt": SHORT_ANSWER_PROMPT,
        "data.train_questions": 8 * STEPS, "evaluation.sets.test.questions": 24, "evaluation.sets.test.samples": 2,
        "reward.variant": FORMAT_ONLY,
        "generation.max_new_tokens": 32, "train.max_completion_length": 32, "train.max_steps": STEPS,
        "train.save_steps": STEPS, "train.eval_steps": STEPS, "train.learning_rate": 2e-4, "train.num_generations": 8,
        **ONE_BATCH, "train.checkpoint_remote": "", "select.step": STEPS})))
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    base = tmp_path / "base"
    prepare_base(str(smollm_dir), "main", base)
    summary = train.run(params, base, tmp_path / "prepared" / "train.jsonl", tmp_path / "ckpt", tmp_path / "live",
                        tmp_path / "summary.json")
    assert summary["global_step"] == STEPS
    select.run(params.select, tmp_path / "ckpt", tmp_path / "live", tmp_path / "adapter", tmp_path / "select.json",
               tmp_path / "selection.png")

    held_out = tmp_path / "prepared" / "eval" / "test.jsonl"  # test split: never trained on
    baseline.run(params, "test", base, held_out, tmp_path / "baseline")
    tuned = evaluate.run(params, "test", base, tmp_path / "adapter", held_out, tmp_path / "evaluate")
    rates = {label: full_format_rate(read_jsonl(tmp_path / folder / "completions.jsonl"), params.reward.format_max)
             for label, folder in (("base", "baseline"), ("tuned", "evaluate"))}
    print("full-format rate on held-out prompts:", rates)
    assert rates["tuned"] >= rates["base"] + 0.2, rates  # seen here: 0.0 -> 0.31
    assert tuned["mean_reward"] > 0, tuned  # scored with the params' variant: the format reward
