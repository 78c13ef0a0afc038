"""The decoder forward that `grpo_gsm8k.fastgen.generator` runs: packed (LoRA-merged, fused) weights, a static KV cache.

`pack_weights(model)` reads a Llama-family causal LM (plain, or a peft LoRA model) and returns `PackedModel`:
q/k/v fused into one matrix and gate/up into another, each LoRA delta merged in (`W + s·B·A`, exactly what peft's
`merge_and_unload` computes), so a decode step runs 4 GEMMs per layer and no adapter layers. The HF model is never
modified; norms, embeddings and an un-adapted lm_head are shared, not copied.

`prefill` runs left-padded prompts once each and copies their K/V into every row that samples from them;
`decode_step` advances all rows by one token in place, so the whole step can be captured in a CUDA graph.
GQA stays grouped: the G query heads that share a KV head are passed to SDPA as G query positions of that one head,
so the 8 KV heads are never expanded to 32 over the cache (the `repeat_kv` copies were a third of HF's decode step).
Why over 300 lines: the forward of one decode step reads top to bottom here (packing, prefill, decode, attention
dispatch); split, each piece would need the packed-weights layout explained again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grpo_gsm8k.fastgen import attention, kernels
from grpo_gsm8k.modeling import unwrap_causal_lm

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(NotImplementedError):
    """The fast engine cannot run this architecture; the message says to use generation.engine=hf."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # ((Nq + 2 Nkv) D, H)
    qkv_bias: torch.Tensor | None  # ((Nq + 2 Nkv) D,) for Qwen2, else None
    o: torch.Tensor  # (H, Nq D)
    post_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2 I, H)
    down: torch.Tensor  # (H, I)


@dataclass
class PackedModel:
    embed: torch.Tensor  # (V, H)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # (H,)
    lm_head: torch.Tensor  # (V, H)
    rope_cos: torch.Tensor  # (positions, D) in the model dtype, as HF casts it
    rope_sin: torch.Tensor  # (positions, D)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def check_supported(model) -> None:
    config = unwrap_causal_lm(model).config
    hint = "; set generation.engine=hf for this model"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"fastgen runs {SUPPORTED_MODEL_TYPES} models, not {config.model_type!r}{hint}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"fastgen expects hidden_act=silu, got {config.hidden_act!r}{hint}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UnsupportedModelError(f"fastgen has no sliding-window attention{hint}")


