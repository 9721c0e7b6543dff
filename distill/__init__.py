"""distill: turn a transformer teacher into an attention + Mamba hybrid the Apriel-H1 way (mixer.md 7).

`python -m distill demo | rank | train | stages | traces | config` (console script `apriel-distill`);
see docs/distill.md. Modules: config (typed settings, presets), data (traces -> packed rows), losses +
kl_triton (chunked reverse/forward KL), ranking (LOO, MMR), stages (staged conversion), trainer (the
loop, checkpoints), distributed (torchrun + FSDP2), report, demo, traces, throughput (GPU probe).
"""
__all__: list[str] = []
