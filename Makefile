# tunewright — make install | demo | test | lock | up | down
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lock clean

$(BIN)/tunewright: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch: any other torch spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@touch $@

install: $(BIN)/tunewright

demo: install
	$(BIN)/tunewright run pipelines/configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Re-lock after changing dependencies in pyproject.toml: exact versions of the whole installed set.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

clean:
	rm -rf .tunewright
