# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing, with torch pinned to the CPU wheel this project is tested on.
#
# The version matrix: `make test MCORE=0.19.2` runs the same checks against another megatron-core
# release, in its own virtualenv .venv-mcore-0.19.2 (same torch pin, the project and its dev
# extras). Releases from 0.17 on declare Requires-Python >= 3.12, but their cp311 wheels run on
# this project's Python 3.11: they are installed with --ignore-requires-python (and their
# dependencies, which the project's own install brings, resolved for 3.11), together with triton,
# which their MoE code imports at module load. On Python 3.12 a plain
# `pip install megatron-core==X` does the same. Without MCORE, everything is as before (.venv).
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
MCORE ?=
ifeq ($(strip $(MCORE)),)
VENV := .venv
else
VENV := .venv-mcore-$(MCORE)
endif
STAMP := $(VENV)/.installed

.PHONY: demo test gpu-check bench-kd-loss bench-teacher bench-backends config-reference clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
ifneq ($(strip $(MCORE)),)
# Before the project, so that its install finds the megatron-core requirement met. Without its
# dependencies: --ignore-requires-python would let pip pick them for Python 3.12 as well (numpy).
	$(VENV)/bin/python -m pip install -q --ignore-requires-python --no-deps "megatron-core==$(MCORE)"
	$(VENV)/bin/python -m pip install -q triton "$(TORCH_PIN)"
endif
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

# GPU readiness (README, "Checking a GPU machine"): the machine's own python3 and CUDA torch, not .venv.
gpu-check:
	bash bench/gpu_check.sh $(if $(WHEELS),--wheels $(WHEELS)) $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

# Regenerate the README's config reference from the dataclass docstrings.
config-reference: $(STAMP)
	$(VENV)/bin/python -m megadistill.cli.readme

clean-venv:
	rm -rf $(VENV)
