"""Faults a user hits with bad input or a full disk: each is one `error:` line naming the problem and the fix, and
no partial output is left. The stages run for real (their main(), in a subprocess), on real files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cpu_params_dict, repo_files, write_params

GSM8K = REPO / "data" / "gsm8k"


def run_stage(stage: str, params: dict, out: Path, tmp_path: Path, env: dict | None = None):
    path = write_params(tmp_path / "params.yaml", params)
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", str(path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def error_line(done) -> str:
    """The stage failed with exactly one line on stderr, an `error:` line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("bad_line, problem", [
    ('{"question": "How many?", "answer": ', "is not valid JSON"),  # a truncated line
    ('{"question": "How many?"}', 'lacks "answer"'),                 # valid JSON, not a GSM8K row
])
def test_malformed_source_line_names_file_line_and_fix(tmp_path, bad_line, problem):
    source = tmp_path / "gsm8k"
    source.mkdir()
    shutil.copy(GSM8K / "test.jsonl", source / "test.jsonl")
    lines = (GSM8K / "train.jsonl").read_text().splitlines()[:5]
    lines[2] = bad_line
    (source / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "prepared"
    line = error_line(run_stage("data", cpu_params_dict(**{"data.source": str(source)}), out, tmp_path))
    assert f"{source / 'train.jsonl'}:3 " in line and problem in line and "data.source" in line and "fix" in line
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


@pytest.mark.parametrize("param, value, size, split", [
    ("evaluation.sets.study.questions", 5000, 1319, "the test split"),
    ("data.train_questions", 8000, 7473 - 32, "the train split less its 32 validation questions"),  # the preset's
    ("data.validation_questions", 8000, 7473, "the train split"),
])
def test_more_questions_than_the_split_holds_is_an_error(tmp_path, param, value, size, split):
    out = tmp_path / "prepared"
    line = error_line(run_stage("data", cpu_params_dict(**{param: value}), out, tmp_path))
    assert f"{param}={value} but {split} has {size} questions" in line and '"all"' in line
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_hub_id_typo_offline_fails_at_the_model_stage(tmp_path):
    out = tmp_path / "base"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}  # an empty cache: nothing downloaded
    line = error_line(run_stage("model", cpu_params_dict(**{"model.source": "mymodels/smol"}), out, tmp_path, env))
    assert "model.source='mymodels/smol'" in line and "offline" in line and "fix model.source" in line
    assert not out.exists() and not list(tmp_path.glob(".base*"))


def test_cached_hub_model_offline_is_pinned_to_the_cached_commit(tmp_path):
    """Offline, a hub id found in the local cache passes and is pinned to the commit the cache holds."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "base"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = run_stage("model", cpu_params_dict(**{"model.source": "someorg/tiny"}), out, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "source.json").read_text())
    assert (record["kind"], record["source"], record["revision"]) == ("hub", "someorg/tiny", commit)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs) that a stage can fill; needs root, as on the project's machines."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, tiny_disk):
    out = tiny_disk / "prepared"  # all of GSM8K train as prompts is ~5 MB: the 1 MiB disk fills
    line = error_line(run_stage("data", cpu_params_dict(**{"data.train_questions": "all"}), out, tmp_path))
    assert str(out) in line and "the disk is full" in line and "free space" in line
    assert os.listdir(tiny_disk) == []


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_repo_copy_leaves_out_what_an_earlier_dvc_run_wrote(tmp_path):
    """After `dvc repro`/the demo, the working tree holds an untracked dvc.lock and the .gitignore files DVC writes
    beside outputs; a test's copy must start from the pipeline as committed, plus files not yet committed."""
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / ".gitignore").write_text("*.pyc\n")
    (repo / "stages" / "data.py").write_text("")
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "init", cwd=repo)
    (repo / "stages" / "new.py").write_text("")        # work in progress: must travel
    (repo / "dvc.lock").write_text("schema: '2.0'\n")   # written by dvc repro / dvc exp run
    (repo / "data").mkdir()
    (repo / "data" / ".gitignore").write_text("/prepared\n")
    (repo / "data" / "prepared").mkdir()
    (repo / "data" / "prepared" / "train.jsonl").write_text("{}\n")
    assert sorted(repo_files(repo)) == [".gitignore", "dvc.yaml", "stages/data.py", "stages/new.py"]
