"""Statistics stage: compare the base and the tuned model's graded answers to the same questions.

    python -m stages.stats --base results/baseline/study/completions.jsonl \
        --tuned results/evaluate/study/completions.jsonl --train-log results/train/live \
        --out results/stats/study.json --figures reports/figures/study --swaps results/stats/study-swaps.json

Its params are params.yaml's `stats` section, `seed` and `reward.min_tokens` (`--params` names another file), as
for every stage. Writes the numbers (counts, Wilson intervals, two-proportion z-test, paired t/Wilcoxon on
per-question scores, clustered GEE, cluster bootstrap, McNemar, power, grading sensitivity, lengths, and the
rewarded behaviours beside accuracy: full-format rate, share under reward.min_tokens, mean length) to --out,
the figures to --figures and the per-question swap-ins/outs to --swaps, all-or-nothing: bad input writes nothing.
The analysis is grpo_gsm8k/science/analysis.py (the statistical tests themselves grpo_gsm8k/science/stats.py),
the figures grpo_gsm8k/science/figures.py; this module reads, validates and writes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from grpo_gsm8k.contracts import COMPLETION_FIELDS
from grpo_gsm8k.io import atomic_file, atomic_output_dir, fail
from grpo_gsm8k.params import StatsParams, load_params
from grpo_gsm8k.science import figures
from grpo_gsm8k.science.analysis import analyse, check_same_questions, headline, plain, swap_table

FIX = "regenerate it with the baseline/evaluate stage (dvc repro)"


def record_problem(record) -> str:
    """Why a completion record is unusable, or "" if it is fine."""
    if not isinstance(record, dict):
        return "a record must be a JSON object"
    for field, kind in COMPLETION_FIELDS.items():
        if field not in record:
            return f"missing field {field!r}"
        value = record[field]
        if not (isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)):
            return f"field {field!r} must be {kind.__name__}, got {type(value).__name__}"
    if record["n_tokens"] < 0:
        return "field 'n_tokens' must not be negative"
    return ""


def load_completions(path: Path) -> list[dict]:
    """Validated completion records; any problem is one ValueError line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found; run the baseline/evaluate stage that writes it (dvc repro)")
    records, seen = [], set()
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); {FIX}") from None
            problem = record_problem(record)
            key = (record.get("qid"), record.get("sample")) if not problem else None
            if not problem and key in seen:
                problem = f"duplicate answer qid={key[0]} sample={key[1]}"
            if problem:
                raise ValueError(f"{path}:{number}: {problem}; {FIX}")
            seen.add(key)
            records.append(record)
    if not records:
        raise ValueError(f"{path}: holds no completion records; {FIX}")
    return records


def dumps(data) -> str:
    return json.dumps(plain(data), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"


def run(stats: StatsParams, seed: int, base_path: Path, tuned_path: Path, train_log_dir: Path | None,
        out_json: Path, figures_dir: Path, swaps_path: Path, metrics_path: Path | None = None, *,
        min_tokens: int) -> dict:
    """`stats`, `seed` and `min_tokens` (reward.min_tokens) as loaded (and validated) from params.yaml by
    grpo_gsm8k.params."""
    base, tuned = load_completions(Path(base_path)), load_completions(Path(tuned_path))
    check_same_questions(base, tuned, base_path, tuned_path)
    result = analyse(base, tuned, alpha=stats.alpha, bootstrap_samples=stats.bootstrap_samples, seed=seed,
                     power_target=stats.power_target, min_tokens=min_tokens)
    curves, notes = figures.load_training_log(Path(train_log_dir) if train_log_dir else None)
    result["training"] = {"curves": sorted(curves), "notes": notes}
    swaps = swap_table(base, tuned)
    # Everything is computed before any output is touched; the three outputs replace old ones only together.
    with contextlib.ExitStack() as stack:
        figures_tmp = stack.enter_context(atomic_output_dir(Path(figures_dir)))
        json_tmp = stack.enter_context(atomic_file(Path(out_json)))
        swaps_tmp = stack.enter_context(atomic_file(Path(swaps_path)))
        metrics_tmp = stack.enter_context(atomic_file(Path(metrics_path))) if metrics_path else None
        result["figures"] = figures.draw_set_figures(figures_tmp, result, base, tuned, curves)
        json_tmp.write_text(dumps(result))
        swaps_tmp.write_text(dumps(swaps))
        if metrics_tmp is not None:
            metrics_tmp.write_text(dumps(headline(result)))
    return plain(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", type=Path, required=True, help="base model completions.jsonl")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned model completions.jsonl")
    parser.add_argument("--train-log", type=Path, default=None, help="dvclive folder (optional)")
    parser.add_argument("--out", type=Path, required=True, help="statistics JSON")
    parser.add_argument("--figures", type=Path, required=True, help="folder for the PNG figures")
    parser.add_argument("--swaps", type=Path, required=True, help="swap-ins/outs JSON")
    parser.add_argument("--metrics", type=Path, default=None, help="headline numbers JSON (for dvc metrics)")
    args = parser.parse_args(argv)
    with fail():
        params = load_params(args.params)
        result = run(params.stats, params.seed, args.base, args.tuned, args.train_log, args.out, args.figures,
                     args.swaps, args.metrics, min_tokens=params.reward.min_tokens)
    counts, tests = result["counts"], result["two_proportion"]
    print(f"stats: base {counts['base']['correct']}/{counts['base']['total']} -> tuned "
          f"{counts['tuned']['correct']}/{counts['tuned']['total']}; two-proportion p={tests['p']}, "
          f"per-question t p={result['per_question']['p_t']}, GEE p={result['gee']['p']}")
    b = result["behaviours"]
    print(f"stats: full format {b['full_format']['proportions']['base']:.3f} -> "
          f"{b['full_format']['proportions']['tuned']:.3f} (p={b['full_format']['verdict']['p']}), under "
          f"reward.min_tokens {b['short']['proportions']['base']:.3f} -> {b['short']['proportions']['tuned']:.3f} "
          f"(p={b['short']['verdict']['p']}), mean tokens {b['length']['means']['base']:.1f} -> "
          f"{b['length']['means']['tuned']:.1f} (p={b['length']['verdict']['p']})"
          + ("; answers got shorter or more formatted while accuracy did not improve"
             if b["degenerate"]["degenerate"] else ""))


if __name__ == "__main__":
    main()
