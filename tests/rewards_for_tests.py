"""Reward variants for tests, selected through params like any variant:
`reward.variant: tests.rewards_for_tests:<function>` (run from the project root, which holds the tests package).

Each is a variant function, (knobs) -> reward functions, as in grpo_gsm8k/science/rewards.py's VARIANTS.
"""
from __future__ import annotations

import functools

from grpo_gsm8k.science.rewards import RewardKnobs, format_reward

TOKEN_VARIANT = "tests.rewards_for_tests:token_variant"
FORMAT_ONLY = "tests.rewards_for_tests:format_only"


def token_reward(completions, completion_ids, **_) -> list[float]:
    """Varies within every group (a tiny random model's completions all run to the cap and never write `####`, so
    the study's rewards would all be 0), so GRPO's advantages, and the gradients, are not all zero."""
    return [float(sum(ids) % 97) for ids in completion_ids]


def token_variant(knobs: RewardKnobs) -> list:
    """A reward that moves a tiny random model's adapter: the sum of the completion's token ids mod 97."""
    return [token_reward]


def format_only(knobs: RewardKnobs) -> list:
    """The study's format reward alone: a 135M model can learn the format in minutes, not GSM8K."""
    return [functools.update_wrapper(functools.partial(format_reward, format_max=knobs.format_max), format_reward)]
