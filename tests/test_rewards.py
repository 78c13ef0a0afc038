"""Tests for grpo_gsm8k.science.rewards: length gates, format parts, variants, knob validation, TRL call contract."""

import copy
import dataclasses
import inspect
import pickle

import pytest
from trl.trainer.utils import get_callable_name

from grpo_gsm8k.params import load_params
from grpo_gsm8k.science.rewards import (
    VARIANTS,
    RewardKnobs,
    build_reward_funcs,
    completion_text,
    correctness_reward,
    format_reward,
    reward_names,
    total_reward,
)
from tests.conftest import REPO

STUDY = load_params(REPO / "params.yaml").reward  # the study's knobs, written only in params.yaml
GATED = dict(correct_value=STUDY.correct_value, min_tokens=STUDY.min_tokens, full_tokens=STUDY.full_tokens,
             short_penalty=STUDY.short_penalty, length_gated=True)
UNGATED = {**GATED, "length_gated": False}
PAID, SHORT = STUDY.correct_value, STUDY.correct_value - STUDY.short_penalty  # full and penalised correct reward


def knobs(**overrides) -> RewardKnobs:
    return dataclasses.replace(STUDY, **overrides)


RIGHT = "9 * 2 = 18 dollars.\n#### 18"
WRONG = "9 * 2 = 19 dollars.\n#### 19"
GOLD = "18"


def _ids(n_tokens: int) -> list[int]:
    return [7] * n_tokens


# completion, n_tokens, reward with the study's knobs (params.yaml: reward)
LENGTH_GATE_CASES = [
    (RIGHT, STUDY.min_tokens - 1, 0.0),  # correct but under min_tokens: nothing
    (RIGHT, STUDY.min_tokens, SHORT),  # correct at min_tokens: penalised
    (RIGHT, STUDY.full_tokens - 1, SHORT),  # correct just under full_tokens: penalised
    (RIGHT, STUDY.full_tokens, PAID),  # correct at full_tokens: full value
    (RIGHT, 4 * STUDY.full_tokens, PAID),  # correct and long: full value
    (WRONG, STUDY.min_tokens - 1, 0.0),  # wrong and short
    (WRONG, STUDY.min_tokens, 0.0),  # wrong at min_tokens
    (WRONG, STUDY.full_tokens - 1, 0.0),  # wrong in the penalty band
    (WRONG, STUDY.full_tokens, 0.0),  # wrong at full_tokens
]


@pytest.mark.parametrize(("completion", "n_tokens", "expected"), LENGTH_GATE_CASES)
def test_correctness_length_gates(completion, n_tokens, expected):
    assert correctness_reward([completion], [GOLD], [_ids(n_tokens)], **GATED) == [expected]


# completion, n_tokens, reward with length_gated=False
UNGATED_CASES = [
    (RIGHT, 1, PAID),  # correct and tiny: full value anyway
    (RIGHT, STUDY.min_tokens, PAID),  # correct in the would-be penalty band
    (WRONG, 400, 0.0),  # wrong stays zero
]


@pytest.mark.parametrize(("completion", "n_tokens", "expected"), UNGATED_CASES)
def test_correctness_ungated(completion, n_tokens, expected):
    assert correctness_reward([completion], [GOLD], [_ids(n_tokens)], **UNGATED) == [expected]


# completion, gold, reward at full_tokens: the reward pays exactly what the grader calls correct (issue 12)
GRADED_LINE_CASES = [
    ("Work.\n#### 3, 4", "3", 0.0),  # two values on the answer line: not paid
    ("Work.\n#### 10-15", "10", 0.0),  # a range: not paid
    ("Work.\n#### 5 + 7", "12", PAID),  # expression evaluated
    ("Work.\n#### 0.5 hours = 30 minutes", "30", PAID),  # value after the last "="
    ("Work.\nThe answer is not 5 but 6.", "6", 0.0),  # two values in the statement: not paid
    ("Work.\n#### $15", "15", PAID),  # guard (passes on the old grader too): currency sign
]


@pytest.mark.parametrize(("completion", "gold", "expected"), GRADED_LINE_CASES)
def test_correctness_reads_the_whole_answer_line(completion, gold, expected):
    assert correctness_reward([completion], [gold], [_ids(STUDY.full_tokens)], **GATED) == [expected]


