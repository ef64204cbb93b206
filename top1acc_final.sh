#!/usr/bin/env bash
# Final top-1 ("Top-1 test accuracy") of the probe runs whose train.log path matches every pattern, printed as the
# original's top1acc_final.sh prints it (tools/acc1.sh; --table: one line per run).
# usage: ./top1acc_final.sh [--table] [pattern ...]    e.g. ./top1acc_final.sh cifar100 cat5
CAT_EXP_HOME="${CAT_EXP_HOME:-$(dirname "$0")}" exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/tools/acc1.sh" \
  final "$@"
