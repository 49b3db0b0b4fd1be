# spade-edge developer tasks. `make install test lint` is what CI (.ci/run) does.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-all lint fuzz demo bench wheel-check device-check device-prepare clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[export,serve,dev,station,camera,genicam,openvino]' -e tools

test:
	$(BIN)/python -m pytest -q

test-all:
	$(BIN)/python -m pytest -q -m "not fuzz or fuzz"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python scripts/typecheck.py

fuzz:
	$(BIN)/python -m pytest -q -m fuzz

demo: $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[export]'
	$(BIN)/spade-demo --out demo_out

bench:
	$(BIN)/spade-bench

wheel-check:
	bash .ci/wheel_check.sh

device-prepare:
	bash scripts/prepare_device.sh

device-check:
	bash scripts/device_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache demo_out