def test_correctness_knobs_are_honoured():
    own = dict(correct_value=2.0, min_tokens=10, full_tokens=20, short_penalty=0.5, length_gated=True)
    rewards = correctness_reward([RIGHT] * 3, [GOLD] * 3, [_ids(9), _ids(10), _ids(20)], **own)
    assert rewards == [0.0, 1.5, 2.0]


def test_correctness_accepts_full_gsm8k_answer_as_gold():
    gold = "She makes 9 * 2 = <<9*2=18>>18.\n#### 18"
    assert correctness_reward([RIGHT], [gold], [_ids(STUDY.full_tokens)], **GATED) == [PAID]


# completion, format parts earned out of 3 (each worth format_max / 3)
FORMAT_CASES = [
    ("Work.\n#### 18", 3),  # all three parts
    ("Work.\n#### 18\n\n  \n", 3),  # trailing blank lines still count as last
    ("Work.\n#### $1,000", 3),  # $ and thousands are still a plain number
    ("Work.\n#### -3.5", 3),  # negative decimal is a plain number
    ("Work.\n#### 18 dollars", 2),  # (b) fails: words after the number
    ("Work.\n#### 18.", 2),  # (b) fails: trailing period
    ("Work.\n#### 18\nHope this helps!", 2),  # (c) fails: text after the #### line
    ("Work. #### 18", 2),  # (a) fails: #### not at the start of a line
    ("#### eighteen\nmore", 1),  # only (a)
    ("The answer is 18.", 0),  # no #### at all
    ("", 0),  # empty completion
]


@pytest.mark.parametrize(("completion", "parts"), FORMAT_CASES)
def test_format_parts(completion, parts):
    assert format_reward([completion], format_max=STUDY.format_max) == [pytest.approx(STUDY.format_max * parts / 3)]


def test_format_max_scales_parts():
    assert format_reward(["Work.\n#### 18 dollars"], format_max=3.0) == [pytest.approx(2.0)]


# completion in either TRL shape, its text
COMPLETION_SHAPES = [
    (RIGHT, RIGHT),  # plain string
    ([{"role": "assistant", "content": RIGHT}], RIGHT),  # conversational
    ([{"role": "assistant", "content": [{"type": "text", "text": RIGHT}]}], RIGHT),  # content as parts
    ([{"role": "assistant", "content": None}], ""),  # empty message
    ([], ""),  # no message
]


@pytest.mark.parametrize(("completion", "text"), COMPLETION_SHAPES)
def test_completion_text(completion, text):
    assert completion_text(completion) == text


def test_conversational_and_plain_completions_score_the_same():
    conversational = [{"role": "assistant", "content": RIGHT}]
    ids = [_ids(STUDY.full_tokens)]
    plain_rewards = [f([RIGHT], answer=[GOLD], completion_ids=ids) for f in build_reward_funcs(STUDY)]
    chat_rewards = [f([conversational], answer=[GOLD], completion_ids=ids) for f in build_reward_funcs(STUDY)]
    assert plain_rewards == chat_rewards == [[PAID], [pytest.approx(STUDY.format_max)]]


# knob overrides, words the one-line error must contain
BAD_KNOBS = [
    (dict(min_tokens=STUDY.full_tokens + 1), f"reward.min_tokens={STUDY.full_tokens + 1} must not be above "
     f"reward.full_tokens={STUDY.full_tokens}"),  # gate inverted
    (dict(variant="foo"), "reward.variant='foo' is unknown; choose one of: correctness_only, naive, study"),  # typo
    (dict(min_tokens=-1), "reward.min_tokens=-1"),  # negative token count
    (dict(full_tokens=99.5), "reward.full_tokens=99.5"),  # token counts are integers
    (dict(correct_value=float("nan")), "reward.correct_value=nan"),  # NaN would poison advantages
    (dict(format_max=-1.0), "reward.format_max=-1.0"),  # negative format reward
    (dict(short_penalty=PAID + 1), f"reward.short_penalty={PAID + 1} must not exceed "
     f"reward.correct_value={PAID}"),  # a short correct answer would score below a wrong one
    (dict(variant="tests.no_such:f"), "reward.variant='tests.no_such:f' cannot be imported (ModuleNotFoundError"),
    (dict(variant="tests.rewards_for_tests:nope"), "cannot be imported (AttributeError"),  # no such function
    (dict(variant="grpo_gsm8k.science.rewards:FORMAT_PARTS"), "is not a function"),  # a constant, not a variant
    (dict(variant="my rewards.py"), "reward.variant='my rewards.py' is unknown"),  # neither a name nor a path
]


