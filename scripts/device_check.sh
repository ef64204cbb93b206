#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one pass (about 6 minutes on one H100), for a machine lent for a
# few minutes: the probe / subset / pretraining tests on CUDA, then tools/benchmark.py's backbone (fp32 vs bf16
# forward against the matmul peak), train (fp32 vs bf16 step) and probe (per-epoch vs cached, K-head sweep,
# --subsets all separate vs fused) sections. Run from the repository root with a CUDA torch on the path:
#
#   OUT=/some/folder scripts/device_check.sh        # default OUT: results/device_check (git-ignored)
#   OUT=/some/folder scripts/device_check.sh pipeline   # issue 21's rows instead (about 8 minutes), below
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

if [[ ${1:-} == pipeline ]]; then
  # Issue 21 (data pipeline and compiled steps), one call of at most ~8 minutes on one H100/H200 with 16 CPU cores
  # (step limits sum to 470 s; run it with a timeout of 540 s or more):
  # nvJPEG decode in batches; JPEG -> pretraining step and JPEG -> feature extraction next to synthetic batches
  # (tools/benchmark.py e2e; each prints Figure 2's cost from its measured rates) at fp32/TF32 and bf16, eager and
  # --compile (CUDA graphs), with the machine's CPUs as DataLoader workers; the foreach optimizer update on CUDA.
  # --decoder turbo needs simplejpeg: installed from results/wheels (carry it: `pip download simplejpeg
  # --only-binary=:all: -d results/wheels`) when the machine's Python lacks it.
  if ! "$PY" -c "import simplejpeg" 2>/dev/null; then  # into a folder of its own: no system site-packages touched
    "$PY" -m pip install -q --no-index --find-links results/wheels --target /tmp/timecat_pydeps simplejpeg \
      >"$OUT/pip.log" 2>&1 || echo "simplejpeg: not installable here (see $OUT/pip.log)" | tee -a "$OUT/summary.txt"
    export PYTHONPATH=$PYTHONPATH:/tmp/timecat_pydeps
  fi
  JPEGS=${JPEGS:-/tmp/timecat_e2e_jpegs}  # generated once by the first e2e call, reused by the others
  E2E=("$PY" tools/benchmark.py e2e --record "$OUT/benchmarks.md" --jpeg_dir "$JPEGS")
  step foreach_cuda 30 "$PY" - <<'PY'
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
  step gpu_decode 40 "$PY" tools/benchmark.py gpu_decode --record "$OUT/benchmarks.md"
  step e2e_tf32_pil 60 "${E2E[@]}" --tf32
  step e2e_tf32_turbo 40 "${E2E[@]}" --tf32 --decoder turbo
  step e2e_bf16_turbo 40 "${E2E[@]}" --precision bf16 --decoder turbo
  step e2e_bf16_fast 40 "${E2E[@]}" --precision bf16 --decoder turbo --fast_transforms --sf_foreach
  step e2e_bf16_turbo_compile 110 "${E2E[@]}" --precision bf16 --decoder turbo --compile --sf_foreach
  step e2e_tf32_turbo_compile 110 "${E2E[@]}" --tf32 --decoder turbo --compile --sf_foreach
  grep -h "img/s\|h =\|GPU-hours\| h$" "$OUT"/e2e_*.log >"$OUT/rates.txt" 2>/dev/null
  rm -rf "$JPEGS"
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
