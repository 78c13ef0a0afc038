"""dvc.yaml's plots: the GRPO curves dvclive logs in training, each drawn with DVC's smooth template (per-step GRPO
rewards are noisy), checked in dvc.yaml and by a real `dvc plots show` on synthetic dvclive TSVs.

    python -m pytest tests/test_plots.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from grpo_gsm8k import contracts
from grpo_gsm8k.params import load_params
from grpo_gsm8k.science.rewards import reward_names
from tests.test_dvc_deps import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
LIVE = "results/train/live"  # the train stage's --live
METRICS = f"{LIVE}/{contracts.LIVE_METRICS.as_posix()}/"
# TRL's logged names worth a curve: the objective, the reward and its spread, the share of groups without a learning
# signal, the answers' length, and each reward of the study's variant
CURVES = {"loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length"} | \
    {f"rewards/{name}/mean" for name in reward_names(load_params(REPO / "params.yaml").reward)} | \
    {"validation/accuracy", "validation/full_format_rate"}  # the validation pass's (training/validation.py)


def data_series() -> dict[str, tuple[dict, dict[str, str]]]:
    """plot id -> (its props, {tsv file: y column}) for every plot that is not an image."""
    series = {}
    for entry in DVC_YAML["plots"]:
        if isinstance(entry, dict):
            (plot_id, props), = entry.items()
            y = props["y"]
            series[plot_id] = (props, y if isinstance(y, dict) else {plot_id: y})
    return series


def test_every_grpo_curve_is_plotted_smoothed_against_the_step():
    plotted = set()
    for plot_id, (props, files) in data_series().items():
        assert props.get("template") == "smooth" and props["x"] == "step" and props.get("title"), plot_id
        for path, column in files.items():
            assert path.startswith(METRICS) and path.endswith(".tsv"), path
            name = path[len(METRICS):-len(".tsv")]
            assert column == name.rsplit("/", 1)[-1], path  # dvclive names the column after the last part
            plotted.add(name)
    assert plotted == CURVES
    assert {LIVE: {"persist": True}} in DVC_YAML["stages"]["train"]["outs"]


def test_dvc_plots_show_draws_each_curve_smoothed(repo_copy):
    for name in CURVES:  # three logged steps of each curve, as dvclive writes them
        column = name.rsplit("/", 1)[-1]
        tsv = repo_copy / METRICS / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text(f"step\t{column}\n" + "".join(f"{s}\t{0.1 * s}\n" for s in (1, 2, 3)))
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo_copy,
                          capture_output=True, text=True, timeout=300, check=True)
    shown = json.loads(done.stdout)
    assert {error["name"] for error in shown["errors"]} <= {e for e in DVC_YAML["plots"] if isinstance(e, str)}
    rows = 0
    for plot_id, (_, files) in data_series().items():
        (render,) = shown["data"][plot_id]
        content = render["content"]
        assert len(content["data"]["values"]) == 3 * len(files), plot_id
        rows += len(content["data"]["values"])
        assert [p["name"] for p in content["params"]] == ["smooth"]  # the bandwidth slider
        smoothed = [t for layer in content["layer"] for t in layer.get("transform", []) if "loess" in t]
        assert smoothed and smoothed[0]["bandwidth"] == {"signal": "smooth"}, plot_id
    assert rows == 3 * len(CURVES)  # every curve drawn
