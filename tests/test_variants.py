"""The reward-variant comparison (grpo_gsm8k/tools/variants.py): table building on a hand-written `dvc exp show --json`
structure, the Markdown and the figure, the no-experiments error, and (slow) real `dvc exp run` experiments, one
run in the workspace and two through `dvc exp run --queue` + `dvc queue start`, compared end to end."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from grpo_gsm8k.science.report_format import fmt_num, fmt_p, fmt_pct, fmt_pp
from grpo_gsm8k.tools import variants
from tests.conftest import ONE_BATCH, REPO, cpu_params_dict, dvc, run, write_params

STUDY_PATHS = variants.metric_paths(REPO, "study")  # where dvc.yaml puts the study set's metrics

STATS_KEYS = ("accuracy_base", "accuracy_tuned", "difference", "difference_ci_low", "difference_ci_high",
              "p_two_proportion", "p_paired_t", "p_wilcoxon", "p_gee", "p_mcnemar", "mean_tokens_base",
              "mean_tokens_tuned")


def answer_metrics(correct: int, total: int, mean_tokens: float, truncated: float, formatted_wrong: float,
                   reward: float | None = None) -> dict:
    metrics = {"correct": correct, "total": total, "accuracy": correct / total, "format_rate": 0.5,
               "mean_tokens": mean_tokens, "truncated_rate": truncated, "formatted_wrong_rate": formatted_wrong}
    return metrics if reward is None else {**metrics, "mean_reward": reward}


DEGENERATE = {"full_format_rate_base": 0.126, "full_format_rate_tuned": 0.998, "p_full_format_rate": 0.00001,
              "p_full_format_rate_two_proportion": 0.00002, "short_share_base": 0.03, "short_share_tuned": 0.4,
              "p_short_share": 0.002, "p_short_share_two_proportion": 0.001, "p_mean_tokens": 0.0003,
              "p_accuracy_per_question": 0.64, "degenerate": True}  # the GPU run, in headline numbers


def exp_entry(rev: str, name: str | None, reward: dict, base=(3, 10), tuned=(7, 10), p=0.0123, stats=True,
              format_max: float = 1.5, behaviours: dict | None = None, seed: int = 42) -> dict:
    """One revision as `dvc exp show --json` lists it (only the fields the comparison reads)."""
    metrics = {"results/baseline/study/metrics.json": {"data": answer_metrics(*base, 120.0, 0.1, 0.2)},
               "results/evaluate/study/metrics.json": {"data": answer_metrics(*tuned, 30.5, 0.0, 0.25, 4.25)}}
    if stats:
        metrics["results/stats/study-metrics.json"] = {"data": {
            "accuracy_base": base[0] / base[1], "accuracy_tuned": tuned[0] / tuned[1],
            "difference": tuned[0] / tuned[1] - base[0] / base[1], "difference_ci_low": 0.1,
            "difference_ci_high": 0.6, "p_two_proportion": p, "p_paired_t": 0.04, "p_wilcoxon": 0.05,
            "p_mcnemar": 0.5, "mean_tokens_base": 120.0, "mean_tokens_tuned": 30.5,  # p_gee left out, as DVC does
            **(behaviours or {})}}
    params = {"seed": seed, "reward": {"variant": "study", "min_tokens": 50, "format_max": format_max, **reward},
              "stats": {"alpha": 0.05}}
    return {"rev": rev, "name": name, "error": None, "experiments": None,
            "data": {"rev": rev, "params": {"params.yaml": {"data": params}}, "metrics": metrics}}


def experiment(entry: dict, state: str | None) -> dict:
    return {"name": entry["name"], "executor": None if state is None else {"state": state}, "revs": [entry]}


def exp_show() -> list:
    """A workspace, and a commit without results holding five experiments: three good, one failed, one queued."""
    commit = exp_entry("c0ffee" * 6 + "abcd", "main", {}, stats=False)
    commit["data"]["metrics"] = {}
    commit["experiments"] = [
        experiment(exp_entry("a" * 40, "only-exp", {"variant": "correctness_only"}, tuned=(1, 10), p=0.00002,
                             format_max=1.0), "success"),
        experiment(exp_entry("b" * 40, "naive-exp", {"variant": "naive"}, tuned=(2, 10), behaviours=DEGENERATE),
                   "success"),
        experiment(exp_entry("c" * 40, "study-exp", {"variant": "study"}), None),
        experiment(exp_entry("d" * 40, "broken-exp", {"variant": "naive"}, stats=False), "failed"),
        experiment(exp_entry("e" * 40, "waiting-exp", {"variant": "naive"}), "queued"),
    ]
    return [exp_entry("workspace", None, {"variant": "naive"}), commit]


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval written out from its formula, to check the module's (statsmodels) one."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


LENGTHS = {"c" * 40: {"base": [100, 120, 140], "tuned": [60, 80, 100]},  # by revision: study-exp, naive-exp, only-exp
           "b" * 40: {"base": [100, 120, 140], "tuned": [4, 6, 8, 50]}, "a" * 40: None}


def table_lines(markdown: str, section: str) -> list[list[str]]:
    """The rows of the table under `## section`, past its header and rule, as lists of cells."""
    body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in cells] for cells in rows[2:]]


def table_rows(markdown: str, section: str) -> dict[str, list[str]]:
    """The rows of the table under `## section`, keyed by their first cell (the experiment name)."""
    return {cells[0]: cells for cells in table_lines(markdown, section)}


def test_rows_one_per_finished_experiment_sorted_by_variant():
    rows, skipped = variants.variant_rows(variants.collect_experiments(exp_show()), STUDY_PATHS)
    assert [(r["name"], r["variant"]) for r in rows] == [
        ("study-exp", "study"), ("naive-exp", "naive"), ("only-exp", "correctness_only")]
    assert skipped == ["broken-exp: failed", "waiting-exp: queued"]
    assert [r["settings"] for r in rows] == ["`reward.format_max=1.5`", "`reward.format_max=1.5`",
                                             "`reward.format_max=1.0`"]
    study = rows[0]
    assert (study["base_correct"], study["base_total"], study["tuned_correct"]) == (3, 10, 7)
    assert (study["base_low"], study["base_high"]) == pytest.approx(wilson(3, 10))
    assert (study["tuned_low"], study["tuned_high"]) == pytest.approx(wilson(7, 10))
    assert study["p_gee"] is None and study["p_two_proportion"] == 0.0123 and study["mean_reward"] == 4.25


def test_experiment_without_stats_is_named_and_commit_without_results_is_not():
    show = exp_show()
    show[1]["experiments"][0]["revs"][0]["data"]["metrics"].pop("results/stats/study-metrics.json")
    rows, skipped = variants.variant_rows(variants.collect_experiments(show), STUDY_PATHS)
    assert [r["name"] for r in rows] == ["study-exp", "naive-exp"]
    assert skipped[1] == "only-exp: no results/stats/study-metrics.json"
    assert not any("main" in note for note in skipped)


def test_markdown_holds_the_metrics_of_each_experiment():
    rows, skipped = variants.variant_rows(variants.collect_experiments(exp_show()), STUDY_PATHS)
    markdown = variants.render_markdown(rows, LENGTHS, skipped, "study", "variants.png")
    accuracy, audit = table_rows(markdown, "Accuracy"), table_rows(markdown, "Reward-hacking audit")
    assert list(accuracy) == list(audit) == ["study-exp", "naive-exp", "only-exp"]
    low, high = wilson(3, 10)
    assert accuracy["study-exp"][3] == f"30.0% (3/10) [{fmt_pct(low)}, {fmt_pct(high)}]"
    assert accuracy["naive-exp"][4].startswith("20.0% (2/10) [")
    assert accuracy["study-exp"][5] == "+40.0 pp [+10.0 pp, +60.0 pp]"
    assert accuracy["only-exp"][6:] == ["<1e-4", "0.0400", "0.0500", "n/a", "0.5000"]
    assert audit["study-exp"][2:] == ["120.0 → 30.5", "80 [70–90] (60–100)", "0.0%", "10.0% → 0.0%",
                                      "20.0% → 25.0%", "50.0% → 50.0%", "4.25"]
    assert audit["naive-exp"][3:5] == ["7 [5.5–18.5] (4–50)", "75.0%"]  # 3 of 4 below min_tokens = 50
    assert audit["only-exp"][3:5] == ["n/a", "n/a"]
    assert "only-exp. The figure shows their mean only" in markdown
    assert "Skipped experiments: broken-exp: failed; waiting-exp: queued." in markdown
    assert "![Accuracy and completion length per variant](variants.png)" in markdown


def test_run_writes_markdown_and_figure_identically_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(variants, "read_exp_show", lambda repo, all_commits: exp_show())
    monkeypatch.setattr(variants, "read_lengths", lambda repo, rev, set_name: LENGTHS[rev])
    shutil.copy(REPO / "dvc.yaml", tmp_path)  # where the paths of the outputs are declared
    out = tmp_path / "reports" / "variants.md"
    variants.run(tmp_path, out)
    first = out.read_bytes(), out.with_suffix(".png").read_bytes()
    assert first[1].startswith(b"\x89PNG") and len(first[1]) > 10_000
    variants.run(tmp_path, out)
    assert (out.read_bytes(), out.with_suffix(".png").read_bytes()) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["variants.md", "variants.png"]  # no temporary left


def test_no_experiments_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(variants, "read_exp_show", lambda repo, all_commits: exp_show()[:1])  # the workspace only
    with pytest.raises(SystemExit) as exit_info:
        variants.main(["--out", str(tmp_path / "variants.md")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no DVC experiment has results/stats/study-metrics.json") and "\n" not in err
    assert "dvc exp run -S reward.variant=" in err
    assert not list(tmp_path.iterdir())


def test_out_naming_the_figure_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The figure goes beside the table as <out>.png: an --out ending in .png would make both one file."""
    monkeypatch.setattr(variants, "read_exp_show", lambda repo, all_commits: exp_show())
    monkeypatch.setattr(variants, "read_lengths", lambda repo, rev, set_name: LENGTHS[rev])
    with pytest.raises(SystemExit):
        variants.main(["--out", str(tmp_path / "variants.png")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "variants.md" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_outside_a_dvc_repository_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="dvc exp show --json` failed"):
        variants.read_exp_show(tmp_path, all_commits=False)


def test_behaviour_rows_per_experiment():
    rows, skipped = variants.variant_rows(variants.collect_experiments(exp_show()), STUDY_PATHS)
    table = table_rows(variants.render_markdown(rows, LENGTHS, skipped, "study", "variants.png"),
                       "Rewarded behaviours beside accuracy")
    assert list(table) == ["study-exp", "naive-exp", "only-exp"]
    assert table["naive-exp"][2:] == [
        "30.0% → 20.0% (per-question p = 0.6400; z-test p = 0.0123)",
        "12.6% → 99.8% (per-question p = <1e-4; z-test p = <1e-4)",
        "3.0% → 40.0% (per-question p = 0.0020; z-test p = 0.0010)",
        "120.0 → 30.5 (per-question p = 0.0003)",
        "**yes**: shorter or more formatted, accuracy not better"]
    # an experiment from before the behaviours were tested: its rates are n/a, not 0
    assert table["study-exp"][3] == "n/a → n/a (per-question p = n/a; z-test p = n/a)"
    assert table["study-exp"][-1] == "n/a"


# --- experiments that differ only in seed ------------------------------------------------------------------------

SEED_RUNS = {1: ((3, 10), (7, 10)), 2: ((4, 10), (6, 10)), 3: ((2, 10), (7, 10))}  # seed: base, tuned correct/total


def seed_show(commit_rev: str = "f" * 40) -> list:
    """Under one commit: three study experiments differing only in seed; two more at another reward.format_max
    (a group of two seeds); and a naive one at seed 1 (a group of one, so no aggregate)."""
    def exp(rev, name, seed, reward=None, **kwargs):
        return experiment(exp_entry(rev * 20, name, reward or {}, seed=seed, **kwargs), "success")

    commit = exp_entry(commit_rev, commit_rev[:4], {}, stats=False)
    commit["data"]["metrics"] = {}
    commit["experiments"] = [
        *(exp(f"{seed}{commit_rev[0]}", f"seed-{seed}", seed, base=base, tuned=tuned)
          for seed, (base, tuned) in SEED_RUNS.items()),
        exp(f"a{commit_rev[0]}", "format-2", 2, format_max=1.0, base=(5, 10), tuned=(5, 10)),
        exp(f"b{commit_rev[0]}", "format-1", 1, format_max=1.0, base=(3, 10), tuned=(5, 10)),
        exp(f"c{commit_rev[0]}", "naive-1", 1, reward={"variant": "naive"}),
    ]
    return [commit]


def seed_rows(show: list) -> list[dict]:
    return variants.variant_rows(variants.collect_experiments(show), STUDY_PATHS)[0]


def test_experiments_differing_only_in_seed_are_one_group():
    groups = variants.seed_groups(seed_rows(seed_show()))
    assert [[r["name"] for r in group] for group in groups] == [["format-1", "format-2"],
                                                                ["seed-1", "seed-2", "seed-3"]]


def test_the_same_seeds_under_two_commits_are_two_groups():  # --all-commits: other code, other experiment
    groups = variants.seed_groups(seed_rows(seed_show("f" * 40) + seed_show("e" * 40)))
    assert [[r["rev"][:2] for r in group] for group in groups] == [["be", "ae"], ["bf", "af"],
                                                                   ["1e", "2e", "3e"], ["1f", "2f", "3f"]]


def test_a_seed_repeated_with_every_param_is_one_error_line(tmp_path, monkeypatch, capsys):
    show = seed_show()
    show[0]["experiments"].append(experiment(exp_entry("d" * 40, "seed-2-again", {}, seed=2), "success"))
    monkeypatch.setattr(variants, "read_exp_show", lambda repo, all_commits: show)
    monkeypatch.setattr(variants, "read_lengths", lambda repo, rev, set_name: None)
    with pytest.raises(SystemExit):
        variants.main(["--out", str(tmp_path / "variants.md")])
    err = capsys.readouterr().err.strip()
    assert err == ("error: experiments seed-2 and seed-2-again have every param alike, seed 2 included, so the seed "
                   "spread would count one seed twice; remove one of them, e.g. `dvc exp remove seed-2-again`")
    assert not list(tmp_path.iterdir())


def test_seed_table_and_figure_through_the_comparison(tmp_path, monkeypatch):
    monkeypatch.setattr(variants, "read_exp_show", lambda repo, all_commits: seed_show())
    monkeypatch.setattr(variants, "read_lengths", lambda repo, rev, set_name: None)
    plotted = []
    monkeypatch.setattr(variants, "plot_seed_spread",
                        lambda ax, summaries, plot=variants.plot_seed_spread: plotted.append(summaries) or
                        plot(ax, summaries))
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    out = tmp_path / "variants.md"
    variants.run(tmp_path, out)
    markdown = out.read_text()
    settings = {cells[0]: cells[2] for cells in table_lines(markdown, "Accuracy")}  # per-experiment rows kept
    assert settings == {"format-1": "`reward.format_max=1.0`, `seed=1`",
                        "format-2": "`reward.format_max=1.0`, `seed=2`",
                        "seed-1": "`reward.format_max=1.5`, `seed=1`", "seed-2": "`reward.format_max=1.5`, `seed=2`",
                        "seed-3": "`reward.format_max=1.5`, `seed=3`", "naive-1": "`reward.format_max=1.5`, `seed=1`"}
    assert list(settings) == ["format-1", "format-2", "seed-1", "seed-2", "seed-3", "naive-1"]
    # Differences 0.4, 0.2, 0.5: test_stats.py works their numbers out by hand. Differences 0.2 and 0.0: mean 0.1,
    # sd 0.1 * sqrt(2) = 0.14142, half width 12.7062 * 0.14142 / sqrt(2) = 1.27062.
    assert table_lines(markdown, "Between seeds") == [
        ["format-1, format-2", "study", "`reward.format_max=1.0`", "2: 1, 2",
         "40.0% (sd 14.1 pp, range 30.0% to 50.0%)", "50.0% (sd 0.0 pp, range 50.0% to 50.0%)",
         "+10.0 pp (sd 14.1 pp, range +0.0 pp to +20.0 pp)",
         "[-117.1 pp, +137.1 pp] (t, 1 df); 2 seeds: 1 degree of freedom (t = 12.7), so the interval is wide; "
         "more seeds narrow it"],
        ["seed-1, seed-2, seed-3", "study", "`reward.format_max=1.5`", "3: 1, 2, 3",
         "30.0% (sd 10.0 pp, range 20.0% to 40.0%)", "66.7% (sd 5.8 pp, range 60.0% to 70.0%)",
         "+36.7 pp (sd 15.3 pp, range +20.0 pp to +50.0 pp)", "[-1.3 pp, +74.6 pp] (t, 2 df)"]]
    assert "95% t interval" in markdown.split("## Between seeds", 1)[1]
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert [[s["seeds"] for s in summaries] for summaries in plotted] == [[[1, 2], [1, 2, 3]]]
    assert plotted[0][1]["differences"] == pytest.approx([0.4, 0.2, 0.5])


def test_without_seed_groups_the_comparison_has_no_seed_section():
    rows, skipped = variants.variant_rows(variants.collect_experiments(exp_show()), STUDY_PATHS)
    assert variants.seed_groups(rows) == []
    assert "## Between seeds" not in variants.render_markdown(rows, LENGTHS, skipped, "study", "variants.png")


# --- real experiments --------------------------------------------------------------------------------------------

TINY = {  # the CPU preset shrunk to seconds per stage on the tiny random model
    "evaluation.sets.study.questions": 3, "evaluation.sets.study.samples": 2, "evaluation.sets.test.questions": 2,
    "evaluation.sets.test.samples": 1, "generation.max_new_tokens": 8, "train.max_steps": 2, "train.save_steps": 1,
    "train.max_completion_length": 8, "reward.min_tokens": 4, "data.train_questions": 8, "train.checkpoint_remote": "",
    "select.step": 2,
    "stats.bootstrap_samples": 200, **ONE_BATCH,
}
QUEUE_WAIT_S = 600


def wait_for_queue(repo: Path) -> str:
    deadline = time.monotonic() + QUEUE_WAIT_S
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=repo)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(5)
    dvc("queue", "stop", "--kill", cwd=repo)
    raise AssertionError(f"queued experiments still running after {QUEUE_WAIT_S} s:\n{status}")


