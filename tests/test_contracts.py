"""grpo_gsm8k/contracts.py names the files inside each stage's outputs; dvc.yaml declares the same files, and the
stage commands hand the consumers the folders those names live in."""
from __future__ import annotations

import pytest
import yaml

from grpo_gsm8k import contracts
from tests.test_dvc_deps import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PLOTS = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]


def declared(stage: str, kind: str) -> list[str]:
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in STAGES[stage].get(kind, [])]


@pytest.mark.parametrize("stage", ["baseline", "evaluate"])
def test_answer_stages_declare_the_contract_files(stage):
    folder = f"results/{stage}/${{item.set}}"
    assert declared(stage, "outs")[:2] == [f"{folder}/{contracts.COMPLETIONS}", f"{folder}/{contracts.GREEDY}"]
    assert declared(stage, "metrics") == [f"{folder}/{contracts.ANSWER_METRICS}"]
    assert f"--out {folder}" in STAGES[stage]["cmd"]


def test_stats_stage_declares_the_contract_files():
    files = {kind: path.as_posix() for kind, path in contracts.stats_files("results/stats", "${item.set}").items()}
    assert declared("stats", "outs")[:2] == [files["result"], files["swaps"]]
    assert declared("stats", "metrics") == [files["metrics"]]
    command = " ".join(STAGES["stats"]["cmd"].split())
    for flag, kind in (("--out", "result"), ("--swaps", "swaps"), ("--metrics", "metrics")):
        assert f"{flag} {files[kind]}" in command


def test_consumers_get_the_folders_the_contract_names_files_in():
    report = " ".join(STAGES["report"]["cmd"].split())
    for flag, path in (("--baseline", "results/baseline"), ("--evaluate", "results/evaluate"),
                       ("--stats", "results/stats"), ("--figures", "reports/figures"),
                       ("--summary", "results/train/summary.json"), ("--select", "results/select.json")):
        assert f"{flag} {path}" in report and path in declared("report", "deps")
    assert f"--data data/prepared/{contracts.TRAIN_PROMPTS}" in STAGES["train"]["cmd"]
    assert f"data/prepared/{contracts.EVAL_FOLDER}/${{item.set}}.jsonl" in STAGES["baseline"]["cmd"]


def test_the_adapter_folder_holds_the_select_stage_files_and_the_card():
    """DVC outs cannot overlap: select declares the adapter files, the card stage the README.md beside them, and
    whoever reads the adapter depends on its files (a dep on the folder would include the card, written later)."""
    files = [f"models/adapter/{name}" for name in contracts.ADAPTER_FILES]
    assert sorted(declared("select", "outs")) == sorted([*files, f"reports/figures/{contracts.SELECTION_FIGURE}"])
    assert declared("card", "outs") == [f"models/adapter/{contracts.MODEL_CARD}"]
    for stage in ("select", "evaluate", "card"):
        assert "--adapter models/adapter " in " ".join(STAGES[stage]["cmd"].split())
    for stage in ("evaluate", "card"):
        assert set(files) <= set(declared(stage, "deps")) and "models/adapter" not in declared(stage, "deps")
    card = " ".join(STAGES["card"]["cmd"].split())
    for flag, path in (("--select", "results/select.json"), ("--baseline", "results/baseline"),
                       ("--evaluate", "results/evaluate")):
        assert f"{flag} {path}" in card and path in declared("card", "deps")


def test_plotted_figures_are_the_stats_and_select_stage_figures():
    figures = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in PLOTS]
    pngs = [path.rsplit("/", 1)[1] for path in figures if path.startswith("reports/figures/")]
    assert pngs and set(pngs) <= {*contracts.FIGURES.values(), contracts.SELECTION_FIGURE}
    assert f"--figure reports/figures/{contracts.SELECTION_FIGURE}" in " ".join(STAGES["select"]["cmd"].split())


def test_read_metric_and_read_curves(tmp_path):
    metrics = tmp_path / contracts.LIVE_METRICS
    (metrics / "rewards" / "format").mkdir(parents=True)
    (metrics / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t1\t0.5\n2\t2\t0.25\n")
    (metrics / "rewards" / "format" / "mean.tsv").write_text("timestamp\tstep\tmean\n1\t2\t1.5\n")
    assert contracts.read_metric(tmp_path, "loss") == [(1, 0.5), (2, 0.25)]
    assert contracts.read_metric(tmp_path, "never_logged") == []
    assert contracts.read_curves(tmp_path) == {"loss": [(1, 0.5), (2, 0.25)], "rewards/format/mean": [(2, 1.5)]}
