"""Load params.yaml once into frozen dataclasses, one per section.

params.yaml is the only place a study value is written: no field here has a default, so a missing key is an
error that names it, as is an unknown key, an out-of-range value or a file that is not valid YAML (one
`ParamsError` line naming the param, or the file:line:column, and the fix). Stages call `load_params(path)` and
read only the sections they declare in dvc.yaml.
Why over 300 lines: one frozen dataclass per params.yaml section, each with the checks that name its bad values,
and the loader that names unknown, missing and mistyped keys; together they are the one definition of the params.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from grpo_gsm8k.science.rewards import RewardKnobs

# step: select.step, chosen by hand (the study); validation: the best smoothed validation accuracy
SELECT_RULES = ("step", "validation")
# TRL 1.16's GRPOConfig.loss_type values: TRL itself checks the name only inside compute_loss, after model loading
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

class ParamsError(ValueError):
    """A param is unknown, missing or out of range; the message names it and the fix."""


@dataclass(frozen=True)
class DataParams:
    source: str
    system_prompt: str
    hub_config: str
    train_questions: int | str
    validation_questions: int

    def validate(self) -> None:
        _check_count("data.train_questions", self.train_questions)
        _check(self.validation_questions >= 0, f"data.validation_questions={self.validation_questions} must be >= 0 "
               "(0 turns the validation pass off)")


@dataclass(frozen=True)
class EvalSet:
    questions: int | str
    samples: int

    def validate(self, name: str) -> None:
        _check_count(f"evaluation.sets.{name}.questions", self.questions)
        _check(self.samples >= 1, f"evaluation.sets.{name}.samples={self.samples} must be >= 1")


@dataclass(frozen=True)
class EvaluationParams:
    sets: dict[str, EvalSet]
    greedy: bool  # also answer each question once at temperature 0 (greedy accuracy)

    def validate(self) -> None:
        _check(bool(self.sets), "evaluation.sets is empty; name at least one set, e.g. study: {questions: 20, samples: 5}")
        for name, eval_set in self.sets.items():
            _check(isinstance(name, str) and name.isidentifier(),  # YAML reads `1:` and `yes:` as no string
                   f"evaluation.sets name {name!r} must be a plain identifier like 'study'")
            eval_set.validate(name)


@dataclass(frozen=True)
class ModelParams:
    source: str
    revision: str
    dtype: str
    device: str

    def validate(self) -> None:
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model.device", self.device, ("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class GenerationParams:
    engine: str
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int

    def validate(self) -> None:
        _check_choice("generation.engine", self.engine, ("hf", "fast"))
        _check(self.max_new_tokens >= 1, f"generation.max_new_tokens={self.max_new_tokens} must be >= 1")
        _check(self.temperature > 0, f"generation.temperature={self.temperature} must be > 0 (answers are sampled)")
        _check(0 < self.top_p <= 1, f"generation.top_p={self.top_p} must be in (0, 1]")
        _check(self.batch_size >= 1, f"generation.batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: str | list[str]

    def validate(self) -> None:
        _check(self.r >= 1, f"train.lora.r={self.r} must be >= 1")
        _check(self.alpha >= 1, f"train.lora.alpha={self.alpha} must be >= 1 (LoRA scales its update by alpha / r)")
        _check(0 <= self.dropout < 1, f"train.lora.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class TrainParams:
    learning_rate: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_generations: int
    max_completion_length: int
    save_steps: int
    logging_steps: int
    eval_steps: int
    lora: LoraParams
    lr_scheduler_type: str
    warmup_steps: int
    temperature: float
    beta: float
    loss_type: str
    mask_truncated_completions: bool
    gradient_checkpointing: bool | str
    compile: bool | str
    keep_checkpoints: int
    num_processes: int
    accelerate_config: str
    checkpoint_remote: str
    report_to: str | list[str]  # trackers beside dvclive; names checked by training/trackers.py

    def validate(self) -> None:
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps",
                     "logging_steps", "eval_steps", "max_completion_length", "keep_checkpoints", "num_processes"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}={value} must be >= 1")
        _check(self.num_generations >= 2, f"train.num_generations={self.num_generations} must be >= 2 "
               "(GRPO compares completions within a group)")
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
        _check(completions % self.num_generations == 0,
               f"train: per_device_train_batch_size x gradient_accumulation_steps = {completions} completions per "
               f"step is not a multiple of train.num_generations={self.num_generations}; "
               "change one of them so whole groups fit in a step")
        # Several processes split the accumulation, so a step still holds `completions` completions.
        _check(self.gradient_accumulation_steps % self.num_processes == 0,
               f"train.gradient_accumulation_steps={self.gradient_accumulation_steps} must be divisible by "
               f"train.num_processes={self.num_processes} to keep {completions} completions per optimizer step; "
               "change either")
        for name in ("learning_rate", "beta", "temperature"):
            _check(math.isfinite(getattr(self, name)), f"train.{name}={getattr(self, name)} must be finite")
        _check(self.learning_rate > 0, f"train.learning_rate={self.learning_rate} must be > 0")
        _check(self.beta >= 0, f"train.beta={self.beta} must be >= 0")
        _check(self.temperature > 0, f"train.temperature={self.temperature} must be > 0 (GRPO samples a group of "
               "different completions per prompt)")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check_choice("train.loss_type", self.loss_type, LOSS_TYPES)
        _check(self.checkpoint_remote == "" or self.checkpoint_remote.startswith("s3://"),
               f"train.checkpoint_remote={self.checkpoint_remote!r} must be an s3:// URI or \"\" for local only")
        _check(self.gradient_checkpointing in (True, False, "auto"),
               f"train.gradient_checkpointing={self.gradient_checkpointing!r} must be true, false or auto")
        _check(self.compile in (True, False, "auto"), f"train.compile={self.compile!r} must be true, false or auto")
        # The validation rule chooses among checkpoints, so every validated step must be saved.
        _check(self.eval_steps % self.save_steps == 0,
               f"train.eval_steps={self.eval_steps} must be a multiple of train.save_steps={self.save_steps}, so "
               "every validated step has a checkpoint; change either")
        _check_trackers(self.report_to)
        self.lora.validate()


@dataclass(frozen=True)
class SelectParams:
    step: int
    rule: str
    smoothing_window: int
    validation_window: int

    def validate(self) -> None:
        _check(self.step >= 1, f"select.step={self.step} must be >= 1")
        _check_choice("select.rule", self.rule, SELECT_RULES)
        _check(self.smoothing_window >= 1, f"select.smoothing_window={self.smoothing_window} must be >= 1")
        _check(self.validation_window >= 1, f"select.validation_window={self.validation_window} must be >= 1")


@dataclass(frozen=True)
class StatsParams:
    alpha: float
    bootstrap_samples: int
    power_target: float

    def validate(self) -> None:
        _check(0 < self.alpha < 1, f"stats.alpha={self.alpha} must be in (0, 1)")
        _check(0 < self.power_target < 1, f"stats.power_target={self.power_target} must be in (0, 1)")
        _check(self.bootstrap_samples >= 100, f"stats.bootstrap_samples={self.bootstrap_samples} must be >= 100")


@dataclass(frozen=True)
class ReportParams:
    pdf: bool

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    evaluation: EvaluationParams
    model: ModelParams
    generation: GenerationParams
    reward: RewardKnobs  # validates itself, naming the reward.* param
    train: TrainParams
    select: SelectParams
    stats: StatsParams
    report: ReportParams

    def validate(self) -> None:
        _check(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32) (numpy and torch seed ranges)")
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if hasattr(value, "validate"):
                value.validate()
        # Completions stop at max_completion_length tokens, so a higher gate could never let correctness pay.
        # Only the study variant gates on length (naive, correctness_only and import-path variants do not).
        _check(self.reward.variant != "study" or self.reward.min_tokens <= self.train.max_completion_length,
               f"reward.min_tokens={self.reward.min_tokens} is above train.max_completion_length="
               f"{self.train.max_completion_length}: no completion is long enough to earn the correctness reward; "
               "lower reward.min_tokens or raise train.max_completion_length")
        _check(self.select.rule != "validation" or self.data.validation_questions > 0,
               "select.rule=validation needs validation answers, but data.validation_questions=0; set it above 0 "
               "(e.g. 200) or use select.rule=step")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root or pass --params <file>")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ParamsError(_yaml_problem(path, err)) from None
    return params_from_dict(raw)


def params_from_dict(raw: object) -> Params:
    """Params from an already-parsed params.yaml (e.g. one a preset was applied to), checked as load_params does."""
    params = _build(Params, raw, "")
    params.validate()
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML would keep the last silently (and dvc refuses
    the file), so `max_steps: 1500` above `max_steps: 10` would train 10 steps."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """'params.yaml:4:1: not valid YAML (...)': the place YAML gave up, 1-based as editors count."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or str(err)
    return (f"{where}: not valid YAML ({' '.join(problem.split())}); fix {path.name} at that line "
            "(indent with spaces, close brackets and quotes)")


