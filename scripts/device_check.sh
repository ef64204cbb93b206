#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one pass (about 6 minutes on one H100), for a machine lent for a
# few minutes: the probe / subset / pretraining tests on CUDA, then tools/benchmark.py's backbone (fp32 vs bf16
# forward against the matmul peak), train (fp32 vs bf16 step) and probe (per-epoch vs cached, K-head sweep,
# --subsets all separate vs fused) sections. Run from the repository root with a CUDA torch on the path:
#
#   OUT=/some/folder scripts/device_check.sh        # default OUT: results/device_check (git-ignored)
#
# Each step has its own time limit and log ($OUT/<step>.log); $OUT/summary.txt gets one line per step and
# $OUT/benchmarks.md the benchmark rows, to be copied into docs/benchmarks.md. Two ranks of NCCL need two GPUs:
# on a one-GPU machine that check is reported as skipped.
set -u
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
OUT=${OUT:-results/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
} | tee "$OUT/summary.txt"

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
