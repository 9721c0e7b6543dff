"""CPU emulation of a tensor-core mixer-scan design (STATUS.md, open problem 2): the input product du (x) B and
the readout h . C done by tf32 mma.sync, which truncates fp32 registers to 10 mantissa bits. Prints the max error
against a float64 recurrence for 1xTF32 and 3xTF32 (hi + lo split) variants; the selective-scan core only.

    python scripts/diag/scan_tf32_emulation.py        (~1 min on 2 CPU cores)
"""
import torch
torch.manual_seed(0)
def tf32(x):  # truncate an fp32 tensor to tf32 (10 mantissa bits), as mma.sync reads fp32 registers
    i = x.float().contiguous().view(torch.int32)
    return (i & ~0x1FFF).view(torch.float32)
b, L, C, N = 1, 2048, 64, 16
u = (torch.randn(b, L, C) * 1.0).bfloat16().float()
delta = torch.nn.functional.softplus(torch.randn(b, L, C) * 0.5 + 2 * (-1.5)).float()
A = -torch.exp(torch.log(torch.arange(1, N + 1).float()).repeat(C, 1) + 0.2 * torch.randn(C, N))
B = torch.randn(b, L, N).bfloat16().float()
Cm = torch.randn(b, L, N).bfloat16().float()
def run(dtype, du_mode="fp32", h_mode="fp32"):
    h = torch.zeros(b, C, N, dtype=dtype); ys = []
    for t in range(L):
        a = torch.exp(delta[:, t, :, None].to(dtype) * A.to(dtype))
        du = (delta[:, t] * u[:, t]).to(dtype)
        if du_mode == "tf32": du = tf32(du).to(dtype)
        if du_mode == "3xtf32": hi = tf32(du); du = (hi + tf32(du.float() - hi)).to(dtype)
        h = a * h + du[:, :, None] * B[:, t, None, :].to(dtype)
        hr = h
        if h_mode == "tf32": hr = tf32(h).to(dtype)
        if h_mode == "3xtf32": hi = tf32(h); hr = (hi + tf32(h.float() - hi)).to(dtype)
        ys.append((hr * Cm[:, t, None, :].to(dtype)).sum(-1))
    return torch.stack(ys, 1)
y64 = run(torch.float64)
scale = y64.abs().max().item()
def err(y): return (y.double() - y64).abs().max().item()
y32 = run(torch.float32)
ylp = y32.bfloat16()  # a bf16 output of fp32 math: the low-precision reference's floor-like error
print(f"max|y| {scale:.3f}")
print(f"fp32 math, fp32 out: {err(y32):.3e}  ({err(y32)/scale:.2e} of max)")
print(f"fp32 math, bf16 out (torch-lowprec-like): {err(ylp):.3e} ({err(ylp)/scale:.2e})")
for dm, hm in [("tf32", "fp32"), ("fp32", "tf32"), ("tf32", "tf32"), ("3xtf32", "3xtf32")]:
    y = run(torch.float32, dm, hm)
    print(f"du {dm:6s} h-readout {hm:6s}: fp32 out {err(y):.3e} ({err(y)/scale:.2e}); bf16 out {err(y.bfloat16()):.3e}")
