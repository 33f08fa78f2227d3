#!/usr/bin/env bash
# Create the virtual environment when it is missing and install storydiff into it, with what this
# machine needs: torch first — the CUDA build where an NVIDIA GPU is, the CPU build elsewhere — so
# pip never pulls gigabytes of CUDA wheels onto a CPU-only box. Safe to run again.
#   PYTHON=python3.11 VENV=.venv TORCH_CPU_INDEX=https://... bash scripts/setup-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# The torch range the package declares, so both installs agree.
TORCH=$(grep -o '"torch[^"]*"' pyproject.toml | head -n 1 | tr -d '"')

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "installing $TORCH (CUDA build: an NVIDIA GPU is present)"
        "${pip[@]}" install -q "$TORCH"  # PyPI's Linux wheels are the CUDA build
    else
        echo "installing $TORCH (CPU build)"
        # Short timeout: a machine that cannot reach the CPU index (a local mirror) still finds
        # the CPU wheel its pip configuration serves.
        "${pip[@]}" install -q --timeout 20 --retries 1 --index-url "$TORCH_CPU_INDEX" "$TORCH" ||
            "${pip[@]}" install -q "$TORCH"
    fi
fi
echo "installing storydiff (editable) with its test tools"
"${pip[@]}" install -q -e ".[dev]"
