import sys, torch
sys.path.insert(0, "tests")
from test_mixer_scan import make_inputs, packed_seq_idx, _grads, _loss_weights
from apriel_kernels import mixer_scan
from apriel_kernels.mixer_scan import varlen_plan
cases = [(1, 129, 64, 16, True, 4, 16, (30, 96, 127)), (1, 200, 256, 64, True, 4, 16, (37, 38, 120))]
for b, L, D_, X, repeat, width, rank, cuts in cases:
    args, kw = make_inputs(b, L, D_, X, dtype=torch.bfloat16, device="cuda", repeat=repeat, dt_rank=rank, width=width, seed=11)
    seq = packed_seq_idx(b, L, list(cuts), "cuda")
    print(L, "plan", varlen_plan(seq, D_), flush=True)
    y = mixer_scan(**args, **kw, seq_idx=seq); torch.cuda.synchronize(); print("fwd ok", flush=True)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    y = mixer_scan(**leaves, **kw, seq_idx=seq); torch.cuda.synchronize(); print("fwd ckpt ok", flush=True)
    w = _loss_weights(args, kw, torch.bfloat16, seed=1)
    g = _grads(args, kw, seq, w); torch.cuda.synchronize(); print("grads ok", flush=True)
