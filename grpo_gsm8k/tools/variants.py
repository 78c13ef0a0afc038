"""Compare reward variants run as DVC experiments: one table, one seaborn figure and a reward-hacking audit.

    dvc exp run -S reward.variant=naive                     # one experiment per variant (or --queue them,
    dvc exp run -S reward.variant=correctness_only          #   then `dvc queue start`)
    dvc exp run --queue -S seed=1,2,3 && dvc queue start     # one variant over three seeds
    python -m grpo_gsm8k.tools.variants --out reports/variants.md [--set study] [--all-commits]

Reads `dvc exp show --json` (experiments of HEAD, or of every commit with --all-commits) and, at each
experiment's revision through dvc.api, the evaluation set's completions for the length distributions. Writes
--out and a figure beside it (reports/variants.png). Numbers come from the metrics DVC tracks per experiment;
only the Wilson intervals (from correct/total) and the length quartiles are computed here. Experiments of one commit
whose params differ only in `seed` also get one between-seed row and a figure panel (grpo_gsm8k/science/seeds.py).
Rows are sorted by variant, settings, commit, seed and name, and the files carry no timestamps: the same experiments give
the same files.
Why over 300 lines: reading the experiments, the table, the audit and the figure of one comparison; each part is a
few short functions, and the comparison is one command (the seed aggregate lives in science/seeds.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, chosen before pyplot is imported (as in grpo_gsm8k/science/figures.py)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

import yaml  # noqa: E402

from grpo_gsm8k.contracts import ANSWER_METRICS, COMPLETIONS, STATS_SUFFIXES  # noqa: E402
from grpo_gsm8k.io import atomic_file, fail  # noqa: E402
from grpo_gsm8k.science.figures import COLORS, DPI  # noqa: E402
from grpo_gsm8k.science.report_format import (fmt_interval, fmt_num, fmt_p, fmt_pct, fmt_pp, header,  # noqa: E402
                                              md_escape, row)
from grpo_gsm8k.science.rewards import VARIANTS  # noqa: E402
from grpo_gsm8k.science.seeds import plot_seed_spread, seed_groups, seed_section, seed_summary  # noqa: E402
from grpo_gsm8k.science.stats import wilson_interval  # noqa: E402

MODELS = ("base", "tuned")
P_VALUES = ("p_two_proportion", "p_paired_t", "p_wilcoxon", "p_gee", "p_mcnemar")
# The stats stage's headline numbers of the rewarded behaviours (stages/stats.py behaviour_headline); an experiment
# run before they existed shows n/a.
BEHAVIOUR_RATES = {"full_format_rate": "full format", "short_share": "under reward.min_tokens"}
BEHAVIOUR_KEYS = (*(f"{key}_{end}" for key in BEHAVIOUR_RATES for end in ("base", "tuned")),
                  *(f"p_{key}{end}" for key in BEHAVIOUR_RATES for end in ("", "_two_proportion")),
                  "p_mean_tokens", "p_accuracy_per_question", "degenerate")
DONE_STATES = (None, "success")  # executor None: run in the workspace and finished
NO_EXPERIMENTS = ("no DVC experiment has {stats}; run one per variant first, e.g. "
                  "`dvc exp run -S reward.variant=naive` (variants: {variants})")


def declared_path(repo: Path, stage: str, kind: str, name: str, set_name: str) -> str:
    """The path dvc.yaml declares for `stage`'s output (`kind`: outs or metrics) ending in `name`, for one
    evaluation set: paths are written in dvc.yaml only; the file names inside each output are contracts'."""
    dvc_yaml = Path(repo) / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise ValueError(f"{dvc_yaml} not found; run from the project root or pass --repo <project root>")
    entries = yaml.safe_load(dvc_yaml.read_text())["stages"][stage].get(kind, [])
    paths = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    return next(path for path in paths if path.endswith(name)).replace("${item.set}", set_name)


def metric_paths(repo: Path, set_name: str) -> dict[str, str]:
    """The metrics files of one evaluation set that `dvc exp show` lists per experiment."""
    return {"base": declared_path(repo, "baseline", "metrics", ANSWER_METRICS, set_name),
            "tuned": declared_path(repo, "evaluate", "metrics", ANSWER_METRICS, set_name),
            "stats": declared_path(repo, "stats", "metrics", STATS_SUFFIXES["metrics"], set_name)}


