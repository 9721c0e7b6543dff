#!/usr/bin/env bash
# Diagnostic: does a TORCH_CHECK thrown inside a minimal torch extension op reach Python as RuntimeError
# on this machine (torch + host compiler)? Isolates the raw-op segfault seen on the device from our code.
set -u
dir=$(mktemp -d)
cp "$(dirname "$0")/torch_check_throw.cpp" "$dir/"
cd "$dir" || exit 1
"${PYTHON:-python3}" - <<'PY'
import sys
from torch.utils.cpp_extension import load
mod = load("torch_check_throw", ["torch_check_throw.cpp"], verbose=False)
import torch
for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    try:
        torch.ops.thr_C.boom(torch.zeros(2, device=device))
        print("diag:", device, "no exception (unexpected)")
    except Exception as e:
        print("diag:", device, "raised", type(e).__name__, str(e).splitlines()[0])
PY
echo "diag: exit code $?"
