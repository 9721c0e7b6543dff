# Sourced by the device scripts (gpu_run.sh, diag/build_ab.sh): exports APRIEL_CUTLASS_DIR for the scan's TMA
# staging. The device has no package index, so the nvidia-cutlass wheel travels in .whl/
# (scripts/fetch_device_wheels.sh) and only its headers are unpacked (once per machine).
if [ -z "${APRIEL_CUTLASS_DIR:-}" ] && \
   ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" 2>/dev/null; then
  _apriel_whl=$(ls .whl/nvidia_cutlass-*.whl ../.whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$_apriel_whl" ]; then
    if [ ! -d /tmp/cutlass/cutlass_library/source/include ]; then
      rm -rf /tmp/cutlass && python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall('/tmp/cutlass', [n for n in z.namelist() if n.startswith('cutlass_library/source/include/')])" "$_apriel_whl"
    fi
    export APRIEL_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source/include
  else
    echo "device_cutlass: no CUTLASS headers (no .whl/nvidia_cutlass-*.whl): the scan builds without TMA staging"
  fi
fi