def read_exp_show(repo: Path, all_commits: bool) -> list:
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"`dvc exp show --json` failed in {repo}: {last}")
    return json.loads(done.stdout)


def _experiment(entry: dict, name: str, kind: str, state: str | None, commit: str) -> dict:
    data = entry.get("data") or {}
    metrics = {path: (found.get("data") or {}) for path, found in (data.get("metrics") or {}).items()}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    return {"name": name, "rev": entry["rev"], "kind": kind, "state": state, "params": params, "metrics": metrics,
            "commit": commit}


def collect_experiments(show: list) -> list[dict]:
    """Commits and their experiments from `dvc exp show --json`, minus the workspace (it repeats one of them)."""
    found = []
    for commit in show:
        if commit.get("rev") == "workspace":
            continue
        found.append(_experiment(commit, commit.get("name") or commit["rev"][:7], "commit", None, commit["rev"]))
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            name = exp.get("name") or exp["revs"][0]["rev"][:7]
            found.append(_experiment(exp["revs"][0], name, "experiment", state, commit["rev"]))
    return found


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    """Nested params as dotted keys, the way `dvc exp run -S` names them."""
    flat = {}
    for key, value in params.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def differing_settings(experiments: list[dict], leave_out: tuple[str, ...] = ("reward.variant",)) -> dict[str, str]:
    """Per experiment revision, the params (besides `leave_out`) whose values differ among the experiments."""
    flats = {e["rev"]: flatten(e["params"]) for e in experiments}
    keys = sorted({k for flat in flats.values() for k in flat} - set(leave_out))
    varying = [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for flat in flats.values()}) > 1]
    # Code spans keep underscores literal; a pipe would still end the table cell, so it is escaped.
    return {rev: ", ".join(f"`{k}={flat.get(k)}`".replace("|", "\\|") for k in varying)
            for rev, flat in flats.items()}


def _model_numbers(model: str, metrics: dict, alpha: float) -> dict:
    correct, total = metrics["correct"], metrics["total"]
    wilson = wilson_interval(correct, total, alpha)
    return {f"{model}_correct": correct, f"{model}_total": total, f"{model}_accuracy": metrics["accuracy"],
            f"{model}_low": wilson["low"], f"{model}_high": wilson["high"],
            f"{model}_mean_tokens": metrics.get("mean_tokens"), f"{model}_truncated": metrics.get("truncated_rate"),
            f"{model}_formatted_wrong": metrics.get("formatted_wrong_rate"),
            f"{model}_format_rate": metrics.get("format_rate")}


def usable_experiments(experiments: list[dict], paths: dict[str, str]) -> tuple[list[dict], list[str]]:
    """Finished experiments holding every metrics file, and a note for each other experiment."""
    usable, skipped = [], []
    for exp in experiments:
        missing = [p for p in paths.values() if not exp["metrics"].get(p)]
        if exp["state"] not in DONE_STATES:
            skipped.append(f"{exp['name']}: {exp['state']}")
        elif not missing:
            usable.append(exp)
        elif exp["kind"] == "experiment":  # a commit without results is just a commit, not worth a note
            skipped.append(f"{exp['name']}: no {missing[0]}")
    return usable, sorted(skipped)