def _lora_terms(module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(B (out, r), A (r, in), scale) of each active, unmerged LoRA adapter of a peft Linear; [] for a plain one."""
    if not hasattr(module, "base_layer") or getattr(module, "merged", False) or getattr(module, "disable_adapters",
                                                                                        False):
        return []
    names = [n for n in module.active_adapters if n in getattr(module, "lora_A", {})]
    odd = [n for n in names if getattr(module, "use_dora", {}).get(n, False) or getattr(module, "lora_bias", {}).get(n)
           or n in getattr(module, "lora_variant", {})]
    if odd or getattr(module, "fan_in_fan_out", False):
        raise UnsupportedModelError(f"fastgen merges plain LoRA only (adapters {odd}); set generation.engine=hf")
    return [(module.lora_B[n].weight, module.lora_A[n].weight, module.scaling[n]) for n in names]


def _base(module) -> nn.Linear:
    return getattr(module, "base_layer", module)


def _merge_into(out: torch.Tensor, module) -> None:
    """out = W + sum(scale * B @ A): one GEMM pass per adapter, fp32 accumulation, a single rounding to out.dtype."""
    out.copy_(_base(module).weight)
    for lora_b, lora_a, scale in _lora_terms(module):
        out.addmm_(lora_b.to(out.dtype), lora_a.to(out.dtype), alpha=scale)


def _linear_weight(module) -> torch.Tensor:
    """The merged weight of a Linear: the module's own tensor when it carries no adapter (no copy)."""
    if not _lora_terms(module):
        return _base(module).weight
    out = torch.empty_like(_base(module).weight)
    _merge_into(out, module)
    return out


def _fuse(modules) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-concatenated merged weights (and biases) of Linears sharing one input."""
    weights = [_base(m).weight for m in modules]
    fused = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1], device=weights[0].device,
                        dtype=weights[0].dtype)
    for part, module in zip(fused.split([w.shape[0] for w in weights]), modules):
        _merge_into(part, module)
    biases = [_base(m).bias for m in modules]
    if all(b is None for b in biases):
        return fused, None
    return fused, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])


def _pack_layer(layer) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "q_norm"):
        raise UnsupportedModelError("fastgen has no per-head q/k norm (Qwen3-style); set generation.engine=hf")
    qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up, gu_bias = _fuse([mlp.gate_proj, mlp.up_proj])
    if gu_bias is not None or _base(attn.o_proj).bias is not None or _base(mlp.down_proj).bias is not None:
        raise UnsupportedModelError("fastgen supports biases on q/k/v only; set generation.engine=hf")
    return LayerWeights(layer.input_layernorm.weight, qkv, qkv_bias, _linear_weight(attn.o_proj),
                        layer.post_attention_layernorm.weight, gate_up, _linear_weight(mlp.down_proj))


@torch.no_grad()
def rope_tables(model, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions 0..positions-1 from the model's own rotary module (any rope scaling), (positions, D)."""
    inner = unwrap_causal_lm(model).model
    device = inner.embed_tokens.weight.device
    probe = torch.empty(1, device=device, dtype=torch.float32)
    cos, sin = inner.rotary_emb(probe, torch.arange(positions, device=device)[None])
    return cos[0].to(dtype), sin[0].to(dtype)


@torch.no_grad()
def pack_weights(model, positions: int) -> PackedModel:
    check_supported(model)
    causal_lm = unwrap_causal_lm(model)
    inner, config = causal_lm.model, causal_lm.config
    if hasattr(inner.embed_tokens, "base_layer"):
        raise UnsupportedModelError("fastgen cannot merge adapters on the embeddings; set generation.engine=hf")
    if _base(causal_lm.lm_head).bias is not None:
        raise UnsupportedModelError("fastgen expects an lm_head without bias; set generation.engine=hf")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embed = inner.embed_tokens.weight
    cos, sin = rope_tables(model, positions, embed.dtype)
    return PackedModel(embed=embed, layers=[_pack_layer(layer) for layer in inner.layers],
                       final_norm=inner.norm.weight, lm_head=_linear_weight(causal_lm.lm_head),
                       rope_cos=cos, rope_sin=sin,
                       n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                       head_dim=head_dim, eps=config.rms_norm_eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm, op for op (normalise in fp32, scale in the model dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _mlp(x: torch.Tensor, w: LayerWeights, eps: float) -> torch.Tensor:
    gate, up = F.linear(rms_norm(x, w.post_norm, eps), w.gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down)


def _split_qkv(pm: PackedModel, qkv: torch.Tensor):
    d = pm.head_dim
    return qkv.split([pm.n_heads * d, pm.n_kv_heads * d, pm.n_kv_heads * d], dim=-1)


@dataclass
class DecodeState:
    """Static buffers one decode step reads and writes in place (so a CUDA graph can replay it)."""
    kv: torch.Tensor  # (layers, 2, B, Nkv, L, D): K and V for every cache slot
    tokens: torch.Tensor  # (B,) token fed at this step
    pad_len: torch.Tensor  # (B,) left-padding slots of each row's prompt
    cur: torch.Tensor  # (1,) cache slot this step writes
    step: torch.Tensor  # (1,) column of out_tokens this step writes
    out_tokens: torch.Tensor  # (B, S) sampled ids
    out_logps: torch.Tensor  # (B, S) fp32 log-probs of the sampled ids
    done: torch.Tensor  # (B,) bool: an EOS was sampled
    eos: torch.Tensor  # (E,) EOS ids

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def cache_len(self) -> int:
        return self.kv.shape[4]


def new_state(pm: PackedModel, batch: int, cache_len: int, max_new: int, eos_ids: list[int]) -> DecodeState:
    device = pm.embed.device
    kv = torch.zeros(len(pm.layers), 2, batch, pm.n_kv_heads, cache_len, pm.head_dim, device=device, dtype=pm.dtype)
    zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
    return DecodeState(kv=kv, tokens=zeros(batch), pad_len=zeros(batch), cur=zeros(1), step=zeros(1),
                       out_tokens=zeros(batch, max_new), out_logps=zeros(batch, max_new, dtype=torch.float32),
                       done=zeros(batch, dtype=torch.bool), eos=torch.tensor(eos_ids, device=device, dtype=torch.long))


def decode_step(pm: PackedModel, st: DecodeState, attend_len: int) -> torch.Tensor:
    """Feed st.tokens at slot st.cur for every row; return the next-token logits (B, V) in fp32.

    Only slots < attend_len are read, so a graph captured for a bucket never touches the rest of the cache."""
    fused = kernels.enabled(st.tokens.device)
    mask = None  # the Triton decode attention reads pad_len and cur itself
    if not (fused and attention.shape_supported(st.kv.device, st.kv.dtype, (st.batch, pm.n_heads, pm.head_dim),
                                                st.kv[0, 0], st.kv[0, 1])):
        slots = torch.arange(attend_len, device=st.tokens.device)
        visible = (slots[None] >= st.pad_len[:, None]) & (slots[None] <= st.cur)  # (B, attend_len)
        # additive mask (B, 1, 1, attend_len), broadcast over KV heads and grouped queries; built once per step
        mask = torch.zeros(visible.shape, device=visible.device, dtype=pm.dtype).masked_fill_(~visible,
                                                                                              float("-inf"))
        mask = mask[:, None, None]
    layer_step = _fused_layers if fused else _torch_layers
    return F.linear(layer_step(pm, st, mask, attend_len), pm.lm_head).float()


def _attend(pm: PackedModel, st: DecodeState, i: int, q: torch.Tensor, mask: torch.Tensor | None,
            attend_len: int):
    """q (B, Nq, D) -> attention output (B, Nq D). With `mask` None: the Triton split-K kernel (fastgen/attention.py),
    reading only each row's visible slots. Else SDPA, the G query heads of a KV head passed as G query positions
    of one head, (B, Nkv, G, D): grouped-query attention without expanding the cache."""
    b, g = q.shape[0], pm.n_heads // pm.n_kv_heads
    if mask is None:
        return attention.decode_attention(q, st.kv[i, 0], st.kv[i, 1], st.pad_len, st.cur,
                                          attend_len).view(b, pm.n_heads * pm.head_dim)
    out = F.scaled_dot_product_attention(q.view(b, pm.n_kv_heads, g, pm.head_dim), st.kv[i, 0, :, :, :attend_len],
                                         st.kv[i, 1, :, :, :attend_len], attn_mask=mask)
    return out.reshape(b, pm.n_heads * pm.head_dim)


def _torch_layers(pm: PackedModel, st: DecodeState, mask: torch.Tensor, attend_len: int) -> torch.Tensor:
    """All layers in plain torch ops (CPU, or FASTGEN_TRITON=0); returns the final-normed hidden state (B, H)."""
    b, d = st.batch, pm.head_dim
    positions = st.cur - st.pad_len  # (B,) position of the fed token within its own sequence
    cos, sin = pm.rope_cos[positions][:, None], pm.rope_sin[positions][:, None]  # (B, 1, D)
    x = pm.embed[st.tokens]  # (B, H)
    for i, w in enumerate(pm.layers):
        q, k, v = _split_qkv(pm, F.linear(rms_norm(x, w.input_norm, pm.eps), w.qkv, w.qkv_bias))
        q = apply_rope(q.view(b, pm.n_heads, d), cos, sin)
        k = apply_rope(k.view(b, pm.n_kv_heads, d), cos, sin)
        st.kv[i, 0].index_copy_(2, st.cur, k[:, :, None])
        st.kv[i, 1].index_copy_(2, st.cur, v.view(b, pm.n_kv_heads, 1, d))
        x = x + F.linear(_attend(pm, st, i, q, mask, attend_len), w.o)
        x = _mlp(x, w, pm.eps)
    return rms_norm(x, pm.final_norm, pm.eps)


def _fused_layers(pm: PackedModel, st: DecodeState, mask: torch.Tensor, attend_len: int) -> torch.Tensor:
    """Same maths with the Triton kernels: per layer 4 GEMMs, attention and 4 fused elementwise launches."""
    x = pm.embed[st.tokens]  # (B, H) residual stream, updated in place by add_rmsnorm
    h = kernels.add_rmsnorm(x, None, pm.layers[0].input_norm, pm.eps)
    for i, w in enumerate(pm.layers):
        qkv = F.linear(h, w.qkv, w.qkv_bias)
        q = kernels.rope_cache(qkv, pm.rope_cos, pm.rope_sin, st.pad_len, st.cur, st.kv[i, 0], st.kv[i, 1],
                               pm.n_heads, pm.n_kv_heads)
        h = kernels.add_rmsnorm(x, F.linear(_attend(pm, st, i, q, mask, attend_len), w.o), w.post_norm, pm.eps)
        down = F.linear(kernels.silu_mul(F.linear(h, w.gate_up)), w.down)
        next_norm = pm.layers[i + 1].input_norm if i + 1 < len(pm.layers) else pm.final_norm
        h = kernels.add_rmsnorm(x, down, next_norm, pm.eps)
    return h


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(U, Nkv, P, D) -> (U, Nkv * groups, P, D), head h reading KV head h // groups (HF repeat_kv; no host sync)."""
    u, n_kv, p, d = x.shape
    return x[:, :, None].expand(u, n_kv, groups, p, d).reshape(u, n_kv * groups, p, d)


def prefill(pm: PackedModel, st: DecodeState, prompts: torch.Tensor, pad_len: torch.Tensor,
            rows: torch.Tensor, row_prompt: torch.Tensor) -> torch.Tensor:
    """Run U left-padded prompts (U, P) once; copy their K/V into cache slots [0, P) of cache rows `rows`,
    row r taking prompt row_prompt[r]. Returns the last position's logits (U, V) in fp32."""
    u, p = prompts.shape
    d, g = pm.head_dim, pm.n_heads // pm.n_kv_heads
    ar = torch.arange(p, device=prompts.device)
    positions = (ar[None] - pad_len[:, None]).clamp(min=0)  # (U, P)
    cos, sin = pm.rope_cos[positions][:, None], pm.rope_sin[positions][:, None]  # (U, 1, P, D)
    real_key = ar[None] >= pad_len[:, None]  # (U, P)
    causal = ar[None, :] <= ar[:, None]  # (P, P) query i sees keys j <= i
    # A padding query sees only itself: no fully-masked row, so no NaN reaches the cache.
    mask = (causal[None] & real_key[:, None]) | torch.eye(p, dtype=torch.bool, device=prompts.device)[None]
    mask = mask[:, None]  # (U, 1, P, P)
    fused = kernels.enabled(prompts.device)
    x = pm.embed[prompts].reshape(u * p, -1)  # (U P, H) residual stream (updated in place by add_rmsnorm)
    h = kernels.add_rmsnorm(x, None, pm.layers[0].input_norm, pm.eps) if fused else None
    for i, w in enumerate(pm.layers):
        h = h if fused else rms_norm(x, w.input_norm, pm.eps)
        q, k, v = _split_qkv(pm, F.linear(h, w.qkv, w.qkv_bias))
        q = apply_rope(q.view(u, p, pm.n_heads, d).transpose(1, 2), cos, sin)  # (U, Nq, P, D)
        k = apply_rope(k.view(u, p, pm.n_kv_heads, d).transpose(1, 2), cos, sin)  # (U, Nkv, P, D)
        v = v.view(u, p, pm.n_kv_heads, d).transpose(1, 2)
        st.kv[i, 0, :, :, :p].index_copy_(0, rows, k[row_prompt])
        st.kv[i, 1, :, :, :p].index_copy_(0, rows, v[row_prompt])
        attn = F.scaled_dot_product_attention(q, _expand_kv(k, g), _expand_kv(v, g), attn_mask=mask)
        attn_out = F.linear(attn.transpose(1, 2).reshape(u * p, pm.n_heads * d), w.o)
        if fused:  # the decode step's kernels over U P rows: same rounding as the torch ops below
            h = kernels.add_rmsnorm(x, attn_out, w.post_norm, pm.eps)
            down = F.linear(kernels.silu_mul(F.linear(h, w.gate_up)), w.down)
            next_norm = pm.layers[i + 1].input_norm if i + 1 < len(pm.layers) else pm.final_norm
            h = kernels.add_rmsnorm(x, down, next_norm, pm.eps)
        else:
            x = _mlp(x + attn_out, w, pm.eps)
    last = h.view(u, p, -1)[:, -1] if fused else rms_norm(x.view(u, p, -1)[:, -1], pm.final_norm, pm.eps)
    return F.linear(last, pm.lm_head).float()
