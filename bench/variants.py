"""Selecting kernel variants for a measurement through the environment variables the host code reads.

    with env_override("APRIEL_SCAN_FWD", "v4k8"): ...   # None unsets the variable for the duration
The previous value (or absence) is restored afterwards, so a user's own setting survives the suite.
"""
from __future__ import annotations

import contextlib
import os
import re


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


@contextlib.contextmanager
def sscan_version(direction: str, version: str):
    """The environment of a selective-scan version label, direction "FWD" or "BWD": "auto" (the default's choice), a
    variant (APRIEL_SSCAN_<direction>=variant), or "v7sN" (v7 with N segments: APRIEL_SSCAN_<direction>_SEGMENTS=N)."""
    split = re.fullmatch(r"v7s(\d+)", version)
    variant = None if version == "auto" else "v7" if split else version
    with env_override(f"APRIEL_SSCAN_{direction}", variant), \
            env_override(f"APRIEL_SSCAN_{direction}_SEGMENTS", split.group(1) if split else None):
        yield
