#!/usr/bin/env bash
# Final top-1 ("Top-1 test accuracy") of the runs whose train.log path matches every pattern.
# usage: ./top1acc_final.sh [pattern ...]    e.g. ./top1acc_final.sh cifar100 cat5
exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/tools/acc1.sh" final "$@"
