#!/usr/bin/env bash
# Download the released Time-Cat checkpoints into checkpoints/supervised_pretrain/resnet50_sfadamw/.
# Every argument goes to tools/download.py (see: tools/download.sh --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$root/tools/download.py" "$@"
