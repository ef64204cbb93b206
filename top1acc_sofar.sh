#!/usr/bin/env bash
# Best top-1 so far ("Best Acc@1 so far") of the probe runs whose train.log path matches every pattern, printed as
# the original's top1acc_sofar.sh prints it (tools/acc1.sh; --table: one line per run).
# usage: ./top1acc_sofar.sh [--table] [pattern ...]    e.g. ./top1acc_sofar.sh inaturalist18
CAT_EXP_HOME="${CAT_EXP_HOME:-$(dirname "$0")}" exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/tools/acc1.sh" \
  sofar "$@"