@pytest.mark.parametrize(("overrides", "message"), BAD_KNOBS)
def test_knob_validation(overrides, message):
    with pytest.raises(ValueError) as error:
        knobs(**overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)  # one line


def test_equal_gates_are_allowed():
    assert knobs(min_tokens=STUDY.full_tokens).min_tokens == STUDY.full_tokens  # empty penalty band, no error


# variant, names TRL will log
VARIANT_NAMES = [
    ("study", ["correctness_reward", "format_reward"]),  # gated correctness + format
    ("naive", ["correctness_reward", "format_reward"]),  # ungated correctness + format
    ("correctness_only", ["correctness_reward"]),  # ungated correctness alone
]


@pytest.mark.parametrize(("variant", "names"), VARIANT_NAMES)
def test_variant_names(variant, names):
    funcs = build_reward_funcs(knobs(variant=variant))
    assert [get_callable_name(f) for f in funcs] == names  # how TRL names them
    assert reward_names(knobs(variant=variant)) == names


def test_variant_table_is_covered():
    assert sorted(VARIANTS) == sorted(variant for variant, _ in VARIANT_NAMES)


# a variant given as a package.module:function path (a researcher's own reward), names TRL will log
PATH_VARIANT_NAMES = [
    ("tests.rewards_for_tests:token_variant", ["token_reward"]),  # a reward of its own
    ("tests.rewards_for_tests:format_only", ["format_reward"]),  # the study's format reward alone
]


@pytest.mark.parametrize(("variant", "names"), PATH_VARIANT_NAMES)
def test_variant_by_import_path(variant, names):
    funcs = build_reward_funcs(knobs(variant=variant))
    assert [get_callable_name(f) for f in funcs] == names
    assert [pickle.loads(pickle.dumps(f)).__name__ for f in funcs] == names  # accelerate may copy them


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_has_distinct_names_and_pickles(variant):
    funcs = build_reward_funcs(knobs(variant=variant, correct_value=PAID + 1))
    names = [f.__name__ for f in funcs]
    assert len(set(names)) == len(names)
    for func in funcs:
        for clone in (pickle.loads(pickle.dumps(func)), copy.deepcopy(func)):
            assert clone.__name__ == func.__name__
            assert clone([RIGHT], answer=[GOLD], completion_ids=[_ids(100)]) == func(
                [RIGHT], answer=[GOLD], completion_ids=[_ids(100)]
            )


# variant, n_tokens of RIGHT, total reward
TOTAL_CASES = [
    ("study", STUDY.full_tokens, PAID + STUDY.format_max),  # correct + full format
    ("study", STUDY.min_tokens, SHORT + STUDY.format_max),  # penalised + full format
    ("study", STUDY.min_tokens - 1, STUDY.format_max),  # too short: format only
    ("naive", STUDY.min_tokens - 1, PAID + STUDY.format_max),  # no gate: the short answer pays in full
    ("correctness_only", STUDY.min_tokens - 1, PAID),  # no gate, no format
]


@pytest.mark.parametrize(("variant", "n_tokens", "expected"), TOTAL_CASES)
def test_total_reward(variant, n_tokens, expected):
    assert total_reward(RIGHT, GOLD, n_tokens, knobs(variant=variant)) == pytest.approx(expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trl_call_contract(variant):
    # Exactly the kwargs GRPOTrainer._calculate_rewards passes (trl 1.16), plus an extra dataset column.
    batch = dict(
        prompts=[[{"role": "user", "content": "q"}]] * 2,
        completions=[[{"role": "assistant", "content": RIGHT}], [{"role": "assistant", "content": WRONG}]],
        completion_ids=[_ids(STUDY.full_tokens), _ids(STUDY.full_tokens)],
        answer=[GOLD, GOLD],
        question=["q", "q"],
        trainer_state=None,
        log_extra=None,
        log_metric=None,
    )
    for func in build_reward_funcs(knobs(variant=variant)):
        assert not inspect.iscoroutinefunction(func.func)  # TRL would await it otherwise
        rewards = func(**batch)
        assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)
        assert rewards[0] > 0.0
