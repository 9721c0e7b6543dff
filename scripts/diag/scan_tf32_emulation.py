"""CPU emulation of a tensor-core mixer-scan design (STATUS.md, open problem 2): the input product du (x) B and
the readout h . C done by tf32 mma.sync, which reads fp32 registers truncated to 10 mantissa bits. Prints the max
error against a float64 recurrence for 1xTF32 and 3xTF32 (hi + lo split) variants; the selective-scan core only
(the conv / dt_proj / gate prep is unchanged by that design).

    python scripts/diag/scan_tf32_emulation.py        (~1 min on 2 CPU cores)
"""
from __future__ import annotations

import torch

BATCH, SEQLEN, CHANNELS, STATES = 1, 2048, 64, 16


def tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the value an mma.sync tf32 operand sees (low 13 mantissa bits dropped)."""
    bits = x.float().contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def as_operand(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x as the mma reads it: exact ("fp32"), one tf32 ("tf32") or hi + lo tf32 pair ("3xtf32")."""
    if mode == "tf32":
        return tf32(x).to(x.dtype)
    if mode == "3xtf32":
        hi = tf32(x)
        return (hi + tf32(x.float() - hi)).to(x.dtype)
    return x


def make_inputs():
    """bf16-exact u, B, C; delta = softplus of a dt_proj-like pre-activation; A near the S4D-real init."""
    torch.manual_seed(0)
    u = torch.randn(BATCH, SEQLEN, CHANNELS).bfloat16().float()
    delta = torch.nn.functional.softplus(torch.randn(BATCH, SEQLEN, CHANNELS) * 0.5 - 3.0)
    a_log = torch.log(torch.arange(1, STATES + 1).float()).repeat(CHANNELS, 1) + 0.2 * torch.randn(CHANNELS, STATES)
    B = torch.randn(BATCH, SEQLEN, STATES).bfloat16().float()
    C = torch.randn(BATCH, SEQLEN, STATES).bfloat16().float()
    return u, delta, -torch.exp(a_log), B, C


def scan(inputs, dtype: torch.dtype, du_mode: str = "fp32", h_mode: str = "fp32") -> torch.Tensor:
    """y (b, L, channels) of h_t = exp(delta A) h_{t-1} + (delta u) B_t, y_t = h_t . C_t."""
    u, delta, A, B, C = (t.to(dtype) for t in inputs)
    h = torch.zeros(BATCH, CHANNELS, STATES, dtype=dtype)
    ys = []
    for t in range(SEQLEN):
        decay = torch.exp(delta[:, t, :, None] * A)
        du = as_operand(delta[:, t] * u[:, t], du_mode)
        h = decay * h + du[:, :, None] * B[:, t, None, :]
        ys.append((as_operand(h, h_mode) * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def main() -> None:
    inputs = make_inputs()
    y64 = scan(inputs, torch.float64)
    scale = y64.abs().max().item()

    def err(y: torch.Tensor) -> float:
        return (y.double() - y64).abs().max().item()

    y32 = scan(inputs, torch.float32)
    print(f"max|y| {scale:.3f}")
    print(f"fp32 math: fp32 out {err(y32):.3e} ({err(y32) / scale:.2e} of max); bf16 out {err(y32.bfloat16()):.3e}")
    for du_mode, h_mode in [("tf32", "fp32"), ("fp32", "tf32"), ("tf32", "tf32"), ("3xtf32", "3xtf32")]:
        y = scan(inputs, torch.float32, du_mode, h_mode)
        print(f"du {du_mode:6s} readout h {h_mode:6s}: fp32 out {err(y):.3e} ({err(y) / scale:.2e} of max); "
              f"bf16 out {err(y.bfloat16()):.3e}")


if __name__ == "__main__":
    main()
