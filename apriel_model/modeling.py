"""The hybrid decoder: Llama/Mistral/Qwen2 blocks whose token mixer is attention, the Apriel-H1 Mamba
mixer, or nothing (identity layer), set per layer by config.hybrid_block_layout.

    AprielHybridForCausalLM(config).forward(input_ids (b, L) int64, attention_mask (b, L) 0/1 = None,
        position_ids (b, L) = None, seq_idx (b, L) int32 = None, labels (b, L) = None,
        past_key_values: HybridCache = None, slot_idx (b,) = None) -> CausalLMOutputWithPast

Three execution modes, chosen per call:
- full (no cache): training / scoring. Attention through SDPA (causal fast path when nothing is masked);
  mixers through apriel_kernels.mixer_scan. seq_idx packs documents: attention gets a per-document causal
  mask, mixers reset their state at document starts, and positions restart at 0 per document unless
  position_ids are given. Left padding in attention_mask is treated the same way (pads form document 0).
- cache, L > 1 (prefill, chunked or not): K/V written into the slot's cache, mixers run mixer_scan from the
  slot's states and store the final states.
- cache, L == 1 (decode): SDPA over the KV cache (GQA as a (kv_heads, group) query block, no KV repeat),
  mixers through apriel_kernels.mixer_step updating the cache in place. With `static_kv=True` the call
  does no host synchronisation, so the engine can capture it in a CUDA graph.
Parameter names follow the published Apriel-H1 format (mixer.md section 6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

import apriel_kernels

from apriel_kernels.decode_attention import decode_attention as fused_decode_attention

from .attention import decode_attention
from .cache import HybridCache
from .configuration import AprielHConfig, AprielHybridConfig, AprielHybridSSMConfig
from .rope import RotaryEmbedding, apply_rotary

__all__ = [
    "MLP",
    "AprielHForCausalLM",
    "AprielHybridDecoderLayer",
    "AprielHybridForCausalLM",
    "AprielHybridModel",
    "AprielHybridPreTrainedModel",
    "AprielHybridSSMForCausalLM",
    "Attention",
    "MambaMixer",
    "RMSNorm",
]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (the Llama convention)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.is_cuda:  # torch's fused kernel (fp32 statistics, weight applied before the final rounding):
            # one launch instead of 7 in the decode graph; within one rounding of the formula below
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(dtype), eps=self.variance_epsilon)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: AprielHybridConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class StepContext:
    """Per-call data shared by all layers (built once by AprielHybridModel.forward).

    cos/sin: (b, L, head_dim). attn_mask: None (plain causal) or bool (b, 1, L, Lk), True = attend.
    seq_idx: (b, L) int32 for mixers or None. cache: HybridCache or None; slots (b,) int64 and
    rows_are_slots (row i uses slot i: caches are sliced, never gathered); write_idx (b, L) int64 cache
    positions of the new tokens; kv_len: keys attended in the cache; decode_splits: split-K chunks of
    decode attention (attention.decode_attention; 0 = one SDPA call).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None = None
    seq_idx: torch.Tensor | None = None
    cache: HybridCache | None = None
    slots: torch.Tensor | None = None
    rows_are_slots: bool = True
    write_idx: torch.Tensor | None = None
    kv_len: int = 0
    decode_splits: int = 0
    decode_kernel: str = "sdpa"  # "sdpa" (torch SDPA, attention.decode_attention) | "fused" (apriel_kernels op)
    memo: dict = field(default_factory=dict)  # per-call tensors shared by layers (decode attention bias)

    def cache_rows(self, t: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """The batch's rows of a slot-major cache tensor (a view when rows are slots 0..b-1)."""
        b = self.slots.shape[0]
        rows = t[:b] if self.rows_are_slots else t[self.slots]
        return rows[:, :, :upto] if upto is not None else rows


class Attention(nn.Module):
    """GQA attention with RoPE through torch SDPA; optional q/k/v (and o) biases."""

    def __init__(self, config: AprielHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attention_out_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b, L, _ = x.shape
        # q and k rotate together (one set of elementwise launches for both)
        qk = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1).view(b, L, self.num_heads + self.num_kv_heads,
                                                                       self.head_dim).transpose(1, 2)
        qk = apply_rotary(qk, ctx.cos, ctx.sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = self.v_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.attn_mask is None,
                                                 scale=self.scale, enable_gqa=True)
        else:
            out = self._cached(q, k, v, ctx)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))

    def _cached(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        key_cache, value_cache = ctx.cache.keys[self.layer_idx], ctx.cache.values[self.layer_idx]
        slot_col = ctx.slots[:, None]
        key_cache[slot_col, :, ctx.write_idx] = k.transpose(1, 2).to(key_cache.dtype)
        value_cache[slot_col, :, ctx.write_idx] = v.transpose(1, 2).to(value_cache.dtype)
        b, _, L, d = q.shape
        if L == 1 and ctx.decode_kernel == "fused":
            # the fused op reads the slot rows itself: no cache_rows gather (a full copy when rows aren't slots)
            qg = q.view(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, d)
            return self._fused_decode(qg, key_cache, value_cache, ctx).reshape(b, self.num_heads, 1, d)
        keys, values = ctx.cache_rows(key_cache, ctx.kv_len), ctx.cache_rows(value_cache, ctx.kv_len)
        if L == 1:
            # Decode: the query heads of one KV head form a (group, d) query block, so SDPA reads each
            # cached K/V once with no GQA repeat; the mask (b, 1, 1, Lk) broadcasts over heads and group.
            qg = q.view(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, d)
            out = decode_attention(qg, keys, values, ctx.attn_mask[:, 0, 0], self.scale, ctx.decode_splits,
                                   ctx.memo)
            return out.reshape(b, self.num_heads, 1, d)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.attn_mask, scale=self.scale,
                                              enable_gqa=True)

    def _fused_decode(self, qg, key_cache, value_cache, ctx: StepContext) -> torch.Tensor:
        # apriel_kernels.decode_attention reads the slot rows of the cache itself (no gather) and only
        # the keys before each row's write position + 1 (kv_stop), where SDPA reads all kv_len of every row.
        if "kv_stop" not in ctx.memo:
            ctx.memo["kv_stop"] = ctx.write_idx[:, -1] + 1
        slots = None if ctx.rows_are_slots else ctx.slots
        kv_len = ctx.kv_len
        return fused_decode_attention(qg, key_cache[:, :, :kv_len], value_cache[:, :, :kv_len], ctx.attn_mask[:, 0, 0],
                                      self.scale, kv_stop=ctx.memo["kv_stop"], slots=slots,
                                      splits=max(int(ctx.decode_splits), 0))


