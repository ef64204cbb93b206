#!/usr/bin/env bash
# Top-1 accuracy of the runs under $CAT_EXP_HOME/results whose train.log path matches every pattern.
# usage: tools/acc1.sh final|sofar [pattern ...]   (called by top1acc_final.sh and top1acc_sofar.sh)
set -euo pipefail
mode=$1
shift
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
home="${CAT_EXP_HOME:-$here}"
root="$home/results"
case "$mode" in
  final) wanted='Top-1 test accuracy: [0-9.]*' ;;
  sofar) wanted='Best Acc@1 so far [0-9.]*' ;;
  *) echo "error: mode must be final or sofar" >&2; exit 2 ;;
esac
if [ ! -d "$root" ]; then
  echo "error: no results folder $root (set CAT_EXP_HOME to the project folder)" >&2
  exit 1
fi

logs=$(find "$root" -type f -name train.log | sort)
for pattern in "$@"; do
  logs=$(printf '%s\n' "$logs" | grep -e "$pattern" || true)
done
if [ -z "$logs" ]; then
  echo "no train.log under $root matches: $*" >&2
  exit 1
fi

while IFS= read -r log; do
  epoch=$(grep -o 'Epoch\[[0-9]*\]' "$log" | tail -n 1 || true)
  accuracy=$(grep -o "$wanted" "$log" | tail -n 1 || true)
  printf '%s\t%s\t%s\n' "${log#"$home"/}" "${epoch:-Epoch[-]}" "${accuracy:-(no result yet)}"
done <<< "$logs"
