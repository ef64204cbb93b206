#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one pass (about 6 minutes on one H100), for a machine lent for a
# few minutes: the probe / subset / pretraining tests on CUDA, then tools/benchmark.py's backbone (fp32 vs bf16
# forward against the matmul peak), train (fp32 vs bf16 step) and probe (per-epoch vs cached, K-head sweep,
# --subsets all separate vs fused) sections. Run from the repository root with a CUDA torch on the path:
#
#   OUT=/some/folder scripts/device_check.sh        # default OUT: results/device_check (git-ignored)
#   OUT=/some/folder scripts/device_check.sh pipeline   # issue 21's rows instead (about 8 minutes), below
#   PYTHON=.venv/bin/python scripts/device_check.sh pipeline --cpu   # dry run of the pipeline steps without a GPU:
#       tiny sizes on the CPU, CUDA-only steps (foreach on CUDA, --compile) skipped; its rows are CPU rows, never
#       GPU numbers: they only show that every step runs and writes its rows
#
# The device machine has no network. `pipeline` needs simplejpeg for its --decoder turbo rows: carry its wheels
# (device tool: carry ["results/wheels"]; the machine's python3 is 3.12, 2026-11), downloaded here with
#   python3 -m pip download simplejpeg==1.9.0 --only-binary=:all: --platform manylinux2014_x86_64 \
#     --python-version 3.12 --no-deps -d results/wheels
# Without the folder (or a wheel that installs) the turbo rows are skipped and summary.txt says so.
#
# Each step has its own time limit and log ($OUT/<step>.log, gathered into $OUT/logs.txt at the end: a device call
# brings back 8 files at most); $OUT/summary.txt gets one line per step and $OUT/benchmarks.md the benchmark rows,
# to be copied into docs/benchmarks.md (pipeline: also rates.txt, the rates and Figure 2's hours in short). Two ranks of NCCL need two GPUs:
# on a one-GPU machine that check is reported as skipped.
set -u
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
OUT=${OUT:-results/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

bundle_logs() {  # a device call brings back 8 files at most: the step logs become one file, logs.txt
  for f in "$OUT"/*.log; do [[ -e $f ]] && { echo "===== $(basename "$f")"; cat "$f"; }; done >"$OUT/logs.txt"
  rm -f "$OUT"/*.log
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
  "$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)',
*(torch.cuda.get_device_name(0),) if torch.cuda.is_available() else ('(no GPU visible)',))"
} | tee "$OUT/summary.txt"

if [[ ${1:-} == pipeline ]]; then
  # Issue 21 (data pipeline and compiled steps), one call of at most ~8.5 minutes on one H100/H200 with 16 CPU
  # cores (step limits sum to 470 s; run it with a timeout of 540 s or more): CPU decode per core and DataLoader
  # workers 1 -> 15 (data); nvJPEG decode in batches (gpu_decode); JPEG -> pretraining step and JPEG -> feature
  # extraction next to synthetic batches (e2e) at fp32/TF32 and bf16, eager and --compile (CUDA graphs), with the
  # machine's CPUs as DataLoader workers; Figure 2's cost from each e2e row's rates (cost); the foreach optimizer
  # update on CUDA.
  CPU_DRY=0
  [[ ${2:-} == --cpu ]] && CPU_DRY=1
  TURBO=1
  if ! "$PY" -c "import simplejpeg" 2>/dev/null; then  # into a folder of its own: no system site-packages touched
    if [[ -d results/wheels ]] && "$PY" -m pip install -q --no-index --no-deps --find-links results/wheels \
        --target /tmp/timecat_pydeps simplejpeg >"$OUT/pip.log" 2>&1; then
      export PYTHONPATH=$PYTHONPATH:/tmp/timecat_pydeps
    else
      TURBO=0
    fi
  fi
  if [[ $TURBO == 1 ]] && ! "$PY" -c "import simplejpeg" 2>/dev/null; then TURBO=0; fi
  [[ $TURBO == 0 ]] && echo "simplejpeg: not importable and no installable wheel in results/wheels (carry it; see" \
    "$OUT/pip.log): the --decoder turbo / --fast_transforms rows are skipped" | tee -a "$OUT/summary.txt"
  turbo() {  # turbo NAME SECONDS COMMAND...: a step that needs simplejpeg
    if [[ $TURBO == 1 ]]; then step "$@"; else echo "$1: skipped (no simplejpeg)" | tee -a "$OUT/summary.txt"; fi
  }
  gpu() {  # gpu NAME SECONDS COMMAND...: a step with no CPU dry run (CUDA kernels, or compilation)
    if [[ $CPU_DRY == 0 ]]; then step "$@"; else echo "$1: skipped (--cpu dry run)" | tee -a "$OUT/summary.txt"; fi
  }
  JPEGS=${JPEGS:-/tmp/timecat_e2e_jpegs}  # generated once by the first e2e call, reused by the others
  E2E=("$PY" tools/benchmark.py e2e --record "$OUT/benchmarks.md" --jpeg_dir "$JPEGS")
  DATA=("$PY" tools/benchmark.py data --record "$OUT/benchmarks.md" --quick --images 200 --no-probe --workers 1 2 4 8 15)
  GPU_DECODE=("$PY" tools/benchmark.py gpu_decode --record "$OUT/benchmarks.md")
  if [[ $CPU_DRY == 1 ]]; then
    E2E+=(--device cpu --arch resnet18 --img_size 32 --batch_size 4 --steps 1 --workers 1)
    DATA=("$PY" tools/benchmark.py data --record "$OUT/benchmarks.md" --quick --no-probe --workers 1 2)
    GPU_DECODE+=(--device cpu --quick --images 8 --batch_size 4)
  fi
  gpu foreach_cuda 30 "$PY" - <<'PY'
import torch
from util.sfadamw import AlgoPerfAdamWScheduleFree
from models import build_backbone
models = [build_backbone("resnet18", 10).cuda() for _ in range(2)]
models[1].load_state_dict(models[0].state_dict())
opts = [AlgoPerfAdamWScheduleFree(m.parameters(), lr=0.01, weight_decay=0.08, warmup_steps=3, foreach=f)
        for m, f in zip(models, (False, True))]
for o in opts:
    o.train()
g = torch.Generator(device="cuda").manual_seed(0)
for _ in range(20):
    x, y = torch.randn(8, 3, 32, 32, device="cuda", generator=g), torch.randint(0, 10, (8,), device="cuda", generator=g)
    for m, o in zip(models, opts):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        o.zero_grad()
same = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
diff = max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters()))
print(f"sfadamw foreach vs per-parameter on CUDA after 20 steps: bit-identical {same}, max abs diff {diff:.3g}")
PY
  step data 60 "${DATA[@]}"  # without simplejpeg it times the other paths and says so
  step gpu_decode 40 "${GPU_DECODE[@]}"
  step e2e_tf32_pil 60 "${E2E[@]}" --tf32
  turbo e2e_bf16_fast 40 "${E2E[@]}" --precision bf16 --decoder turbo --fast_transforms --sf_foreach
  # the compiled steps read through the fastest reference-equal decoder there is here (turbo, else pil)
  DEC=(--decoder pil)
  [[ $TURBO == 1 ]] && DEC=(--decoder turbo)
  gpu e2e_bf16_compile 110 "${E2E[@]}" --precision bf16 --compile --sf_foreach "${DEC[@]}"
  gpu e2e_tf32_compile 110 "${E2E[@]}" --tf32 --compile --sf_foreach "${DEC[@]}"
  step cost 20 "$PY" tools/benchmark.py cost --from_e2e "$OUT/benchmarks.md"
  grep -h "img/s\|h =\|GPU-hours\| h$" "$OUT"/e2e_*.log "$OUT/cost.log" >"$OUT/rates.txt" 2>/dev/null
  rm -rf "$JPEGS"
  bundle_logs
  exit 0
fi

# the tests whose code paths change on a GPU: device placement, autocast, non_blocking copies, cuda seeding
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -n 8 --basetemp /tmp/device_check_tests \
  tests/test_probe.py tests/test_subsets.py tests/test_fast_probe.py tests/test_batch_sources.py \
  tests/test_pretrain.py tests/test_analysis.py -k "not two_processes"
step backbone 80 "$PY" tools/benchmark.py backbone --record "$OUT/benchmarks.md"
step train 80 "$PY" tools/benchmark.py train --record "$OUT/benchmarks.md"
step probe 150 "$PY" tools/benchmark.py probe --epochs 10 --record "$OUT/benchmarks.md"
if [[ $("$PY" -c "import torch; print(torch.cuda.device_count())") -ge 2 ]]; then
  step nccl 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed_probe.py tests/test_subsets.py -k two_processes
else
  echo "nccl: skipped, one GPU (two NCCL ranks cannot share a GPU)" | tee -a "$OUT/summary.txt"
fi
bundle_logs
