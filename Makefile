# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; every install goes through constraints.txt so torch stays the CPU build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup html student clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,notebooks]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffugts demo

# One worker per core, a test file on one worker (tests/conftest.py keeps each worker to one thread).
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests ran" >&2; fi; exit $$status

# Every notebook executed (full size, about 15 min on two cores) as an HTML page to read without a kernel.
html: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/diffugts notebooks --html docs/notebooks

# Student copies: exercise answers taken out, checks locked (nbgrader).
student: $(STAMP)
	$(BIN)/diffugts notebooks --student student

clean-venv:
	rm -rf $(VENV)
