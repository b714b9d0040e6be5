# Quick start: `make run` (set up + the main job on SynthArt) and `make test` (set up + tests).
# The virtual environment lives in .venv/; a second call reuses it (the stamp file is
# rebuilt only when pyproject.toml or constraints.txt changes). `make wheelhouse` writes every
# wheel for an offline machine (README, "GPU machines and offline installs").
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# the target of `make wheelhouse`: CPython version, wheel platform tag, packages it already has
WHEELHOUSE ?= wheelhouse
TARGET_PYTHON ?= 3.12
TARGET_PLATFORM ?= manylinux_2_28_x86_64
WITHOUT ?=

.PHONY: setup run test wheelhouse clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[test,baselines,faiss]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cir-bench run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

wheelhouse: $(STAMP)
	$(VENV)/bin/python -m cir_bench.wheelhouse --out $(WHEELHOUSE) --python-version $(TARGET_PYTHON) \
	  --platform $(TARGET_PLATFORM) $(if $(WITHOUT),--without $(WITHOUT))

clean:
	rm -rf $(VENV) runs .pytest_cache