def variant_rows(experiments: list[dict], paths: dict[str, str]) -> tuple[list[dict], list[str]]:
    """One flat row of numbers per usable experiment (`paths`: metric_paths), sorted by variant, settings and
    name; and the skip notes."""
    usable, skipped = usable_experiments(experiments, paths)
    settings, rows = differing_settings(usable), []
    group_settings = differing_settings(usable, ("reward.variant", "seed"))
    for exp in usable:
        flat = flatten(exp["params"])
        alpha = float(exp["params"].get("stats", {}).get("alpha", 0.05))
        stats, reward = exp["metrics"][paths["stats"]], exp["params"].get("reward", {})
        rows.append({"name": exp["name"], "rev": exp["rev"], "variant": reward.get("variant", "?"),
                     "settings": settings[exp["rev"]], "alpha": alpha, "min_tokens": reward.get("min_tokens"),
                     "seed": flat.get("seed"), "group_settings": group_settings[exp["rev"]],
                     # experiments alike in all but the seed, and of one commit (other code is another experiment)
                     "group": (exp["commit"], json.dumps({k: v for k, v in flat.items() if k != "seed"},
                                                         sort_keys=True)),
                     **_model_numbers("base", exp["metrics"][paths["base"]], alpha),
                     **_model_numbers("tuned", exp["metrics"][paths["tuned"]], alpha),
                     "difference": stats.get("difference"), "diff_low": stats.get("difference_ci_low"),
                     "diff_high": stats.get("difference_ci_high"), **{p: stats.get(p) for p in P_VALUES},
                     **{key: stats.get(key) for key in BEHAVIOUR_KEYS},
                     "mean_reward": exp["metrics"][paths["tuned"]].get("mean_reward")})
    order = list(VARIANTS)
    rows.sort(key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order), r["variant"],
                             r["group_settings"], r["group"][0], _seed_order(r["seed"]), r["settings"], r["name"],
                             r["rev"]))
    return rows, skipped


def _seed_order(seed) -> tuple:
    """Seeds in numeric order (2 before 10); a missing or non-numeric one after them."""
    numeric = isinstance(seed, (int, float)) and not isinstance(seed, bool)
    return (0, seed, "") if numeric else (1, 0, str(seed))


def read_lengths(repo: Path, rev: str, set_name: str) -> dict[str, list[int]] | None:
    """Completion lengths of both models at an experiment's revision; None when its files can't be read
    (e.g. an experiment pulled without its data), and the figure falls back to the mean from the metrics."""
    import dvc.api

    lengths = {}
    try:
        for model in MODELS:
            stage = "baseline" if model == "base" else "evaluate"
            path = declared_path(repo, stage, "outs", COMPLETIONS, set_name)
            with dvc.api.open(path, repo=str(repo), rev=rev) as handle:
                lengths[model] = [json.loads(line)["n_tokens"] for line in handle if line.strip()]
    except Exception:  # noqa: BLE001 - not cached, no remote, no credentials...: all mean "no distribution"
        return None
    return lengths


def _interval(r: dict, model: str) -> str:
    return (f"{fmt_pct(r[f'{model}_accuracy'])} ({r[f'{model}_correct']}/{r[f'{model}_total']}) "
            f"{fmt_interval(r[f'{model}_low'], r[f'{model}_high'])}")


def _level(rows: list[dict]) -> str:
    alphas = {r["alpha"] for r in rows}
    return f"{1 - alphas.pop():.0%}" if len(alphas) == 1 else "1 − stats.alpha"


def accuracy_table(rows: list[dict]) -> list[str]:
    level = _level(rows)
    lines = header("experiment", "variant", "settings", f"before, {level} Wilson", f"after, {level} Wilson",
                   f"difference, {level} bootstrap", "p two-prop.", "p paired t", "p Wilcoxon", "p GEE", "p McNemar")
    for r in rows:
        difference = f"{fmt_pp(r['difference'])} {fmt_interval(r['diff_low'], r['diff_high'], fmt_pp)}"
        lines.append(row(r["name"], r["variant"], r["settings"] or "–", _interval(r, "base"),
                         _interval(r, "tuned"), difference, *(fmt_p(r[p]) for p in P_VALUES)))
    return lines


def _quartiles(values: list[int] | None) -> str:
    if not values:
        return "n/a"
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"{median:g} [{q1:g}–{q3:g}] ({min(values)}–{max(values)})"


def _short_rate(values: list[int] | None, min_tokens) -> str:
    if not values or min_tokens is None:
        return "n/a"
    return fmt_pct(sum(v < min_tokens for v in values) / len(values))


def _change(r: dict, key: str, fmt=fmt_pct) -> str:
    return f"{fmt(r[f'base_{key}'])} → {fmt(r[f'tuned_{key}'])}"