def shown_experiments(repo: Path) -> dict[str, dict]:
    """Name -> {variant, seed, metrics by file} for each experiment `dvc exp show --json` lists."""
    found = {}
    for commit in json.loads(dvc("exp", "show", "--json", cwd=repo)):
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0]["data"]
            params = data["params"]["params.yaml"]["data"]
            found[exp["name"]] = {"variant": params["reward"]["variant"], "seed": params["seed"],
                                  **{path: m.get("data", {}) for path, m in data["metrics"].items()}}
    return found


@pytest.mark.slow
def test_variants_as_dvc_experiments(repo_copy, tiny_model_dir):
    env = {"HF_HUB_OFFLINE": "1"}
    # Absolute: queued experiments run in temporary copies of the commit, elsewhere on disk.
    params = cpu_params_dict(**TINY, **{"model.source": str(Path(tiny_model_dir).resolve())})
    write_params(repo_copy / "params.yaml", params)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], repo_copy)

    dvc("exp", "run", "-S", "reward.variant=study", cwd=repo_copy, env=env)  # at params.yaml's seed, 42
    for variant in ("naive", "correctness_only"):
        dvc("exp", "run", "--queue", "-S", f"reward.variant={variant}", cwd=repo_copy, env=env)
    dvc("exp", "run", "--queue", "-S", "reward.variant=study", "-S", "seed=7", cwd=repo_copy, env=env)
    dvc("queue", "start", cwd=repo_copy, env=env)
    status = wait_for_queue(repo_copy)
    assert status.count("Success") == 3, status

    shown = shown_experiments(repo_copy)
    assert sorted((m["variant"], m["seed"]) for m in shown.values()) == [
        ("correctness_only", 42), ("naive", 42), ("study", 7), ("study", 42)]
    for metrics in shown.values():
        variant, stats = metrics["variant"], metrics["results/stats/study-metrics.json"]
        assert {k for k in STATS_KEYS if k != "p_gee"} <= set(stats), (variant, stats)  # p_gee may be null
        for key in ("accuracy", "mean_tokens", "truncated_rate", "formatted_wrong_rate", "mean_reward"):
            assert key in metrics["results/evaluate/study/metrics.json"], (variant, key)

    run(["python", "-m", "grpo_gsm8k.tools.variants", "--out", "reports/variants.md"], repo_copy, env)
    markdown = (repo_copy / "reports" / "variants.md").read_text()
    assert (repo_copy / "reports" / "variants.png").read_bytes().startswith(b"\x89PNG")
    accuracy, audit = table_rows(markdown, "Accuracy"), table_rows(markdown, "Reward-hacking audit")
    behaviours = table_rows(markdown, "Rewarded behaviours beside accuracy")
    assert sorted(accuracy) == sorted(audit) == sorted(behaviours) == sorted(shown)
    for name, metrics in shown.items():
        check_row(accuracy[name], audit[name], metrics["variant"], metrics)
        stats = metrics["results/stats/study-metrics.json"]
        assert set(variants.BEHAVIOUR_KEYS) <= set(stats), (name, stats)
        assert behaviours[name][3].startswith(f"{fmt_pct(stats['full_format_rate_base'])} → "
                                              f"{fmt_pct(stats['full_format_rate_tuned'])} (")
    check_seed_row(table_lines(markdown, "Between seeds"), shown)


