"""Baseline stage: the base model answers one evaluation set; every completion graded.

    python -m stages.baseline --set study --model models/base --eval data/prepared/eval/study.jsonl \
        --out results/baseline/study

Writes `completions.jsonl` (question, completion, extracted answer, grade, ambiguity flag, both graders' verdicts),
`greedy.jsonl` (the same for one temperature-0 answer per question; empty when evaluation.greedy is off) and
`metrics.json`: correct / total of the sampled answers, the format, length and truncation rates, and the
standard-protocol columns of grpo_gsm8k.science.protocols (greedy, maj@k, pass@k, pass@1, lm-eval strict / flexible).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from grpo_gsm8k.answering import run_answer_stage
from grpo_gsm8k.io import fail
from grpo_gsm8k.params import load_params


def run(params, set_name: str, model_dir: Path, eval_path: Path, out_dir: Path) -> dict:
    return run_answer_stage(model_dir, None, eval_path, set_name, params, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", required=True, help="a name in evaluation.sets")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with fail():
        metrics = run(load_params(args.params), args.set, args.model, args.eval, args.out)
    print("baseline:", json.dumps(metrics))


if __name__ == "__main__":
    main()
