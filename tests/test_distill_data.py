"""Trace data: chat-template tokenisation with assistant-only loss mask, packing with document boundaries,
bucketing, resumable sharded streams, bad lines reported as file:line; config presets/TOML/overrides."""
import json

import pytest
import torch
from distill_tiny import make_records, make_tokenizer

from distill.config import PRESETS, load_config
from distill.data import BatchStream, DataError, build_documents, read_records, split_records, tokenize_messages


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_assistant_mask_covers_exactly_the_assistant_turns(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 3"},
                {"role": "assistant", "content": "the answer is 5 ."}, {"role": "user", "content": "what is 1 plus 1"},
                {"role": "assistant", "content": "2 ."}]
    ids, mask = tokenize_messages(tok, messages)
    assert ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    scored = [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]
    assert scored == ["the", "answer", "is", "5", ".", "<|im_end|>", "2", ".", "<|im_end|>"]


def test_pack_rows_keep_documents_apart(tok):
    docs = build_documents([(f"x:{i}", r["messages"]) for i, r in enumerate(make_records(12, seed=3))], tok, 64)
    stream = BatchStream(docs, seq_len=64, batch_size=3, layout="pack", pad_id=tok.pad_token_id, seed=1)
    b = stream.next()
    assert b.input_ids.shape == (3, 64) and b.seq_idx.dtype == torch.int32
    assert (b.seq_idx[:, 1:] >= b.seq_idx[:, :-1]).all()
    new_doc = torch.ones_like(b.target_mask)
    new_doc[:, 1:] = b.seq_idx[:, 1:] != b.seq_idx[:, :-1]
    assert (b.position_ids[new_doc] == 0).all()  # positions restart per document
    # a scored position predicts a token of its own document, and the label is that next token
    rows, cols = b.target_mask.nonzero(as_tuple=True)
    assert (b.seq_idx[rows, cols] == b.seq_idx[rows, cols + 1]).all()
    assert (b.labels[rows, cols] == b.input_ids[rows, cols + 1]).all()
    assert (b.labels[~b.target_mask] == -100).all()
    assert not b.target_mask[b.attention_mask == 0].any()


def test_bucket_rows_one_document_each(tok):
    docs = build_documents([(f"x:{i}", r["messages"]) for i, r in enumerate(make_records(9, seed=4))], tok, 200)
    stream = BatchStream(docs, seq_len=200, batch_size=4, layout="bucket", pad_id=tok.pad_token_id, shuffle=False)
    for b in stream.all_batches():
        real = b.attention_mask.bool()
        assert (b.seq_idx[real] == 0).all()
        assert real.sum(1).max() == b.input_ids.shape[1]  # padded to the longest row of the batch only


def test_stream_resume_and_rank_sharding(tok):
    docs = build_documents([(f"x:{i}", r["messages"]) for i, r in enumerate(make_records(30, seed=5))], tok, 48)
    kw = {"seq_len": 48, "batch_size": 2, "layout": "pack", "pad_id": tok.pad_token_id, "seed": 7}
    a = BatchStream(docs, **kw)
    seq = [a.next().input_ids for _ in range(len(a) + 3)]  # crosses an epoch boundary
    b = BatchStream(docs, **kw)
    for _ in range(len(a) - 1):
        b.next()
    c = BatchStream(docs, **kw)
    c.load_state_dict(b.state_dict())
    for i in range(len(a) - 1, len(a) + 3):
        assert torch.equal(c.next().input_ids, seq[i])
    r0, r1 = BatchStream(docs, **kw, rank=0, world=2), BatchStream(docs, **kw, rank=1, world=2)
    seen0 = {tuple(r0.next().input_ids[0].tolist()) for _ in range(len(r0))}
    seen1 = {tuple(r1.next().input_ids[0].tolist()) for _ in range(len(r1))}
    assert seen0 and seen1 and not (seen0 & seen1)


def test_bad_lines_reported_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "what is 1 plus 1", "response": "2 ."})
    path.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                               json.dumps({"prompt": "x"}), good]) + "\n")
    recs = read_records(path)
    assert [w for w, _ in recs] == [f"{path}:1", f"{path}:5"]
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err and f"{path}:3: no non-empty assistant" in err and f"{path}:4:" in err
    with pytest.raises(DataError, match=f"{path}:2"):
        read_records(path, strict=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=f"{bad}:1: expected a JSON object"):
        read_records(bad)


def test_split_is_deterministic_and_disjoint():
    recs = list(range(50))
    tr, ev = split_records(recs, 0.1, seed=3)
    assert split_records(recs, 0.1, seed=3) == (tr, ev) and len(ev) == 5 and not set(tr) & set(ev)


def test_config_precedence_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nsteps = 7\nlr_typo = 1\n')
    with pytest.raises(ValueError, match="train.lr_typo.*unknown field"):
        load_config(path=toml)
    toml.write_text('[train]\nsteps = 7\nbf16 = false\n[stages]\nschedule = [2, 4]\n')
    cfg = load_config("apriel-15b", toml, ["train.steps=9", "loss.kind=forward_kl", "optim.betas=0.8,0.9"])
    assert cfg.train.steps == 9 and cfg.train.bf16 is False and cfg.stages.schedule == [2, 4]
    assert cfg.loss.kind == "forward_kl" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.seq_len == PRESETS["apriel-15b"]["data.seq_len"]
    with pytest.raises(ValueError, match="train.steps: expected int"):
        load_config(overrides=["train.steps=many"])
    with pytest.raises(ValueError, match="loss.kind: expected one of"):
        load_config(overrides=["loss.kind=js"])
    with pytest.raises(ValueError, match="stages.schedule"):
        load_config(overrides=["stages.schedule=8,4"])
    with pytest.raises(ValueError, match="preset"):
        load_config("nope")
