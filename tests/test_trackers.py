"""train.report_to: the trackers TRL reports to beside dvclive (which always runs). A name must be one transformers
supports and installed, or the stage fails in one line before training; `all` is refused (not reproducible); and a
change of tracker resumes the same run.

    python -m pytest tests/test_trackers.py -q
"""
from __future__ import annotations

import pytest

from grpo_gsm8k.params import ParamsError, load_params
from grpo_gsm8k.training import trackers
from stages import train
from tests.conftest import cpu_params_dict, write_params
from tests.test_resume_faults import stage_folder, stage_paths


@pytest.fixture
def installed(monkeypatch):
    """Pretend transformers finds exactly these trackers installed (only dvclive is, in the test venv)."""
    def pretend(*names: str) -> None:
        monkeypatch.setattr(trackers, "get_available_reporting_integrations", lambda: list(names))
    return pretend


def params_with(tmp_path, report_to):
    return load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**{"train.report_to": report_to})))


# train.report_to, the trackers installed, the list GRPOConfig gets
ACCEPTED = [
    ("none", [], []),
    ("tensorboard", ["tensorboard"], ["tensorboard"]),
    (["tensorboard", "wandb"], ["wandb", "tensorboard", "dvclive"], ["tensorboard", "wandb"]),
]


@pytest.mark.parametrize("report_to, present, expected", ACCEPTED)
def test_grpo_config_reports_to_the_named_trackers(tmp_path, installed, report_to, present, expected):
    installed(*present)
    config = train.grpo_config(params_with(tmp_path, report_to), tmp_path / "ckpt", "cpu")
    assert config.report_to == expected


# train.report_to, the trackers installed, the error (one line, naming the param and the fix)
REJECTED_AT_START = [
    ("tensorbord", ["tensorboard"], "train.report_to: 'tensorbord' is not a tracker transformers supports"),  # typo
    ("tensorboard", [], "train.report_to: 'tensorboard' is not installed; pip install tensorboard, or set "
                        "train.report_to: none"),
    (["mlflow", "wandb"], ["mlflow"], "train.report_to: 'wandb' is not installed"),  # every name is checked
]


@pytest.mark.parametrize("report_to, present, message", REJECTED_AT_START)
def test_unknown_or_missing_tracker_fails_naming_the_fix(tmp_path, installed, report_to, present, message):
    installed(*present)
    with pytest.raises(ValueError) as err:
        train.grpo_config(params_with(tmp_path, report_to), tmp_path / "ckpt", "cpu")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_supported_names_come_from_transformers(tmp_path, installed):
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    installed()
    with pytest.raises(ValueError) as err:
        trackers.tracker_names("tensorbord")
    assert all(name in str(err.value) for name in INTEGRATION_TO_CALLBACK)


def test_stage_fails_in_one_line_before_training_when_the_tracker_is_missing(tmp_path, installed, capsys):
    installed("dvclive")
    params_file = write_params(tmp_path / "p.yaml", cpu_params_dict(**{"train.report_to": "tensorboard"}))
    paths = stage_paths(tmp_path)  # no model, no data: the tracker is checked before either is read
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--params", str(params_file), "--model", str(paths["model_dir"]), "--data",
                    str(paths["data_path"]), "--checkpoints", str(paths["checkpoints"]), "--live",
                    str(paths["live_dir"]), "--summary", str(paths["summary_path"]), "--validation",
                    str(tmp_path / "validation.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("error: train.report_to: 'tensorboard' is not installed") and err.count("\n") == 1
    assert not paths["checkpoints"].exists() and not paths["live_dir"].exists()


# train.report_to as params.yaml holds it, the error load_params gives
REJECTED_PARAMS = [
    ("all", "train.report_to='all' reports to whichever trackers happen to be installed (not reproducible)"),
    (["tensorboard", "all"], "train.report_to=['tensorboard', 'all'] reports to whichever trackers"),
    ("dvclive", "train.report_to='dvclive': dvclive always logs the curves"),
    (["none", "wandb"], "train.report_to=['none', 'wandb'] mixes none with trackers"),
    (3, "train.report_to=3 has the wrong type"),
    ([3], "train.report_to=[3] must be none, a tracker name or a list of names"),
]


@pytest.mark.parametrize("report_to, message", REJECTED_PARAMS)
def test_bad_report_to_names_the_param(tmp_path, report_to, message):
    with pytest.raises(ParamsError) as err:
        params_with(tmp_path, report_to)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("report_to", ["none", "tensorboard", ["tensorboard", "wandb"]])
def test_report_to_loads_as_written(tmp_path, report_to):
    assert params_with(tmp_path, report_to).train.report_to == report_to


def test_committed_params_report_to_no_tracker():
    from tests.conftest import REPO

    assert load_params(REPO / "params.yaml").train.report_to == "none"


# a param and a new value; whether the run id stays (so the run resumes) or a new run starts
RUN_ID_CASES = [
    ("train.report_to", "tensorboard", True),  # a tracker is bookkeeping
    ("train.report_to", ["tensorboard", "wandb"], True),
    ("train.logging_steps", 7, True),
    ("train.learning_rate", 1e-3, False),  # shapes the weights
]


@pytest.mark.parametrize("key, value, same_run", RUN_ID_CASES)
def test_changing_the_tracker_resumes_the_same_run(tmp_path, key, value, same_run):
    stage_folder(tmp_path)  # the base-model folder and train.jsonl run_identity digests
    paths = stage_paths(tmp_path)
    before = load_params(write_params(tmp_path / "before.yaml", cpu_params_dict()))
    after = load_params(write_params(tmp_path / "after.yaml", cpu_params_dict(**{key: value})))
    ids = [train.run_identity(p, paths["model_dir"], paths["data_path"])["run_id"] for p in (before, after)]
    assert (ids[0] == ids[1]) is same_run
