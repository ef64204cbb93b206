#!/usr/bin/env bash
# Best top-1 so far ("Best Acc@1 so far") of the runs whose train.log path matches every pattern.
# usage: ./top1acc_sofar.sh [pattern ...]    e.g. ./top1acc_sofar.sh inaturalist18
exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/tools/acc1.sh" sofar "$@"
