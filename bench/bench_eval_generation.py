"""Evaluation-generation throughput: the GSM8K test split (1,319 questions x 5 samples, up to 512 new tokens).

    python bench/bench_eval_generation.py --batch 120,240 --chunks 2      # on one H100 (device tool)
    python bench/bench_eval_generation.py --tiny --batch 10 --chunks 2 --max-new 16   # CPU smoke test

Random-weight Llama-3.1-8B architecture (see bench_grpo_step.py), so every sample runs to the 512-token limit:
the worst case. For each batch size it times whole chunks of `batch` rows with FastGenerator (the first chunk
also packs weights and captures graphs, reported apart) and EXTRAPOLATES the full split from the steady chunk time:
pack + capture + ceil(6595 / rows per chunk) x chunk seconds. With --hf-tokens N it also times HF generate
(dynamic cache, sampling) for N forced new tokens at the same batch, and extrapolates it per decode step the same way.
With --full B[,B2] it also times the evaluate stage's generation path END TO END, not extrapolated: one
FastGenerator built as grpo_gsm8k.answering builds it (max_batch = generation.batch_size = B, default KV
buckets), one generate() over all 1,319 prompts x 5 samples, weights packing and graph capture included.
Appends a markdown table to $OUT/bench_eval_generation.md (or --out).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_grpo_step import build_model, build_tokenizer, device_line, gsm8k_rows, sync  # noqa: E402
from grpo_gsm8k.fastgen.generator import FastGenerator  # noqa: E402

QUESTIONS, SAMPLES = 1319, 5


def test_prompts(tokenizer) -> list[list[int]]:
    system = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["system_prompt"]
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": r["question"]}]
             for r in gsm8k_rows("test", QUESTIONS)]
    return [list(ids) for ids in tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"]]


def time_fast(model, tokenizer, prompts, batch: int, chunks: int, max_new: int, label: str = "fast") -> dict:
    per_chunk = batch // SAMPLES  # questions per chunk: all 5 samples of a question share one prefill
    gen = FastGenerator(model, tokenizer, max_new_tokens=max_new, temperature=0.8, max_batch=per_chunk * SAMPLES,
                        vocab_size=len(tokenizer), kv_bucket=128)
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    sync()
    start = time.perf_counter()
    gen.generate(prompts[:per_chunk], SAMPLES, seed=0)  # first chunk: pack + capture + one chunk
    first = time.perf_counter() - start
    setup = gen.stats.pack_s + gen.stats.capture_s
    tokens_before = gen.stats.completion_tokens
    start = time.perf_counter()
    samples = gen.generate(prompts[per_chunk:per_chunk * chunks], SAMPLES, seed=1)
    steady = (time.perf_counter() - start) / max(chunks - 1, 1)
    tokens = (gen.stats.completion_tokens - tokens_before) / max(chunks - 1, 1)
    n_chunks = math.ceil(QUESTIONS / per_chunk)
    return {"engine": label, "batch": per_chunk * SAMPLES, "first_chunk_s": first, "setup_s": setup,
            "chunk_s": steady, "ms_per_decode_step": 1000 * steady / max_new, "tokens_per_s": tokens / steady,
            "mean_len": sum(len(s.completion_ids) for s in samples) / max(len(samples), 1),
            "extrapolated_min": (setup + n_chunks * steady) / 60, "peak_gib": peak_gib()}


def time_full(model, tokenizer, prompts, batch: int, max_new: int, questions: int = QUESTIONS) -> dict:
    """All `questions` x SAMPLES in one generate() call, as the evaluate stage runs them (answering.py), timed whole."""
    gen = FastGenerator(model, tokenizer, max_new_tokens=max_new, temperature=0.8, top_p=1.0, max_batch=batch,
                        vocab_size=len(tokenizer))
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    sync()
    start = time.perf_counter()
    samples = gen.generate(prompts[:questions], SAMPLES, seed=42)
    sync()
    total = time.perf_counter() - start
    st = gen.stats
    tokens = sum(len(s.completion_ids) for s in samples)
    return {"batch": batch, "questions": questions, "samples": len(samples), "total_s": total,
            "minutes": total / 60, "tokens": tokens, "tokens_per_s": tokens / total,
            "truncated": sum(s.truncated for s in samples) / len(samples),
            "pack_s": st.pack_s, "capture_s": st.capture_s, "prefill_s": st.prefill_s,
            "decode_s": st.decode_s - st.capture_s, "decode_steps": st.decode_steps,
            "ms_per_decode_step": 1000 * (st.decode_s - st.capture_s) / max(st.decode_steps, 1),
            "graphs": st.graphs_captured, "peak_gib": peak_gib()}


def full_table(results: list[dict], max_new: int) -> str:
    lines = [f"| rows/chunk | questions x samples | END TO END s (min) | completion tok/s | truncated | pack s | "
             f"capture s (graphs) | prefill s | decode s | ms/decode step | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['batch']} | {r['questions']} x {SAMPLES} ({max_new} tok max) | {r['total_s']:.1f} "
                     f"({r['minutes']:.2f}) | {r['tokens_per_s']:.0f} | {r['truncated']:.0%} | {r['pack_s']:.1f} | "
                     f"{r['capture_s']:.1f} ({r['graphs']}) | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | "
                     f"{r['ms_per_decode_step']:.1f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def time_hf(model, tokenizer, prompts, batch: int, new_tokens: int, max_new: int) -> dict:
    per_chunk = batch // SAMPLES
    rows = [p for p in prompts[:per_chunk] for _ in range(SAMPLES)]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=model.device)
    mask = (torch.arange(width, device=model.device)[None] >= torch.tensor([width - len(r) for r in rows],
                                                                            device=model.device)[:, None]).long()
    kwargs = dict(do_sample=True, temperature=0.8, pad_token_id=tokenizer.pad_token_id, attention_mask=mask)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    sync()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync()
    per_step = (time.perf_counter() - start) / new_tokens
    n_chunks = math.ceil(QUESTIONS / per_chunk)
    return {"engine": f"hf generate ({new_tokens} tokens timed)", "batch": len(rows), "chunk_s": per_step * max_new,
            "ms_per_decode_step": 1000 * per_step, "tokens_per_s": len(rows) / per_step,
            "extrapolated_min": n_chunks * per_step * max_new / 60, "peak_gib": peak_gib()}


def profile_training_shape(model, tokenizer, prompts, out_dir: str) -> None:
    """torch.profiler over one rollout of the training shape (4 prompts x 6 samples, 256 tokens), after a warm one:
    where the prefill and the graph-replayed decode steps spend their GPU time."""
    from torch.profiler import ProfilerActivity, profile

    gen = FastGenerator(model, tokenizer, max_new_tokens=256, temperature=1.0, max_batch=24,
                        vocab_size=len(tokenizer), kv_bucket=None)
    gen.generate(prompts[:4], 6, seed=0)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen.generate(prompts[4:8], 6, seed=1)
        sync()
    averages = prof.key_averages()
    text = (averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70) + "\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    chunk = gen.stats.extra["chunks"][-1]
    text += f"\nlast chunk: {chunk}\n"
    print(text, flush=True)
    (Path(out_dir) / "profile_training_shape.txt").write_text(text)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def table(results: list[dict], max_new: int) -> str:
    lines = [f"| engine | rows/chunk | ms/decode step | completion tok/s | chunk s ({max_new} tok) | setup s | "
             f"test split {QUESTIONS}x{SAMPLES}, EXTRAPOLATED min | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['ms_per_decode_step']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['chunk_s']:.1f} | {r.get('setup_s', 0):.1f} | {r['extrapolated_min']:.1f} | "
                     f"{r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="120,240", help="rows per chunk, comma-separated")
    parser.add_argument("--chunks", type=int, default=2, help="chunks timed per batch size (the first is warm-up)")
    parser.add_argument("--max-new", type=int, default=512)
    parser.add_argument("--hf-tokens", type=int, default=0, help="also time HF generate for this many tokens")
    parser.add_argument("--compare-torch", action="store_true", help="also time the first batch without Triton")
    parser.add_argument("--profile", action="store_true", help="also profile one rollout of the training shape")
    parser.add_argument("--full", default="", help="rows per chunk for END-TO-END runs of the whole split, e.g. 240")
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="questions in an end-to-end run")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    cli = parser.parse_args()
    tokenizer = build_tokenizer(vocab_size=1000 if cli.tiny else 8000)
    model = build_model(tokenizer, cli.tiny).eval()
    prompts = test_prompts(tokenizer)
    results = []
    for batch in (int(b) for b in cli.batch.split(",") if b):
        results.append(time_fast(model, tokenizer, prompts, batch, cli.chunks, cli.max_new))
        print(results[-1], flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if cli.compare_torch:  # the same generator with the Triton kernels off: their share of the decode step
        os.environ["FASTGEN_TRITON"] = "0"
        batch = int(cli.batch.split(",")[0])
        results.append(time_fast(model, tokenizer, prompts, batch, cli.chunks, cli.max_new, "fast, FASTGEN_TRITON=0"))
        os.environ.pop("FASTGEN_TRITON")
        print(results[-1], flush=True)
    if cli.profile:
        profile_training_shape(model, tokenizer, prompts, cli.out)
    if cli.hf_tokens:
        results.append(time_hf(model, tokenizer, prompts, int(cli.batch.split(",")[0]), cli.hf_tokens, cli.max_new))
        print(results[-1], flush=True)
    full = []
    for batch in (int(b) for b in cli.full.split(",") if b):
        full.append(time_full(model, tokenizer, prompts, batch, cli.max_new, cli.questions))
        print(full[-1], flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    report = f"\n### bench_eval_generation · {device_line()}\n\n{table(results, cli.max_new) if results else ''}"
    if full:
        report += f"\nEnd to end (evaluate stage's generation path, not extrapolated):\n\n{full_table(full, cli.max_new)}"
    print(report, flush=True)
    with open(Path(cli.out) / "bench_eval_generation.md", "a") as handle:
        handle.write(report)


if __name__ == "__main__":
    main()
