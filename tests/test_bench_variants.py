"""bench.variants.env_override: the variable is set (or unset) inside and restored exactly afterwards."""
from __future__ import annotations

import os

from bench.variants import env_override


def test_env_override_sets_unsets_and_restores(monkeypatch):
    monkeypatch.setenv("APRIEL_TEST_VARIANT", "user")
    with env_override("APRIEL_TEST_VARIANT", "8"):
        assert os.environ["APRIEL_TEST_VARIANT"] == "8"
    assert os.environ["APRIEL_TEST_VARIANT"] == "user"
    with env_override("APRIEL_TEST_VARIANT", None):
        assert "APRIEL_TEST_VARIANT" not in os.environ
    assert os.environ["APRIEL_TEST_VARIANT"] == "user"
    monkeypatch.delenv("APRIEL_TEST_VARIANT")
    try:
        with env_override("APRIEL_TEST_VARIANT", "4"):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert "APRIEL_TEST_VARIANT" not in os.environ
