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

# ---------------------------------------------------------------------------------------------------- operations
# Local stack on loopback: Prefect server (basic auth), MLflow basic-auth server, a process worker on pool `cpu`,
# and `tunewright deploy`. Credentials come from the environment or the git-ignored .env (random ones are generated
# into it when absent). `make down` stops exactly the processes in .tunewright/stack/pids.
.PHONY: up down status browser-deps test-ops
up: install
	$(BIN)/python -m deployments.stack up

down:
	$(BIN)/python -m deployments.stack down

status:
	$(BIN)/python -m deployments.stack status

# What tests/test_browser.py needs: Debian's Chromium (Playwright's own browser download is not used) and the
# Playwright client. The test itself installs nothing; run this before `make test` (.ci/run does).
PLAYWRIGHT_VERSION ?= 1.65.2
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser-deps: install
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/pip install -q -c constraints.txt "playwright==$(PLAYWRIGHT_VERSION)"

# The operations tests alone (real servers, a worker, faults, a browser): about 10 minutes.
test-ops: install browser-deps
	$(BIN)/python -m pytest -q tests/test_ops.py tests/test_faults.py tests/test_security.py tests/test_browser.py
