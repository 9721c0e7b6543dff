"""apriel_model on CPU with tiny configs: transformers parity, conversion (MIL), packing, padding, caches,
checkpoint formats, presets and argument errors. The mixer math runs through the reference ops."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import apriel_model as am
from apriel_model.checkpoint import export_config_dict, load_hybrid, save_hybrid
from apriel_model.convert import convert_to_hybrid, hybrid_from_teacher_config, mil_head_order, spread_ranking
from apriel_model.presets import get_preset

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
TEACHERS = {
    # llama3 rope scaling + tied embeddings
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})),
    # dynamic NTK scaling kicks in beyond 8 positions
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, max_position_embeddings=8,
                                                        rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    # q/k/v biases, linear scaling
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def make_teacher(kind: str) -> torch.nn.Module:
    cfg_cls, model_cls, extra = TEACHERS[kind]
    model = model_cls(cfg_cls(**{**COMMON, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():  # fresh random values everywhere (no zero biases, no unit norms)
            p.normal_(0, 0.1)
    return model


def tiny_hybrid(layout=("t", "m2", "i", "m2"), **overrides) -> am.AprielHybridForCausalLM:
    cfg = get_preset("tiny", layout=list(layout), **overrides)
    model = am.AprielHybridForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_proj.bias")):
                continue  # keep the mixer's stable defaults
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ------------------------------------------------------------------------------ transformers parity
@pytest.mark.parametrize("kind", list(TEACHERS))
def test_all_attention_matches_transformers(kind):
    teacher = make_teacher(kind)
    hybrid = convert_to_hybrid(teacher)  # 0 converted layers
    assert hybrid.layout == ["t"] * 3
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        ref, ours = teacher(ids).logits, hybrid(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_convert_zero_layers_is_teacher_exactly(kind):
    teacher = make_teacher(kind)
    hybrid = convert_to_hybrid(teacher, num_mixers=0)
    ours = hybrid.state_dict()
    for name, t in teacher.state_dict().items():
        assert torch.equal(ours[name], t), name
    assert set(ours) == set(teacher.state_dict())


def test_left_padding_matches_transformers():
    teacher = make_teacher("llama")
    hybrid = convert_to_hybrid(teacher)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = teacher(ids, attention_mask=mask).logits
        ours = hybrid(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("mapping", ["peers", "aligned"])
def test_mil_init_copies_attention(mapping):
    teacher = make_teacher("qwen2")
    hybrid = convert_to_hybrid(teacher, layout=["t", "m2", "i"], mil_mapping=mapping, seed=3)
    cfg = hybrid.config
    d_inner, d_xb, d_state, _, _ = cfg.mixer_dims()
    attn = teacher.model.layers[1].self_attn
    mixer = hybrid.model.layers[1].mixer
    order = mil_head_order(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, d_state, mapping)
    z, x, B, C = torch.split(mixer.in_proj.weight, [d_inner, d_xb, d_xb, d_inner])
    assert torch.equal(x, attn.v_proj.weight) and torch.equal(B, attn.k_proj.weight)
    assert torch.equal(C, attn.q_proj.weight[order])
    assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight[:, order])
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, d_state + 1.0)).expand(d_inner, -1))
    assert torch.equal(mixer.D, torch.ones(d_inner))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert bool((dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all())
    assert z.abs().max() <= 64 ** -0.5 and z.std() > 0.01  # nn.Linear default range, not zeros
    # the other layers are the teacher's, bit for bit
    assert torch.equal(hybrid.model.layers[0].self_attn.q_proj.bias, teacher.model.layers[0].self_attn.q_proj.bias)
    assert torch.equal(hybrid.model.layers[1].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert not hasattr(hybrid.model.layers[1], "self_attn") and hybrid.layout == ["t", "m2", "i"]
    again = convert_to_hybrid(teacher, layout=["t", "m2", "i"], mil_mapping=mapping, seed=3)
    assert torch.equal(again.model.layers[1].mixer.in_proj.weight, mixer.in_proj.weight)  # seeded


def _matching_heads(num_heads, num_kv, head_dim, d_state, mapping) -> float:
    """Fraction of mixer heads whose C rows and B rows come from the same chunk of a q head and its kv head."""
    order = mil_head_order(num_heads, num_kv, head_dim, d_state, mapping)
    r = num_heads // num_kv
    good = 0
    n_heads = num_heads * head_dim // d_state
    for h in range(n_heads):
        c_row = int(order[h * d_state])
        q_head, q_chunk = c_row // head_dim, (c_row % head_dim) // d_state
        b_row = (h // r) * d_state
        kv_head, k_chunk = b_row // head_dim, (b_row % head_dim) // d_state
        good += (q_head // r == kv_head) and (q_chunk == k_chunk)
    return good / n_heads


def test_aligned_mapping_pairs_every_head():
    # apriel-15b shape: the peers' mapping pairs 32 of 256 heads (mixer.md section 5), 'aligned' all of them
    assert _matching_heads(32, 8, 128, 16, "peers") == pytest.approx(32 / 256)
    assert _matching_heads(32, 8, 128, 16, "aligned") == 1.0
    order = mil_head_order(32, 8, 128, 16, "aligned")
    assert torch.equal(order.sort().values, torch.arange(4096))  # a permutation


def test_stage_conversion_keeps_mixers():
    teacher = make_teacher("llama")
    stage1 = convert_to_hybrid(teacher, num_mixers=1, ranking=[2, 0, 1], seed=1)
    assert stage1.layout == ["t", "t", "m2"]
    stage2 = convert_to_hybrid(stage1, num_mixers=2, ranking=[2, 0, 1], seed=2)
    assert stage2.layout == ["m2", "t", "m2"]
    for name, t in stage1.model.layers[2].state_dict().items():
        assert torch.equal(stage2.model.layers[2].state_dict()[name], t), name
    assert torch.equal(stage2.model.layers[0].mixer.out_proj.weight, teacher.model.layers[0].self_attn.o_proj.weight)


def test_convert_from_sharded_directory(tmp_path):
    teacher = make_teacher("mistral")
    teacher.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    hybrid = convert_to_hybrid(str(tmp_path), layout=["m2", "t", "t"])
    in_memory = convert_to_hybrid(teacher, layout=["m2", "t", "t"])
    for (name, a), b in zip(hybrid.state_dict().items(), in_memory.state_dict().values()):
        assert torch.equal(a, b), name


def test_convert_rejects_bad_requests():
    teacher = make_teacher("llama")
    with pytest.raises(ValueError, match="layout"):
        convert_to_hybrid(teacher, layout=["t", "m2"])
    with pytest.raises(ValueError, match="layout"):
        convert_to_hybrid(teacher, layout=["t", "x", "t"])
    with pytest.raises(ValueError, match="num_mixers"):
        convert_to_hybrid(teacher, num_mixers=4)
    with pytest.raises(ValueError, match="mil_mapping"):
        convert_to_hybrid(teacher, num_mixers=1, mil_mapping="random")
    with pytest.raises(ValueError, match="ranking"):
        convert_to_hybrid(teacher, num_mixers=1, ranking=[0, 0])
    stage = convert_to_hybrid(teacher, layout=["m2", "t", "t"])
    with pytest.raises(ValueError, match="cannot become 't'"):
        convert_to_hybrid(stage, layout=["t", "t", "t"])
    with pytest.raises(ValueError, match="teacher"):
        convert_to_hybrid("/nonexistent/dir")


def test_spread_ranking_is_a_spread_permutation():
    r = spread_ranking(50)
    assert sorted(r) == list(range(50)) and r[-2:] == [0, 49]
    first = sorted(r[:8])
    assert max(b - a for a, b in zip(first, first[1:])) <= 12  # the first 8 are spread over the depth


# ---------------------------------------------------------------------------- hybrid semantics
def test_prefill_chunks_and_decode_equal_full_forward():
    model = tiny_hybrid()
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        full = model(ids).logits
        cache = am.HybridCache(model.config, 2, 32)
        parts = [model(ids[:, :6], past_key_values=cache).logits, model(ids[:, 6:13], past_key_values=cache).logits]
        parts += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(13, 19)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.lengths[:2].tolist() == [19, 19]


def test_packed_documents_equal_separate_forwards():
    model = tiny_hybrid()
    a, b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 10))
    packed = torch.cat([a, b], 1)
    seq_idx = torch.tensor([[0] * 7 + [1] * 10], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, seq_idx=seq_idx).logits
        ref = torch.cat([model(a).logits, model(b).logits], 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_left_padding_is_exact_for_mixers():
    model = tiny_hybrid()
    ids = torch.randint(1, 128, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    model = tiny_hybrid().train()
    ids = torch.randint(0, 128, (2, 9))
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], dtype=torch.int32)
    out = model(ids, seq_idx=seq_idx, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bf16_forward_runs_with_fp32_mixer_params():
    model = tiny_hybrid().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_forward_rejects_bad_input():
    model = tiny_hybrid()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(0, 128, (5,)))
    with pytest.raises(ValueError, match="seq_idx"):
        model(torch.randint(0, 128, (1, 5)), seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="layout"):
        get_preset("tiny", layout=["t", "m2"])
    with pytest.raises(ValueError, match="hybrid_block_layout"):
        get_preset("tiny", layout=["t", "m3", "t", "t"])
    with pytest.raises(ValueError, match="hybrid_block_layout"):
        am.AprielHybridConfig(num_hidden_layers=2, hybrid_block_layout=["t"])


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["apriel_hybrid", "apriel_h", "apriel_hybrid_ssm"])
def test_checkpoint_round_trip_bitwise(tmp_path, fmt):
    model = tiny_hybrid()
    save_hybrid(model, tmp_path, format=fmt, max_shard_size="100KB")
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert json.load(open(tmp_path / "config.json"))["model_type"] == fmt
    loaded = load_hybrid(tmp_path)
    assert loaded.layout == model.layout
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_loads_published_apriel_h_directory(tmp_path):
    """A directory written as ServiceNow publishes it (hand-written config, published weight names)."""
    model = tiny_hybrid(layout=("t", "m2", "m2", "t"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    config = {
        "model_type": "apriel_h", "architectures": ["AprielHForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_apriel_h.AprielHConfig",
                     "AutoModelForCausalLM": "modeling_apriel_h.AprielHForCausalLM"},
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "hybrid_block_layout": ["t", "m2", "m2", "t"],
        "ssm_cfg": {"d_state": 8, "d_xb": 32, "d_inner": 64, "d_conv": 4, "dt_rank": 4, "expand": 1,
                    "repeat_kv_before_conv": True, "conv_bias": True, "dt_proj_bias": True, "bias": False,
                    "dt_min": 0.001, "dt_max": 0.1, "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4,
                    "activation": "identity", "n_qk_heads": 32, "n_v_heads": 32, "chunk_size": 128},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_hybrid(tmp_path)
    assert type(loaded).__name__ == "AprielHForCausalLM" and loaded.layout == ["t", "m2", "m2", "t"]
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_export_config_resolves_sizes():
    cfg = get_preset("apriel-15b", layout="H1-30")
    d = export_config_dict(cfg, "apriel_h")
    assert d["model_type"] == "apriel_h" and d["hybrid_block_layout"].count("m2") == 30
    assert {k: d["ssm_cfg"][k] for k in ("d_inner", "d_xb", "d_state", "dt_rank")} == \
        {"d_inner": 4096, "d_xb": 1024, "d_state": 16, "dt_rank": 16}
    assert "rope_settings" not in d and "ssm_state_dtype" not in d
    with pytest.raises(ValueError, match="format"):
        export_config_dict(cfg, "gguf")


# ---------------------------------------------------------------------------------------- presets
def test_presets_have_real_shapes():
    cfg = get_preset("apriel-15b", layout="H1-40")
    assert cfg.layout_counts == {"t": 10, "m2": 40, "i": 0}
    with torch.device("meta"):
        model = am.AprielHybridForCausalLM(get_preset("apriel-15b"))
    n = sum(p.numel() for p in model.parameters())
    assert 14.5e9 < n < 15.5e9, n
    small = get_preset("apriel-15b", layout="H1-30", num_hidden_layers=10)
    assert small.layout_counts["m2"] == 6
    teacher_cfg = hybrid_from_teacher_config(LlamaConfig(**COMMON))
    assert teacher_cfg.hybrid_block_layout == ["t"] * 3
    with pytest.raises(ValueError, match="layout"):
        get_preset("smollm2-135m", layout="H1-30")


def test_cli_convert_and_info(tmp_path, capsys):
    from apriel_model.__main__ import main

    make_teacher("llama").save_pretrained(tmp_path / "teacher")
    out = tmp_path / "hybrid"
    assert main(["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(out), "--num-mixers", "2",
                 "--ranking", "2,0,1", "--mil-mapping", "aligned", "--format", "apriel_h"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layout"] == ["m2", "t", "m2"]
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["model_type"] == "apriel_h" and info["counts"]["m2"] == 2
