"""The ceilings every result is compared with, measured at the start of each run on the current GPU.

    measure() -> Ceilings(copy_bytes_per_s, gemm_bf16_flops, exp2_per_s, ...)
copy bandwidth (bytes read + written by a 1 GiB device copy) and bf16 GEMM (8192^3) are measured; the
exp2 (MUFU) rate is derived from the datasheet (16 per clock per SM x SMs x ~1.8 GHz), because no
single torch op isolates it. floor_ms() turns an amount of work into the time it takes at the ceilings.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import timing

MUFU_EXP2_PER_CLK_PER_SM = 16
SM_CLOCK_HZ = 1.8e9  # H100 SXM sustained boost; kernels.md uses the same figure


@dataclasses.dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    gemm_bf16_flops: float
    exp2_per_s: float
    sm_count: int
    gpu: str

    def floor_ms(self, *, flops: float = 0.0, nbytes: float = 0.0, exp2: float = 0.0) -> float:
        """Time at the ceilings. Roofline: the slowest of the three units bounds the work (they overlap)."""
        return 1e3 * max(flops / self.gemm_bf16_flops, nbytes / self.copy_bytes_per_s, exp2 / self.exp2_per_s)

    def as_rows(self) -> list[dict[str, Any]]:
        return [
            {"suite": "ceilings", "op": "copy_bandwidth", "provider": "torch", "status": "ok",
             "gb_per_s": self.copy_bytes_per_s / 1e9, "note": "1 GiB device copy, bytes read + written"},
            {"suite": "ceilings", "op": "gemm_bf16", "provider": "torch", "status": "ok",
             "tflop_s": self.gemm_bf16_flops / 1e12, "note": "8192^3 bf16 matmul"},
            {"suite": "ceilings", "op": "exp2_rate", "provider": "datasheet", "status": "ok",
             "note": f"{MUFU_EXP2_PER_CLK_PER_SM}/clk/SM x {self.sm_count} SMs x {SM_CLOCK_HZ / 1e9:.2f} GHz = "
                     f"{self.exp2_per_s / 1e12:.2f} T/s (not measured)"},
        ]


_CACHE: dict[str, Ceilings] = {}


def measure(force: bool = False) -> Ceilings:
    """Measure once per process (the suites share it); force=True measures again."""
    if "c" in _CACHE and not force:
        return _CACHE["c"]
    if not torch.cuda.is_available():
        raise RuntimeError("ceilings.measure: needs a CUDA device (the CPU fallback has no ceilings)")
    props = torch.cuda.get_device_properties(0)
    copy = timing.measure_copy_bandwidth()
    gemm = timing.measure_bf16_gemm_flops()
    torch.cuda.empty_cache()
    c = Ceilings(copy_bytes_per_s=copy, gemm_bf16_flops=gemm,
                 exp2_per_s=MUFU_EXP2_PER_CLK_PER_SM * props.multi_processor_count * SM_CLOCK_HZ,
                 sm_count=props.multi_processor_count, gpu=props.name)
    _CACHE["c"] = c
    return c