def check_seed_row(seed_rows: list[list[str]], shown: dict[str, dict]) -> None:
    """The study at seeds 7 and 42 is the one group: its row against the experiments' own accuracies."""
    study = sorted((m["seed"], name) for name, m in shown.items() if m["variant"] == "study")
    accuracies = [(shown[name]["results/baseline/study/metrics.json"]["accuracy"],
                   shown[name]["results/evaluate/study/metrics.json"]["accuracy"]) for _, name in study]
    differences = [tuned - base for base, tuned in accuracies]
    assert len(seed_rows) == 1, seed_rows
    assert seed_rows[0][:4] == [", ".join(name for _, name in study), "study", "–", "2: 7, 42"]
    assert seed_rows[0][6].startswith(f"{fmt_pp(sum(differences) / 2)} (sd ")
    assert seed_rows[0][7].endswith("(t, 1 df); 2 seeds: 1 degree of freedom (t = 12.7), so the interval is wide; "
                                    "more seeds narrow it") or "the same value" in seed_rows[0][7]


def check_row(accuracy: list[str], audit: list[str], variant: str, metrics: dict) -> None:
    """One experiment's table cells against its metrics as `dvc exp show` reported them."""
    base, tuned = metrics["results/baseline/study/metrics.json"], metrics["results/evaluate/study/metrics.json"]
    stats = metrics["results/stats/study-metrics.json"]
    assert accuracy[1] == audit[1] == variant
    assert accuracy[3].startswith(f"{fmt_pct(stats['accuracy_base'])} ({base['correct']}/{base['total']}) [")
    assert accuracy[4].startswith(f"{fmt_pct(stats['accuracy_tuned'])} ({tuned['correct']}/{tuned['total']}) [")
    assert accuracy[5] == (f"{fmt_pp(stats['difference'])} [{fmt_pp(stats['difference_ci_low'])}, "
                           f"{fmt_pp(stats['difference_ci_high'])}]")
    assert accuracy[6:] == [fmt_p(stats.get(p)) for p in variants.P_VALUES]
    assert audit[2] == f"{fmt_num(stats['mean_tokens_base'], 1)} → {fmt_num(stats['mean_tokens_tuned'], 1)}"
    assert audit[5] == f"{fmt_pct(base['truncated_rate'])} → {fmt_pct(tuned['truncated_rate'])}"
    assert audit[6] == f"{fmt_pct(base['formatted_wrong_rate'])} → {fmt_pct(tuned['formatted_wrong_rate'])}"
    assert audit[8] == fmt_num(tuned["mean_reward"])
    assert audit[3] != "n/a"  # the length distribution was read at the experiment's revision
