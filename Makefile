# One command each, from a fresh machine with only Python and pip.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel lies on disk on our machines; elsewhere pip takes a normal torch.
TORCH ?= torch==2.13.0

.PHONY: venv test demo bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q "torch>=2.4,<2.15"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto tests || [ $$? -eq 5 ]

demo: $(VENV)/.installed
	$(VENV)/bin/minilora demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_cpu.py
