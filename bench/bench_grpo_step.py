"""Seconds per GRPO optimizer step at the study's shape: plain TRL GRPOTrainer vs our fast path, same run.

    python bench/bench_grpo_step.py --steps 4 --engine both      # on one H100 (through the device tool)
    python bench/bench_grpo_step.py --steps 2 --engine both --tiny   # CPU smoke test of the script itself

Builds the Llama-3.1-8B architecture with random bf16 weights on the GPU (no download) and a small BPE tokenizer
trained on GSM8K questions; lm_head outputs beyond that tokenizer's vocabulary are masked (TRL's generate) or
excluded (our sampler's vocab_size), so completions decode. Random weights almost never emit EOS: every completion
runs to max_completion_length, the worst case, identically for both paths. Shape as in the anchors: LoRA r=16
all-linear, 6 per device x 4 accumulation, 6 generations (24 completions of 256 tokens per step), beta=0 (the
study's settings: --beta 0.04 --lora-dropout 0.05).

Each engine runs in its own subprocess (clean peak-memory numbers); the table gives the median of the steps after
the first, completion tokens per second, peak allocated GiB, and the per-phase breakdown: generation (TRL's
_generate), scoring (rest of TRL's batch preparation: rewards, padding), log-prob forward + loss (compute_loss),
backward, optimizer. The table is printed and appended to $OUT/bench_grpo_step.md (or --out).

Completion lengths (--lengths): "max" (default) lets every completion run to --max-completion, the worst case.
"gsm8k[:SCALE]" (fast engines only) emulates a model that ends its answers: each completion ends (EOS) at a
length drawn, seeded and independently, from the GSM8K training split's reference solutions' token counts (in the
bench's tokenizer) times SCALE (default 2.0: a chat model writes out more than the terse references), capped at
--max-completion. The generator decodes until the longest drawn length of its batch, rounded up to its
"all rows ended?" check period, as it does with real EOS; training then sees the drawn lengths.

A second table gives each phase's distance from the card's limit: decode as bytes read per decode step (packed
weights without the embedding table, plus the visible K/V) over its time vs HBM bandwidth; training as useful
FLOPs (2 x non-embedding parameters x tokens for each forward, the same for the frozen-base backward, lm_head on
completion tokens only, attention FLOPs left out) over the phase's time vs peak bf16. Limits default to what was
measured on the card (H200: 4.3 TB/s copy, 790 TFLOP/s bf16 matmul; H100: 3.0 and 798; the device KINDS.md);
--hbm-tbps and --peak-tflops set them.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trace_gaps import analyse, load, report  # noqa: E402 (needs ROOT on the path when run as a script)
from bench.trace_kernels import kernel_time, report as kernel_report  # noqa: E402

SYSTEM = "Solve the math problem. Put the final answer after ####."
ENGINES = {"trl": {}, "trl-static": {"cache_implementation": "static"}}
# "fast" is what the train stage runs (speed_up_training: regional torch.compile of the decoder layers on a GPU,
# SDPA off cuDNN, gc.freeze(), one-batch reference scoring). The others switch pieces off to attribute the gains.
# BENCH_COMPILE_ON_CPU=1 compiles on CPU too (minutes of C++ builds; a check of the script, not a timing).
FAST_ENGINES = {"fast": {"compile": True, "freeze_gc": True, "cudnn_attention": False},
                "fast-cudnn": {"compile": True, "freeze_gc": True, "cudnn_attention": True},
                "fast-eager": {"compile": False, "freeze_gc": True, "cudnn_attention": False},
                "fast-v1": {"compile": False, "freeze_gc": False, "cudnn_attention": True},  # as first measured
                "fast-gc-off": {"compile": True, "freeze_gc": True, "cudnn_attention": False},  # + gc.disable()
                "fast-gc-once": {"compile": True, "freeze_gc": True, "cudnn_attention": False},  # no re-freeze a step
                "fast-no-nan-check": {"compile": True, "freeze_gc": True, "cudnn_attention": False},  # see run_engine
                "fast-masked-attention": {"compile": True, "freeze_gc": True, "cudnn_attention": False},  # HF's mask
                "fast-untrimmed": {"compile": True, "freeze_gc": True, "cudnn_attention": False},  # TRL's padding
                "fast-unpacked": {"compile": True, "freeze_gc": True, "cudnn_attention": False},  # rows trimmed only
                "fast-autograd-adds": {"compile": True, "freeze_gc": True, "cudnn_attention": False}}  # per param
# set up by speed_up_training, as the train stage is; the others change one thing in it
AS_TRAIN_STAGE = ("fast", "fast-gc-off", "fast-gc-once", "fast-no-nan-check", "fast-masked-attention",
                  "fast-untrimmed", "fast-unpacked", "fast-autograd-adds")
PHASES = ("generation", "scoring", "forward", "backward", "optimizer")
# Limits read on the lent cards (device KINDS.md): device-to-device copy bandwidth, bf16 8192^3 matmul throughput.
CARD_LIMITS = {"H200": (4.3, 790.0), "H100": (3.0, 798.0)}  # name substring: (TB/s, TFLOP/s)


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["question"] + r["answer"] for r in gsm8k_rows("train", 200)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer


def gsm8k_rows(split: str, n: int) -> list[dict]:
    with open(ROOT / f"data/gsm8k/{split}.jsonl") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def chat_prompt(question: str) -> list[dict]:
    """The bench's prompt for one GSM8K question (system instruction, then the question)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def build_model(tokenizer, tiny: bool):
    """Llama-3.1-8B architecture (or a tiny one), random weights, lm_head masked beyond the tokenizer's ids."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024) if tiny else
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256))
    config = LlamaConfig(**size, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         rope_scaling=None if tiny else {"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    n_ids = len(tokenizer)

    def mask_unknown_ids(module, inputs, output):
        output[..., n_ids:] = -1e4
        return output

    model.lm_head.register_forward_hook(mask_unknown_ids)
    return model


def correct(completions, answer, **kwargs):
    import re

    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [5.0 if (nums := re.findall(r"-?\d[\d,]*\.?\d*", t)) and nums[-1].replace(",", "") == a else 0.0
            for t, a in zip(texts, answer)]


class PhaseClock:
    """Seconds per phase of each optimizer step, read off the GPU's own timeline (CUDA events; wall time on CPU).

    Events add no host sync inside the step. A sync at every phase edge (how this bench used to measure) drains the
    GPU's queue, then the GPU idles while the host launches the next phase's first kernels: time the train stage
    never pays. The phases still partition the step: a phase's time runs from the GPU reaching its start mark to
    reaching its end mark, so the GPU waiting for the host (rewards on CPU, a .item()) counts in the phase that
    waited. Each phase is also a profiler range ("bench:<phase>") that bench/trace_gaps.py reads."""

    def __init__(self):
        self.current = dict.fromkeys(PHASES, 0.0)
        self.steps: list[dict] = []
        self.pending: list[tuple[str, object, object]] = []  # (phase, start mark, end mark) of the running step
        self.subtract: dict[str, str] = {}

    def wrap(self, owner, name: str, phase: str, subtract: str | None = None):
        """Time owner.name as `phase`; `subtract`: a phase that only ever runs inside this one, its time taken out."""
        original = getattr(owner, name)
        if subtract:
            self.subtract[phase] = subtract

        def timed(*args, **kwargs):
            with torch.profiler.record_function(f"bench:{phase}"):
                start = mark()
                result = original(*args, **kwargs)
                self.pending.append((phase, start, mark()))
            if name == "_generate":
                self.current["tokens"] = self.current.get("tokens", 0) + sum(len(c) for c in result[1])
                self.current["prompt_tokens"] = self.current.get("prompt_tokens", 0) + sum(len(p) for p in result[0])
            return result

        setattr(owner, name, timed)

    def begin_step(self) -> None:
        self.current = dict.fromkeys(PHASES, 0.0)
        self.pending = []

    def end_step(self) -> None:
        """Add up the step's marks; call after a host sync (every mark has been reached)."""
        for phase, start, end in self.pending:
            self.current[phase] += seconds_between(start, end)
        for phase, inner in self.subtract.items():
            self.current[phase] -= self.current[inner]
        self.pending = []


