"""Build apriel-kernels: pure-Python packages plus the CUDA extension apriel_kernels._C.

Environment variables (all optional):
  APRIEL_KERNELS_CUDA_ARCHS  target archs, e.g. "9.0" or "8.0;9.0" (default; TORCH_CUDA_ARCH_LIST is
                             honoured when this is unset). "9.0a" enables Hopper-only instructions.
  APRIEL_KERNELS_FAMILIES    comma-separated csrc/ kernel families to build (default: all), for fast
                             iteration on one family.
  APRIEL_KERNELS_REQUIRE_CUDA=1  a missing CUDA toolkit or a failing extension build is a hard error
                             (CI sets it); otherwise the install falls back to pure Python, saying so once.
  APRIEL_KERNELS_SKIP_CUDA=1 never build the extension.
  APRIEL_CUTLASS_DIR         CUTLASS include directory (holding cute/ and cutlass/); default: the headers of the
                             installed nvidia-cutlass wheel (`pip install --no-deps nvidia-cutlass`). Without them the
                             scan kernels stage tiles by cp.async only (no TMA path).
  CUDA_HOME                  toolkit root; guessed from the nvcc on the PATH when unset (a wrapper script
                             that execs the real nvcc is followed).
  MAX_JOBS                   parallel compile jobs (ninja), honoured by torch's builder.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
PACKAGES = find_packages(include=["apriel_kernels*", "apriel_model*", "distill*", "bench*"])


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """The real toolkit root. The nvcc on some PATHs is a shell wrapper: follow its exec line."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda/bin/nvcc")
        return str(default.parent.parent) if default.exists() else None
    nvcc_path = Path(os.path.realpath(nvcc))
    try:
        head = nvcc_path.read_bytes()[:4096]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        match = re.search(rb"exec\s+['\"]?(/[^\s'\"]+/bin/nvcc)", head)
        if match:
            nvcc_path = Path(match.group(1).decode())
    return str(nvcc_path.parent.parent)


def _shared_libstdcxx_link_args() -> list[str]:
    """["-l:libstdc++.so.6"] when the C++ compiler would link a private static copy of libstdc++.

    Some toolchains ship only libstdc++.a (the GPU machine's /opt/gcc wrapper: `g++ -print-file-name=libstdc++.so`
    names no file). g++ then links libstdc++ statically into the extension, and every TORCH_CHECK whose message
    formats a number segfaults inside that copy (its locale facets are never initialised; seen in
    std::ostream::_M_insert<long>) instead of raising a RuntimeError. Linking the system's shared runtime,
    the one torch itself loads, keeps a single libstdc++ in the process.
    """
    cxx = os.environ.get("CXX", "c++")
    try:
        names = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True, timeout=60,
                                check=False).stdout.strip() for lib in ("libstdc++.so", "libstdc++.so.6")]
    except (OSError, subprocess.SubprocessError):
        return []
    dev_link, runtime = names
    return ["-l:libstdc++.so.6"] if not os.path.isabs(dev_link) and os.path.isabs(runtime) else []


def _arch_flags(arch_list: str) -> list[str]:
    """-gencode flags for exactly the requested archs (no PTX fallbacks: build time is a feature)."""
    flags = []
    for arch in re.split(r"[;,\s]+", arch_list.strip()):
        if not arch:
            continue
        arch = arch.replace("+PTX", "")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _arch_token(arch_list: str) -> str:
    """"8.0;9.0a" -> "8.0_9.0a" (characters outside [0-9a-z.] dropped so the -D value stays one token)."""
    archs = [re.sub(r"[^0-9a-z.]", "", a.replace("+PTX", "").lower()) for a in re.split(r"[;,\s]+", arch_list)]
    return "_".join(a for a in archs if a) or "none"


def _cutlass_include() -> str | None:
    """CUTLASS / CuTe headers for the TMA tile staging (csrc/common/tma.cuh), or None.

    APRIEL_CUTLASS_DIR wins; else the nvidia-cutlass wheel's copy (cutlass_library/source/include), found without
    importing the package (its import pulls cuda-python, which the build does not need).
    """
    candidates = []
    if os.environ.get("APRIEL_CUTLASS_DIR"):
        root = Path(os.environ["APRIEL_CUTLASS_DIR"])
        candidates += [root, root / "include"]
    else:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(list(spec.submodule_search_locations)[0]) / "source" / "include")
    for path in candidates:
        if (path / "cute" / "arch" / "copy_sm90_tma.hpp").exists() and (path / "cutlass" / "arch" / "barrier.h").exists():
            return str(path)
    return None


