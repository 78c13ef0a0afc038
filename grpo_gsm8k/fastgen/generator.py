"""Fast sampling from a Llama-family model (plain or peft-LoRA) for GRPO rollouts and for evaluation.

    gen = FastGenerator(model, tokenizer, max_new_tokens=512, temperature=0.8, max_batch=120)
    samples = gen.generate(prompt_ids, num_samples=5, seed=0)   # prompt-major: p0s0, p0s1, ..., p1s0, ...

What makes it fast (see fastgen/model.py for the forward): LoRA merged into fused weights once per weight version,
each distinct prompt prefilled once for all its samples, a static KV cache, GQA-aware decode attention, fused
Triton kernels for the elementwise work (fastgen/kernels.py), and on CUDA the whole decode step (forward + sampling
+ bookkeeping) captured in CUDA graphs, one per attended-length bucket, replayed with no host sync except an
"all finished?" check every `CHECK_EVERY` steps. On CPU (or `use_cuda_graph=False`) the same step runs eagerly.
Seeded calls are reproducible (fork of the device RNG).

The TRL rollout glue is fastgen/rollout.py; the engine-independent training speed-ups are training/speedups.py.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from grpo_gsm8k.fastgen.model import (DecodeState, check_supported, decode_step, new_state, pack_weights, prefill,
                                      rope_tables)
from grpo_gsm8k.fastgen.sampling import sample_tokens
from grpo_gsm8k.modeling import unwrap_causal_lm

CHECK_EVERY = 16  # decode steps between host syncs that look for "every row has ended" (CUDA graphs only)
CACHE_ROUND = 64  # cache length is rounded up to this, so nearby prompt lengths reuse buffers and graphs


@dataclass(frozen=True)
class Sample:
    completion_ids: list[int]  # up to and including the first EOS
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), one per completion id
    truncated: bool  # max_new_tokens reached without an EOS


@dataclass
class GenerationStats:
    """Seconds spent per phase (host-synchronised at phase ends), summed over calls; the bench reads it."""
    pack_s: float = 0.0
    setup_s: float = 0.0  # KV cache allocation, plus one eager warm-up step per batch size
    prefill_s: float = 0.0
    decode_s: float = 0.0  # includes capture_s: graphs are captured when a bucket is first reached
    capture_s: float = 0.0
    decode_steps: int = 0
    completion_tokens: int = 0
    graphs_captured: int = 0
    extra: dict = field(default_factory=dict)


class FastGenerator:
    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 max_batch: int, use_cuda_graph: bool | None = None, eos_token_ids: list[int] | None = None,
                 vocab_size: int | None = None, kv_bucket: int | None = 128, prefill_tokens: int = 16384):
        """kv_bucket: decode graphs attend to the cache in multiples of this many slots (None: one graph over the
        whole cache, cheapest to capture, best when weights change every round). vocab_size: sample only ids below
        it (for an lm_head padded beyond the tokenizer). prefill_tokens: prompt tokens per prefill forward."""
        check_supported(model)
        if max_new_tokens < 1 or max_batch < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"bad generation settings: max_new_tokens={max_new_tokens} max_batch={max_batch} "
                             f"temperature={temperature} top_p={top_p}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_batch, self.vocab_size, self.kv_bucket = max_batch, vocab_size, kv_bucket
        self.prefill_tokens = prefill_tokens
        self.device = unwrap_causal_lm(model).model.embed_tokens.weight.device
        if use_cuda_graph and self.device.type != "cuda":
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.eos_token_ids = sorted(set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)))
        if not self.eos_token_ids:
            raise ValueError("no EOS token id: pass eos_token_ids or give the tokenizer an eos_token")
        self.stats = GenerationStats()
        self._packed = None
        self._state: DecodeState | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._capture_stream = None
        self._warmed: set[int] = set()  # batch sizes whose decode step already ran once eagerly

    # ---- weights -------------------------------------------------------------------------------------------
    def load_weights(self, model=None) -> None:
        """(Re)pack the weights, merging active LoRA adapters. Call whenever the model's weights changed."""
        self.release()
        self.model = model if model is not None else self.model
        start = self._now()
        with torch.no_grad():
            self._packed = pack_weights(self.model, positions=1024)
        self.stats.pack_s += self._now() - start

    def release(self) -> None:
        """Free the packed weights, KV cache and graphs (the next generate() repacks)."""
        self._graphs.clear()
        self._state = self._packed = self._pool = None

    @property
    def has_weights(self) -> bool:
        return self._packed is not None

    # ---- public API ------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], num_samples: int | list[int],
                 seed: int | None = None) -> list[Sample]:
        """Sample num_samples completions per prompt (or num_samples[i] for prompt i), grouped prompt-major."""
        counts = [num_samples] * len(prompt_ids) if isinstance(num_samples, int) else list(num_samples)
        if len(counts) != len(prompt_ids) or any(c < 0 for c in counts) or any(not p for p in prompt_ids):
            raise ValueError("need one non-negative sample count per prompt, and non-empty prompts")
        rows = [i for i, c in enumerate(counts) for _ in range(c)]
        samples: list[Sample] = []
        with torch.no_grad(), _seeded(seed, self.device):
            if self._packed is None:
                self.load_weights()
            for start in range(0, len(rows), self.max_batch):
                samples.extend(self._generate_chunk(prompt_ids, rows[start:start + self.max_batch]))
        return samples

    # ---- one batch of rows -----------------------------------------------------------------------------------
    def _generate_chunk(self, prompt_ids: list[list[int]], rows: list[int]) -> list[Sample]:
        unique = list(dict.fromkeys(rows))  # prompt indices in first-seen order
        local = {p: j for j, p in enumerate(unique)}
        width = max(len(prompt_ids[p]) for p in unique)
        start = self._now()
        st = self._ensure_state(len(rows), width + self.max_new_tokens)
        row_prompt = [local[p] for p in rows] + [0] * (st.batch - len(rows))  # spare graph rows copy prompt 0
        setup = self._now()
        self._prefill(st, [prompt_ids[p] for p in unique], row_prompt, n_real=len(rows))
        prefilled = self._now()
        columns = self._decode(st, width)
        samples = self._collect(st, len(rows), columns)
        done = self._now()
        self.stats.setup_s += setup - start
        self.stats.prefill_s += prefilled - setup
        self.stats.decode_s += done - prefilled
        self.stats.completion_tokens += sum(len(s.completion_ids) for s in samples)
        chunks = self.stats.extra.setdefault("chunks", [])  # the last few, for the bench's breakdown
        chunks[:] = chunks[-15:] + [{"rows": len(rows), "prompts": len(unique), "width": width, "columns": columns,
                                     "setup_s": round(setup - start, 4), "prefill_s": round(prefilled - setup, 4),
                                     "decode_s": round(done - prefilled, 4)}]
        return samples

    def _prefill(self, st: DecodeState, prompts: list[list[int]], row_prompt: list[int], n_real: int) -> None:
        """Fill cache slots [0, width) for every row, sample each row's first token, arm the decode state."""
        dev, width = self.device, max(len(p) for p in prompts)
        pad_len = torch.tensor([width - len(p) for p in prompts], device=dev)
        padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)  # (U, width), left-padded
        row_prompt_t = torch.tensor(row_prompt, device=dev)
        per_forward = max(1, self.prefill_tokens // width)
        logits = []
        for a in range(0, len(prompts), per_forward):
            b = min(a + per_forward, len(prompts))
            rows = ((row_prompt_t >= a) & (row_prompt_t < b)).nonzero()[:, 0]
            logits.append(prefill(self._packed, st, padded[a:b], pad_len[a:b], rows, row_prompt_t[rows] - a))
        tokens, logps = sample_tokens(torch.cat(logits)[row_prompt_t], self.temperature, self.top_p, self.vocab_size)
        st.pad_len.copy_(pad_len[row_prompt_t])
        st.tokens.copy_(tokens)
        st.out_tokens[:, 0] = tokens
        st.out_logps[:, 0] = logps
        st.done.copy_(torch.isin(tokens, st.eos))
        st.done[n_real:] = True  # spare rows must not keep the batch running
        st.cur.fill_(width)
        st.step.fill_(1)

    def _decode_limit(self) -> int:
        """Columns to sample at most (bench/bench_grpo_step.py lowers it to emulate realistic lengths)."""
        return self.max_new_tokens

    def _decode(self, st: DecodeState, width: int) -> int:
        """Run decode steps until the limit or every row ended; return the number of sampled columns."""
        check_every = CHECK_EVERY if self.use_cuda_graph else 1
        limit = self._decode_limit()
        if bool(st.done.all()):
            return 1
        for column in range(1, limit):
            slot = width + column - 1  # cache slot of the token fed at this step
            if self.use_cuda_graph:
                self._graph_for(st, self._attend_len(slot, st.cache_len)).replay()
            else:
                self._step(st, slot + 1)
            self.stats.decode_steps += 1
            if (column + 1) % check_every == 0 and bool(st.done.all()):
                return column + 1
        return limit

    def _collect(self, st: DecodeState, n_rows: int, columns: int) -> list[Sample]:
        tokens = st.out_tokens[:n_rows, :columns].cpu()
        logps = st.out_logps[:n_rows, :columns].cpu()
        is_eos = torch.isin(tokens, st.eos.cpu())
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((n_rows,), columns))
        return [Sample(tokens[r, :n].tolist(), logps[r, :n].tolist(), truncated=not bool(is_eos[r].any()))
                for r, n in enumerate(ends.tolist())]

    # ---- the step, its buffers and its graphs ----------------------------------------------------------------
    def _step(self, st: DecodeState, attend_len: int) -> None:
        """One decode step, all in place on `st`: the body of every captured graph."""
        logits = decode_step(self._packed, st, attend_len)
        tokens, logps = sample_tokens(logits, self.temperature, self.top_p, self.vocab_size)
        st.out_tokens.index_copy_(1, st.step, tokens[:, None])
        st.out_logps.index_copy_(1, st.step, logps[:, None])
        st.done.logical_or_(torch.isin(tokens, st.eos))
        st.tokens.copy_(tokens)
        st.cur.add_(1)
        st.step.add_(1)

    def _attend_len(self, slot: int, cache_len: int) -> int:
        if self.kv_bucket is None:
            return cache_len
        return min(-(-(slot + 1) // self.kv_bucket) * self.kv_bucket, cache_len)

    def _ensure_state(self, n_rows: int, need_len: int) -> DecodeState:
        batch = self.max_batch if self.use_cuda_graph else n_rows
        st = self._state
        if st is not None and st.batch == batch and st.cache_len >= need_len:
            return st
        self._graphs.clear()
        self._state = st = None  # free the old cache before allocating the new one
        cache_len = -(-need_len // CACHE_ROUND) * CACHE_ROUND
        if self._packed.rope_cos.shape[0] < cache_len:
            self._packed.rope_cos, self._packed.rope_sin = rope_tables(self.model, cache_len, self._packed.dtype)
        st = new_state(self._packed, batch, cache_len, self.max_new_tokens, self.eos_token_ids)
        self._state = st
        if self.use_cuda_graph:
            self._pool = torch.cuda.graph_pool_handle()
            if self._capture_stream is None:
                self._capture_stream = torch.cuda.Stream(device=self.device)
            if batch not in self._warmed:  # lazy inits (cuBLAS workspace, Triton JIT) must not happen in a capture
                with torch.random.fork_rng(devices=[self.device]):  # and must not move the seeded RNG
                    self._on_capture_stream(lambda: self._step(st, st.cache_len))
                self._warmed.add(batch)
        return st

    def _graph_for(self, st: DecodeState, attend_len: int) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(attend_len)
        if graph is None:
            start = self._now()
            graph = torch.cuda.CUDAGraph()

            def capture():
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self._step(st, attend_len)
                finally:
                    graph.capture_end()

            # torch.cuda.graph() would also gc.collect() and empty the cache: slow in a big training process
            with torch.random.fork_rng(devices=[self.device]):
                self._on_capture_stream(capture)
            self._graphs[attend_len] = graph
            self.stats.capture_s += self._now() - start
            self.stats.graphs_captured += 1
        return graph

    def _on_capture_stream(self, fn) -> None:
        stream = self._capture_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(unwrap_causal_lm(model), "generation_config", None), "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed the CPU and `device` RNGs for the block, restoring their previous state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
