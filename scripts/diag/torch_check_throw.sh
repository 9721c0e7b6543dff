#!/usr/bin/env bash
# Diagnostic: does a TORCH_CHECK thrown inside a minimal torch extension op reach Python as RuntimeError
# on this machine (torch + host compiler)? Builds the 10-line extension twice: as torch's builder links it,
# and with the shared libstdc++ forced (what setup.py does when the compiler has only libstdc++.a).
# Finding (session 4): on the GPU machine /opt/gcc ships only libstdc++.a, the extension gets a private
# static libstdc++, and formatting a number into the TORCH_CHECK message segfaults inside that copy.
set -u
dir=$(mktemp -d)
cp "$(dirname "$0")/torch_check_throw.cpp" "$dir/"
cd "$dir" || exit 1
cxx=${CXX:-c++}
echo "diag: $cxx -print-file-name=libstdc++.so -> $($cxx -print-file-name=libstdc++.so)"
for link in "" "-l:libstdc++.so.6"; do
  "${PYTHON:-python3}" - "$link" <<'PY'
import os, sys
from torch.utils.cpp_extension import load
link = sys.argv[1]
build = os.path.join(os.getcwd(), "shared" if link else "default")
os.makedirs(build, exist_ok=True)
mod = load("torch_check_throw", ["torch_check_throw.cpp"], extra_ldflags=link.split(), build_directory=build,
           verbose=False)
import torch
for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    try:
        torch.ops.thr_C.boom(torch.zeros(2, device=device))
        print("diag:", link or "default link", device, "no exception (unexpected)")
    except Exception as e:
        print("diag:", link or "default link", device, "raised", type(e).__name__, str(e).splitlines()[0])
PY
  echo "diag: ${link:-default link}: exit code $?"
done
