#!/usr/bin/env bash
# Top-1 accuracy of the probe runs whose train.log path matches every pattern, printed as the original's
# top1acc_final.sh / top1acc_sofar.sh print it (so scripts that read their output keep working):
#   filtering for: , pattern1, pattern2        (only when patterns are given)
#   then per run: the log's path, its last Epoch[k] with k >= 1, the last result line (each line absent when the
#   log has none yet), in find's order.
# Searched: the original's folder results/supervised/imagenet/transfer/, then this project's default probe folder
# results/probe/ (arguments/linear_probe.py, RESULTS_ROOT), both under $CAT_EXP_HOME (default: the folder of the
# calling script); never results/pretrain/ (pretraining logs also write "Top-1 test accuracy").
# --table (or ACC1_TABLE=1): one tab-separated line per run instead: path, last Epoch[k], result.
# usage: tools/acc1.sh final|sofar [--table] [pattern ...]   (called by top1acc_final.sh and top1acc_sofar.sh)
set -uo pipefail
mode=$1
shift
table="${ACC1_TABLE:-0}"
if [ "${1:-}" = "--table" ]; then
  table=1
  shift
fi
home="${CAT_EXP_HOME:-$(dirname "$(dirname "$0")")}"
case "$mode" in
  final) wanted='Top-1 test accuracy: [0-9]\+\.[0-9]\+' ;;
  sofar) wanted='Best Acc@1 so far [0-9]\+\.[0-9]\+' ;;
  *) echo "error: mode must be final or sofar" >&2; exit 2 ;;
esac
roots=()
for root in "$home/results/supervised/imagenet/transfer/" "$home/results/probe/"; do
  [ -d "$root" ] && roots+=("$root")
done
if [ "${#roots[@]}" -eq 0 ]; then
  echo "error: no probe results under $home/results (supervised/imagenet/transfer/ or probe/); set CAT_EXP_HOME" \
       "to the project folder" >&2
  exit 1
fi

if [ "$#" -gt 0 ] && [ "$table" = 0 ]; then
  filters=""
  for pattern in "$@"; do
    filters="$filters, $pattern"
  done
  echo "filtering for: $filters"
fi
find "${roots[@]}" -type f -name train.log | while IFS= read -r log; do
  for pattern in "$@"; do  # every pattern, a grep regular expression, must match the path
    printf '%s\n' "$log" | grep -aq -- "$pattern" || continue 2
  done
  epoch=$(grep -a -io 'Epoch\[[1-9][0-9]*\]' "$log" | tail -n 1)
  result=$(grep -a -o "$wanted" "$log" | tail -n 1)
  if [ "$table" = 0 ]; then
    echo "$log"
    if [ -n "$epoch" ]; then echo "$epoch"; fi
    if [ -n "$result" ]; then echo "$result"; fi
  else
    printf '%s\t%s\t%s\n' "${log#"$home"/}" "${epoch:-Epoch[-]}" "${result:-(no result yet)}"
  fi
done
