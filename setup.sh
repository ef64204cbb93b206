#!/usr/bin/env bash
# Set up the project on a fresh machine: uv (installed with pip if missing), then the locked environment in .venv.
# Safe to run again. Changes nothing outside this folder except installing uv for the current user.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"

if command -v uv >/dev/null 2>&1; then
  uv=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  uv=(python3 -m uv)
else
  echo "setup: installing uv with pip"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
  uv=(python3 -m uv)
fi

# --locked: install exactly uv.lock; includes the dev group (pytest) and the plot extra (matplotlib)
"${uv[@]}" sync --locked --all-extras --quiet
.venv/bin/python -c "import torch, torchvision, schedulefree; print(f'setup: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')"
echo "setup: done. Activate with: source .venv/bin/activate   (or run .venv/bin/python ...)"
