#!/usr/bin/env bash
# Create ./.venv and install flowguide into it, with a CPU build of torch.
#   bash scripts/install.sh          # the library, its demo and plots
#   bash scripts/install.sh test     # ... plus the test and lint tools
# Set FLOWGUIDE_VENV to use another folder. An existing torch in the venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOWGUIDE_VENV:-.venv}"
extra="plot"
[ "${1:-}" = "test" ] && extra="dev"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    # Never pull a multi-GB CUDA build: take the CPU wheel that lies on disk where there is one,
    # otherwise PyTorch's CPU-only index.
    if ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --find-links /opt/wheels "torch==2.13.0"
    else
        "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"$py" -m pip install -q -e ".[$extra]"
echo "flowguide installed in $venv ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