def _build(cls, raw, prefix: str):
    """Build dataclass `cls` from a dict, naming unknown, missing and mistyped keys by their dotted path."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys need not be strings
    if unknown:
        raise ParamsError(f"unknown param {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in fields:
        if name not in raw:
            raise ParamsError(f"missing param {prefix}{name}; add it to params.yaml")
        values[name] = _convert(hints[name], raw[name], f"{prefix}{name}")
    try:
        return cls(**values)
    except ValueError as err:  # classes that check themselves on construction (RewardKnobs)
        raise ParamsError(str(err)) from None


def _convert(hint, value, dotted: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, dotted + ".")
    origin = typing.get_origin(hint)
    if origin is dict:
        item_type = typing.get_args(hint)[1]
        if not isinstance(value, dict):
            raise ParamsError(f"{dotted} must be a mapping, got {value!r}")
        return {key: _convert(item_type, item, f"{dotted}.{key}") for key, item in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(option, value, dotted)
            except ParamsError:
                continue
        raise ParamsError(f"{dotted}={value!r} has the wrong type; expected {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{dotted}={value!r} must be a list")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-6" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ParamsError(f"{dotted}={value!r} has the wrong type; expected {hint.__name__}")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ParamsError(message)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r} is not one of: {', '.join(choices)}")


def _check_count(name: str, value: int | str) -> None:
    _check(value == "all" or (isinstance(value, int) and value >= 1),
           f"{name}={value!r} must be a positive number or \"all\"")


def _check_trackers(value: str | list[str]) -> None:
    """train.report_to's form; whether transformers knows each name, and it is installed, the train stage checks."""
    names = [value] if isinstance(value, str) else value
    _check(all(isinstance(name, str) for name in names),
           f"train.report_to={value!r} must be none, a tracker name or a list of names")
    _check("all" not in names, f"train.report_to={value!r} reports to whichever trackers happen to be installed "
           "(not reproducible); name them, e.g. train.report_to: tensorboard, or none")
    _check("dvclive" not in names, f"train.report_to={value!r}: dvclive always logs the curves (the train stage's "
           "live dir); list only other trackers, or none")
    _check("none" not in names or len(names) == 1,
           f"train.report_to={value!r} mixes none with trackers; write none alone or list only trackers")
