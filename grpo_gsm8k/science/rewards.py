"""The study's GRPO rewards for GSM8K, one function per reward so TRL logs each under its own name.

The study: `reward.correct_value` for a correct final answer, but only if the completion is long enough (less
`reward.short_penalty` under `reward.full_tokens` tokens, 0.0 under `reward.min_tokens`), plus up to
`reward.format_max` for the answer format; the numbers live in params.yaml only (no knob here has a default).
Naive rewards (correctness without the length gate) let the policy collapse to short degenerate answers; the
"naive" variant is kept to reproduce that.

Every reward function takes TRL 1.16's keyword call, `f(prompts=, completions=, completion_ids=, answer=,
trainer_state=, log_extra=, log_metric=, **other columns)`, and returns one float per completion. Knobs are bound
with functools.partial, which TRL names after the wrapped function and which pickles (accelerate may deepcopy).
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpo_gsm8k.science.grading import canonical_number, is_correct, is_plain_number

RewardFunc = Callable[..., list[float]]
Completion = str | Sequence[dict[str, Any]]

_HASH_LINE_START = re.compile(r"^[ \t]*####", re.MULTILINE)
FORMAT_PARTS = 3  # has a #### line, plain number after it, it is the last line


def completion_text(completion: Completion) -> str:
    """Plain text of a completion: a str as is, or the last message's content of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content") or ""
    if isinstance(content, str):
        return content
    # Multimodal content: a list of parts such as {"type": "text", "text": "..."}.
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def correctness_score(
    text: str,
    gold: str,
    n_tokens: int,
    *,
    correct_value: float,
    min_tokens: int,
    full_tokens: int,
    short_penalty: float,
    length_gated: bool,
) -> float:
    """Reward for one completion: full value if correct and long enough, less if short, 0 if too short or wrong."""
    if length_gated and n_tokens < min_tokens:
        return 0.0  # checked first: a too-short completion earns nothing, so skip grading it
    if not is_correct(text, str(gold)):
        return 0.0
    if length_gated and n_tokens < full_tokens:
        return correct_value - short_penalty
    return correct_value


def format_score(text: str, *, format_max: float) -> float:
    """Answer-format reward for one completion, three equal parts of format_max / 3:

    (a) some line starts with "####";
    (b) what follows the last "####" is a plain number ("72", "-3.5", "$1,000"; no words, units or trailing period);
    (c) the line holding that last "####" is the last non-empty line.
    """
    part = format_max / FORMAT_PARTS
    score = part if _HASH_LINE_START.search(text) else 0.0
    if "####" not in text:
        return score
    after_last_hash = text.rsplit("####", 1)[1]
    hash_line_rest, _, following = after_last_hash.partition("\n")
    if is_plain_number(hash_line_rest) and canonical_number(hash_line_rest) is not None:
        score += part
    if not following.strip():
        score += part
    return score


def correctness_reward(
    completions: Sequence[Completion],
    answer: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    correct_value: float,
    min_tokens: int,
    full_tokens: int,
    short_penalty: float,
    length_gated: bool,
    **_: Any,
) -> list[float]:
    """Correct final answer, length-gated by len(completion_ids[i]) when length_gated."""
    return [
        correctness_score(
            completion_text(completion),
            gold,
            len(ids),
            correct_value=correct_value,
            min_tokens=min_tokens,
            full_tokens=full_tokens,
            short_penalty=short_penalty,
            length_gated=length_gated,
        )
        for completion, gold, ids in zip(completions, answer, completion_ids, strict=True)
    ]


def format_reward(completions: Sequence[Completion], *, format_max: float, **_: Any) -> list[float]:
    """Answer format (see format_score), independent of correctness."""
    return [format_score(completion_text(completion), format_max=format_max) for completion in completions]


@dataclass(frozen=True)
class RewardKnobs:
    """params.yaml's `reward` section (loaded by grpo_gsm8k.params, the only place its values are written)."""
    variant: str
    correct_value: float
    min_tokens: int
    full_tokens: int
    short_penalty: float
    format_max: float

    def __post_init__(self) -> None:
        problem = _knobs_problem(self)
        if problem:
            raise ValueError(problem)


