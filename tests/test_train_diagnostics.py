"""Learning-signal diagnostics: run-level numbers from the logged curves, the no-signal warning, the LoRA update
norm, and the train stage putting them in its summary (a 1-step run on a random model has no signal at all)."""
from __future__ import annotations

import math

import pytest

from grpo_gsm8k.science.learning_signal import UPDATE_NORM, no_signal_warning, signal_summary
from grpo_gsm8k.training.diagnostics import UpdateNormLogger, lora_update_norm
from grpo_gsm8k.contracts import read_curves

FORMAT = "rewards/format_reward"


@pytest.mark.parametrize("curves, expected", [
    # every logged step averaged with equal weight
    ({"frac_reward_zero_std": [(1, 1.0), (2, 0.5)], "completions/clipped_ratio": [(1, 1.0), (2, 0.0)],
      "completions/mean_length": [(1, 128.0), (2, 64.0)], UPDATE_NORM: [(1, 0.0), (2, 0.25)]},
     {"zero_std_share": 0.75, "clipped_share": 0.5, "mean_completion_length": 96.0, "lora_update_norm": 0.25,
      "rewards": {}}),
    # the update norm is the last logged one, not the mean; each reward component gets its mean and std
    ({"frac_reward_zero_std": [(1, 0.0)], UPDATE_NORM: [(1, 0.5), (2, 0.1)],
      f"{FORMAT}/mean": [(1, 0.5), (2, 1.5)], f"{FORMAT}/std": [(1, 0.2), (2, 0.4)]},
     {"zero_std_share": 0.0, "clipped_share": None, "mean_completion_length": None, "lora_update_norm": 0.1,
      "rewards": {"format_reward": {"mean": 1.0, "std": 0.30000000000000004}}}),
    # nothing logged (a run resumed at its last step logs nothing new): every number is None, not 0
    ({}, {"zero_std_share": None, "clipped_share": None, "mean_completion_length": None, "lora_update_norm": None,
          "rewards": {}}),
])
def test_signal_summary(curves, expected):
    assert signal_summary(curves) == expected


@pytest.mark.parametrize("zero_std_share, update_norm, warned", [
    (1.0, 0.0, True),      # the demo: no group had spread, the adapter never moved
    (0.95, 0.3, True),     # spread in a few groups only: too little to learn from
    (0.2, 0.0, True),      # spread, yet the adapter did not move (learning rate 0, frozen adapter)
    (0.9, 0.3, False),     # at the bound: not flagged
    (0.3, 0.3, False),     # a run that learns
    (None, None, False),   # nothing logged: nothing to judge
])
def test_no_signal_warning(zero_std_share, update_norm, warned):
    summary = {"zero_std_share": zero_std_share, "lora_update_norm": update_norm}
    message = no_signal_warning(summary)
    assert bool(message) is warned
    if warned:
        assert message.startswith("train: WARNING") and "\n" not in message
        assert f"{zero_std_share:.0%}" in message and "presets/cpu.yaml" in message


def test_lora_update_norm_is_the_frobenius_norm_of_the_weight_update():
    import torch

    torch.manual_seed(0)
    layers = [(torch.randn(4, 6), torch.randn(5, 4), 2.0), (torch.randn(3, 2), torch.randn(7, 3), 0.5)]
    explicit = math.sqrt(sum(float(torch.linalg.norm(scale * b @ a)) ** 2 for a, b, scale in layers))
    assert lora_update_norm(layers) == pytest.approx(explicit, rel=1e-5)
    assert lora_update_norm([(a, torch.zeros_like(b), s) for a, b, s in layers]) == 0.0  # peft's B starts at 0


def test_update_norm_logger_adds_the_norm_of_a_real_peft_adapter_to_the_logs():
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import TrainerState

    net = torch.nn.Module()
    net.proj = torch.nn.Linear(3, 3)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]), net)
    state, logs = TrainerState(), {"loss": 0.0}
    state.log_history.append({**logs, "step": 1})  # what Trainer.log does just before on_log
    UpdateNormLogger().on_log(None, state, None, logs=logs, model=model)
    assert logs[UPDATE_NORM] == 0.0  # at initialisation
    with torch.no_grad():
        model.proj.lora_B["default"].weight.fill_(1.0)
    state.log_history.append({**logs, "step": 2})
    UpdateNormLogger().on_log(None, state, None, logs=logs, model=model)
    a = model.proj.lora_A["default"].weight
    assert logs[UPDATE_NORM] == pytest.approx(float(torch.linalg.norm(2.0 * torch.ones(3, 2) @ a)), rel=1e-5)
    assert [entry[UPDATE_NORM] for entry in state.log_history] == [0.0, logs[UPDATE_NORM]]  # kept for resumes


def test_read_curves_reads_nested_dvclive_metrics(tmp_path):
    from dvclive import Live

    with Live(dir=str(tmp_path), report=None, save_dvc_exp=False, dvcyaml=False) as live:
        for step, (share, fmt) in enumerate([(1.0, 0.0), (0.5, 1.0)], start=1):
            live.step = step
            live.log_metric("frac_reward_zero_std", share)
            live.log_metric(f"{FORMAT}/mean", fmt)
            live.next_step()
    curves = read_curves(tmp_path)
    assert curves["frac_reward_zero_std"] == [(1, 1.0), (2, 0.5)]
    assert curves[f"{FORMAT}/mean"] == [(1, 0.0), (2, 1.0)]


def test_train_stage_summarises_and_warns_on_a_run_without_signal(tmp_path, tiny_model_dir, capsys):
    """A random 2-layer model never writes '####': every group gets reward 0, the adapter cannot move."""
    from grpo_gsm8k.params import load_params
    from stages import data, train
    from tests.conftest import ONE_BATCH, cpu_params_dict, write_params

    params = load_params(write_params(tmp_path / "params.yaml", cpu_params_dict(**{
        **ONE_BATCH, "model.source": str(tiny_model_dir), "data.train_questions": 8, "train.max_steps": 1,
        "train.save_steps": 1, "train.max_completion_length": 8, "reward.min_tokens": 8,
        "reward.full_tokens": 8, "train.checkpoint_remote": "", "select.step": 1})))
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    summary = train.run(params, tiny_model_dir, tmp_path / "prepared" / "train.jsonl", tmp_path / "ckpt",
                        tmp_path / "live", tmp_path / "summary.json")
    assert summary["zero_std_share"] == 1.0 and summary["lora_update_norm"] == 0.0
    assert 0.0 <= summary["clipped_share"] <= 1.0 and set(summary["rewards"]) == {"correctness_reward", "format_reward"}
    assert "train: WARNING: no learning signal" in capsys.readouterr().out
