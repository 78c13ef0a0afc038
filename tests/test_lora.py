"""LoRA through the train stage's own GRPOTrainer: base weights stay fixed, adapter weights move."""
from __future__ import annotations

import torch

from grpo_gsm8k.params import load_params
from stages import data, train
from tests.conftest import ONE_BATCH, cpu_params_dict, write_params


def token_reward(completions, completion_ids, **_):
    """Varies within every group (a random model's completions all run to the cap, so length would not), so
    GRPO's advantages, and the gradients, are not all zero."""
    return [float(sum(ids) % 97) for ids in completion_ids]


def test_base_weights_fixed_adapter_weights_change(tmp_path, tiny_model_dir):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**{
        **ONE_BATCH, "model.source": str(tiny_model_dir), "data.train_questions": 8, "train.max_steps": 2,
        "train.max_completion_length": 8, "reward.min_tokens": 4, "train.learning_rate": 1e-2,
        "train.checkpoint_remote": ""})))  # the study gate (50 tokens) is checked against 8; the reward here is token_reward
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "source.json").write_text(f'{{"kind": "local", "source": "{tiny_model_dir}"}}')
    trainer = train.build_trainer(params, base_dir, tmp_path / "prepared" / "train.jsonl", tmp_path / "ckpt",
                                  callbacks=[], reward_funcs=[token_reward])
    named = dict(trainer.model.named_parameters())
    lora = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    assert lora and all(not p.requires_grad for n, p in named.items() if "lora_" not in n)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in base.items()), "a base weight changed"
    changed = [n for n, value in lora.items() if not torch.equal(after[n], value)]
    assert len(changed) >= len(lora) // 2, f"only {len(changed)} of {len(lora)} adapter tensors changed"