def _knobs_problem(knobs: RewardKnobs) -> str:
    """One line naming the bad param and the fix, or "" when the knobs are consistent."""
    problem = variant_problem(knobs.variant)
    if problem:
        return problem
    for name in ("min_tokens", "full_tokens"):
        value = getattr(knobs, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"reward.{name}={value!r} must be a non-negative integer token count"
    for name in ("correct_value", "short_penalty", "format_max"):
        value = getattr(knobs, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return f"reward.{name}={value!r} must be a finite number >= 0"
    if knobs.min_tokens > knobs.full_tokens:
        return (
            f"reward.min_tokens={knobs.min_tokens} must not be above reward.full_tokens={knobs.full_tokens}; "
            "lower min_tokens or raise full_tokens"
        )
    if knobs.short_penalty > knobs.correct_value:
        # Otherwise a correct short answer would score below a wrong one.
        return (
            f"reward.short_penalty={knobs.short_penalty} must not exceed reward.correct_value={knobs.correct_value}; "
            "lower short_penalty or raise correct_value"
        )
    return ""


def _bind(func: RewardFunc, **knobs: Any) -> RewardFunc:
    """Knobs bound by partial; update_wrapper keeps func's __name__ so TRL logs it under a stable name."""
    return functools.update_wrapper(functools.partial(func, **knobs), func)


def _correctness(knobs: RewardKnobs, *, length_gated: bool) -> RewardFunc:
    return _bind(
        correctness_reward,
        correct_value=knobs.correct_value,
        min_tokens=knobs.min_tokens,
        full_tokens=knobs.full_tokens,
        short_penalty=knobs.short_penalty,
        length_gated=length_gated,
    )


def _format(knobs: RewardKnobs) -> RewardFunc:
    return _bind(format_reward, format_max=knobs.format_max)


def study_variant(knobs: RewardKnobs) -> list[RewardFunc]:
    """The study's reward: length-gated correctness + format."""
    return [_correctness(knobs, length_gated=True), _format(knobs)]


def naive_variant(knobs: RewardKnobs) -> list[RewardFunc]:
    """Common-tutorial reward: correctness at any length + format."""
    return [_correctness(knobs, length_gated=False), _format(knobs)]


def correctness_only_variant(knobs: RewardKnobs) -> list[RewardFunc]:
    """Bare correctness at any length, no format reward."""
    return [_correctness(knobs, length_gated=False)]


VariantFunc = Callable[[RewardKnobs], list[RewardFunc]]

# Adding a variant = one function above and one name here; or, without editing this file, a function of the same
# shape in your own module, selected as reward.variant=package.module:function. Declare that module's file in
# the deps of dvc.yaml's train, baseline and evaluate stages (each computes the rewards), or editing it will not
# rerun them.
VARIANTS: dict[str, VariantFunc] = {
    "study": study_variant,
    "naive": naive_variant,
    "correctness_only": correctness_only_variant,
}


def resolve_variant(name: str) -> VariantFunc:
    """The variant function `name` names: a key of VARIANTS, or an importable "package.module:function" path
    to a function of the same shape (knobs -> reward functions), so a researcher's own reward needs no edit here."""
    if name in VARIANTS:
        return VARIANTS[name]
    module_name, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def variant_problem(name: object) -> str:
    """One line naming a reward.variant that is neither registered nor importable, or "" when it resolves."""
    choices = f"choose one of: {', '.join(sorted(VARIANTS))}, or a package.module:function path"
    if not isinstance(name, str) or (name not in VARIANTS and not re.fullmatch(r"[\w.]+:\w+", name)):
        return f"reward.variant={name!r} is unknown; {choices}"
    try:
        func = resolve_variant(name)
    except Exception as err:  # the user's module may fail in any way while importing
        reason = (str(err).splitlines() or [""])[0]
        return (f"reward.variant={name!r} cannot be imported ({type(err).__name__}: {reason}); fix the path or "
                "put its package on PYTHONPATH")
    if not callable(func):
        return f"reward.variant={name!r} is not a function; point it at a function (knobs) -> reward functions"
    return ""


def build_reward_funcs(knobs: RewardKnobs) -> list[RewardFunc]:
    """The variant's reward functions with knobs bound, ready for GRPOTrainer(reward_funcs=...)."""
    funcs = list(resolve_variant(knobs.variant)(knobs))
    if not funcs or not all(callable(func) for func in funcs):
        raise ValueError(f"reward.variant={knobs.variant!r} returned {funcs!r}; it must return a non-empty list "
                         "of reward functions")
    return funcs


def reward_names(knobs: RewardKnobs) -> list[str]:
    """Names TRL logs the variant's rewards under (rewards/<name>/mean)."""
    return [func.__name__ for func in build_reward_funcs(knobs)]


@functools.lru_cache(maxsize=32)
def _cached_reward_funcs(knobs: RewardKnobs) -> tuple[RewardFunc, ...]:
    return tuple(build_reward_funcs(knobs))


def total_reward(completion: Completion, answer: str, n_tokens: int, knobs: RewardKnobs) -> float:
    """Sum of the variant's rewards for one completion, as GRPO would see it (rewards weighted 1)."""
    token_ids = [range(n_tokens)]  # only the length of completion_ids is read
    rewards = [
        func(completions=[completion], answer=[answer], completion_ids=token_ids)[0]
        for func in _cached_reward_funcs(knobs)
    ]
    return float(sum(rewards))