def audit_table(rows: list[dict], lengths: dict[str, dict | None]) -> list[str]:
    lines = header("experiment", "variant", "mean tokens", "tuned tokens: median [IQR] (range)",
                   "tuned shorter than reward.min_tokens", "truncated", "formatted but wrong", "formatted",
                   "mean reward (tuned)")
    for r in rows:
        tuned = (lengths.get(r["rev"]) or {}).get("tuned")
        lines.append(row(r["name"], r["variant"], _change(r, "mean_tokens", lambda x: fmt_num(x, 1)),
                         _quartiles(tuned), _short_rate(tuned, r["min_tokens"]), _change(r, "truncated"),
                         _change(r, "formatted_wrong"), _change(r, "format_rate"), fmt_num(r["mean_reward"])))
    return lines


def _tested_change(before, after, p, *p_z, fmt=fmt_pct) -> str:
    """'a → b (per-question p = ...; z-test p = ...)'; the z-test part only for rates (p_z given, maybe None)."""
    z_test = f"; z-test p = {fmt_p(p_z[0])}" if p_z else ""
    return f"{fmt(before)} → {fmt(after)} (per-question p = {fmt_p(p)}{z_test})"


def _degenerate_cell(flag) -> str:
    if flag is None:
        return "n/a"
    return "**yes**: shorter or more formatted, accuracy not better" if flag else "no"


def behaviours_table(rows: list[dict]) -> list[str]:
    """Accuracy and each rewarded behaviour before → after with its tests, as the report's rows, per experiment."""
    lines = header("experiment", "variant", "accuracy", *BEHAVIOUR_RATES.values(), "mean tokens",
                   "short, degenerate answers?")
    for r in rows:
        rates = [_tested_change(r[f"{key}_base"], r[f"{key}_tuned"], r[f"p_{key}"], r[f"p_{key}_two_proportion"])
                 for key in BEHAVIOUR_RATES]
        lines.append(row(r["name"], r["variant"],
                         _tested_change(r["base_accuracy"], r["tuned_accuracy"], r["p_accuracy_per_question"],
                                        r["p_two_proportion"]), *rates,
                         _tested_change(r["base_mean_tokens"], r["tuned_mean_tokens"], r["p_mean_tokens"],
                                        fmt=lambda x: fmt_num(x, 1)), _degenerate_cell(r["degenerate"])))
    return lines


def render_markdown(rows: list[dict], lengths: dict, skipped: list[str], set_name: str, figure: str,
                    seeds: list[dict] = ()) -> str:
    """`seeds`: a seed_summary per group of experiments differing only in seed."""
    no_lengths = [r["name"] for r in rows if lengths.get(r["rev"]) is None]
    lines = [f"# Reward variants on the `{set_name}` evaluation set", "",
             "Generated by `python -m grpo_gsm8k.tools.variants` from `dvc exp show --json`: one row per DVC experiment, "
             "before = base model, after = GRPO-tuned. Settings lists the params that differ between experiments.",
             "", "## Accuracy", "", *accuracy_table(rows), "",
             f"![Accuracy and completion length per variant]({figure})", "", *seed_section(seeds),
             "## Rewarded behaviours beside accuracy", "",
             "The stats stage's tests of what the reward pays for, base → tuned: the share of completions earning "
             "the whole format reward, the share under reward.min_tokens (tokens as the reward counts them) and the "
             "mean length (per-question p: paired t-test, or Wilcoxon where every question changed alike). The "
             "last column flags the seed study's failure: answers significantly shorter or more often formatted "
             "while accuracy did not significantly improve.", "", *behaviours_table(rows), "",
             "## Reward-hacking audit", "",
             "Naive rewards let the policy collapse to short, degenerate answers. Columns with → read base → "
             "tuned; watch for the tuned model getting shorter, more often well-formatted but wrong, or more often "
             "truncated. The mean reward is scored with each experiment's own variant, so compare it within a "
             "variant only.", "", *audit_table(rows, lengths), ""]
    if no_lengths:
        lines += [f"Length distributions unavailable (completions not in the DVC cache; `dvc exp pull` them): "
                  f"{', '.join(no_lengths)}. The figure shows their mean only.", ""]
    if skipped:
        lines += ["Skipped experiments: " + "; ".join(md_escape(s) for s in skipped) + ".", ""]
    return "\n".join(lines)


