"""Selecting kernel variants for a measurement through the environment variables the host code reads.

    with env_override("APRIEL_SCAN_FWD", "v4k8"): ...   # None unsets the variable for the duration
The previous value (or absence) is restored afterwards, so a user's own setting survives the suite.
"""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def env_override(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
