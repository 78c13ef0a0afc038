"""Training-side speed-ups of the train stage, with either generation engine: GRPOConfig overrides, regional
torch.compile of the decoder layers, no cuDNN attention, causal attention without a padding mask
(training/packed_attention.py), log-prob forwards cut to each chunk's real tokens, on CUDA packed into one
sequence (training/trimmed_logps.py), one-batch no-grad scoring, LM-head projection of the scored positions only,
gradient accumulation in one multi-tensor add a micro-batch, and a garbage collector frozen before training and
again after every step.

    trainer = GRPOTrainer(..., args=GRPOConfig(..., **fast_training_overrides()))
    speed_up_training(trainer)
    trainer.train()
"""
from __future__ import annotations

import gc

import torch
from transformers import TrainerCallback

from grpo_gsm8k.modeling import unwrap_causal_lm
from grpo_gsm8k.training.compile_cache import use_persistent_cache
from grpo_gsm8k.training.packed_attention import use_packed_causal_attention
from grpo_gsm8k.training.trimmed_logps import trim_padding

DEFAULT_MIN_GIB_WITHOUT_CHECKPOINTING = 60.0  # an 8B LoRA step of 24 x ~400 tokens peaks near 36 GiB without it


def fast_training_overrides(*, gradient_checkpointing: bool | None = None,
                            min_gib_without_checkpointing: float = DEFAULT_MIN_GIB_WITHOUT_CHECKPOINTING) -> dict:
    """GRPOConfig kwargs for the fast path (all exist in TRL 1.16).

    Gradient checkpointing recomputes every layer's forward in backward (+0.5 s of a ~1.7 s training half at the
    study's shape on an H100); it is turned off when the GPU has at least `min_gib_without_checkpointing` GiB,
    unless `gradient_checkpointing` says otherwise. Log-probs need no override: TRL 1.16 already scores completions
    through its chunked fused LM head, never materialising (batch, seq, vocab) logits."""
    if gradient_checkpointing is None and torch.cuda.is_available():
        total_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        gradient_checkpointing = total_gib < min_gib_without_checkpointing
    elif gradient_checkpointing is None:  # CPU: activations live in host RAM, recomputing them only costs time
        gradient_checkpointing = False
    return {"gradient_checkpointing": gradient_checkpointing}