def plot_variants(path: Path, rows: list[dict], lengths: dict, seeds: list[dict] = ()) -> None:
    """Accuracy before/after with Wilson intervals, and the completion-length distribution, per experiment; and
    where experiments differ only in seed, each seed's difference per group."""
    labels, level = [f"{r['variant']}\n{r['name']}" for r in rows], _level(rows)
    widths = [max(11.0, 2.6 * len(rows)) / 2] * 2 + ([max(4.5, 2.6 * len(seeds))] if seeds else [])  # inches
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 5.5), width_ratios=widths)
        acc_ax, len_ax = axes[:2]
        try:
            for offset, model in ((-0.12, "base"), (0.12, "tuned")):
                y = np.array([r[f"{model}_accuracy"] for r in rows])
                err = np.array([[v - r[f"{model}_low"], r[f"{model}_high"] - v] for v, r in zip(y, rows)]).T
                acc_ax.errorbar(np.arange(len(rows)) + offset, y, yerr=err, fmt="o", capsize=5,
                                color=COLORS[model], label=f"{model} ({level} Wilson)")
            acc_ax.set_xticks(range(len(rows)), labels)
            acc_ax.set_ylim(-0.03, 1.03)
            acc_ax.set_ylabel("accuracy")
            acc_ax.set_title("Accuracy per variant")
            acc_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=9)
            _plot_lengths(len_ax, rows, lengths, labels)
            if seeds:
                plot_seed_spread(axes[2], seeds)
            fig.tight_layout()
            # format: the temporary name has no .png suffix; no software stamp, so reruns are byte-identical.
            fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
        finally:
            plt.close(fig)


def _plot_lengths(ax, rows: list[dict], lengths: dict, labels: list[str]) -> None:
    frame = pd.DataFrame([{"experiment": label, "model": model, "n_tokens": n}
                          for r, label in zip(rows, labels) for model in MODELS
                          for n in (lengths.get(r["rev"]) or {}).get(model, [])],
                         columns=["experiment", "model", "n_tokens"])
    if not frame.empty:
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`; harmless
            warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
            sns.boxplot(frame, x="experiment", y="n_tokens", hue="model", order=labels, hue_order=list(MODELS),
                        palette=COLORS, ax=ax)
    for x, r in enumerate(rows):  # the mean from the metrics, also where no distribution could be read
        for offset, model in ((-0.2, "base"), (0.2, "tuned")):
            ax.plot(x + offset, r[f"{model}_mean_tokens"], marker="D", color="black", mec="white", linestyle="none",
                    zorder=5, label="mean" if x == 0 and model == "base" else None)
    gates = {r["min_tokens"] for r in rows if r["variant"] == "study"}
    for gate in sorted(g for g in gates if g is not None):  # where the study's reward starts paying
        ax.axhline(gate, color="grey", linestyle="--", linewidth=1, label=f"reward.min_tokens = {gate}")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("completion length (tokens)")
    ax.set_xlabel("")
    ax.set_title("Completion length per variant (box: quartiles)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=9)


def run(repo: Path, out: Path, set_name: str = "study", all_commits: bool = False) -> list[dict]:
    if out.suffix == ".png":  # the figure is written beside the table under that very name
        raise ValueError(f"--out {out} names the figure; give the Markdown table's path (e.g. {out.with_suffix('.md')}"
                         "), and the figure goes beside it")
    paths = metric_paths(repo, set_name)
    rows, skipped = variant_rows(collect_experiments(read_exp_show(repo, all_commits)), paths)
    if not rows:
        raise ValueError(NO_EXPERIMENTS.format(stats=paths["stats"], variants=", ".join(VARIANTS)))
    seeds = [seed_summary(group) for group in seed_groups(rows)]
    lengths = {r["rev"]: read_lengths(repo, r["rev"], set_name) for r in rows}
    figure = out.with_suffix(".png")
    with atomic_file(figure) as tmp_png, atomic_file(out) as tmp_md:  # both files or neither
        plot_variants(tmp_png, rows, lengths, seeds)
        tmp_md.write_text(render_markdown(rows, lengths, skipped, set_name, figure.name, seeds))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/variants.md"), help="Markdown file to write")
    parser.add_argument("--set", default="study", help="evaluation set to compare (a key of evaluation.sets)")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository")
    args = parser.parse_args(argv)
    with fail():
        rows = run(args.repo, args.out, args.set, args.all_commits)
    print(f"variants: {len(rows)} experiment(s) -> {args.out}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
