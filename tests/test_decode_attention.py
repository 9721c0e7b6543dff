"""apriel_kernels.decode_attention: reference vs a naive float64 loop, the split-K Triton kernel (interpreter
on CPU, compiled on GPU) vs the reference, argument errors, opcheck / torch.compile, CUDA-graph replay, and
the engine's fused decode path against its SDPA path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apriel_kernels import _triton_decode as td
from apriel_kernels.decode_attention import decode_attention, decode_attention_op, decode_attention_ref

ROOT = Path(__file__).resolve().parents[1]


def naive(q, keys, values, valid, scale, kv_stop=None, slots=None):
    """Float64 loop over (row, kv head, query head): softmax over the attended keys, zeros if none."""
    b, kv, g, d = q.shape
    out = torch.zeros(b, kv, g, d, dtype=torch.float64)
    for i in range(b):
        row = i if slots is None else int(slots[i])
        if row < 0:
            continue
        idx = [j for j in range(valid.shape[1]) if valid[i, j] and (kv_stop is None or j < int(kv_stop[i]))]
        if not idx:
            continue
        for h in range(kv):
            k = keys[row, h, idx].double()
            v = values[row, h, idx].double()
            for gi in range(g):
                w = torch.softmax(k @ q[i, h, gi].double() * scale, dim=0)
                out[i, h, gi] = w @ v
    return out


def make_case(b=3, kv=2, g=4, d=32, lk=50, rows=5, dtype=torch.float64, device="cpu", gen=None, pad_cache=7):
    gen = gen or torch.Generator(device=device).manual_seed(1)
    q = torch.randn(b, kv, g, d, dtype=dtype, device=device, generator=gen)
    keys = torch.randn(rows, kv, lk + pad_cache, d, dtype=dtype, device=device, generator=gen)[:, :, :lk]
    values = torch.randn(rows, kv, lk + pad_cache, d, dtype=dtype, device=device, generator=gen)[:, :, :lk]
    valid = torch.rand(b, lk, device=device, generator=gen) < 0.7
    kv_stop = torch.randint(1, lk + 1, (b,), device=device, generator=gen)
    slots = torch.randperm(rows, device=device, generator=gen)[:b].to(torch.int32)
    return q, keys, values, valid, kv_stop, slots


def test_reference_matches_naive_loop():
    q, keys, values, valid, kv_stop, slots = make_case()
    valid[1] = False  # a row with no key -> zeros
    slots[2] = -1  # a padding row -> zeros
    for stop, sl in [(None, None), (kv_stop, None), (kv_stop, slots)]:
        ref = decode_attention_ref(q, keys, values, valid, 0.3, stop, sl)
        torch.testing.assert_close(ref, naive(q, keys, values, valid, 0.3, stop, sl), rtol=1e-12, atol=1e-12)
    assert decode_attention_ref(q, keys, values, valid, 0.3)[1].abs().max() == 0


def test_public_op_on_cpu_equals_reference_and_sdpa():
    q, keys, values, valid, kv_stop, slots = make_case(dtype=torch.float32)
    out = decode_attention(q, keys, values, valid, 0.25, kv_stop=kv_stop.to(torch.int32), slots=slots)
    torch.testing.assert_close(out, decode_attention_ref(q, keys, values, valid, 0.25, kv_stop, slots))
    # without stop/slots, rows 0..b-1, a valid key in every row: torch SDPA with a boolean mask
    valid[:, 0] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, keys[:3], values[:3], attn_mask=valid[:, None, None, :],
                                                            scale=0.25)
    torch.testing.assert_close(decode_attention(q, keys, values, valid, 0.25), sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(2, 2, 32)), "q: expected 4 dims"),
    (dict(keys=torch.randn(5, 2, 50, 32, dtype=torch.float64)), "keys: expected dtype"),
    (dict(values=torch.randn(5, 3, 50, 32)), "values dim 1: expected kv_heads = 2"),
    (dict(valid=torch.ones(3, 49, dtype=torch.bool)), "valid dim 1: expected kv_len = 50"),
    (dict(valid=torch.ones(3, 50)), "valid: expected dtype"),
    (dict(kv_stop=torch.ones(3)), "kv_stop: expected dtype"),
    (dict(slots=torch.tensor([0, 1, 5], dtype=torch.int32)), r"slots: expected values in \[0, 5\)"),
    (dict(slots=torch.tensor([0, 1], dtype=torch.int32)), "slots dim 0: expected batch = 3"),
    (dict(splits=-1), "splits: expected an int >= 0"),
    (dict(scale=0.0), "scale: expected a positive float"),
    (dict(keys=torch.randn(2, 2, 50, 32)), "keys: expected at least batch = 3 rows"),
])
def test_bad_input_errors_name_the_argument(bad, match):
    q, keys, values, valid, _, _ = make_case(dtype=torch.float32)
    args = dict(q=q, keys=keys, values=values, valid=valid, scale=0.2, kv_stop=None, slots=None, splits=0)
    if "keys" in bad and "values" not in bad and bad["keys"].dtype == torch.float32:
        args["values"] = bad["keys"]
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(args.pop("q"), args.pop("keys"), args.pop("values"), args.pop("valid"), args.pop("scale"), **args)


def test_opcheck_and_compile_on_cpu():
    q, keys, values, valid, kv_stop, slots = make_case(dtype=torch.float32)
    torch.library.opcheck(decode_attention_op, (q, keys, values, valid, 0.2, kv_stop, slots, 0))
    fn = torch.compile(lambda *a: decode_attention(*a, kv_stop=kv_stop, slots=slots), fullgraph=True)
    torch.testing.assert_close(fn(q, keys, values, valid, 0.2), decode_attention_ref(q, keys, values, valid, 0.2,
                                                                                      kv_stop, slots))


def test_pick_splits_gives_enough_programs():
    # the engine's batches at 16k context on 132 SMs: 15 / 36 / 71 sequences x 8 kv heads
    assert [td.pick_splits(b * 8, 16384, 132) for b in (15, 36, 71)] == [16, 4, 2]
    assert td.pick_splits(4, 300, 132) == 1  # chunks never below 256 keys
    assert td.pick_splits(1, 1 << 20, 132) == 2048  # one sequence, 1M keys: 8 programs per SM
    assert td.pick_splits(4096, 16384, 132) == 1


_INTERPRETER_SCRIPT = r"""
import torch
from apriel_kernels import _triton_decode as td
from apriel_kernels.decode_attention import decode_attention_ref
gen = torch.Generator().manual_seed(3)
cases = [  # b, kv, g, d, lk, rows, splits, dtype, block_n
    (3, 2, 4, 64, 300, 5, 4, torch.float32, 64), (2, 1, 5, 80, 129, 2, 1, torch.float32, 32),
    (4, 2, 1, 32, 77, 4, 3, torch.float16, 16), (2, 3, 8, 16, 1, 3, 1, torch.float32, 16),
]
for b, kv, g, d, lk, rows, splits, dt, bn in cases:
    q = torch.randn(b, kv, g, d, generator=gen).to(dt)
    keys = torch.randn(rows, kv, lk + 5, d, generator=gen).to(dt)[:, :, :lk]
    vals = torch.randn(rows, kv, lk + 5, d, generator=gen).to(dt)[:, :, :lk]
    valid = torch.rand(b, lk, generator=gen) < 0.6
    valid[:, 0] = True
    if b > 2:
        valid[1] = False  # no key at all -> zeros
    stop = torch.randint(1, lk + 1, (b,), generator=gen).to(torch.int32)
    slots = torch.randperm(rows, generator=gen)[:b].to(torch.int32)
    slots[-1] = -1
    for st, sl in [(None, None), (stop, slots)]:
        op, lse = td.partials(q, keys, vals, valid.view(torch.uint8), st, sl, d ** -0.5, splits, block_n=bn,
                              num_stages=1)
        out = torch.full(q.shape, float("nan"), dtype=dt)
        td.merge(op, lse, out)
        ref = decode_attention_ref(q.double(), keys.double(), vals.double(), valid, d ** -0.5, st, sl)
        tol = 1e-5 if dt == torch.float32 else 2e-3
        err = (out.double() - ref).abs().max().item()
        assert err < tol, (b, kv, g, d, lk, splits, dt, st is not None, err)