def compile_decoder_layers(model, *, recompile_limit: int = 64, backend="inductor") -> int:
    """torch.compile each decoder layer in place ("regional" compilation) for the training forward and backward.

    The eager LoRA forward is bound by the host: ~75 small kernels per layer (peft's adapter branches, fp32
    RMSNorm, RoPE), each launched from Python. Inductor fuses the elementwise work around the GEMMs. Every layer
    runs the same code, so one compilation serves all of them (parameters are graph inputs); shapes are dynamic,
    so new sequence lengths do not recompile. Variants that do compile once each: the first layer (its input needs
    no grad), attention with or without a padding mask, adapters disabled (beta > 0's reference forward), no_grad;
    `recompile_limit` leaves room for them. FastGenerator never calls the layers, so rollouts are unaffected.

    A layer's 11 Python floats (peft's seven LoRA scalings, the attention scale and dropout, two RMSNorm eps) are
    compiled in as constants. Left dynamic, each became a CPU float64 graph input cast by a C++ kernel, and
    loading a graph with such kernels ran Inductor's C++ build checks (its CPU vector-ISA probes each start a
    Python subprocess): 35.6 s of a 52.8 s warm-cache first step on an H100 host, 9.7 s without them
    (bench/RESULTS.md). The values never change during training; a change would recompile, not go wrong.
    Returns the number of layers compiled."""
    import torch._dynamo  # a submodule that `import torch` does not load

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    torch._dynamo.config.specialize_float = True  # read when a layer first runs, so set for the process
    layers = unwrap_causal_lm(model).model.layers
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def avoid_cudnn_attention() -> None:
    """Route SDPA to the flash / memory-efficient kernels instead of cuDNN's for this process.

    cuDNN builds an execution plan for every new (batch, length) shape, ~7 ms of host time per call: GRPO
    micro-batches change length all the time (prompt width x longest completion), so a step with new lengths spent
    ~2 s of CPU there (H100 profile, bench_grpo_step.py --profile-step)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def will_compile(choice: bool | None, cuda: bool) -> bool:
    """train.compile: true or false as given; auto (None) compiles on CUDA only."""
    return cuda if choice is None else choice


def will_pack_rows(choice: bool | None, *, cuda: bool, half: bool, packed_attention: bool, trimmed: bool) -> bool:
    """Whether log-prob forwards pack each chunk's rows into one sequence (training/trimmed_logps.py). It builds on
    trimming and needs the packed attention; auto (None) packs where flash's variable-length kernel runs them
    (CUDA, half precision). Elsewhere attention per row falls back to a masked (tokens x tokens) square: exact,
    but slower than trimming alone."""
    if not (trimmed and packed_attention):
        return False
    return cuda and half if choice is None else choice


def speed_up_training(trainer, *, compile_layers: bool | None = None, packed_attention: bool = True,
                      trimmed: bool = True, packed_rows: bool | None = None, accumulate_at_once: bool = True) -> dict:
    """The training-side settings of the fast path, applied to a GRPOTrainer just before `trainer.train()`.
    Returns what was done.

    compile_layers None: compile on CUDA only (inductor on CPU spends minutes in C++ builds for little gain).
    On an H100 at the study's shape these took forward + backward from ~1.1 s to ~0.7 s per optimizer step and
    removed the 6-9 s stalls seen in some steps (bench/RESULTS.md). What is compiled, and fastgen's Triton kernels,
    go to a cache that later runs and resumes read back (training/compile_cache.py). `packed_attention` False keeps
    HF's masked SDPA, `trimmed` False TRL's padded layout (the bench's A/Bs). `packed_rows`: see `will_pack_rows`.
    `accumulate_at_once` False leaves gradient accumulation to autograd (an A/B)."""
    model = trainer.model
    cuda = next(model.parameters()).is_cuda
    compile_layers = will_compile(compile_layers, cuda)
    caches = use_persistent_cache() if cuda or compile_layers else {}
    if cuda:
        avoid_cudnn_attention()
    packed = use_packed_causal_attention(model) if packed_attention else False
    compiled = compile_decoder_layers(model) if compile_layers else 0
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16) or trainer.args.bf16 or trainer.args.fp16
    packed_rows = will_pack_rows(packed_rows, cuda=cuda, half=half, packed_attention=packed, trimmed=trimmed)
    if trimmed:
        trim_padding(trainer, pack_rows=packed_rows)
    score_in_one_forward(trainer)
    accumulated_at_once = accumulate_gradients_at_once(trainer) if accumulate_at_once else False
    project_only_scored_positions()
    trainer.add_callback(FreezeGcEachStep())
    return {"compiled_layers": compiled, "compile_cache": caches.get("inductor", ""), "cudnn_attention_off": cuda,
            "packed_causal_attention": packed, "trimmed_padding": trimmed, "packed_rows": packed_rows,
            "lm_head_scored_positions_only": True, "gradients_accumulated_at_once": accumulated_at_once,
            "gc_frozen": True}


def project_only_scored_positions() -> None:
    """Make TRL's fused LM head project only the positions it scores (the completion tokens) on CPU too.

    TRL 1.16 does so on CUDA and XPU, but on other devices it projects every position, prompt included, so that a
    shape-compiling backend (its comment names Neuron) sees one tile shape. Eager CPU has no such compiler, and
    the full projection is the larger part of the CPU preset's memory: its 16 x 159-token micro-batch (127 prompt
    tokens) put 2,528 rows through the 49,152-word head in 316 MB fp32 tiles, where 512 rows are scored.
    The log-probs and gradients are the same either way (tests/test_fastgen.py)."""
    import trl.trainer.utils as trl_utils

    trl_choice = trl_utils._use_triton  # the fused head's switch: True -> project the labelled positions only
    if getattr(trl_choice, "cpu_too", False):
        return

    def cuda_xpu_or_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or trl_choice(device)

    cuda_xpu_or_cpu.cpu_too = True
    trl_utils._use_triton = cuda_xpu_or_cpu


def score_in_one_forward(trainer) -> None:
    """Make TRL's no-grad scoring forwards (reference log-probs when beta > 0, old log-probs when they are needed)
    take the whole generation batch at once.

    TRL 1.16 runs them in chunks of per_device_train_batch_size, the size a training forward's saved activations
    fit in; without grad nothing is saved, so one forward over the 24 completions does the same work in fewer,
    larger GEMMs. Per-row results do not depend on the chunking (all rows are already padded to one width).
    Training forwards (grad enabled) keep TRL's chunking."""
    original = trainer._get_per_token_logps_and_entropies

    def scored(model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        if not torch.is_grad_enabled():
            batch_size = input_ids.size(0)
        return original(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, **kwargs)

    trainer._get_per_token_logps_and_entropies = scored


def accumulate_gradients_at_once(trainer) -> bool:
    """Make each micro-batch's backward write fresh gradients, and add the earlier micro-batches' in one
    multi-tensor kernel after it, instead of autograd adding them parameter by parameter as it goes.

    With LoRA on every linear layer an 8B model has 448 trainable tensors; from the second micro-batch of an
    optimizer step on, autograd's AccumulateGrad launched one small add for each, from its engine thread, and the
    GPU waited ~35 µs for each launch: 17 ms of a 120 ms backward on an H100 (bench/RESULTS.md, the seventh
    session's trace). `torch._foreach_add_` does the same sums (fresh + earlier: the same floats as earlier +
    fresh) in a few launches. Only for a single process: DDP's reducer owns the gradients there. Returns whether
    it was installed."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type != DistributedType.NO:
        return False
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    backward = accelerator.backward

    def backward_then_accumulate(loss, **kwargs):
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None  # autograd then hands over its gradient tensors, no add kernels
        result = backward(loss, **kwargs)
        both = [(p, g) for p, g in zip(params, earlier) if g is not None and p.grad is not None]
        if both:
            torch._foreach_add_([p.grad for p, _ in both], [g for _, g in both])
        for p, g in zip(params, earlier):
            if p.grad is None:  # untouched by this micro-batch: keeps what it had
                p.grad = g
        return result

    accelerator.backward = backward_then_accumulate
    return True


def freeze_gc() -> None:
    """Move every object alive now (model, trainer, datasets, imported modules) out of the garbage collector's view.

    A training process holds millions of long-lived Python objects; each full collection walks all of them, and
    Python starts one whenever enough new objects survived. Frozen objects are never walked again."""
    gc.collect()
    gc.freeze()


class FreezeGcEachStep(TrainerCallback):
    """freeze_gc() when training begins and again after every optimizer step (collect that step's garbage, freeze
    what survived); everything goes back to the collector when training ends.

    A freeze before training only cannot see what the first step creates: torch.compile's graphs, guards and symbolic
    shapes (56,605 objects for a two-layer model compiled on CPU). Left in view, they are walked by every full
    collection Python starts later, mid-step, while the GPU's queue may run dry: 0.04 s once in five steps on an
    H100 without this callback, none with it, at under 1 ms for its own collection a step. Steady steps were the
    same within noise (2.82 against 2.84 s, bench/RESULTS.md); a full collection's cost grows with every object a
    run keeps in view, which is what this bounds. The price: a reference cycle that turns to garbage after it was
    frozen is never freed during training; what survives a step (compiled code, the trainer's logs) is meant to
    live, and reference counting still frees everything acyclic. When training ends, everything frozen is handed
    back to the collector, so a process that goes on (tests, a notebook) can free the trainer and model."""

    def on_train_begin(self, args, state, control, **kwargs):
        freeze_gc()

    def on_step_end(self, args, state, control, **kwargs):
        freeze_gc()

    def on_train_end(self, args, state, control, **kwargs):
        gc.unfreeze()
