# The two set-up commands of the README: `make demo` and `make test`; `make test-tl4` adds the
# backend-agreement suite on TransformerLens 4 in a second virtualenv (CI runs both).
VENV ?= .venv
VENV_TL4 ?= .venv-tl4
# Test processes (pytest-xdist, one torch thread each): the machine's cores, at most 4.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test setup setup-tl4 test-tl4

setup: $(VENV)/.edgeatp-installed

$(VENV)/.edgeatp-installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh $(VENV) 3

setup-tl4: $(VENV_TL4)/.edgeatp-installed

$(VENV_TL4)/.edgeatp-installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh $(VENV_TL4) 4

demo: setup
	$(VENV)/bin/edgeatp discover --out edgeatp-out

test: setup
	$(VENV)/bin/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

# TransformerLens 4 has no HookedTransformer: the reference results come from $(VENV)'s Python
test-tl4: setup setup-tl4
	EDGEATP_REFERENCE_PYTHON=$(VENV)/bin/python $(VENV_TL4)/bin/python -m pytest tests/test_backends.py \
		-n $(TEST_WORKERS)
