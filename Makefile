# Quick start: `make run` (set up + the main job on SynthArt) and `make test` (set up + tests).
# The virtual environment lives in .venv/; a second call reuses it (the stamp file is
# rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,baselines,faiss]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cir-bench run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
