# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing, with torch pinned to the CPU wheel this project is tested on.
PYTHON ?= python3
VENV := .venv
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench-kd-loss bench-teacher bench-backends config-reference clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m megadistill demo

# The layering contract first (pyproject.toml [tool.importlinter]; seconds), then the tests.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q tests

bench-kd-loss: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python bench/kd_loss.py --reps 7

bench-teacher: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/python bench/teacher_overhead.py --steps 10

bench-backends: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python bench/backends.py --steps 3 --rounds 2

# Regenerate the README's config reference from the dataclass docstrings.
config-reference: $(STAMP)
	$(VENV)/bin/python -m megadistill.cli.readme

clean-venv:
	rm -rf $(VENV)