class MambaMixer(nn.Module):
    """The Apriel-H1 Mamba mixer (mixer.md sections 2-4); the core runs in apriel_kernels.

    Parameters (published names): in_proj (2D+2X, H), dt_in_proj (R, H), dt_proj (D, R) + bias (D,),
    conv1d (Cc, 1, W) + bias, A_log (D, N), D (D,), out_proj (H, D); Cc = D if repeat_kv_before_conv else X.
    """

    def __init__(self, config: AprielHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        cfg = config.ssm_cfg
        self.d_inner, self.d_xb, self.d_state, self.dt_rank, self.d_conv = config.mixer_dims()
        self.repeat_kv_before_conv = bool(cfg["repeat_kv_before_conv"])
        h, bias = config.hidden_size, bool(cfg.get("bias", False))
        conv_channels = self.d_inner if self.repeat_kv_before_conv else self.d_xb
        self.in_proj = nn.Linear(h, 2 * self.d_inner + 2 * self.d_xb, bias=bias)
        self.dt_in_proj = nn.Linear(h, self.dt_rank, bias=bias)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, self.d_conv, groups=conv_channels,
                                padding=self.d_conv - 1, bias=bool(cfg.get("conv_bias", True)))
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, h, bias=bias)
        self.dt_min, self.dt_max = float(cfg["dt_min"]), float(cfg["dt_max"])
        self.dt_init_floor, self.dt_scale = float(cfg["dt_init_floor"]), float(cfg["dt_scale"])

    def _core_args(self):
        # The ops take A_log and D in fp32 whatever the model dtype (mixer.md section 2).
        return (self.conv1d.weight, self.conv1d.bias, self.dt_proj.weight, self.dt_proj.bias,
                self.A_log.float(), self.D.float())

    def _dims(self):
        return dict(d_inner=self.d_inner, d_xb=self.d_xb, d_state=self.d_state,
                    repeat_kv_before_conv=self.repeat_kv_before_conv)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        zxbc = self.in_proj(x)
        dt_low = self.dt_in_proj(x)
        conv_w, conv_b, dt_w, dt_b, A_log, D = self._core_args()
        cache = ctx.cache
        if cache is None:
            y = apriel_kernels.mixer_scan(zxbc, dt_low, conv_w, conv_b, dt_w, dt_b, A_log, D, seq_idx=ctx.seq_idx,
                                          **self._dims())
        elif x.shape[1] == 1:
            conv_state, ssm_state = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
            slot_idx = None if ctx.rows_are_slots else ctx.slots.to(torch.int32)
            y = apriel_kernels.mixer_step(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_w, conv_b, dt_w, dt_b,
                                          A_log, D, **self._dims())
        else:
            conv_all, ssm_all = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
            y, ssm1, conv1 = apriel_kernels.mixer_scan(
                zxbc, dt_low, conv_w, conv_b, dt_w, dt_b, A_log, D, seq_idx=ctx.seq_idx,
                initial_ssm_state=ctx.cache_rows(ssm_all).float(), initial_conv_state=ctx.cache_rows(conv_all),
                return_final_states=True, **self._dims())
            ssm_all[ctx.slots] = ssm1.to(ssm_all.dtype)
            conv_all[ctx.slots] = conv1.to(conv_all.dtype)
        return self.out_proj(y)

    @torch.no_grad()
    def init_mixer_params(self, generator: torch.Generator | None = None) -> None:
        """The Mamba defaults for the non-projection parameters (MIL keeps them too, mixer.md section 5):
        dt_proj.weight ~ U(+-dt_scale R^-0.5); dt_proj.bias = softplus^-1(dt), dt ~ exp(U[log dt_min, log
        dt_max]) clamped >= dt_init_floor; A_log[c, n] = log(n + 1); D = 1; conv1d PyTorch default."""
        std = self.dt_rank ** -0.5 * self.dt_scale
        dev = "cpu"  # random draws on the CPU (a CPU generator seeds them on any device), then copied
        w = (torch.rand(self.dt_proj.weight.shape, generator=generator, device=dev) * 2 - 1) * std
        hf_init.copy_(self.dt_proj.weight, w)
        u = torch.rand(self.d_inner, generator=generator, device=dev)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        hf_init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dev))
        hf_init.copy_(self.A_log, a.expand(self.d_inner, -1))
        hf_init.ones_(self.D)
        fan_in = self.d_conv  # depthwise: in_channels / groups * kernel = W
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias rule of nn.Conv1d
        cw = (torch.rand(self.conv1d.weight.shape, generator=generator, device=dev) * 2 - 1) * bound
        hf_init.copy_(self.conv1d.weight, cw)
        if self.conv1d.bias is not None:
            cb = (torch.rand(self.conv1d.bias.shape, generator=generator, device=dev) * 2 - 1) * bound
            hf_init.copy_(self.conv1d.bias, cb)


