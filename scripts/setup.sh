#!/usr/bin/env bash
# Create a virtualenv with CPU torch 2.13.0 (installed first, so nothing pulls a CUDA build),
# edgeatp and its test extras on a pinned TransformerLens, and make sure graphviz's `dot` is on the
# machine. Usage: setup.sh [VENV] [TL], TL = 3 (default: 3.9.0, HookedTransformer, what the whole
# test suite runs on) or 4 (4.3.0, TransformerBridge only, for the backend-agreement suite).
# --no-compile: Python compiles the modules edgeatp imports on first use, not all of torch's and
# transformers' up front (most of the install's CPU time: 117 s -> 40 s for torch and TransformerLens).
set -euo pipefail
VENV="${1:-.venv}"
case "${2:-3}" in
    3) TL="transformer-lens==3.9.0" ;;
    4) TL="transformer-lens==4.3.0" ;;
    *) echo "setup.sh: unknown TransformerLens line '${2}'; use 3 or 4" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-compile torch==2.13.0 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-compile torch==2.13.0 "$TL" -e ".[test]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, transformer_lens, edgeatp" 2>/dev/null || {
    echo "setup failed: edgeatp or its dependencies did not install into $VENV" >&2; exit 1; }
if ! command -v dot >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
        (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) || echo "warning: could not apt-get install graphviz; SVG/PNG rendering will be skipped" >&2
    elif command -v sudo >/dev/null 2>&1; then
        (sudo apt-get update -qq && sudo apt-get install -y -qq graphviz >/dev/null) || echo "warning: could not install graphviz; SVG/PNG rendering will be skipped" >&2
    else
        echo "warning: graphviz's dot is missing and cannot be installed without root; SVG/PNG rendering will be skipped" >&2
    fi
fi
touch "$VENV/.edgeatp-installed"
