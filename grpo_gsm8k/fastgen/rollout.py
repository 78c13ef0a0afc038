"""TRL glue for the fast engine: a GRPOTrainer `rollout_func` that samples with `FastGenerator`.

    trainer = GRPOTrainer(..., rollout_func=make_rollout_func())

TRL 1.16 hands `rollout_func` the per-process generation batch exactly as its RepeatSampler built it: each prompt
repeated num_generations times in a row (the docstring's "no duplication" does not match the code: rewards and
advantages are computed over that same list). So the rollout returns one completion per entry, in the same order,
and prefills each run of identical prompts once. Weights are re-packed (LoRA merged) when `global_step` moved;
by default the packed copy is freed after each round so it never coexists with training activations.
The training-side speed-ups, which run with either engine, are in grpo_gsm8k/training/speedups.py.
"""
from __future__ import annotations

from typing import Callable

from grpo_gsm8k.fastgen.generator import FastGenerator


def _group_runs(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Consecutive identical prompts -> (distinct prompts, run lengths)."""
    unique: list[list[int]] = []
    counts: list[int] = []
    for ids in prompt_ids:
        if unique and unique[-1] == ids:
            counts[-1] += 1
        else:
            unique.append(list(ids))
            counts.append(1)
    return unique, counts


def tokenize_like_trl(prompts: list, trainer) -> list[list[int]]:
    """Prompt token ids exactly as TRL's own generation path renders them (chat template, tools, kwargs)."""
    if hasattr(trainer, "_tokenize_prompts"):  # TRL 1.16: the same call its transformers/vLLM paths use
        return [list(ids) for ids in trainer._tokenize_prompts(prompts)[0]]
    tokenizer = trainer.processing_class
    if isinstance(prompts[0], list):
        return tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             **(trainer.args.chat_template_kwargs or {}))["input_ids"]
    return tokenizer(text=prompts)["input_ids"]


def _check_sampling_args(args) -> None:
    unsupported = {"top_k": (args.top_k, (0, None)), "min_p": (args.min_p, (None, 0.0)),
                   "repetition_penalty": (args.repetition_penalty, (1.0,)),
                   "generation_kwargs": (args.generation_kwargs, (None, {}))}
    for name, (value, neutral) in unsupported.items():
        if value not in neutral:
            raise ValueError(f"fastgen rollouts do not implement GRPOConfig.{name}={value!r}; "
                             "leave it at its default or use the hf engine")


class _Rollout:
    """State kept between rounds: the generator and the step its weights were packed at."""

    def __init__(self, options: dict, keep_weights: bool, seed: int | None):
        self.options, self.keep_weights, self.seed = options, keep_weights, seed
        self.generator = None
        self.packed_step: int | None = None

    def __call__(self, prompts: list, trainer) -> dict:
        prompt_ids = tokenize_like_trl(prompts, trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        generator = self._generator(model, trainer, len(prompt_ids))
        step = trainer.state.global_step
        if not generator.has_weights or self.packed_step != step:
            generator.load_weights(model)
            self.packed_step = step
        unique, counts = _group_runs(prompt_ids)
        samples = generator.generate(unique, counts, seed=None if self.seed is None else self.seed + step)
        if not self.keep_weights:
            generator.release()
        repeated = [ids for ids, n in zip(unique, counts) for _ in range(n)]
        return {"prompt_ids": repeated,
                "completion_ids": [s.completion_ids for s in samples],
                "logprobs": [s.logprobs for s in samples]}

    def _generator(self, model, trainer, n_rows: int):
        if self.generator is None:
            args = trainer.args
            _check_sampling_args(args)
            options = {"max_batch": n_rows, "kv_bucket": None, **self.options}
            self.generator = FastGenerator(model, trainer.processing_class,
                                           max_new_tokens=args.max_completion_length,
                                           temperature=args.temperature, top_p=args.top_p,
                                           eos_token_ids=list(trainer.eos_token_ids) or None, **options)
        return self.generator


def make_rollout_func(params=None, *, max_batch: int | None = None, use_cuda_graph: bool | None = None,
                      vocab_size: int | None = None, keep_weights: bool = False,
                      seed: int | None = None) -> Callable[[list, object], dict]:
    """A TRL `rollout_func` sampling with FastGenerator from the trainer's current (LoRA-merged) weights.

    Sampling settings always come from the trainer's GRPOConfig (max_completion_length, temperature, top_p), so
    the rollouts are exactly what TRL scores; `params` (the project's Params) is accepted and not needed.
    max_batch defaults to the size of the first generation batch. keep_weights=True keeps the packed copy
    between rounds (faster only if rounds reuse weights; costs a model-sized copy of GPU memory during training).
    seed: None uses the global RNG (which TRL seeds); an int makes round k use seed + global_step."""
    del params  # generation settings are the trainer's, see above
    options = {k: v for k, v in {"max_batch": max_batch, "use_cuda_graph": use_cuda_graph,
                                 "vocab_size": vocab_size}.items() if v is not None}
    return _Rollout(options, keep_weights, seed)
