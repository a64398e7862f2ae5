# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (see constraints/cpu.txt); users on GPUs install the project without it.
CONSTRAINTS ?= constraints/cpu.txt
PYTEST_ARGS ?=
# `make test` lists its slowest tests: the suite must stay under 20 minutes (docs/testing.md)
DURATIONS ?= 20

.PHONY: install demo test test-fast mutants bench clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/cnc demo --out demo-output

test: install
	$(BIN)/python -m pytest --durations=$(DURATIONS) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Mutation testing of the modules where a wrong sign or a swapped argument changes images silently
# ([tool.mutmut] in pyproject.toml; not part of CI, slow: see docs/testing.md). MUTANTS narrows the
# run, e.g. MUTANTS='cnc_model.glod.composition*'.
MUTANTS ?=
mutants: install
	nice -n 10 $(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

clean:
	rm -rf demo-output .pytest_cache mutants
