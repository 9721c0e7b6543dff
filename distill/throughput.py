"""Distillation throughput and peak memory for a random-weight apriel-15b-shaped teacher and student on one
GPU (issue 6, H100 bar): one training step = teacher forward + student forward/backward + chunked
reverse KL + AdamW, bf16 weights, activation checkpointing.

    python -m distill.throughput --layers 50,40,30,20 --mixers 0.5 --seq 4096 --steps 5 --out results.json

Tries each depth in order (full width: H 5120, 32/8 heads, vocab 131072, H1 mixer) and reports the first
that fits, plus every one tried: tokens/s (training tokens per second, teacher included) and
torch.cuda.max_memory_allocated. Prints one JSON line per shape.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch


def _one(layers: int, mixer_frac: float, seq: int, batch: int, steps: int, trainable: str, preset: str = "apriel-15b",
         device: str = "cuda") -> dict:
    from apriel_model.convert import convert_to_hybrid, spread_ranking
    from apriel_model.modeling import AprielHybridForCausalLM
    from apriel_model.presets import get_preset

    from .config import LossConfig
    from .data import Batch
    from .modeling import lm_head_weight, set_trainable
    from .trainer import StudentLoss, enable_activation_checkpointing, teacher_hidden

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = get_preset(preset, num_hidden_layers=layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise 15B fp32 weights
    try:
        with dev:
            teacher = AprielHybridForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_mix = round(layers * mixer_frac)
    student = convert_to_hybrid(teacher, num_mixers=n_mix, ranking=spread_ranking(layers))
    student.to(dev).train()
    params = set_trainable(student, trainable)
    enable_activation_checkpointing(student)
    wrapper = StudentLoss(student, LossConfig(chunk_tokens=1024))
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=dev)
    mask[:, -1] = False
    labels = torch.where(mask, torch.roll(ids, -1, 1), torch.full_like(ids, -100))
    b = Batch(ids, torch.arange(seq, device=dev).expand(batch, seq), torch.zeros(batch, seq, dtype=torch.int32, device=dev),
              mask, labels, torch.ones_like(ids))
    times = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            h_t = teacher_hidden(teacher, b)
            loss, _ = wrapper(b, h_t, lm_head_weight(teacher))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:]) if len(times) > 1 else times
    med = steady[len(steady) // 2]
    from apriel_kernels import info

    kernels = info()
    return {"layers": layers, "mixers": n_mix, "seq": seq, "batch": batch, "trainable": trainable,
            "trainable_params": sum(p.numel() for p in params),
            "student_params": sum(p.numel() for p in student.parameters()),
            "step_s_median": med, "tokens_per_s": batch * seq / med, "first_step_s": times[0],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": float(loss.detach()),
            "kernels": kernels.get("kernels", kernels) if isinstance(kernels, dict) else str(kernels),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def loss_memory(n: int = 4096, hidden: int = 5120, vocab: int = 131072, chunk: int = 1024, device: str = "cuda") -> dict:
    """Peak memory above the inputs of one loss forward+backward: the chunked fused loss (both backends
    on CUDA) vs the unchunked autograd formulation, bf16 hidden states and lm_heads."""
    from .losses import distill_loss, reference_loss

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    h_s = (torch.randn(n, hidden, device=dev, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    h_t = (torch.randn(n, hidden, device=dev, generator=g) * 0.5).to(torch.bfloat16)
    w_s = (torch.randn(vocab, hidden, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    w_t = (torch.randn(vocab, hidden, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=dev, generator=g)
    out = {"tokens": n, "vocab": vocab, "hidden": hidden, "chunk": chunk}
    variants = {"chunked_triton": lambda: distill_loss(h_s, w_s, h_t, w_t, labels, chunk_tokens=chunk, backend="triton")[0],
                "chunked_torch": lambda: distill_loss(h_s, w_s, h_t, w_t, labels, chunk_tokens=chunk, backend="torch")[0],
                "unchunked_reference": lambda: reference_loss(h_s, w_s, h_t, w_t, labels)}
    for name, fn in [*variants.items(), *variants.items()]:  # the second round is the one kept (JIT warm)
        h_s.grad = w_s.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            loss = fn()
            loss.backward()
            torch.cuda.synchronize()
            out[name] = {"peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                         "ms": 1000 * (time.perf_counter() - t0), "loss": float(loss.detach())}
        except torch.OutOfMemoryError as error:
            out[name] = {"oom": str(error).splitlines()[0][:160]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.throughput", description=__doc__)
    p.add_argument("--layers", default="50,40,30,20")
    p.add_argument("--mixers", type=float, default=0.5, help="fraction of layers converted")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trainable", default="mixers", choices=("mixers", "all"))
    p.add_argument("--out", default=None)
    p.add_argument("--preset", default="apriel-15b", help="apriel_model.presets shape (tiny: a CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--loss-memory", action="store_true", help="also measure the loss's peak memory (chunked vs not)")
    p.add_argument("--all", action="store_true", help="measure every depth, not just down to the first that fits")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("distill.throughput: no CUDA device (use --device cpu --preset tiny for a smoke run)")
        return 2
    results = []
    if args.loss_memory:
        r = loss_memory(device=args.device)
        print(json.dumps(r), flush=True)
        results.append(r)
    for layers in [int(x) for x in args.layers.split(",")]:
        try:
            r = _one(layers, args.mixers, args.seq, args.batch, args.steps, args.trainable, args.preset, args.device)
        except torch.OutOfMemoryError as error:
            r = {"layers": layers, "seq": args.seq, "oom": str(error).splitlines()[0][:200]}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        results.append(r)
        if "oom" not in r and not args.all:
            break
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
