"""Inference engine for hybrids: chunked prefill, batched decode (CUDA graphs on GPU), streaming.

    engine = Engine(model, max_batch=8, max_seqlen=4096, prefill_chunk=1024, cuda_graphs=None,
                    decode_splits="auto", decode_attention="auto")
    engine.prefill(slot, token_ids) -> logits (V,) of the last prompt token
    engine.decode(tokens (b,)) -> logits (b, V)          rows 0..b-1 = slots 0..b-1, one token each
    engine.stream(prompts: list[list[int]], params, tokenizer=None) -> iterator of TokenEvent
    engine.generate(prompts, params, tokenizer=None) -> list[Completion]

Prefill runs one sequence at a time in chunks of `prefill_chunk` tokens: attention writes its K/V into the
slot and the mixers run the scan op from the slot's states, leaving the final states there (so a prompt of
any length costs the same memory). Decode advances every active slot by one token: SDPA over the KV cache
and the fused mixer step op, in place. On CUDA the whole decode step (embedding to logits) is captured once
per batch bucket (1, 2, 4, 8, ... up to max_batch) in a CUDA graph and replayed; rows beyond the live batch
run on spare slots whose results are discarded. Prompts of different lengths decode together: each row
attends to its own valid keys and positions. decode_attention: the one-token attention over the cache -
"fused" (apriel_kernels.decode_attention: split-K Triton kernel, reads each row's keys only up to its
length), "sdpa" (torch SDPA, split-K through the memory-efficient kernel when decode_splits asks), or
"auto" (fused on CUDA when Triton is present and a start-up check against SDPA passes, else sdpa).
decode_splits: key chunks per (sequence, kv head) ("auto": chosen from the grid; 0: no split).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .attention import decode_attention, pick_splits
from .cache import HybridCache
from .sampling import SamplingParams, sample

__all__ = ["Completion", "Engine", "TokenEvent"]


@dataclass
class TokenEvent:
    """One generated token of prompt `row` (streaming). text: the new text piece (with a tokenizer)."""

    row: int
    token_id: int
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Completion:
    """token_ids: generated ids (stop token included, stop string excluded from text)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop_token", "stop_string", "length"


def _buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class _DecodeGraph:
    """A captured decode step for one batch bucket: static token input, static logits output."""

    def __init__(self, engine: Engine, bucket: int, pool):
        self.bucket = bucket
        dev = engine.device
        self.tokens = torch.zeros(bucket, 1, dtype=torch.long, device=dev)
        self.graph = torch.cuda.CUDAGraph()
        cache = engine.cache
        saved_len, saved_valid = cache.lengths.clone(), cache.key_valid.clone()
        # warm-up and capture advance the mixer states of slots 0..bucket-1: keep live ones intact
        live = bool(cache.lengths[:bucket].any())
        saved_states = [t[:bucket].clone() for t in (*cache.conv.values(), *cache.ssm.values())] if live else []
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: allocator, cuBLAS handles, the rope table
                engine._decode_eager(self.tokens, static_kv=True)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=pool), _programmatic_step_launch():
            self.logits = engine._decode_eager(self.tokens, static_kv=True)
        cache.lengths.copy_(saved_len)
        cache.key_valid.copy_(saved_valid)
        for t, saved in zip((*cache.conv.values(), *cache.ssm.values()), saved_states):
            t[:bucket].copy_(saved)

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens[: tokens.shape[0], 0].copy_(tokens)
        self.graph.replay()
        return self.logits


@contextlib.contextmanager
def _programmatic_step_launch():
    """Captures the fused mixer steps with programmatic dependent launch (APRIEL_STEP_PDL=1), unless the user set
    the variable: a step may then load its layer parameters before the previous kernel has finished, which is
    safe inside the decode graph (the kernels before a step are GEMMs, none writes a layer parameter) but not as
    a process-wide default (an optimizer step just before a step would race with those reads)."""
    if "APRIEL_STEP_PDL" in os.environ:
        yield
        return
    os.environ["APRIEL_STEP_PDL"] = "1"
    try:
        yield
    finally:
        os.environ.pop("APRIEL_STEP_PDL", None)


