"""How many tokens a GRPO step's log-prob forwards run, in TRL's padded layout and cut to each chunk's real tokens
(grpo_gsm8k/training/trimmed_logps.py): a count, no model, no GPU.

    python bench/padding_tokens.py [--steps 200] [--out DIR]

A step as the study and the bench take it: 4 prompts x 6 generations = 24 rows, shuffled (as TRL does before it
splits them) into micro-batches of 6. TRL pads every prompt to the longest prompt of the 24 and every completion to
the longest completion; trimmed, each micro-batch runs at its own longest row (prompt + completion). Prompts are the
bench's (system prompt + a GSM8K train question, chat template, the bench's tokenizer); completion lengths are the
bench's worst cases (every completion at the cap) and its realistic pool (`--lengths gsm8k:2.0`: the reference
solutions' token counts x 2, capped at 512). Prints the mean tokens per step of each layout and of the real tokens.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_grpo_step import build_tokenizer, chat_prompt, gsm8k_rows, reference_lengths  # noqa: E402

ROWS, GROUP, MICRO = 24, 6, 6


def step_tokens(prompts: list[int], pool: list[int], rng: random.Random) -> dict:
    """One step's token counts: TRL's padded training forwards, trimmed ones, the real tokens, and the no-grad
    scoring forward (all 24 rows at once) trimmed as a fraction of padded."""
    rows = [(p, rng.choice(pool)) for p in prompts for _ in range(GROUP)]
    padded = ROWS * (max(p for p, _ in rows) + max(c for _, c in rows))
    rng.shuffle(rows)
    trimmed = sum(MICRO * max(p + c for p, c in rows[i:i + MICRO]) for i in range(0, ROWS, MICRO))
    return {"padded": padded, "trimmed": trimmed, "real": sum(p + c for p, c in rows),
            "scoring_trimmed": ROWS * max(p + c for p, c in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="20 questions and 5 steps: a check of the script")
    parser.add_argument("--out", default=".")
    cli = parser.parse_args()
    tokenizer = build_tokenizer(vocab_size=1000 if cli.tiny else 8000)
    questions = gsm8k_rows("train", 20 if cli.tiny else 400)
    prompt_lengths = [len(tokenizer.apply_chat_template(chat_prompt(r["question"]), add_generation_prompt=True,
                                                        tokenize=True, return_dict=True)["input_ids"])
                      for r in questions]
    shapes = {"24 x 256, every completion at the cap": [256], "24 x 512, every completion at the cap": [512],
              "24 x up to 512, --lengths gsm8k:2.0": reference_lengths(tokenizer, 2.0, 512)}
    rng = random.Random(0)
    lines = [f"Prompts: mean {statistics.mean(prompt_lengths):.0f} tokens (min {min(prompt_lengths)}, max "
             f"{max(prompt_lengths)}); mean tokens a step over {5 if cli.tiny else cli.steps} steps.", "",
             "| shape | training forwards, TRL's padding | trimmed | real tokens | trimmed / padded | "
             "scoring forward trimmed / padded |", "|---|---|---|---|---|---|"]
    for name, pool in shapes.items():
        steps = [step_tokens(rng.sample(prompt_lengths, ROWS // GROUP), pool, rng)
                 for _ in range(5 if cli.tiny else cli.steps)]
        mean = {k: statistics.mean(s[k] for s in steps) for k in steps[0]}
        lines.append(f"| {name} | {mean['padded']:.0f} | {mean['trimmed']:.0f} | {mean['real']:.0f} | "
                     f"{mean['trimmed'] / mean['padded']:.0%} | {mean['scoring_trimmed'] / mean['padded']:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(cli.out, "padding_tokens.md").write_text(text)


if __name__ == "__main__":
    main()
