"""Card stage: the selected adapter's model card, README.md in the adapter folder, in the Hugging Face format.

    python -m stages.card --adapter models/adapter --select results/select.json \
        --baseline results/baseline --evaluate results/evaluate [--params params.yaml]

Reads params.yaml, results/select.json and, for each evaluation set, the baseline and evaluate metrics.json;
writes the card (YAML front matter with base_model, library_name, datasets, tags and this run's model-index, then
the training settings, the results and how to load and upload the folder) beside the adapter files, so the folder
uploads to the hub as it is. A missing or stale input is one error line naming the file and the stage that writes
it, and leaves the old card in place. The text is grpo_gsm8k/science/model_card.py.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from grpo_gsm8k.contracts import (ACCURACY_KEYS, ADAPTER_FILES, ANSWER_METRICS, ANSWER_METRICS_KEYS, MODEL_CARD,
                                  SELECT_KEYS)
from grpo_gsm8k.io import atomic_file, fail, read_stage_json
from grpo_gsm8k.modeling import resolve_source
from grpo_gsm8k.params import Params, load_params
from grpo_gsm8k.science.model_card import CardInputs, SetScores, front_matter, render_body


def card_text(front: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def run(params: Params, adapter_dir: Path, select_path: Path, baseline_dir: Path, evaluate_dir: Path) -> Path:
    """Read every input, then write the card (nothing on bad input); returns its path."""
    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise ValueError(f"{adapter_dir / name} not found; the select stage writes it (dvc repro)")
    keys = (*ANSWER_METRICS_KEYS, *ACCURACY_KEYS)
    sets = [SetScores(name, eval_set.samples,
                      read_stage_json(Path(baseline_dir) / name / ANSWER_METRICS, "baseline", keys),
                      read_stage_json(Path(evaluate_dir) / name / ANSWER_METRICS, "evaluate", keys))
            for name, eval_set in params.evaluation.sets.items()]
    settings = {"train": dataclasses.asdict(params.train), "reward": dataclasses.asdict(params.reward),
                "generation": dataclasses.asdict(params.generation), "seed": params.seed,
                "train_questions": params.data.train_questions}
    inputs = CardInputs(params.model.source, resolve_source(params.model.source).kind, adapter_dir.as_posix(),
                        settings, read_stage_json(Path(select_path), "select", SELECT_KEYS), sets)
    text = card_text(front_matter(inputs), render_body(inputs))
    with atomic_file(adapter_dir / MODEL_CARD) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return adapter_dir / MODEL_CARD


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--adapter", type=Path, required=True, help="the select stage's adapter folder; the card "
                        "is written into it")
    parser.add_argument("--select", type=Path, required=True, help="the select stage's record")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline stage's folder (<set>/ each)")
    parser.add_argument("--evaluate", type=Path, required=True, help="the evaluate stage's folder (<set>/ each)")
    args = parser.parse_args(argv)
    with fail():
        path = run(load_params(args.params), args.adapter, args.select, args.baseline, args.evaluate)
    print("card:", path)


if __name__ == "__main__":
    main()