class Engine:
    """Owns a HybridCache for `model` and runs prefill / decode / generation over it."""

    def __init__(self, model, max_batch: int = 8, max_seqlen: int = 4096, prefill_chunk: int = 1024,
                 cuda_graphs: bool | None = None, ssm_dtype: torch.dtype | None = None,
                 decode_splits: int | str = "auto", decode_attention: str = "auto"):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: expected >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.config = model.config
        for module in model.modules():  # the ops take A_log and D in fp32: convert once, not every step
            if hasattr(module, "A_log") and hasattr(module, "D") and module.A_log.dtype != torch.float32:
                module.A_log.data = module.A_log.data.float()
                module.D.data = module.D.data.float()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = HybridCache(self.config, max_batch, max_seqlen, device=self.device, dtype=self.dtype,
                                 ssm_dtype=ssm_dtype)
        self.prefill_chunk = prefill_chunk
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs: expected False for a model that is not on a CUDA device")
        if self.use_graphs and (self.config.rope_settings or {}).get("rope_type") == "dynamic":
            raise ValueError("cuda_graphs: dynamic NTK rope picks its table from the positions on the host; "
                             "use cuda_graphs=False")
        if decode_attention not in ("auto", "fused", "sdpa"):
            raise ValueError(f"decode_attention: expected 'auto', 'fused' or 'sdpa', got {decode_attention!r}")
        self.decode_splits = decode_splits
        self.notes: list[str] = []
        self.decode_kernel = "sdpa" if decode_attention == "sdpa" else "fused"
        if decode_attention == "auto":
            self.decode_kernel = "fused" if self.device.type == "cuda" and self._probe_fused_attention() else "sdpa"
        if self.decode_kernel == "sdpa" and decode_splits == "auto" and self.device.type == "cuda":
            self._probe_split_attention()
        self._graphs: dict[int, _DecodeGraph] = {}
        self._pool = None

    # ------------------------------------------------------------------------------------ building blocks
    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    @torch.no_grad()
    def prefill(self, slot: int, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Empty `slot`, run the prompt through it in chunks; returns the last token's logits (V,)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("token_ids: expected a non-empty prompt")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot: expected in [0, {self.max_batch}), got {slot}")
        if ids.shape[1] >= self.cache.max_seqlen:
            raise ValueError(f"token_ids: {ids.shape[1]} tokens leave no room in max_seqlen {self.cache.max_seqlen}")
        self.cache.reset([slot])
        slot_idx = torch.tensor([slot], device=self.device)
        logits = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            logits = self.model(chunk, past_key_values=self.cache, slot_idx=slot_idx, logits_to_keep=1).logits
        return logits[0, -1]

    def splits_for(self, batch: int) -> int:
        """Split-K chunks of decode attention for a batch (0 on CPU or when disabled; with the fused kernel
        0 = the kernel's own choice)."""
        if self.decode_kernel == "fused":
            return 0 if self.decode_splits == "auto" else int(self.decode_splits or 0)
        if self.decode_splits == "auto":
            if self.device.type != "cuda":
                return 0
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            return pick_splits(batch, self.config.num_key_value_heads, self.cache.max_seqlen, sms)
        return int(self.decode_splits or 0)

    def _agrees_with_sdpa(self, attention, label: str) -> bool:
        """Run `attention(q, keys, values, valid, scale)` on a small masked case and compare with one SDPA call;
        on any failure keep a note and return False (the plain SDPA path still works)."""
        try:
            g = torch.Generator(device=self.device).manual_seed(0)
            q = torch.randn(2, 2, 4, 64, device=self.device, dtype=self.dtype, generator=g)
            kv = torch.randn(2, 2, 1024, 64, device=self.device, dtype=self.dtype, generator=g)
            valid = torch.arange(1024, device=self.device)[None] < torch.tensor([[700], [100]], device=self.device)
            err = (attention(q, kv, kv, valid, 0.125).float() - decode_attention(q, kv, kv, valid, 0.125).float())
            err = err.abs().max().item()
            if not err < 2e-2:
                raise RuntimeError(f"{label} differs from SDPA by {err}")
            return True
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"{label} decode attention disabled: {type(e).__name__}: {str(e)[:200]}")
            return False

    def _probe_fused_attention(self) -> bool:
        """Check apriel_kernels.decode_attention (Triton on GPU) against SDPA once."""
        from apriel_kernels import _triton_decode
        from apriel_kernels.decode_attention import decode_attention as fused
        if not _triton_decode.available():
            self.notes.append("fused decode attention disabled: triton is not installed")
            return False
        return self._agrees_with_sdpa(lambda *a: fused(*a, splits=4), "fused")

    def _probe_split_attention(self) -> None:
        """Check the split-K path (a private aten op) against SDPA once; no split if it fails."""
        if not self._agrees_with_sdpa(lambda *a: decode_attention(*a, splits=4), "split-K"):
            self.decode_splits = 0

    def _decode_eager(self, tokens: torch.Tensor, static_kv: bool) -> torch.Tensor:
        splits = self.splits_for(tokens.shape[0])
        return self.model(tokens, past_key_values=self.cache, logits_to_keep=1, static_kv=static_kv,
                          decode_splits=splits, decode_kernel=self.decode_kernel).logits[:, -1]

    def capture(self, buckets: list[int] | None = None) -> None:
        """Capture the decode step for the given batch buckets (default: all). Needs empty slots: do it
        before prefilling (decode() captures lazily otherwise, which is fine between generate() calls)."""
        for b in buckets or _buckets(self.max_batch):
            if b not in self._graphs:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                self._graphs[b] = _DecodeGraph(self, b, self._pool)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for slots 0..b-1 (tokens (b,) int64 on the model's device); returns logits (b, V)."""
        b = tokens.shape[0]
        if not 1 <= b <= self.max_batch:
            raise ValueError(f"tokens: expected 1..{self.max_batch} rows, got {b}")
        if not self.use_graphs:
            return self._decode_eager(tokens.reshape(b, 1), static_kv=False)
        bucket = next(s for s in _buckets(self.max_batch) if s >= b)
        if bucket not in self._graphs:
            self.capture([bucket])
        if bucket > b:  # spare rows run on slots b..bucket-1: keep their write index in range
            self.cache.lengths[b:bucket] = 0
        return self._graphs[bucket].run(tokens)[:b]

    # ---------------------------------------------------------------------------------------- generation
    def _check_room(self, prompts, params: SamplingParams) -> None:
        for i, p in enumerate(prompts):
            if len(p) + params.max_new_tokens > self.cache.max_seqlen:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceed "
                                 f"max_seqlen {self.cache.max_seqlen}")

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], params: SamplingParams | None = None,
               tokenizer=None) -> Iterator[TokenEvent]:
        """Generate for every prompt (batched, up to max_batch at a time); yields tokens as they come."""
        params = params or SamplingParams()
        if not prompts:
            return
        self._check_room(prompts, params)
        stop_ids = params.stop_token_ids
        if stop_ids is None:
            eos = self.config.eos_token_id
            stop_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if params.stop_strings and tokenizer is None:
            raise ValueError("stop_strings: expected a tokenizer to decode text")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        for wave in range(0, len(prompts), self.max_batch):
            yield from self._stream_wave(prompts[wave:wave + self.max_batch], wave, params, stop_ids, tokenizer,
                                         generator)

    def _stream_wave(self, prompts, offset, params, stop_ids, tokenizer, generator) -> Iterator[TokenEvent]:
        b = len(prompts)
        last = torch.stack([self.prefill(i, p) for i, p in enumerate(prompts)])
        emitted = [0] * b  # characters of each row's text already streamed
        # text that could be the start of a stop string is held back until it cannot be
        hold = max((len(s) for s in params.stop_strings), default=1) - 1
        generated: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(params.max_new_tokens):
            tokens = sample(last, params, generator)
            for i, t in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                generated[i].append(t)
                piece, reason, full = "", None, ""
                if tokenizer is not None:
                    full = tokenizer.decode(generated[i], skip_special_tokens=True)
                    cuts = [c for c in (full.find(s) for s in params.stop_strings) if c >= 0]
                    if cuts:
                        full, reason = full[: min(cuts)], "stop_string"
                if reason is None and t in stop_ids:
                    reason = "stop_token"
                if reason is None and step == params.max_new_tokens - 1:
                    reason = "length"
                done[i] = reason is not None
                stable = len(full.rstrip("\ufffd"))  # an unfinished multi-byte character may still change
                end = len(full) if done[i] else max(emitted[i], min(stable, len(full) - hold))
                piece, emitted[i] = full[emitted[i]:end], end
                yield TokenEvent(row=offset + i, token_id=t, text=piece, finished=done[i], finish_reason=reason)
            if all(done):
                break
            last = self.decode(tokens)

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 tokenizer=None) -> list[Completion]:
        """Batched generation; one Completion per prompt, in order."""
        out = [Completion() for _ in prompts]
        for ev in self.stream(prompts, params, tokenizer):
            c = out[ev.row]
            c.token_ids.append(ev.token_id)
            c.text += ev.text
            if ev.finished:
                c.finish_reason = ev.finish_reason
        return out
