"""The adapter is really trained, saved and loaded: GRPO with the study's format reward alone, on
SmolLM2-135M-Instruct on CPU, makes the evaluated adapter write a well-formed `#### <number>` final line clearly
more often than the base model, on held-out test questions.

A 135M model cannot learn GSM8K in minutes, but it can learn the format; that is what this test relies on.
"""
from __future__ import annotations

import functools
import os

import pytest

from grpo_gsm8k.answering import answer_set
from grpo_gsm8k.io import read_jsonl
from grpo_gsm8k.modeling import load_model, load_tokenizer
from grpo_gsm8k.params import load_params
from grpo_gsm8k.rewards import format_reward, format_score
from stages import data, select, train
from tests.conftest import cpu_params_dict, write_params

SHORT_ANSWER_PROMPT = "Answer the math problem. Reply with the final answer only, written as '#### <number>'."
STEPS = int(os.environ.get("LEARNING_TEST_STEPS", "12"))


def full_format_rate(records: list[dict], format_max: float) -> float:
    return sum(format_score(r["completion"], format_max=format_max) == format_max for r in records) / len(records)


@pytest.mark.slow
def test_format_reward_is_learned_and_survives_save_and_load(tmp_path, smollm_dir):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**{
        "model.source": str(smollm_dir), "data.system_prompt": SHORT_ANSWER_PROMPT,
        "data.train_questions": 8 * STEPS, "evaluation.sets.test.questions": 24,
        "generation.max_new_tokens": 32, "train.max_completion_length": 32, "train.max_steps": STEPS,
        "train.save_steps": STEPS, "train.learning_rate": 2e-4, "train.num_generations": 8,
        "train.per_device_train_batch_size": 16, "train.checkpoint_remote": "", "select.step": STEPS})))
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    rewarded = functools.update_wrapper(functools.partial(format_reward, format_max=params.reward.format_max),
                                        format_reward)
    trainer = train.build_trainer(params, smollm_dir, tmp_path / "prepared" / "train.jsonl", tmp_path / "ckpt",
                                  callbacks=[], reward_funcs=[rewarded])
    trainer.train()
    select.run(params.select, tmp_path / "ckpt", tmp_path / "live", tmp_path / "adapter", tmp_path / "select.json")

    held_out = read_jsonl(tmp_path / "prepared" / "eval" / "test.jsonl")  # test split: never trained on
    tokenizer = load_tokenizer(smollm_dir)
    rates = {}
    for label, adapter in (("base", None), ("tuned", tmp_path / "adapter")):
        model = load_model(smollm_dir, "float32", "cpu", adapter_dir=adapter)
        records = answer_set(model, tokenizer, held_out, 2, params.generation, params.seed, label)
        rates[label] = full_format_rate(records, params.reward.format_max)
    print("full-format rate on held-out prompts:", rates)
    assert rates["tuned"] >= rates["base"] + 0.2, rates  # seen here: 0.0 -> 0.31
