"""Sample completions of chat prompts with either engine: "hf" is `model.generate`; "fast" is
grpo_gsm8k.fastgen (static cache and CUDA graphs on a GPU). Each batch is seeded from (seed, batch index), so a
rerun with the same params gives the same completions. Used by the answer stages (grpo_gsm8k/answering.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from grpo_gsm8k.fastgen.generator import FastGenerator
from grpo_gsm8k.params import GenerationParams
from grpo_gsm8k.science.grading import grade


@dataclass(frozen=True)
class Completion:
    ids: list[int]  # generated tokens, up to and including EOS
    truncated: bool  # hit max_new_tokens without EOS


def prompt_token_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
            for p in prompts]


def sample_completions(model, tokenizer, prompts: list[list[dict]], samples: int, gen: GenerationParams,
                       seed: int, desc: str = "generating") -> list[Completion]:
    """`samples` completions per prompt, prompt-major (p0s0, p0s1, ..., p1s0, ...)."""
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    if gen.engine == "fast":
        generator = FastGenerator(model, tokenizer, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                  top_p=gen.top_p, max_batch=gen.batch_size)
        return [Completion(list(s.completion_ids), bool(s.truncated))
                for s in generator.generate(prompt_ids, samples, seed=seed)]
    expanded = [ids for ids in prompt_ids for _ in range(samples)]
    completions: list[Completion] = []
    with tqdm(total=len(expanded), desc=desc, unit="answer") as progress:
        for batch_index, start in enumerate(range(0, len(expanded), gen.batch_size)):
            batch = expanded[start:start + gen.batch_size]
            completions += _generate_batch(model, tokenizer, batch, gen, seed * 100_003 + batch_index)
            progress.update(len(batch))
    return completions


@torch.no_grad()
def _generate_batch(model, tokenizer, batch: list[list[int]], gen: GenerationParams, seed: int) -> list[Completion]:
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    torch.manual_seed(seed)
    # temperature 0 is greedy decoding; model.generate refuses do_sample with temperature 0
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0) if gen.temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    output = model.generate(input_ids=input_ids, attention_mask=attention, **sampling,
                            max_new_tokens=gen.max_new_tokens, pad_token_id=pad)
    eos_ids = _eos_ids(model, tokenizer)
    completions = []
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        completions.append(Completion(row if end is None else row[:end + 1], truncated=end is None))
    return completions


def _eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured]) if configured is not None else set()
    return ids | {tokenizer.eos_token_id}


def answer_set(model, tokenizer, rows: list[dict], samples: int, gen: GenerationParams, seed: int,
               desc: str) -> list[dict]:
    """One graded record per (question, sample): what the baseline and evaluate stages write, and what the train
    stage's validation pass scores. rows: the data stage's (qid, question, answer, prompt)."""
    completions = sample_completions(model, tokenizer, [row["prompt"] for row in rows], samples, gen, seed, desc)
    records = []
    for index, completion in enumerate(completions):
        row = rows[index // samples]
        text = tokenizer.decode(completion.ids, skip_special_tokens=True)
        records.append({
            "qid": row["qid"], "sample": index % samples, "question": row["question"], "gold": row["answer"],
            "completion": text, "n_tokens": len(completion.ids), "truncated": completion.truncated,
            **asdict(grade(text, row["answer"])),
        })
    return records