class GcClock:
    """Host seconds Python's garbage collector ran (gc.callbacks), per generation, since the last `take()`: a full
    collection walks every tracked object not frozen by gc.freeze(), and the GPU idles if its queue drains meanwhile."""

    def __init__(self):
        self.seconds, self.counts, self._start = [0.0, 0.0, 0.0], [0, 0, 0], 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1

    def take(self) -> dict:
        taken = {"gc_s": sum(self.seconds), "gc_full_s": self.seconds[2], "gc_full_n": self.counts[2]}
        self.seconds, self.counts = [0.0, 0.0, 0.0], [0, 0, 0]
        return taken


def mark():
    """A point on the GPU's timeline (a recorded CUDA event), or the wall clock on CPU."""
    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start, end) -> float:
    return start.elapsed_time(end) / 1000 if torch.cuda.is_available() else end - start


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_callback(clock: PhaseClock, profile_step: int = 0, profile_path: Path | None = None):
    """A TrainerCallback timing each optimizer step from its on_step_begin to the next one's (or to the end of
    training), so what runs after on_step_end (the other callbacks, TRL's logging) counts in its step too. Add it
    last (trainer.add_callback), after every callback whose work should be timed."""
    from transformers import TrainerCallback

    gc_clock = GcClock()

    class StepTimer(TrainerCallback):
        profiler = None
        start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.close_step(state.global_step)
            if state.global_step + 1 == profile_step:
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.profiler.start()
            clock.begin_step()
            gc_clock.take()
            self.start = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.opt_start = mark()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.pending.append(("optimizer", self.opt_start, mark()))

        def on_train_end(self, args, state, control, **kwargs):
            self.close_step(state.global_step)

        def close_step(self, step: int) -> None:
            if self.start is None:
                return
            sync()  # one sync a step, at its edges: the step's wall time
            clock.current["step"] = time.perf_counter() - self.start
            self.start = None
            clock.end_step()
            clock.current.update(gc_clock.take())
            cuda = torch.cuda.is_available()
            clock.current["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            clock.current["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
            clock.steps.append(dict(clock.current))
            if self.profiler is not None:
                self.profiler.stop()
                clock.current["gpu_kernel_s"] = write_profile(self.profiler, clock.current["step"], profile_path)
                self.profiler = None
            print(f"step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in clock.current.items()), flush=True)

    return StepTimer()


TRAINER_RANGES = ("training_step", "_prepare_inputs", "_calculate_rewards", "_get_per_token_logps_and_entropies",
                  "_compute_loss", "log")


def annotate_trainer(trainer) -> None:
    """Name the trainer's main methods (and the tokenizer's batch_decode) as profiler ranges "trl:<name>", so
    bench/trace_gaps.py can say which host code the GPU waited for."""
    def ranged(name, original):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"trl:{name}"):
                return original(*args, **kwargs)
        return call

    for name in TRAINER_RANGES:
        if getattr(trainer, name, None) is not None:
            setattr(trainer, name, ranged(name, getattr(trainer, name)))
    tokenizer = trainer.processing_class
    tokenizer.batch_decode = ranged("batch_decode", tokenizer.batch_decode)


def write_profile(prof, step_s: float, path: Path) -> float:
    """Kernel time of the profiled step against its wall time (profiling slows the host side), the top ops, and
    the step's Chrome trace beside `path` (trace_<engine>.json.gz) with bench/trace_gaps.py's account of the GPU's
    idle gaps and bench/trace_kernels.py's of its busy time."""
    averages = prof.key_averages()
    # Kernels only, as torch's table footer counts: an op's (aten::mm) self device time repeats its kernels' time.
    kernel_s = sum(e.self_device_time_total for e in averages
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
    text = (f"profiled step: {step_s:.2f} s wall, {kernel_s:.2f} s of GPU kernels "
            f"({100 * kernel_s / step_s:.0f}% busy at most)\n\n"
            + averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60) + "\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    events = load(write_trace(prof, path.with_name(path.stem.replace("profile", "trace") + ".json")))
    gaps = report(analyse(events)) + "\n" + kernel_report(kernel_time(events))
    print(gaps, flush=True)
    path.write_text(gaps + "\n" + text)
    print(text[:300], flush=True)
    return kernel_s


def write_trace(prof, path: Path) -> str:
    """The profile as a gzipped Chrome trace (chrome://tracing, ui.perfetto.dev); returns its path."""
    prof.export_chrome_trace(str(path))
    with open(path, "rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    path.unlink()
    return f"{path}.gz"


def parse_lengths(spec: str) -> float | None:
    """--lengths: "max" -> None (worst case); "gsm8k" or "gsm8k:SCALE" -> SCALE (default 2.0)."""
    name, _, scale = spec.partition(":")
    if name == "max" and not scale:
        return None
    try:
        value = float(scale) if scale else 2.0
    except ValueError:
        value = -1.0
    if name != "gsm8k" or value <= 0:
        raise SystemExit(f"--lengths {spec!r}: use max, gsm8k or gsm8k:SCALE with SCALE > 0 (e.g. gsm8k:2.0)")
    return value


def reference_lengths(tokenizer, scale: float, cap: int, n_rows: int = 7473) -> list[int]:
    """Token counts of the GSM8K training split's reference solutions, times `scale`, clipped to [1, cap]."""
    answers = [r["answer"] for r in gsm8k_rows("train", n_rows)]
    counts = [len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]]
    return [min(cap, max(1, round(scale * n))) for n in counts]


def cut_to_lengths(samples: list, lengths: list[int], eos_id: int, max_new: int) -> list:
    """End each sample at its drawn length with EOS, as a model that stopped there would have; a sample that is
    already shorter (a real EOS) stays, and a drawn length at the cap keeps the sample truncated."""
    from grpo_gsm8k.fastgen.generator import Sample

    cut = []
    for sample, n in zip(samples, lengths):
        if n >= max_new or len(sample.completion_ids) <= n:
            cut.append(sample)
            continue
        cut.append(Sample(sample.completion_ids[:n - 1] + [eos_id], sample.logprobs[:n], truncated=False))
    return cut


def emulate_lengths(pool: list[int], seed: int = 0) -> None:
    """Patch FastGenerator (in this bench process only) so completions end at lengths drawn from `pool`."""
    import random

    from grpo_gsm8k.fastgen import generator as fastgen

    rng = random.Random(seed)
    cls = fastgen.FastGenerator
    chunk, collect = cls._generate_chunk, cls._collect

    def generate_chunk(self, prompt_ids, rows):
        self.bench_lengths = [rng.choice(pool) for _ in rows]
        return chunk(self, prompt_ids, rows)

    def decode_limit(self):  # stop where the longest drawn completion ends, rounded up to a done-check
        check_every = fastgen.CHECK_EVERY if self.use_cuda_graph else 1
        return max(1, min(self.max_new_tokens, -(-max(self.bench_lengths) // check_every) * check_every))

    def collect_cut(self, st, n_rows, columns):
        return cut_to_lengths(collect(self, st, n_rows, columns), self.bench_lengths, self.eos_token_ids[0],
                              self.max_new_tokens)

    cls._generate_chunk, cls._decode_limit, cls._collect = generate_chunk, decode_limit, collect_cut


def model_sizes(model) -> dict:
    """Parameter counts the limits table needs (base model only, before LoRA)."""
    inner = model.model
    embed = inner.embed_tokens.weight.numel()
    head = model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"layers_params": total - embed - head, "head_params": head, "weight_bytes": 2 * (total - embed),
            "kv_bytes_per_slot": 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim}


def phase_limits(result: dict, sizes: dict, beta: float, hbm_tbps: float | None, peak_tflops: float | None) -> dict:
    """Bytes and FLOPs of one step's phases, and the achieved fraction of the card's limits (None: unknown)."""
    out = {}
    fg = result.get("fastgen")
    if fg and fg.get("decode_steps"):
        ms = 1000 * (fg["decode_s"] - fg["capture_s"]) / fg["decode_steps"]
        chunks = result.get("fastgen_chunks") or []
        rows = statistics.mean(c["rows"] for c in chunks) if chunks else 0
        attended = statistics.mean(c["width"] + c["columns"] / 2 for c in chunks) if chunks else 0
        gb = (sizes["weight_bytes"] + rows * attended * sizes["kv_bytes_per_slot"]) / 1e9
        out.update(decode_ms=ms, decode_gb=gb, decode_tbps=gb / ms, decode_frac=gb / ms / hbm_tbps if hbm_tbps else None)
    completion, prompt = result["tokens_per_step"], result.get("prompt_tokens_per_step", 0.0)
    forward = 2 * (sizes["layers_params"] * (prompt + completion) + sizes["head_params"] * completion)
    train_s = result["forward"] + result["backward"] + (result["scoring"] if beta > 0 else 0.0)
    tflop = (forward * (3 if beta > 0 else 2)) / 1e12  # policy forward + frozen-base backward (+ reference forward)
    out.update(train_tflop=tflop, train_s=train_s, train_tflops=tflop / train_s if train_s else 0.0)
    out["train_frac"] = out["train_tflops"] / peak_tflops if peak_tflops and train_s else None
    return out


def watch_kernel_loading() -> dict:
    """Time Inductor's hand-off of Triton kernels (to its worker processes, or compiled in this process while they
    are not ready yet) and when the workers became ready: where a warm first step's graph loading goes."""
    from torch._inductor.async_compile import AsyncCompile

    seen = {"kernels": 0, "in_workers": 0, "triton_call_s": 0.0, "workers_ready_s": None}
    start = time.perf_counter()
    if AsyncCompile._ready_future is not None:
        AsyncCompile._ready_future.add_done_callback(
            lambda _: seen.update(workers_ready_s=round(time.perf_counter() - start, 1)))
    original = AsyncCompile.triton

    def timed(self, *args, **kwargs):
        seen["in_workers"] += bool(AsyncCompile.use_process_pool())
        began = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seen["kernels"] += 1
            seen["triton_call_s"] = round(seen["triton_call_s"] + time.perf_counter() - began, 2)

    AsyncCompile.triton = timed
    return seen


def run_engine(engine: str, cli) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from grpo_gsm8k.training.speedups import fast_training_overrides
    from grpo_gsm8k.fastgen.rollout import make_rollout_func
    from grpo_gsm8k.training.speedups import (FreezeGcEachStep, avoid_cudnn_attention, compile_decoder_layers, freeze_gc,
                                              speed_up_training)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if engine in AS_TRAIN_STAGE and torch.cuda.is_available():  # as the train stage does before loading its model
        from grpo_gsm8k.training.compile_cache import start_compile_workers

        start_compile_workers()
    kernel_loading = watch_kernel_loading() if engine in AS_TRAIN_STAGE and torch.cuda.is_available() else None
    tokenizer = build_tokenizer(vocab_size=1000 if cli.tiny else 8000)
    scale = parse_lengths(getattr(cli, "lengths", "max"))
    fast = engine in FAST_ENGINES
    if scale is not None:
        if not fast:
            raise SystemExit(f"--lengths {cli.lengths}: only the fast engines can end completions at drawn lengths")
        pool = reference_lengths(tokenizer, scale, cli.max_completion)
        emulate_lengths(pool)
        print(f"[{engine}] lengths {cli.lengths}: mean {statistics.mean(pool):.0f}, median "
              f"{statistics.median(pool):.0f}, p90 {sorted(pool)[int(0.9 * len(pool))]}, max {max(pool)} tokens "
              f"({sum(n >= cli.max_completion for n in pool) / len(pool):.1%} at the cap)", flush=True)
    start = time.perf_counter()
    model = build_model(tokenizer, cli.tiny)
    sizes = model_sizes(model)
    print(f"[{engine}] model built in {time.perf_counter() - start:.1f}s", flush=True)
    dataset = Dataset.from_list([{"prompt": chat_prompt(r["question"]),
                                  "answer": r["answer"].split("####")[-1].strip()} for r in gsm8k_rows("train", 400)])
    extra = fast_training_overrides() if fast else ENGINES[engine]
    if engine == "fast-no-nan-check":  # the Trainer's NaN/inf loss check syncs after every micro-batch's backward
        extra = {**extra, "logging_nan_inf_filter": False}
    args = GRPOConfig(output_dir="/tmp/bench_grpo", per_device_train_batch_size=cli.per_device,
                      gradient_accumulation_steps=cli.accum, num_generations=cli.gens,
                      max_completion_length=cli.max_completion, max_steps=cli.steps, logging_steps=1,
                      learning_rate=5e-6, bf16=torch.cuda.is_available(), report_to="none", save_strategy="no",
                      seed=0, beta=cli.beta, **extra)
    clock = PhaseClock()
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[correct], args=args,
                          train_dataset=dataset,
                          rollout_func=make_rollout_func(vocab_size=len(tokenizer)) if fast else None,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=cli.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    clock.wrap(trainer, "_generate", "generation")
    clock.wrap(trainer, "_generate_and_score_completions", "scoring", subtract="generation")
    clock.wrap(trainer, "compute_loss", "forward")
    clock.wrap(trainer.accelerator, "backward", "backward")
    options = FAST_ENGINES.get(engine, {})
    if engine in AS_TRAIN_STAGE:  # exactly what the train stage does (train.compile: auto)
        speed_up_training(trainer, compile_layers=True if os.environ.get("BENCH_COMPILE_ON_CPU") else None,
                          packed_attention=engine != "fast-masked-attention", trimmed=engine != "fast-untrimmed",
                          packed_rows=False if engine == "fast-unpacked" else None,
                          accumulate_at_once=engine != "fast-autograd-adds")
        if engine == "fast-gc-off":  # what the garbage collector costs a step (a few steps only: cycles pile up)
            gc.disable()
        if engine == "fast-gc-once":  # frozen before training only, as before FreezeGcEachStep
            trainer.remove_callback(FreezeGcEachStep)
            freeze_gc()
    elif fast:  # the same pieces one by one, for attribution
        if options["compile"] and torch.cuda.is_available():
            compile_decoder_layers(trainer.model)
        if not options["cudnn_attention"] and torch.cuda.is_available():
            avoid_cudnn_attention()
        if options["freeze_gc"]:
            freeze_gc()
    if cli.profile_step:
        annotate_trainer(trainer)
    trainer.add_callback(make_callback(clock, cli.profile_step, Path(cli.out) / f"profile_{engine}.txt"))
    trainer.train()
    result = summarize(engine, clock.steps, args)
    if options.get("compile"):
        from torch._dynamo.utils import compile_times, counters

        from grpo_gsm8k.training.compile_cache import cache_counts

        result["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles")}
        result["compile_cache"] = {"dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""), **cache_counts()}
        result["kernel_loading"] = kernel_loading
        print(f"[{engine}] first step {clock.steps[0]['step']:.1f} s; compile cache {result['compile_cache']}; "
              f"Triton kernels handed to Inductor {kernel_loading}\n"
              + compile_times(), flush=True)
    if fast:
        stats = trainer.rollout_func.generator.stats
        result["fastgen"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(stats).items()
                             if k != "extra"}
        result["fastgen_chunks"] = stats.extra.get("chunks", [])
    result["lengths"] = getattr(cli, "lengths", "max")
    result["completions"] = cli.per_device * cli.accum
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    hbm, peak = next((v for k, v in CARD_LIMITS.items() if k in card), (None, None))
    hbm, peak = getattr(cli, "hbm_tbps", None) or hbm, getattr(cli, "peak_tflops", None) or peak
    result["limits"] = phase_limits(result, sizes, cli.beta, hbm, peak)
    result["limits"].update(hbm_tbps=hbm, peak_tflops=peak)
    return result


def summarize(engine: str, steps: list[dict], args) -> dict:
    timed = steps[1:] or steps  # the first step carries one-off costs (allocator warm-up, graph capture, kernels)
    median = lambda key: statistics.median(s.get(key, 0.0) for s in timed)  # noqa: E731
    return {"engine": engine, "steps": [round(s["step"], 3) for s in steps], "s_per_step": median("step"),
            "tokens_per_step": median("tokens"), "tokens_per_s": median("tokens") / median("step"),
            "prompt_tokens_per_step": median("prompt_tokens"),
            "peak_gib": max(s["peak_gib"] for s in steps), "reserved_gib": max(s["reserved_gib"] for s in steps),
            **{p: median(p) for p in PHASES}, "gc_s": median("gc_s"), "gc_full_s": median("gc_full_s"),
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def table(results: list[dict]) -> str:
    head = ("| engine | s/step (median, steps 2+) | completion tok/s | peak GiB | generation | scoring | "
            "fwd+loss | backward | optimizer | host in gc (full) | grad ckpt |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {r['engine']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | "
            f"{r['generation']:.2f} | {r['scoring']:.2f} | {r['forward']:.2f} | {r['backward']:.2f} | "
            f"{r['optimizer']:.3f} | {r['gc_s']:.3f} ({r['gc_full_s']:.3f}) | {r['gradient_checkpointing']} |"
            for r in results]
    return head + "\n".join(rows) + "\n"


def limits_table(results: list[dict]) -> str:
    """Each phase against the card's limit (see the module docstring for what is counted)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    head = ("| engine | lengths | completion tok/step (mean/completion) | decode ms/step | decode GB/step | "
            "decode TB/s | of HBM | train TFLOP/step | train s | train TFLOP/s | of peak |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        lim = r.get("limits", {})
        n = r["tokens_per_step"]
        decode = (f"{lim['decode_ms']:.2f} | {lim['decode_gb']:.1f} | {lim['decode_tbps']:.2f} | "
                  f"{pct(lim['decode_frac'])}" if "decode_ms" in lim else "- | - | - | -")
        rows.append(f"| {r['engine']} | {r.get('lengths', 'max')} | {n:.0f} ({n / r.get('completions', 24):.0f}) | {decode} | "
                    f"{lim.get('train_tflop', 0):.0f} | {lim.get('train_s', 0):.2f} | {lim.get('train_tflops', 0):.0f} | "
                    f"{pct(lim.get('train_frac'))} |")
    limits = next((f"limits used: HBM {r['limits']['hbm_tbps']} TB/s, peak {r['limits']['peak_tflops']} TFLOP/s"
                   for r in results if r.get("limits", {}).get("hbm_tbps")), "limits: unknown card, no fractions")
    return head + "\n".join(rows) + f"\n\n{limits}\n"


def device_line() -> str:
    import transformers
    import trl

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"{time.strftime('%Y-%m-%d %H:%M')} · {card} · torch {torch.__version__} · transformers "
            f"{transformers.__version__} · trl {trl.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="both",
                        help=f"trl | trl-static | {' | '.join(FAST_ENGINES)} | both (= trl,fast) | a,b,c")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--trl-steps", type=int, default=None, help="steps for the TRL engines (default: --steps)")
    parser.add_argument("--per-device", type=int, default=6)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--gens", type=int, default=6)
    parser.add_argument("--max-completion", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="the anchors used 0; the study 0.05")
    parser.add_argument("--lengths", default="max", help="max (every completion to the limit) | gsm8k[:SCALE]")
    parser.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth limit (default: the card's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: the card's)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: checks the script, on CPU too")
    parser.add_argument("--profile-step", type=int, default=0, help="torch.profiler over this step (1-based)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per engine")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    engines = ["trl", "fast"] if cli.engine == "both" else cli.engine.split(",")
    if parse_lengths(cli.lengths) is not None and not all(e in FAST_ENGINES for e in engines):
        raise SystemExit(f"--lengths {cli.lengths}: only the fast engines can end completions at drawn lengths")
    if cli.child:
        print("RESULT " + json.dumps(run_engine(engines[0], cli)), flush=True)
        return
    Path(cli.out).mkdir(parents=True, exist_ok=True)
    results = []
    for engine in engines:  # one process each: peak memory and allocator state are not shared
        steps = cli.trl_steps if engine.startswith("trl") and cli.trl_steps else cli.steps
        argv = [f"--engine={engine}", "--child", f"--steps={steps}", f"--per-device={cli.per_device}",
                f"--accum={cli.accum}", f"--gens={cli.gens}", f"--max-completion={cli.max_completion}",
                f"--beta={cli.beta}", f"--lora-dropout={cli.lora_dropout}", f"--out={cli.out}",
                f"--profile-step={cli.profile_step}", f"--lengths={cli.lengths}"] + (["--tiny"] if cli.tiny else []) \
            + [f"--{k.replace('_', '-')}={v}" for k, v in (("hbm_tbps", cli.hbm_tbps),
                                                          ("peak_tflops", cli.peak_tflops)) if v]
        try:
            proc = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True,
                                  timeout=cli.timeout)
        except subprocess.TimeoutExpired as expired:
            print(expired.stdout or "", f"[{engine}] timed out after {cli.timeout}s", flush=True)
            continue
        print(proc.stdout, end="", flush=True)
        found = [json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"[{engine}] failed with exit code {proc.returncode}", flush=True)
            continue
        results.append(found[0])
    report = f"\n### bench_grpo_step · {device_line()}\n\n{table(results)}\n{limits_table(results)}\n" + "".join(
        f"- {r['engine']}: per-step seconds {r['steps']}" + (f"; fastgen {r['fastgen']}" if "fastgen" in r else "")
        + "\n" for r in results)
    print(report, flush=True)
    with open(Path(cli.out) / "bench_grpo_step.md", "a") as handle:
        handle.write(report)


if __name__ == "__main__":
    main()
