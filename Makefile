# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test setup

setup: $(VENV)/.edgeatp-installed

$(VENV)/.edgeatp-installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh $(VENV)

demo: setup
	$(VENV)/bin/edgeatp discover --out edgeatp-out

test: setup
	$(VENV)/bin/python -m pytest tests
