"""The bench scripts run on the GPU through the device tool, never in CI; their --tiny modes run here on CPU so a
change to the code they drive (trainer setup, generator, CLI) cannot leave them broken until the next GPU lease."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "bench_grpo_step": ["--tiny", "--steps", "2", "--engine", "trl,fast,fast-v1", "--max-completion", "8",
                        "--beta", "0.04", "--lora-dropout", "0.05", "--profile-step", "2"],
    "bench_multi_gpu": ["--tiny", "--cpu", "--gpus", "1,2", "--steps", "2", "--max-completion", "8"],
    "bench_eval_generation": ["--tiny", "--batch", "10", "--chunks", "2", "--max-new", "8"],
    "bench_decode_attention": ["--tiny"],
}


def markdown_tables(text: str) -> list[list[str]]:
    """The body rows of each markdown table in text, table by table (header and |---| rule left out)."""
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
        elif current is None:
            current = []
            tables.append(current)  # this line is the header
        elif not line.startswith("|---"):
            current.append(line)
    return tables


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_its_tiny_mode(script, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TRL_EXPERIMENTAL_SILENCE": "1"}
    if script == "bench_decode_attention":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed: scripts/setup.sh installs it on CPU machines")
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *SCRIPTS[script],
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (tmp_path / f"{script}.md").read_text()
    tables = markdown_tables(table)
    assert tables and tables[0], table
    if script == "bench_multi_gpu":
        assert "=== N=1: ok" in proc.stdout and "=== N=2: ok" in proc.stdout, proc.stdout[-2000:]
    if script == "bench_grpo_step":
        step_table, limits_table = tables[0], tables[1]  # one row per engine in each
        assert [r.split("|")[1].strip() for r in step_table] == ["trl", "fast", "fast-v1"], table
        assert [r.split("|")[1].strip() for r in limits_table] == ["trl", "fast", "fast-v1"], table
        assert (tmp_path / "profile_fast.txt").is_file()
