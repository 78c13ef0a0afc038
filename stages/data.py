"""Data stage: GSM8K -> training prompts and the evaluation samples.

    python -m stages.data --params params.yaml --out data/prepared

Reads GSM8K from a local folder of train/test jsonl (the shipped `data/gsm8k`), or through `datasets` for a hub id
(`openai/gsm8k`), writes `train.jsonl` (chat prompt with the system prompt from params, gold answer),
`validation.jsonl` (`data.validation_questions` train questions held out first: no training prompt has the same
row or the same question text) and `eval/<set>.jsonl` for every set in `evaluation.sets`: `questions` test
questions drawn with the params' seed, each listed once (the baseline and evaluate stages answer each `samples`
times).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from grpo_gsm8k.contracts import EVAL_FOLDER, TRAIN_PROMPTS, VALIDATION_PROMPTS
from grpo_gsm8k.io import atomic_output_dir, fail, read_jsonl, write_jsonl
from grpo_gsm8k.params import DataParams, EvaluationParams, load_params
from grpo_gsm8k.science.grading import parse_gold


def load_gsm8k(source: str, hub_config: str) -> dict:
    """Both splits by name, each indexable by row (a list of rows, or a `datasets.Dataset` from the hub); a
    folder must hold train.jsonl and test.jsonl."""
    folder = Path(source)
    if folder.is_dir():
        files = {split: folder / f"{split}.jsonl" for split in ("train", "test")}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"data.source={source!r} lacks {missing[0]}; "
                                    "point it at a folder with GSM8K's train.jsonl and test.jsonl")
        # Read here rather than through `datasets`: it reports a bad line by byte position only, and on a fresh
        # cache it prints progress bars into what should be the stage's one error line.
        return {split: read_jsonl(path, keys=("question", "answer"), fix=f"fix that line of data.source={source!r} "
                                  "or point data.source at an intact GSM8K folder (the shipped data/gsm8k)")
                for split, path in files.items()}
    # A path, not a hub id ("org/name"): it has a suffix, starts like a path, or its folder exists here.
    if folder.suffix or source.startswith((".", "/")) or (folder.parent != Path(".") and folder.parent.is_dir()):
        raise FileNotFoundError(f"data.source={source!r} does not exist; fix the path or use 'openai/gsm8k'")
    from datasets import load_dataset  # the hub path only: importing it costs seconds

    return load_dataset(source, hub_config)


def chat_prompt(system_prompt: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def prepare_rows(split, system_prompt: str, indices: list[int]) -> list[dict]:
    rows = []
    for qid in indices:
        example = split[qid]
        rows.append({
            "qid": qid,  # row index in the split: stable across runs and machines
            "question": example["question"],
            "answer": parse_gold(example["answer"]),
            "prompt": chat_prompt(system_prompt, example["question"]),
        })
    return rows


def choose(count: int | str, total: int, rng: random.Random, param: str, split: str) -> list[int]:
    """`count` distinct row indices drawn with `rng`, or every row in order for "all" (or exactly `total`);
    `split` says where they come from ("the test split") in the error."""
    if count != "all" and count > total:  # silently taking fewer would change the design
        raise ValueError(f"{param}={count} but {split} has {total} questions; "
                         f"use at most {total}, or \"all\" for every one")
    if count == "all" or count == total:
        return list(range(total))
    return rng.sample(range(total), count)


def question_key(question: str) -> str:
    """GSM8K's train split repeats some questions word for word (up to spacing and case): compare them so."""
    return " ".join(question.lower().split())


def split_validation(train, validation_questions: int, train_questions: int | str,
                     seed: int) -> tuple[list[int], list[int]]:
    """(validation row ids, training row ids): the validation rows are drawn first, then every row whose question
    text matches one of them leaves the training pool, so no validation question is ever trained on."""
    validation_ids = choose(validation_questions, len(train), random.Random(f"{seed}-validation"),
                            "data.validation_questions", "the train split")
    held_out = {question_key(train[i]["question"]) for i in validation_ids}
    # With validation off the pool is every row, so the training draw is the one made before validation existed.
    pool = [i for i in range(len(train)) if question_key(train[i]["question"]) not in held_out]
    picks = choose(train_questions, len(pool), random.Random(f"{seed}-train"),
                   "data.train_questions", f"the train split less its {len(validation_ids)} validation questions")
    train_ids = [pool[i] for i in picks]
    overlap = set(validation_ids) & set(train_ids)
    if overlap or held_out & {question_key(train[i]["question"]) for i in train_ids}:
        raise AssertionError(f"validation and training prompts overlap (rows {sorted(overlap)[:5]}); a bug in "
                             "stages/data.py: please report it")
    return validation_ids, train_ids


def run(data: DataParams, evaluation: EvaluationParams, seed: int, out_dir: Path) -> dict:
    dataset = load_gsm8k(data.source, data.hub_config)
    train, test = dataset["train"], dataset["test"]
    counts = {}
    with atomic_output_dir(out_dir) as tmp:
        validation_ids, train_ids = split_validation(train, data.validation_questions, data.train_questions, seed)
        write_jsonl(tmp / TRAIN_PROMPTS, prepare_rows(train, data.system_prompt, train_ids))
        write_jsonl(tmp / VALIDATION_PROMPTS, prepare_rows(train, data.system_prompt, validation_ids))
        counts["train"], counts["validation"] = len(train_ids), len(validation_ids)
        for name, eval_set in evaluation.sets.items():
            # Each set gets its own stream so adding a set never changes another set's draw.
            ids = choose(eval_set.questions, len(test), random.Random(f"{seed}-eval-{name}"),
                         f"evaluation.sets.{name}.questions", "the test split")
            write_jsonl(tmp / EVAL_FOLDER / f"{name}.jsonl", prepare_rows(test, data.system_prompt, ids))
            counts[name] = len(ids)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with fail():
        params = load_params(args.params)
        counts = run(params.data, params.evaluation, params.seed, args.out)
    print("data:", ", ".join(f"{name} {count} questions" for name, count in counts.items()))


if __name__ == "__main__":
    main()
