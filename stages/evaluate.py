"""Evaluate stage: the base model with the selected LoRA adapters (merged) answers one evaluation set.

    python -m stages.evaluate --set study --model models/base --adapter models/adapter \
        --eval data/prepared/eval/study.jsonl --out results/evaluate/study

Same outputs as the baseline stage (completions.jsonl, greedy.jsonl, metrics.json with the standard-protocol
columns), graded by the same code, plus each sampled completion's total reward under the params' reward variant
(for the reward-hacking audit of `dvc exp show`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from grpo_gsm8k.answering import run_answer_stage
from grpo_gsm8k.io import fail
from grpo_gsm8k.params import load_params


def run(params, set_name: str, model_dir: Path, adapter_dir: Path, eval_path: Path, out_dir: Path) -> dict:
    knobs = params.reward
    return run_answer_stage(model_dir, adapter_dir, eval_path, set_name, params, out_dir, reward_knobs=knobs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", required=True, help="a name in evaluation.sets")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with fail():
        metrics = run(load_params(args.params), args.set, args.model, args.adapter, args.eval, args.out)
    print("evaluate:", json.dumps(metrics))


if __name__ == "__main__":
    main()
