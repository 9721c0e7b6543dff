"""apriel_model on the GPU with the CUDA kernels: kernels-in-model parity against the CPU reference,
prefill + decode against the full forward, and CUDA-graph decode against eager decode."""
from __future__ import annotations

import pytest
import torch
from conftest import require_cuda_kernel

import apriel_model as am
from apriel_model.engine import Engine
from apriel_model.presets import get_preset
from apriel_model.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, require_cuda_kernel("mixer_scan_fwd"), require_cuda_kernel("mixer_step")]

LAYOUT = ["t", "m2", "i", "m2", "t", "m2"]


def make_model(dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    cfg = get_preset("tiny", layout=LAYOUT, num_hidden_layers=6, ssm_cfg={"d_state": 16, "dt_rank": 8},
                     hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = am.AprielHybridForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(device=device, dtype=dtype)


def test_kernels_in_model_match_cpu_reference():
    cpu = make_model(device="cpu")
    gpu = make_model()
    ids = torch.randint(0, 128, (3, 37))
    seq_idx = torch.tensor([[0] * 20 + [1] * 17, [0] * 37, [0] * 5 + [1] * 32], dtype=torch.int32)
    with torch.no_grad():
        ref = cpu(ids, seq_idx=seq_idx).logits
        out = gpu(ids.cuda(), seq_idx=seq_idx.cuda()).logits.cpu()
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_decode_equals_full_forward_on_gpu(dtype):
    model = make_model(dtype)
    ids = torch.randint(0, 128, (2, 41), device="cuda")
    cache = am.HybridCache(model.config, 2, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        full = model(ids).logits.float()
        parts = [model(ids[:, :17], past_key_values=cache).logits, model(ids[:, 17:33], past_key_values=cache).logits]
        parts += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(33, 41)]
    # bf16: a few roundings of logits of size ~|full| per layer; fp32: the kernels' accumulation order
    tol = (2e-3 if dtype == torch.float32 else 5e-2) * max(1.0, full.abs().max().item())
    torch.testing.assert_close(torch.cat(parts, 1).float(), full, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    model = make_model(dtype)
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (7, 19, 3)]
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    graph = Engine(model, max_batch=4, max_seqlen=64, cuda_graphs=True)
    eager = Engine(model, max_batch=4, max_seqlen=64, cuda_graphs=False)
    for e in (graph, eager):
        last = torch.stack([e.prefill(i, p) for i, p in enumerate(prompts)])
    tokens = last.argmax(-1)
    for _ in range(5):
        lg, le = graph.decode(tokens), eager.decode(tokens)
        scale = max(1.0, le.float().abs().max().item())
        tol = (1e-3 if dtype == torch.float32 else 3e-2) * scale
        torch.testing.assert_close(lg.float(), le.float(), rtol=0, atol=tol)
        tokens = le.argmax(-1)
    if dtype == torch.float32:
        a = Engine(model, max_batch=4, max_seqlen=64, cuda_graphs=True).generate(prompts, params)
        b = Engine(model, max_batch=4, max_seqlen=64, cuda_graphs=False).generate(prompts, params)
        assert [x.token_ids for x in a] == [x.token_ids for x in b]


def test_split_k_decode_attention_equals_single_sdpa():
    from apriel_model.attention import decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 2, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(3, 2, 2048, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(3, 2, 2048, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    lengths = torch.tensor([[2048], [700], [1]], device="cuda")
    valid = torch.arange(2048, device="cuda")[None] < lengths
    ref = decode_attention(q.double(), k.double(), v.double(), valid, 0.125, splits=0)
    out = decode_attention(q, k, v, valid, 0.125, splits=8)
    low = decode_attention(q, k, v, valid, 0.125, splits=0)
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-2


def test_engine_split_decode_equals_plain_decode():
    model = make_model(torch.float32)
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (30, 5)]
    split = Engine(model, max_batch=2, max_seqlen=64, cuda_graphs=True, decode_splits=4)
    plain = Engine(model, max_batch=2, max_seqlen=64, cuda_graphs=True, decode_splits=0)
    for e in (split, plain):
        last = torch.stack([e.prefill(i, p) for i, p in enumerate(prompts)])
    tokens = last.argmax(-1)
    for _ in range(4):
        a, b = split.decode(tokens), plain.decode(tokens)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        tokens = b.argmax(-1)
