"""CPU tests of grpo_gsm8k.fastgen.generator on a tiny random Llama (fp32): greedy equals HF generate, reported log-probs
equal a plain forward's, seeding, EOS, prompt-major order, LoRA merging, and the TRL rollout_func contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo_gsm8k.fastgen.generator import FastGenerator
from grpo_gsm8k.training.speedups import fast_training_overrides
from grpo_gsm8k.fastgen.rollout import make_rollout_func

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few GSM8K questions, with a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (ROOT / "data/gsm8k/train.jsonl").read_text().splitlines()[:200]
    rows = [json.loads(line) for line in lines]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["question"] + r["answer"] for r in rows], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer


def tiny_model(vocab_size: int = 300, eos: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=eos, bos_token_id=eos, pad_token_id=1, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).eval()


class _Eos:
    eos_token_id = 2


def hf_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=1, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_greedy_matches_hf_generate_in_prompt_major_order(model):
    gen = FastGenerator(model, _Eos(), max_new_tokens=12, temperature=0, max_batch=4)  # 4 < 6 rows: two chunks
    samples = gen.generate(PROMPTS, num_samples=[2, 1, 3])
    owners = [0, 0, 1, 2, 2, 2]
    assert len(samples) == len(owners)
    for sample, owner in zip(samples, owners):
        assert sample.completion_ids == hf_greedy(model, PROMPTS[owner], 12, eos=2)
        assert len(sample.logprobs) == len(sample.completion_ids)


def test_stops_at_eos_inclusive(model):
    reference = FastGenerator(model, _Eos(), max_new_tokens=10, temperature=0, max_batch=8).generate(PROMPTS, 1)
    eos = reference[0].completion_ids[4]  # declare a token greedy emits at step 5 to be EOS
    first = reference[0].completion_ids.index(eos)
    gen = FastGenerator(model, _Eos(), max_new_tokens=10, temperature=0, max_batch=8, eos_token_ids=[eos])
    samples = gen.generate(PROMPTS, 1)
    assert samples[0].completion_ids == reference[0].completion_ids[:first + 1]
    assert not samples[0].truncated
    assert all(s.truncated == (eos not in s.completion_ids) for s in samples)
    assert all(s.completion_ids.count(eos) <= 1 for s in samples)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_plain_forward(model, temperature, top_p):
    gen = FastGenerator(model, _Eos(), max_new_tokens=16, temperature=temperature, top_p=top_p, max_batch=8)
    samples = gen.generate(PROMPTS, num_samples=2, seed=3)
    for i, sample in enumerate(samples):
        expected = forward_logprobs(model, PROMPTS[i // 2], sample.completion_ids, temperature)
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, rtol=1e-4, atol=1e-5)


def test_same_seed_same_samples(model):
    gen = FastGenerator(model, _Eos(), max_new_tokens=16, temperature=1.0, max_batch=8)
    first = gen.generate(PROMPTS, 3, seed=11)
    assert gen.generate(PROMPTS, 3, seed=11) == first
    assert gen.generate(PROMPTS, 3, seed=12) != first
    # samples of one prompt differ from each other (independent draws, not copies)
    assert len({tuple(s.completion_ids) for s in first[:3]}) > 1


def test_sampling_respects_vocab_limit(model):
    gen = FastGenerator(model, _Eos(), max_new_tokens=32, temperature=2.0, max_batch=8, vocab_size=50)
    samples = gen.generate(PROMPTS, 2, seed=0)
    assert max(max(s.completion_ids) for s in samples) < 50


def test_lora_merged_matches_unmerged_peft_model():
    peft_model = with_lora(tiny_model(seed=1))
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    gen = FastGenerator(peft_model, _Eos(), max_new_tokens=12, temperature=0.8, max_batch=8)
    samples = gen.generate(PROMPTS, 2, seed=5)
    for i, sample in enumerate(samples):
        expected = forward_logprobs(peft_model, PROMPTS[i // 2], sample.completion_ids, 0.8)
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, rtol=1e-4, atol=1e-5)
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "packing must not modify the model"
    greedy = FastGenerator(peft_model, _Eos(), max_new_tokens=12, temperature=0, max_batch=8).generate(PROMPTS, 1)
    assert [s.completion_ids for s in greedy] == [hf_greedy(peft_model, p, 12, eos=2) for p in PROMPTS]


def test_fast_training_overrides_are_grpo_config_fields():
    from trl import GRPOConfig

    overrides = fast_training_overrides()
    assert set(overrides) <= {f.name for f in GRPOConfig.__dataclass_fields__.values()}
    assert fast_training_overrides(gradient_checkpointing=True) == {"gradient_checkpointing": True}


def _trainer(model, tokenizer, rollout_func, rewards_seen, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"What is {n} plus zero?"}], "answer": str(n)} for n in range(8)]

    def reward(completions, answer, prompts, **kwargs):
        rewards_seen.append((prompts, answer))
        return [float(len(c[0]["content"]) % 3) for c in completions]

    args = GRPOConfig(output_dir="/tmp/fastgen-test", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      num_generations=2, max_completion_length=8, max_steps=1, learning_rate=1e-3, report_to="none",
                      save_strategy="no", logging_steps=1, seed=0, temperature=0.9, bf16=False,
                      **config)
    return GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[reward], args=args,
                       train_dataset=Dataset.from_list(rows), rollout_func=rollout_func)


def test_rollout_func_contract_in_a_trl_training_step(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = tiny_tokenizer()
    model = with_lora(tiny_model(vocab_size=len(tokenizer), eos=tokenizer.eos_token_id)).train()
    fast = make_rollout_func()
    outputs, seen = [], []

    def checked(prompts, trainer):
        out = fast(prompts, trainer)
        outputs.append((prompts, out, trainer))
        return out

    trainer = _trainer(model, tokenizer, checked, seen, **fast_training_overrides())
    trainer.train()
    prompts, out, trainer = outputs[0]
    assert {"prompt_ids", "completion_ids", "logprobs"} <= set(out)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == len(prompts) == 8
    assert prompts[0] == prompts[1] != prompts[2]  # TRL repeats each prompt num_generations times in a row
    expected_ids = trainer._tokenize_prompts(prompts)[0]
    assert [list(p) for p in out["prompt_ids"]] == [list(p) for p in expected_ids]
    assert all(len(c) == len(lp) and 1 <= len(c) <= 8 for c, lp in zip(out["completion_ids"], out["logprobs"]))
    seen_prompts, seen_answers = seen[0]
    assert [p[0]["content"] for p in seen_prompts] == [f"What is {a} plus zero?" for a in seen_answers]


def test_rollout_logprobs_match_trl_training_forward(monkeypatch):
    """Before any optimizer step, the generator's log-probs are TRL's own per-token log-probs (fp32)."""
    from trl.trainer.utils import pad

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = tiny_tokenizer()
    model = with_lora(tiny_model(vocab_size=len(tokenizer), eos=tokenizer.eos_token_id))
    rollout = make_rollout_func(seed=0)
    trainer = _trainer(model, tokenizer, rollout, [])
    prompts = [[{"role": "user", "content": f"What is {n} plus zero?"}] for n in (3, 3, 3, 5, 5, 5)]
    out = rollout(prompts, trainer)
    assert not rollout.generator.has_weights  # released after the round by default
    prompt = pad([torch.tensor(p) for p in out["prompt_ids"]], padding_value=0, padding_side="left")
    prompt_mask = pad([torch.ones(len(p), dtype=torch.long) for p in out["prompt_ids"]], 0, padding_side="left")
    completion = pad([torch.tensor(c) for c in out["completion_ids"]], padding_value=0, padding_side="right")
    completion_mask = pad([torch.ones(len(c), dtype=torch.long) for c in out["completion_ids"]], 0,
                          padding_side="right")
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion.shape[1])
    ours = pad([torch.tensor(lp) for lp in out["logprobs"]], padding_value=0.0, padding_side="right")
    mask = completion_mask.bool()
    torch.testing.assert_close(ours[mask], logps[mask].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["keep-activations", "gradient-checkpointing"])
def test_compiled_decoder_layers_give_the_eager_loss_and_lora_gradients(checkpointing):
    """train.compile: the regionally compiled LoRA layers compute the same loss and gradients as eager (inductor
    on CPU here; no dropout so both draw no random numbers), across new sequence lengths and padding, also under
    HF gradient checkpointing (train.gradient_checkpointing: auto turns it on for GPUs under 60 GiB)."""
    import gc

    from grpo_gsm8k.training.speedups import compile_decoder_layers, freeze_gc

    def loss_and_grads(model, ids, mask):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        loss = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = with_lora(tiny_model()).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    batches = []
    for length, pad in ((9, 0), (14, 3), (21, 5)):
        ids = torch.randint(3, 300, (3, length))
        mask = torch.ones_like(ids)
        mask[0, :pad] = 0
        batches.append((ids, mask))
    eager = [loss_and_grads(model, *b) for b in batches]
    assert compile_decoder_layers(model) == 2
    freeze_gc()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    compiled = [loss_and_grads(model, *b) for b in batches]
    for (loss_a, grads_a), (loss_b, grads_b) in zip(eager, compiled):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2  # A and B of 7 linears x 2 layers
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)
    assert compile_decoder_layers(model) == 2  # compiling again is harmless


def test_compiled_decoder_layers_take_no_python_float_as_a_cpu_tensor(monkeypatch):
    """A LoRA layer holds 11 Python floats (seven adapter scalings, the attention scale and dropout, two RMSNorm
    eps). Compiled with dynamic shapes they became 0-d CPU float64 graph inputs, each cast by a C++ kernel whose
    loading cost a warm-cache first step on an H100 ~36 s; compiled in as constants, no graph takes one."""
    import torch._dynamo

    from grpo_gsm8k.training.speedups import compile_decoder_layers

    monkeypatch.setattr(torch._dynamo.config, "specialize_float", False)  # torch's default, restored afterwards
    torch._dynamo.reset()
    scalar_inputs = []

    def record(graph, example_inputs):
        scalar_inputs.append([t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 0])
        return graph.forward

    model = with_lora(tiny_model()).train()
    assert compile_decoder_layers(model, backend=record) == 2
    ids = torch.randint(3, 300, (2, 9))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().mean().backward()
    torch._dynamo.reset()
    assert scalar_inputs, "no layer was compiled"
    assert all(inputs == [] for inputs in scalar_inputs), [[(t.dtype, t.device.type) for t in inputs]
                                                            for inputs in scalar_inputs]


def test_each_step_end_collects_the_garbage_and_freezes_the_survivors():
    """Frozen when training begins; what a step leaves alive (torch.compile's graphs and guards, after the first)
    leaves the collector's view, so later full collections do not walk it mid-step; a reference cycle the step
    dropped is freed first; the end of training gives everything back to the collector."""
    import gc
    import weakref

    from grpo_gsm8k.training.speedups import FreezeGcEachStep

    class Node:
        pass

    gc.unfreeze()
    try:
        callback = FreezeGcEachStep()
        callback.on_train_begin(None, None, None)
        frozen_before = gc.get_freeze_count()
        assert frozen_before > 0  # the model, trainer and libraries, frozen when training begins
        survivors = [Node() for _ in range(1000)]
        dropped = Node()
        dropped.self = dropped  # a cycle: only the collector frees it
        dropped_ref = weakref.ref(dropped)
        del dropped
        callback.on_step_end(None, None, None)
        assert dropped_ref() is None
        assert gc.get_freeze_count() >= frozen_before + len(survivors)
        assert not any(o is survivors[0] for o in gc.get_objects())  # frozen: out of the collector's view
        callback.on_train_end(None, None, None)
        assert gc.get_freeze_count() == 0  # handed back: the process can free the trainer's cycles later
    finally:
        gc.unfreeze()


def test_speed_up_training_scores_the_reference_in_one_forward(monkeypatch):
    """beta > 0: TRL's no-grad reference forward takes the whole generation batch at once (same log-probs as its
    chunks); training forwards keep per_device_train_batch_size."""
    import gc

    from grpo_gsm8k.training.speedups import FreezeGcEachStep, speed_up_training

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = tiny_tokenizer()
    model = with_lora(tiny_model(vocab_size=len(tokenizer), eos=tokenizer.eos_token_id)).train()
    trainer = _trainer(model, tokenizer, make_rollout_func(), [], beta=0.04)
    calls = []
    chunked = trainer._get_per_token_logps_and_entropies  # TRL's own, bound before the wrappers go in
    forward = model.forward

    def spy(*args, **kwargs):  # each forward the log-prob function runs: (grad enabled, rows)
        calls.append((torch.is_grad_enabled(), kwargs["input_ids"].size(0)))
        return forward(*args, **kwargs)

    model.forward = spy
    monkeypatch.setattr("trl.trainer.utils._use_triton", trl_projects_only_scored_on)  # speed_up_training patches it
    assert speed_up_training(trainer) == {"compiled_layers": 0, "compile_cache": "", "cudnn_attention_off": False,
                                          "packed_causal_attention": True, "trimmed_padding": True,
                                          "packed_rows": False, "lm_head_scored_positions_only": True,
                                          "gradients_accumulated_at_once": True,
                                          "gc_frozen": True}
    assert any(isinstance(c, FreezeGcEachStep) for c in trainer.callback_handler.callbacks)
    gc.unfreeze()
    trainer.train()
    assert (False, 8) in calls  # the reference forward: 4 per device x 2 accumulation, at once
    assert {rows for grad, rows in calls if grad} == {4}  # micro-batches, untouched
    ids = torch.randint(3, len(tokenizer), (8, 12))
    mask = torch.ones_like(ids)
    mask[:3, :4] = 0
    with torch.no_grad():
        calls.clear()
        whole = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5, batch_size=4)[0]
        assert calls == [(False, 8)]
        in_chunks = chunked(trainer.model, ids, mask, 5, batch_size=4)[0]
    torch.testing.assert_close(whole, in_chunks, rtol=1e-5, atol=1e-6)


def test_fused_lm_head_projects_only_the_completion_positions_on_cpu(monkeypatch):
    """TRL's fused LM head on CPU projected every position, prompt included, through the vocabulary (the CPU
    preset's memory peak); after project_only_scored_positions only the scored (completion) positions go through
    it, with the same log-probs and the same LoRA gradients."""
    import trl.trainer.utils as trl_utils

    from grpo_gsm8k.training.speedups import project_only_scored_positions

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.setattr(trl_utils, "_use_triton", trl_projects_only_scored_on)  # restored after the test
    tokenizer = tiny_tokenizer()
    trainer = _trainer(with_lora(tiny_model(vocab_size=len(tokenizer), eos=tokenizer.eos_token_id)).train(),
                       tokenizer, make_rollout_func(), [])
    rows_projected = []
    chunked = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: rows_projected.append(hidden.shape[0]) or chunked(hidden, *rest))
    ids = torch.randint(3, len(tokenizer), (4, 12))
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # left-padded prompts
    mask[1, -2:] = 0  # a completion that ended early
    completion_length = 5

    def logps_and_grads():
        trainer.model.zero_grad()
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, completion_length)[0]
        logps.sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    every_position, grads_every = logps_and_grads()
    project_only_scored_positions()
    scored_only, grads_scored = logps_and_grads()
    assert rows_projected[0] == 4 * 11  # before: every position but the last, prompts and padding included
    assert rows_projected[1] == int(mask[:, -completion_length:].sum())  # after: the real completion tokens
    torch.testing.assert_close(scored_only, every_position, rtol=1e-5, atol=1e-6)
    assert grads_every.keys() == grads_scored.keys() and grads_every
    for name in grads_every:
        torch.testing.assert_close(grads_scored[name], grads_every[name], rtol=1e-4, atol=1e-6)


def trl_projects_only_scored_on(device: torch.device) -> bool:
    """TRL 1.16's own choice, as shipped (monkeypatch.setattr with it restores TRL's function after a test)."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(device)
