#!/usr/bin/env bash
# Set up the project on a fresh machine: uv, then the locked environment in .venv (Python from .python-version),
# installed with compiled bytecode, and the torch build that fits this machine's NVIDIA driver.
# Safe to run again. Changes nothing outside this folder: the system Python is never modified (PEP 668 safe).
#
#   ./setup.sh                  # auto: the lock's torch (CUDA 13) unless nvidia-smi reports an older driver
#   ./setup.sh --cuda cu126     # force a build (or CUDA=cu126): locked | cpu | cu126 | cu128 | cu130
#                               # (all but locked from download.pytorch.org): on a login node without a GPU, the
#                               # build of the GPU nodes' driver (nvidia-smi there: >= 580 cu130/locked,
#                               # >= 570 cu128, >= 525 cu126)
#   ./setup.sh --detect-cuda    # print the build auto would choose, and why; install nothing
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"

# The torch build a driver can run (CUDA's minor-version compatibility: 13.x needs driver >= 580,
# 12.8 >= 570 for its full feature set, 12.x >= 525). No nvidia-smi: the lock's build (it also runs on CPUs).
detect_cuda() {
  local driver major
  if ! command -v nvidia-smi >/dev/null 2>&1; then echo "locked no nvidia-smi: the lock's build"; return; fi
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  major=${driver%%.*}
  if [[ ! $major =~ ^[0-9]+$ ]]; then echo "locked nvidia-smi gave no driver version: the lock's build"; return; fi
  if (( major >= 580 )); then echo "locked driver $driver runs the lock's CUDA 13 build"
  elif (( major >= 570 )); then echo "cu128 driver $driver is older than CUDA 13 needs (580)"
  elif (( major >= 525 )); then echo "cu126 driver $driver is older than CUDA 12.8 needs (570)"
  else echo "none driver $driver is older than any supported CUDA build needs (525): update the driver"; fi
}

choice=${CUDA:-auto}
while (( $# )); do
  case $1 in
    --detect-cuda) detect_cuda; exit 0 ;;
    --cuda) [[ $# -ge 2 ]] || { echo "error: --cuda needs a build: locked, cpu, cu126, cu128, cu130 or auto" >&2; exit 2; }
            choice=$2; shift 2 ;;
    --cuda=*) choice=${1#--cuda=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "error: unknown argument $1 (./setup.sh [--cuda locked|cpu|cu126|cu128|cu130|auto] [--detect-cuda])" >&2
       exit 2 ;;
  esac
done
no_driver_note=""
if [[ $choice == auto ]]; then
  read -r choice why < <(detect_cuda); echo "setup: torch build $choice ($why)"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    no_driver_note="setup: no NVIDIA driver on this machine (no nvidia-smi), so this is the lock's build (CUDA 13): \
on GPU nodes it needs driver >= 580. If the jobs run on older drivers (nvidia-smi on a GPU node), rerun with \
./setup.sh --cuda cu128 (driver >= 570) or --cuda cu126 (>= 525); --cuda cpu for CPU-only machines."
  fi
fi
case $choice in
  locked|cpu|cu126|cu128|cu130) ;;
  none) echo "error: NVIDIA driver too old for any supported torch build; update it or use --cuda cpu" >&2; exit 2 ;;
  *) echo "error: CUDA=$choice is not one of locked, cpu, cu126, cu128, cu130 (or auto)" >&2; exit 2 ;;
esac

# uv: on PATH, as a module, a previous bootstrap in .uv/, else bootstrapped into .uv/ (never the system Python)
bootstrap_uv() {
  if python3 -m venv .uv >/dev/null 2>&1 && .uv/bin/python -m pip install --quiet uv 2>/dev/null; then return; fi
  echo "setup: no venv/pip here; fetching uv's wheel from PyPI"  # e.g. Debian without python3-venv
  rm -rf .uv && mkdir -p .uv/bin && python3 - <<'PY'
import hashlib, io, json, platform, urllib.parse, urllib.request, zipfile
index = "https://pypi.org/pypi/uv/json"
arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}[platform.machine().lower()]
files = json.load(urllib.request.urlopen(index, timeout=60))["urls"]
wheel = next(f for f in files if "manylinux" in f["filename"] and f["filename"].endswith(f"_{arch}.whl"))
data = urllib.request.urlopen(urllib.parse.urljoin(index, wheel["url"]), timeout=300).read()
assert hashlib.sha256(data).hexdigest() == wheel["digests"]["sha256"], "uv wheel: sha256 mismatch"
with zipfile.ZipFile(io.BytesIO(data)) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/uv"))
    open(".uv/bin/uv", "wb").write(z.read(name))
PY
  chmod +x .uv/bin/uv
}
if command -v uv >/dev/null 2>&1; then uv=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then uv=(python3 -m uv)
else
  [[ -x .uv/bin/uv ]] || bootstrap_uv
  uv=(.uv/bin/uv)
fi

# --locked: exactly uv.lock, for the Python of .python-version; the dev group (pytest) and the plot extra.
# --compile-bytecode: processes start without recompiling torch's sources (PYTHONDONTWRITEBYTECODE, read-only
# installs on clusters), several seconds saved per start.
"${uv[@]}" sync --locked --all-extras --compile-bytecode --quiet
if [[ $choice != locked ]]; then
  # same torch/torchvision versions as the lock, another build; `uv run`/`uv sync` would restore the lock's build:
  # run .venv/bin/python (the scripts and sbatch files do)
  versions=$(.venv/bin/python -c "from importlib.metadata import version as v; print(*(f'{p}=={v(p).split(\"+\")[0]}' for p in ('torch', 'torchvision')))")
  # shellcheck disable=SC2086
  "${uv[@]}" pip install --quiet --python .venv/bin/python --compile-bytecode --torch-backend "$choice" \
    --reinstall-package torch --reinstall-package torchvision $versions
fi
.venv/bin/python -c "import torch, torchvision, schedulefree; print(f'setup: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')"
echo "setup: done. Activate with: source .venv/bin/activate   (or run .venv/bin/python ...)"
if [[ -n $no_driver_note ]]; then echo "$no_driver_note"; fi