class AprielHybridDecoderLayer(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)). mixer_type "i" passes x through."""

    def __init__(self, config: AprielHybridConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.hybrid_block_layout[layer_idx]
        self.layer_idx = layer_idx
        if self.mixer_type == "i":
            return
        if self.mixer_type == "t":
            self.self_attn = Attention(config, layer_idx)
        else:
            self.mixer = MambaMixer(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def token_mixer(self) -> nn.Module | None:
        return {"t": getattr(self, "self_attn", None), "m2": getattr(self, "mixer", None)}.get(self.mixer_type)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.mixer_type == "i":
            return x
        x = x + self.token_mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class AprielHybridPreTrainedModel(PreTrainedModel):
    config_class = AprielHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["AprielHybridDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # mixer states: generation cannot rewind the cache (no assisted decoding)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised before their parents, so the mixer's own rule overrides the Linear one.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, MambaMixer):
            module.init_mixer_params()


def _doc_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) document ids -> position of each token inside its document."""
    L = seq_idx.shape[1]
    idx = torch.arange(L, device=seq_idx.device).expand_as(seq_idx)
    new_doc = torch.ones_like(seq_idx, dtype=torch.bool)
    new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    starts = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


class AprielHybridModel(AprielHybridPreTrainedModel):
    """Embeddings, the layer stack and the final norm; see the module docstring for the modes."""

    def __init__(self, config: AprielHybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(AprielHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # ----------------------------------------------------------------------------------------- contexts
    def _full_context(self, x, attention_mask, position_ids, seq_idx) -> StepContext:
        b, L, _ = x.shape
        dev = x.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and seq_idx is None:
            # Leading pads become document 0: mixers restart at the first real token, attention ignores pads.
            seq_idx = (attention_mask.cumsum(-1) > 0).to(torch.int32)
        if position_ids is None:
            position_ids = _doc_positions(seq_idx) if seq_idx is not None and not padded else \
                torch.arange(L, device=dev).expand(b, L)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        window = self.config.sliding_window
        mask = None
        if seq_idx is not None or padded or (window is not None and L > window):
            i = torch.arange(L, device=dev)
            allowed = (i[None, :] <= i[:, None]).expand(b, L, L)
            if seq_idx is not None:
                allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
            if padded:
                allowed = allowed & attention_mask.bool()[:, None, :]
            if window is not None:
                allowed = allowed & (i[None, :] > i[:, None] - window)
            mask = (allowed | torch.eye(L, dtype=torch.bool, device=dev)).unsqueeze(1)
        return StepContext(cos=cos, sin=sin, attn_mask=mask, seq_idx=seq_idx)

    def _cache_context(self, x, cache: HybridCache, attention_mask, position_ids, slot_idx, static_kv,
                       decode_splits, decode_kernel="sdpa") -> StepContext:
        b, L, _ = x.shape
        dev = x.device
        rows_are_slots = slot_idx is None
        slots = torch.arange(b, device=dev) if rows_are_slots else slot_idx.to(device=dev, dtype=torch.long)
        start = cache.lengths[:b] if rows_are_slots else cache.lengths[slots]
        write_idx = start[:, None] + torch.arange(L, device=dev)
        new_valid = attention_mask[:, -L:].bool() if attention_mask is not None else \
            torch.ones(b, L, dtype=torch.bool, device=dev)
        cache.key_valid[slots[:, None], write_idx] = new_valid
        cache.lengths[slots] = start + L
        seq_idx = None
        if L > 1 and attention_mask is not None and not static_kv and not bool(new_valid.all()):
            seq_idx = (new_valid.to(torch.int32).cumsum(-1) > 0).to(torch.int32)
        if position_ids is None:
            position_ids = write_idx
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        kv_len = cache.max_seqlen if static_kv else int(write_idx.max()) + 1
        j = torch.arange(kv_len, device=dev)
        valid = (cache.key_valid[:b] if rows_are_slots else cache.key_valid[slots])[:, :kv_len]
        allowed = valid[:, None, :] & (j[None, None, :] <= write_idx[:, :, None])
        if self.config.sliding_window is not None:
            allowed = allowed & (j[None, None, :] > write_idx[:, :, None] - self.config.sliding_window)
        allowed = allowed | (j[None, None, :] == write_idx[:, :, None])  # pad queries must see something
        return StepContext(cos=cos, sin=sin, attn_mask=allowed.unsqueeze(1), seq_idx=seq_idx, cache=cache,
                           slots=slots, rows_are_slots=rows_are_slots, write_idx=write_idx, kv_len=kv_len,
                           decode_splits=decode_splits, decode_kernel=decode_kernel)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, seq_idx=None, inputs_embeds=None,
                past_key_values: HybridCache | None = None, slot_idx=None, static_kv: bool = False,
                decode_splits: int = 0, decode_kernel: str = "sdpa"):
        """Returns the final hidden states (b, L, H). See AprielHybridForCausalLM.forward."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() != 3:
            raise ValueError(f"input_ids: expected (batch, seqlen), got {tuple(x.shape[:-1])}")
        if seq_idx is not None:
            if past_key_values is not None:
                raise ValueError("seq_idx: packed documents are for the cache-free forward, got a cache too")
            if seq_idx.shape != x.shape[:2]:
                raise ValueError(f"seq_idx: expected shape {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")
            seq_idx = seq_idx.to(torch.int32)
        if attention_mask is not None and attention_mask.shape[-1] < x.shape[1]:
            raise ValueError(f"attention_mask: expected >= {x.shape[1]} columns, got {tuple(attention_mask.shape)}")
        if past_key_values is None:
            if attention_mask is not None:
                attention_mask = attention_mask[:, -x.shape[1]:]
            ctx = self._full_context(x, attention_mask, position_ids, seq_idx)
        else:
            ctx = self._cache_context(x, past_key_values, attention_mask, position_ids, slot_idx, static_kv,
                                      decode_splits, decode_kernel)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)


class AprielHybridForCausalLM(AprielHybridPreTrainedModel, GenerationMixin):
    """Hybrid causal LM; HF save/load, generate(), and the fast engine in apriel_model.engine."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AprielHybridConfig):
        super().__init__(config)
        self.model = AprielHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @property
    def layout(self) -> list[str]:
        return [layer.mixer_type for layer in self.model.layers]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, seq_idx=None, labels=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, slot_idx=None, logits_to_keep: int = 0,
                static_kv: bool = False, decode_splits: int = 0, decode_kernel: str = "sdpa",
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (b, L) int64; attention_mask: (b, L) or (b, past + L) 0/1 (left padding);
        position_ids: (b, L); seq_idx: (b, L) int32 packed-document ids (non-decreasing per row, cache-free
        forward only); labels: (b, L) with -100 = ignored (shifted inside: token t predicts t+1);
        past_key_values: a HybridCache (rows use slots slot_idx (b,), default 0..b-1); logits_to_keep: k > 0
        computes logits for the last k positions only; static_kv: attend over the whole cache capacity with no
        host synchronisation (CUDA-graph capture); decode_splits: split-K decode attention; decode_kernel: "sdpa"
        (torch SDPA) or "fused" (apriel_kernels.decode_attention) for one-token decode over the cache. Returns CausalLMOutputWithPast (logits (b, L|k, V))."""
        cache = past_key_values if isinstance(past_key_values, HybridCache) else None
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            seq_idx=seq_idx, inputs_embeds=inputs_embeds, past_key_values=cache, slot_idx=slot_idx,
                            static_kv=static_kv, decode_splits=decode_splits, decode_kernel=decode_kernel)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    # --------------------------------------------------------------------------- transformers generate()
    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Feeds generate() through a HybridCache (created on the first call, grown as needed): the first
        call sends the whole prompt, later calls only the tokens the cache has not seen."""
        if not isinstance(past_key_values, HybridCache):
            b = input_ids.shape[0]
            max_len = max(int(kwargs.get("max_length") or 0), input_ids.shape[1] + 256)
            past_key_values = HybridCache(self.config, b, max_len, device=input_ids.device, dtype=self.dtype)
        seen = int(past_key_values.lengths[0])
        if input_ids.shape[1] > past_key_values.max_seqlen:
            past_key_values.grow(2 * input_ids.shape[1])
        new_ids = input_ids[:, seen:]
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, seen:input_ids.shape[1]]
        return {"input_ids": new_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "past_key_values": past_key_values, "use_cache": use_cache}


class AprielHForCausalLM(AprielHybridForCausalLM):
    """The same model under the published Apriel-H1 config class (model_type "apriel_h")."""

    config_class = AprielHConfig


class AprielHybridSSMForCausalLM(AprielHybridForCausalLM):
    """The same model under Fast-LLM's export config class (model_type "apriel_hybrid_ssm")."""

    config_class = AprielHybridSSMConfig
