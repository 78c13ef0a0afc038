"""The whole pipeline through real DVC on the CPU preset (shrunk), with the project's own S3 server:
`dvc exp run` of the preset, every declared output present, the report's numbers equal to the stats outputs,
the preset's learning signal (reward spread in most groups, an adapter that moved), a second repro that does
nothing, push, a fresh clone that pulls byte-identical outputs, a forced rerun of stats + report that rebuilds
identical p-values and figures, and a rerun from scratch with identical completions, grades and p-values."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k.science.learning_signal import MAX_ZERO_STD_SHARE
from tests.conftest import dvc, run
from tests.test_resume import distance_from_init, moved_bound

SHRINK = {  # the CPU preset, shrunk so the whole pipeline runs in a few minutes: fewer questions and steps, the
    # preset's own reward, prompt, batch shape and completion length, so the learning-signal checks test the preset
    "data.train_questions": 8, "evaluation.sets.study.questions": 4, "evaluation.sets.study.samples": 2,
    "evaluation.sets.test.questions": 3, "train.max_steps": 2, "train.save_steps": 1, "select.step": 2,
    "stats.bootstrap_samples": 200, "data.validation_questions": 4, "train.eval_steps": 1,
}


def set_args(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def declared_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted({repo / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def outputs_digest(repo: Path, skip=("models/checkpoints", "results/train")) -> dict[str, str]:
    """Digest of every output except training's own bookkeeping (timings, optimizer state)."""
    return {str(p.relative_to(repo)): digest(p) for p in declared_outputs(repo)
            if not str(p.relative_to(repo)).startswith(skip)}


@pytest.mark.slow
def test_cpu_preset_pipeline_round_trip(repo_copy, s3_server, tmp_path):
    env = s3_server.env()
    dvc("remote", "modify", "store", "url", f"s3://{s3_server.bucket}/dvcstore", cwd=repo_copy)
    # As scripts/demo.sh does: the preset goes into params.yaml (its system prompt holds spaces), then the shrink.
    run(["python", "-m", "grpo_gsm8k.tools.preset", "cpu", "--write", "params.yaml"], repo_copy)
    overrides = {**SHRINK, "train.checkpoint_remote": f"s3://{s3_server.bucket}/checkpoints"}
    dvc("exp", "run", *set_args(overrides), cwd=repo_copy, env=env)

    outputs = declared_outputs(repo_copy)
    assert len(outputs) >= 15
    missing = [str(p) for p in outputs if not p.exists()]
    assert not missing, missing
    for name in ("report.md", "report.html"):
        assert (repo_copy / "reports" / name).stat().st_size > 1000
    dag = dvc("dag", "--md", cwd=repo_copy)
    for stage in ("data", "model", "baseline@study", "train", "select", "evaluate@study", "stats@study", "card",
                  "report"):
        assert stage in dag, stage
    check_report_numbers(repo_copy)
    check_validation(repo_copy)
    summary = json.loads((repo_copy / "results/train/summary.json").read_text())
    assert summary["global_step"] == 2 and summary["uploaded_steps"] == [1, 2]
    # A vacuous run (every group one reward, so every advantage 0) fails here. Two steps are too few for the
    # issue's 30% (the preset's first steps have the least spread), so this is the no-signal warning's bound.
    assert summary["zero_std_share"] <= MAX_ZERO_STD_SHARE, summary
    assert summary["lora_update_norm"] > 0, summary
    from safetensors.torch import load_file

    # The preset's learning rate, not the tiny-model tests' 1e-2: two steps at 2e-4 move lora_B by ~4e-4.
    learning_rate = yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["learning_rate"]
    adapter = load_file(repo_copy / "models/adapter/adapter_model.safetensors")
    assert distance_from_init(adapter) > moved_bound(learning_rate)

    again = dvc("repro", cwd=repo_copy, env=env)
    assert "Running stage" not in again, again

    # Version everything: commit the lock and params, push the data, pull it into a fresh clone.
    run(["git", "add", "-A"], repo_copy)  # dvc.lock and the .gitignore files dvc wrote are new
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "cpu preset run"], repo_copy)
    dvc("push", cwd=repo_copy, env=env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    shutil.copy(repo_copy / ".dvc" / "config", clone / ".dvc" / "config")
    dvc("pull", cwd=clone, env=env)
    assert outputs_digest(clone) == outputs_digest(repo_copy)
    status = dvc("status", cwd=clone, env=env)
    assert "up to date" in status, status

    before = outputs_digest(clone, skip=())
    dvc("repro", "--force", "--single-item", "stats@study", "stats@test", cwd=clone, env=env)
    dvc("repro", "--force", "--single-item", "report", cwd=clone, env=env)
    assert outputs_digest(clone, skip=()) == before

    # From scratch with the same seed: identical completions, grades and p-values. The checkpoints on S3 go
    # too, or training would (rightly) resume from them instead of training again.
    import s3fs

    s3fs.S3FileSystem(**s3_server.storage_options()).rm(f"{s3_server.bucket}/checkpoints", recursive=True)
    for folder in ("models", "results", "data/prepared"):
        shutil.rmtree(clone / folder, ignore_errors=True)
    dvc("repro", "--force", cwd=clone, env=env)
    assert outputs_digest(clone) == outputs_digest(repo_copy)


def check_validation(repo: Path) -> None:
    """The validation curve is in dvclive's output at steps 0, 1, 2, and the report shows each candidate step's
    validation accuracy from select's record, with the selection figure."""
    from grpo_gsm8k.contracts import read_metric
    from grpo_gsm8k.science.report_format import fmt_pct

    curve = read_metric(repo / "results/train/live", "validation/accuracy")
    assert [step for step, _ in curve] == [0, 1, 2], curve
    record = json.loads((repo / "results/select.json").read_text())
    assert record["validation_points"] == 3 and record["validation_step"] in (1, 2)
    report = (repo / "reports" / "report.md").read_text()
    assert "| Candidate | Step | Validation accuracy | Evaluated |" in report
    for accuracy in record["validation_accuracy"].values():
        assert fmt_pct(accuracy) in report
    assert "](figures/selection.png)" in report and (repo / "reports/figures/selection.png").is_file()


def check_report_numbers(repo: Path) -> None:
    """Every headline number of the stats outputs appears in the report as the report formats it."""
    from grpo_gsm8k.science.report_format import fmt_p, fmt_pct

    report = (repo / "reports" / "report.md").read_text()
    for metrics_file in (repo / "results" / "stats").glob("*-metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        for key in ("p_two_proportion", "p_paired_t", "p_wilcoxon", "p_mcnemar"):
            if metrics[key] is not None:
                assert fmt_p(metrics[key]) in report, (metrics_file.name, key, fmt_p(metrics[key]))
        for key in ("accuracy_base", "accuracy_tuned"):
            assert fmt_pct(metrics[key]) in report, (metrics_file.name, key)
    for stats_file in (repo / "results" / "stats").glob("*-metrics.json"):
        name = stats_file.name.removesuffix("-metrics.json")
        counts = json.loads((repo / "results" / "stats" / f"{name}.json").read_text())["counts"]
        for model in ("base", "tuned"):
            assert f"{counts[model]['correct']}/{counts[model]['total']}" in report, (name, model)