print("TRITON_OK")
"""


def test_triton_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(check=False, args=[sys.executable, "-c", _INTERPRETER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stderr[-3000:]


def _tiny_model(device="cpu", dtype=torch.float32):
    import apriel_model as am
    from apriel_model.presets import get_preset
    torch.manual_seed(0)
    cfg = get_preset("tiny", layout=["t", "m2", "t", "m2"], num_hidden_layers=4, ssm_cfg={"d_state": 16, "dt_rank": 8},
                     hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = am.AprielHybridForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(device=device, dtype=dtype)


def test_engine_fused_decode_equals_sdpa_decode_on_cpu():
    from apriel_model.engine import Engine
    from apriel_model.sampling import SamplingParams
    model = _tiny_model()
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (7, 19, 3)]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    fused = Engine(model, max_batch=3, max_seqlen=40, decode_attention="fused")
    sdpa = Engine(model, max_batch=3, max_seqlen=40, decode_attention="sdpa")
    assert fused.decode_kernel == "fused" and sdpa.decode_kernel == "sdpa"
    a = [c.token_ids for c in fused.generate(prompts, params)]
    b = [c.token_ids for c in sdpa.generate(prompts, params)]
    assert a == b
    with pytest.raises(ValueError, match="decode_attention: expected"):
        Engine(model, decode_attention="flash")


# ------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


def _need_triton_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b, kv, g, d, lk, splits", [
    (1, 1, 1, 64, 1, 0), (3, 2, 4, 128, 17, 0), (5, 8, 4, 128, 1000, 3), (2, 2, 5, 80, 2049, 7),
    (4, 4, 8, 64, 4097, 0), (2, 8, 4, 128, 16400, 0), (2, 8, 4, 128, 16400, 1),
])
def test_cuda_kernel_matches_float64_reference(dtype, b, kv, g, d, lk, splits):
    _need_triton_cuda()
    gen = torch.Generator(device="cuda").manual_seed(b * 1000 + lk)
    rows = b + 2
    q, keys, values, valid, kv_stop, slots = make_case(b, kv, g, d, lk, rows, dtype, "cuda", gen)
    valid[:, 0] = True
    if b > 2:
        slots[1] = -1
    # poison what must not be read: keys/values at or beyond each row's kv_stop (the cache's unused tail)
    pos = torch.arange(lk, device="cuda")
    for i in range(b):
        r = int(slots[i])
        if r >= 0:
            keys[r, :, pos >= kv_stop[i]] = float("nan")
            values[r, :, pos >= kv_stop[i]] = float("nan")
    out = decode_attention(q, keys, values, valid, d ** -0.5, kv_stop=kv_stop, slots=slots, splits=splits)
    ref = decode_attention_ref(q.double(), keys.double().nan_to_num(0.0), values.double().nan_to_num(0.0), valid,
                               d ** -0.5, kv_stop, slots)
    assert torch.isfinite(out).all()
    # bf16/fp16: p is rounded to the input dtype before the PV product, as flash attention does
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
    if b > 2:
        assert out[1].abs().max() == 0


@gpu
def test_cuda_kernel_equals_sdpa_at_apriel_shape():
    _need_triton_cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, keys, values, valid, _, _ = make_case(6, 8, 4, 128, 4096, 6, torch.bfloat16, "cuda", gen, pad_cache=0)
    valid[:, :3000] = True
    out = decode_attention(q, keys, values, valid)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None, :])
    torch.testing.assert_close(out.float(), sdpa.float(), rtol=0, atol=2e-2)


@gpu
def test_cuda_graph_replay_equals_eager():
    _need_triton_cuda()
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, keys, values, valid, kv_stop, slots = make_case(4, 8, 4, 128, 3000, 6, torch.bfloat16, "cuda", gen)
    eager = decode_attention(q, keys, values, valid, kv_stop=kv_stop, slots=slots)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode_attention(q, keys, values, valid, kv_stop=kv_stop, slots=slots)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, keys, values, valid, kv_stop=kv_stop, slots=slots)
    for _ in range(5):
        q.normal_(generator=gen)
        kv_stop.random_(1, 3001, generator=gen)
        graph.replay()
        torch.testing.assert_close(out, decode_attention(q, keys, values, valid, kv_stop=kv_stop, slots=slots),
                                   rtol=0, atol=0)
    assert not torch.equal(out, eager)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_fused_decode_equals_sdpa_decode_on_gpu(dtype):
    _need_triton_cuda()
    from conftest import cuda_kernel_available

    from apriel_model.engine import Engine
    from apriel_model.sampling import SamplingParams
    if not (cuda_kernel_available("mixer_step") and cuda_kernel_available("mixer_scan_fwd")):
        pytest.skip("needs the built mixer kernels")
    model = _tiny_model("cuda", dtype)
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (7, 19, 3)]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    fused = Engine(model, max_batch=4, max_seqlen=64, cuda_graphs=True)
    assert fused.decode_kernel == "fused", fused.notes
    sdpa = Engine(model, max_batch=4, max_seqlen=64, cuda_graphs=True, decode_attention="sdpa")
    tokens = torch.tensor([1, 2, 3], device="cuda")
    for e in (fused, sdpa):
        for i, p in enumerate(prompts):
            e.prefill(i, p)
    a, b = fused.decode(tokens).float(), sdpa.decode(tokens).float()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
    if dtype == torch.float32:
        ga = [c.token_ids for c in Engine(model, max_batch=4, max_seqlen=64).generate(prompts, params)]
        gb = [c.token_ids for c in Engine(model, max_batch=4, max_seqlen=64, decode_attention="sdpa").generate(prompts, params)]
        assert ga == gb
