# Two commands for a fresh machine: `make demo` (the main job) and `make test` (ruff, mypy, pytest).
# Both create .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean docs paper notebooks

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# A real swarm on this machine: a tracker and 6 peer processes on MNIST with logistic regression and
# learned trust; a live table while it runs, then a summary, summary.json and plots in runs/demo.
DEMO_ROUNDS ?= 30
demo: $(STAMP)
	rm -rf runs/demo
	mkdir -p runs/demo
	$(BIN)/fedtorrent create --output runs/demo/session.torrent --dataset mnist --model logreg \
		--nodes 6 --mixing learned --cohort 3 --rounds $(DEMO_ROUNDS)
	$(BIN)/fedtorrent swarm runs/demo/session.torrent --peers 6 --out runs/demo

# Re-execute the companion notebooks at full size, one at a time, saving their outputs
# (notebooks/README.md); datasets come from $FEDTORRENT_DATA.
notebooks: $(STAMP)
	nice -n 19 $(BIN)/python notebooks/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments examples paper notebooks
	$(BIN)/ruff format --check src tests benchmarks experiments examples paper notebooks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# docs/cli.md, the command reference, from the Typer app (tests/test_cli_docs.py fails when stale).
docs: $(STAMP)
	$(BIN)/python -m fedtorrent.cli.docs

# paper/fedtorrent.pdf from paper/fedtorrent.typ and the committed results (paper/build.py).
paper: $(STAMP)
	$(BIN)/python paper/build.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
