"""Experiments that differ only in seed, for the reward-variant comparison: grouping, the between-seed table and the
figure's seed panel (grpo_gsm8k/tools/variants.py reads the experiments and calls these).

    dvc exp run --queue -S seed=1,2,3 && dvc queue start
    python -m grpo_gsm8k.tools.variants --out reports/variants.md

The seed draws the evaluation questions (where a set takes fewer than all), the training subset and its order, and
the sampling of both models, so the base accuracy moves with the seed too. The difference is therefore taken
within each seed, where both models answered the same questions, and then summarised over the seeds
(stats.between_seed_spread: mean, sample sd, range, t interval of the mean with n - 1 degrees of freedom).
"""
from __future__ import annotations

import numpy as np

from grpo_gsm8k.science.figures import COLORS
from grpo_gsm8k.science.report_format import fmt_interval, fmt_pct, fmt_pp, fmt_spread, header, md_escape, row
from grpo_gsm8k.science.stats import between_seed_spread

DUPLICATE_SEED = ("experiments {first} and {second} have every param alike, seed {seed} included, so the seed spread "
                  "would count one seed twice; remove one of them, e.g. `dvc exp remove {second}`")


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """The rows (one per experiment: `group` holds its commit and every param but `seed`) of each group with two or
    more seeds, in the rows' order; a group of one seed has no spread and is left out."""
    groups: dict = {}
    for r in rows:
        if r["seed"] is not None:
            groups.setdefault(r["group"], []).append(r)
    found = [members for members in groups.values() if len({r["seed"] for r in members}) > 1]
    for members in found:
        first = {}
        for r in members:
            if r["seed"] in first:
                raise ValueError(DUPLICATE_SEED.format(first=first[r["seed"]], second=r["name"], seed=r["seed"]))
            first[r["seed"]] = r["name"]
    return found


def seed_summary(members: list[dict]) -> dict:
    """Before, after and their difference over one group's seeds; each seed's difference is tuned - base of that
    seed (the same questions), so the spread of the difference is not derived from the spreads of the accuracies."""
    alpha = members[0]["alpha"]  # one group: the same params, stats.alpha included
    differences = [r["tuned_accuracy"] - r["base_accuracy"] for r in members]
    return {"names": [r["name"] for r in members], "variant": members[0]["variant"],
            "settings": members[0]["group_settings"], "seeds": [r["seed"] for r in members], "alpha": alpha,
            "differences": differences, "difference": between_seed_spread(differences, alpha),
            **{model: between_seed_spread([r[f"{model}_accuracy"] for r in members], alpha)
               for model in ("base", "tuned")}}


def _spread(s: dict, fmt) -> str:
    return f"{fmt(s['mean'])} (sd {fmt_spread(s['sd'])}, range {fmt(s['min'])} to {fmt(s['max'])})"


def _t_interval(d: dict) -> str:
    note = f"; {md_escape(d['note'])}" if d["note"] else ""
    return f"{fmt_interval(d['low'], d['high'], fmt_pp)} (t, {d['df']} df){note}"


def seed_table(summaries: list[dict]) -> list[str]:
    alphas = {s["alpha"] for s in summaries}
    level = f"{1 - alphas.pop():.0%}" if len(alphas) == 1 else "1 − stats.alpha"
    lines = header("experiments", "variant", "settings besides seed", "seeds", "before: mean (sd, range)",
                   "after: mean (sd, range)", "difference: mean (sd, range)", f"mean difference, {level} t interval")
    for s in summaries:
        lines.append(row(", ".join(s["names"]), s["variant"], s["settings"] or "–",
                         f"{len(s['seeds'])}: {', '.join(map(str, s['seeds']))}", _spread(s["base"], fmt_pct),
                         _spread(s["tuned"], fmt_pct), _spread(s["difference"], fmt_pp), _t_interval(s["difference"])))
    return lines


def seed_section(summaries: list[dict]) -> list[str]:
    """The Markdown section of the seed groups' summaries; nothing where no experiments differ only in seed."""
    if not summaries:
        return []
    return ["## Between seeds", "",
            "Experiments of one commit whose params differ only in `seed` (`dvc exp run --queue -S seed=1,2,3`), "
            "summarised over their seeds. The seed also draws the evaluation questions (where a set takes fewer "
            "than all), the training subset and the sampling, so the base accuracy moves with it: each seed's "
            "difference is tuned − base on its own questions, and those differences are averaged. The sd is the "
            "sample standard deviation between seeds; the t interval (n − 1 degrees of freedom) is for the mean "
            "difference over seeds, and is wide with few seeds.", "", *seed_table(summaries), ""]


def _label(s: dict) -> str:
    settings = s["settings"].replace("`", "").replace("\\|", "|").replace(", ", "\n")
    return f"{s['variant']}, {len(s['seeds'])} seeds\n{settings}".rstrip()


def plot_seed_spread(ax, summaries: list[dict]) -> None:
    """Each seed's difference as a point (labelled with its seed), and the group's mean ± sd beside them."""
    for x, s in enumerate(summaries):
        offsets = np.linspace(-0.15, 0.15, len(s["differences"]))
        ax.scatter(x + offsets, s["differences"], color=COLORS["tuned"], zorder=3, label="one seed" if x == 0 else None)
        for dx, diff, seed in zip(offsets, s["differences"], s["seeds"]):
            ax.annotate(str(seed), (x + dx, diff), textcoords="offset points", xytext=(5, 3), fontsize=8)
        d = s["difference"]
        ax.errorbar(x + 0.3, d["mean"], yerr=d["sd"], fmt="D", color="black", capsize=5,
                    label="mean ± sd" if x == 0 else None)
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xticks(range(len(summaries)), [_label(s) for s in summaries])
    ax.set_xlim(-0.6, len(summaries) - 0.4)
    ax.set_ylabel("accuracy difference, tuned − base")
    ax.set_title("Difference per seed")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=9)
