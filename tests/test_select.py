"""Tests for stages/select.py's record: what it says about the choice follows the params, not the study.

    python -m pytest tests/test_select.py -q
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from grpo_gsm8k.contracts import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, MODEL_CARD
from grpo_gsm8k.training.checkpoint_sync import build_manifest, write_local_manifest
from grpo_gsm8k.params import load_params
from stages import select
from tests.conftest import REPO

STUDY = load_params(REPO / "params.yaml").select


def write_checkpoint(folder: Path, step: int) -> None:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["v_proj", "q_proj"]}))
    write_local_manifest(ckpt, build_manifest(ckpt, step))


@pytest.mark.parametrize("step", [4, 8])
def test_the_recorded_reason_names_the_step_params_chose(tmp_path, step):
    for saved in (4, 8):
        write_checkpoint(tmp_path / "ckpt", saved)
    params = dataclasses.replace(STUDY, step=step)
    record = select.run(params, tmp_path / "ckpt", tmp_path / "live", tmp_path / "adapter", tmp_path / "s.json",
                        tmp_path / "selection.png")
    assert record["step"] == step and f"select.step={step}" in record["reason"]
    # No claim about a step the params did not choose (the study's own choice lives in params.yaml's comment).
    assert str(STUDY.step) not in record["reason"] and "1,200" not in record["reason"]
    assert json.loads((tmp_path / "s.json").read_text()) == record


def test_the_adapter_files_are_written_beside_the_card(tmp_path):
    """select writes only the two adapter files; the folder's README.md is the card stage's output and stays."""
    write_checkpoint(tmp_path / "ckpt", 4)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / MODEL_CARD).write_text("the card")
    select.run(dataclasses.replace(STUDY, step=4), tmp_path / "ckpt", tmp_path / "live", adapter, tmp_path / "s.json",
               tmp_path / "selection.png")
    assert sorted(path.name for path in adapter.iterdir()) == sorted([*ADAPTER_FILES, MODEL_CARD])
    assert (adapter / MODEL_CARD).read_text() == "the card"
    assert (adapter / ADAPTER_WEIGHTS).read_bytes() == b"weights 4"
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["target_modules"] == ["q_proj", "v_proj"]  # sorted


def test_a_failed_copy_leaves_the_old_adapter_whole(tmp_path):
    ckpt = tmp_path / "ckpt" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / ADAPTER_WEIGHTS).write_bytes(b"new weights")
    (ckpt / ADAPTER_CONFIG).write_text("{not json")
    write_local_manifest(ckpt, build_manifest(ckpt, 4))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ADAPTER_FILES:
        (adapter / name).write_text("old")
    with pytest.raises(ValueError):
        select.run(dataclasses.replace(STUDY, step=4), ckpt.parent, tmp_path / "live", adapter, tmp_path / "s.json",
                   tmp_path / "selection.png")
    assert {path.name: path.read_text() for path in adapter.iterdir()} == {name: "old" for name in ADAPTER_FILES}