def _families() -> list[Path]:
    wanted = os.environ.get("APRIEL_KERNELS_FAMILIES")
    names = [n.strip() for n in wanted.split(",") if n.strip()] if wanted else None
    found = sorted(p for p in CSRC.iterdir() if p.is_dir() and p.name != "common" and any(p.glob("*.cpp")))
    if names is not None:
        missing = set(names) - {p.name for p in found}
        if missing:
            raise SystemExit(f"APRIEL_KERNELS_FAMILIES names unknown families {sorted(missing)}; have {[p.name for p in found]}")
        found = [p for p in found if p.name in names]
    return found


def _cuda_extension_kwargs():
    if _truthy("APRIEL_KERNELS_SKIP_CUDA"):
        return None, "APRIEL_KERNELS_SKIP_CUDA is set"
    cuda_home = _find_cuda_home()
    if cuda_home is None or not Path(cuda_home, "bin", "nvcc").exists():
        return None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on the PATH)"
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not importable in the build environment (use pip install --no-build-isolation)"
    cpp_extension.CUDA_HOME = cuda_home  # torch computed its guess at import; the wrapper fools it
    archs = os.environ.get("APRIEL_KERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    # torch's builder appends its own arch flags from TORCH_CUDA_ARCH_LIST; keep it equal to ours.
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs.replace(",", ";")
    sources = [str(CSRC / "module.cpp")]
    for family in _families():
        sources += sorted(str(p) for p in family.glob("*.cpp"))
        sources += sorted(str(p) for p in family.glob("*.cu"))
    sources = [os.path.relpath(s, ROOT) for s in sources]
    cutlass = _cutlass_include()
    cutlass_flags = ["-DAPRIEL_HAVE_CUTLASS=1"] if cutlass else []
    print(f"apriel-kernels: CUTLASS headers {cutlass or 'not found (no TMA staging; pip install --no-deps nvidia-cutlass)'}",
          file=sys.stderr)
    nvcc_flags = [
        "-O3",
        *cutlass_flags,
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xptxas=-v" if _truthy("APRIEL_KERNELS_PTXAS_VERBOSE") else "",
        *_arch_flags(archs),
    ]
    extension = cpp_extension.CUDAExtension(
        name="apriel_kernels._C",
        sources=sources,
        include_dirs=[str(CSRC), str(CSRC / "common"), *([cutlass] if cutlass else [])],
        # No -std for host code: torch's builder adds the one its headers need (torch 2.14's headers
        # refuse C++17, so a forced -std=c++17 broke the CPU-machine compile check).
        # The arch list for apriel_kernels._C.build_info(), as one pp-number token ("8.0_9.0a": no quoting).
        extra_compile_args={"cxx": ["-O3", f"-DAPRIEL_KERNELS_ARCHS={_arch_token(archs)}", *cutlass_flags],
                            "nvcc": [f for f in nvcc_flags if f]},
        extra_link_args=_shared_libstdcxx_link_args(),
        py_limited_api=False,
    )
    return extension, archs


def _build_config():
    extension, detail = _cuda_extension_kwargs()
    if extension is None:
        if _truthy("APRIEL_KERNELS_REQUIRE_CUDA"):
            raise SystemExit(f"APRIEL_KERNELS_REQUIRE_CUDA=1 but the CUDA extension cannot be built: {detail}")
        print(f"apriel-kernels: CUDA kernels not built ({detail}); installing the pure-Python package.", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - the fallback must survive any compiler failure
                if _truthy("APRIEL_KERNELS_REQUIRE_CUDA"):
                    raise
                print(f"apriel-kernels: CUDA extension build failed ({error}); pure-Python install.", file=sys.stderr)

    print(f"apriel-kernels: building the CUDA extension for archs {detail}", file=sys.stderr)
    return [extension], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _build_config()

setup(
    name="apriel-kernels",
    version="0.1.0",
    description="Kernels, hybrid model and distillation for attention + Mamba hybrids (Apriel-H1 recipe)",
    packages=PACKAGES,
    package_data={"distill": ["data/*.jsonl", "presets/*.toml"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "model": ["transformers>=4.44", "safetensors", "accelerate", "gguf"],
        "train": ["transformers>=4.44", "safetensors", "tqdm", "tensorboard"],
        "bench": ["rich", "matplotlib", "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "numpy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "apriel-distill=distill.__main__:cli",
            "apriel-bench=bench.__main__:main",
        ]
    },
    zip_safe=False,
)
