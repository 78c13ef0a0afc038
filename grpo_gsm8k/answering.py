"""Answer an evaluation set: sample each question's completions, grade them, summarise.

The baseline and evaluate stages differ only in the model they pass here, so both are graded by the same code.
Beside the sampled answers, an optional greedy pass (temperature 0, one answer per question, same engine) and the
standard-protocol columns of grpo_gsm8k.protocols (maj@k, pass@k, lm-eval's strict and flexible matches).
Engines: "hf" is `model.generate`; "fast" is grpo_gsm8k.fastgen (static cache and CUDA graphs on a GPU).
Each batch is seeded from (seed, batch index), so a rerun with the same params gives the same completions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from grpo_gsm8k.grading import grade
from grpo_gsm8k.params import GenerationParams
from grpo_gsm8k.protocols import greedy_protocols, sampled_protocols


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
        from grpo_gsm8k.fastgen import FastGenerator

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
    """One graded record per (question, sample)."""
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


def summarize(records: list[dict], greedy_records: list[dict] | None = None) -> dict:
    """The metrics `dvc metrics show` and `dvc exp show` list for one model on one set; greedy_records is the
    temperature-0 pass (None where evaluation.greedy is off)."""
    total = len(records)
    correct = sum(r["correct"] for r in records)
    summary = {
        "correct": correct,
        "total": total,
        "accuracy": correct / total if total else 0.0,
        "questions": len({r["qid"] for r in records}),
        "format_rate": sum(r["method"] == "hash" for r in records) / total if total else 0.0,
        "mean_tokens": sum(r["n_tokens"] for r in records) / total if total else 0.0,
        "truncated_rate": sum(r["truncated"] for r in records) / total if total else 0.0,
        # Reward-hacking audit: the format is rewarded on its own, so watch for well-formed wrong answers.
        "formatted_wrong_rate": sum(r["method"] == "hash" and not r["correct"] for r in records) / total
        if total else 0.0,
        "ambiguous": sum(r["ambiguous"] for r in records),
        "math_verify_correct": sum(r["mv_correct"] for r in records),
    }
    if records and "reward" in records[0]:
        summary["mean_reward"] = sum(r["reward"] for r in records) / total
    return {**summary, **sampled_protocols(records), **greedy_protocols(greedy_records)}


def run_answer_stage(base_dir, adapter_dir, eval_path, set_name: str, params, out_dir, reward_knobs=None) -> dict:
    """What baseline (adapter_dir=None) and evaluate share: load, answer, grade, write all-or-nothing."""
    from pathlib import Path

    from grpo_gsm8k.io import atomic_output_dir, read_jsonl, write_json, write_jsonl
    from grpo_gsm8k.modeling import load_model, load_tokenizer
    from grpo_gsm8k.rewards import total_reward

    if set_name not in params.evaluation.sets:
        raise ValueError(f"evaluation set {set_name!r} is not in evaluation.sets "
                         f"({', '.join(params.evaluation.sets)}); fix dvc.yaml or params.yaml")
    rows = read_jsonl(Path(eval_path))
    tokenizer = load_tokenizer(Path(base_dir))
    model = load_model(Path(base_dir), params.model.dtype, params.model.device,
                       adapter_dir=Path(adapter_dir) if adapter_dir else None)
    samples = params.evaluation.sets[set_name].samples
    label = "tuned" if adapter_dir else "base"
    records = answer_set(model, tokenizer, rows, samples, params.generation, params.seed, f"{label} {set_name}")
    greedy = answer_set(model, tokenizer, rows, 1, replace(params.generation, temperature=0.0), params.seed,
                        f"{label} {set_name} greedy") if params.evaluation.greedy else None
    if reward_knobs is not None:
        for record in records:
            record["reward"] = total_reward(record["completion"], record["gold"], record["n_tokens"], reward_knobs)
    metrics = summarize(records, greedy)
    with atomic_output_dir(Path(out_dir)) as tmp:
        write_jsonl(tmp / "completions.jsonl", records)
        write_jsonl(tmp / "greedy.jsonl", greedy or [])  # empty where evaluation.greedy is off: a declared out
        write_json(tmp / "metrics.json", metrics)
    return metrics
