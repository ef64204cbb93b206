#!/usr/bin/env bash
# A real one-node slurm on this machine, for the cluster tests and for trying the cluster path before a cluster:
#   scripts/local_slurm.sh start     # install slurm-wlm + munge if missing (root, apt-get), configure, start, wait idle
#   eval "$(scripts/local_slurm.sh env)"   # then sbatch / squeue / scancel / scontrol talk to it
#   scripts/local_slurm.sh status    # exit 0 when it answers and its node is up
#   scripts/local_slurm.sh stop      # cancels its jobs, stops exactly the daemons it started
# Everything lives in one folder of its own, $TIMECAT_SLURM_DIR (default /tmp/timecat-slurm): slurm.conf, a munge
# key and socket, state, logs, and the pids of the daemons it started. Nothing in /etc is written. `start` on a
# running instance is a no-op, so several test runs share one. Ports: $TIMECAT_SLURM_PORT (slurmctld, default 6817)
# and the next one (slurmd).
# The node is this machine: CPUs and memory as `slurmd -C` sees them, no GPUs (jobs ask --gpus-per-node=0). Timings
# are short for tests: the scheduler runs every 5 s, a requeued job is eligible again after cred_expire + 1 = 11 s
# (slurm's default is 121 s), KillWait (SIGTERM -> SIGKILL) is 30 s as on most clusters.
set -euo pipefail

DIR=${TIMECAT_SLURM_DIR:-/tmp/timecat-slurm}
PORT=${TIMECAT_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin  # slurmctld, slurmd, munged live in sbin, which a user's PATH may lack
DAEMONS=(munged slurmctld slurmd)

die() { echo "error: $*" >&2; exit 2; }
say() { echo "local_slurm: $*" >&2; }

missing() {
    local name
    for name in sbatch srun scontrol scancel squeue sinfo slurmctld slurmd munged; do
        command -v "$name" >/dev/null || { echo "$name"; return 0; }
    done
    return 1
}

install() {
    # Debian/Ubuntu's packages: slurm-wlm (slurmctld, slurmd, the client commands) and munge (authentication).
    [[ $(id -u) == 0 ]] || die "slurm is not installed ($(missing) missing) and installing it needs root:" \
        "sudo apt-get install slurm-wlm munge, then rerun"
    command -v apt-get >/dev/null || die "slurm is not installed ($(missing) missing) and this system has no" \
        "apt-get: install slurm (slurmctld, slurmd, client commands) and munge with its package manager"
    say "installing slurm-wlm and munge with apt-get"
    # The packages' scripts would start system-wide daemons without a configuration; a policy-rc.d that answers
    # "not now" (101) keeps them stopped while installing (it is removed after, if it was ours).
    local policy=/usr/sbin/policy-rc.d ours=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && ours=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge; } >&2 || rc=$?
    [[ -z $ours ]] || rm -f "$policy"
    [[ $rc == 0 ]] || die "apt-get install slurm-wlm munge failed (exit $rc); see the lines above"
    ! missing >/dev/null || die "after apt-get install slurm-wlm munge, $(missing) is still not on PATH"
}

pid_alive() { [[ -s $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

answers() {
    # slurmctld answers and the node is usable (idle, mixed or allocated)
    local state
    state=$(timeout 10 sinfo -h -N -o %t 2>/dev/null | head -n1) || return 1
    [[ $state =~ ^(idle|mix|alloc|comp) ]]
}

running() {
    local daemon
    for daemon in "${DAEMONS[@]}"; do pid_alive "$daemon" || return 1; done
    answers
}

write_config() {
    local node host cores mem user
    host=$(hostname -s)
    # the machine as slurmd sees it; RealMemory a little under the total, or slurmd's own count drains the node
    node=$(slurmd -C | head -n1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node")
    node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/; s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" \
        <<< "$node")
    user=$(id -un)
    cat > "$CONF.tmp" <<EOF
# written by scripts/local_slurm.sh: a one-node slurm on this machine, short timings for tests
ClusterName=timecat
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_daemon() {
    # $1 name, then the command; run in the foreground of its own session, so it outlives this script and its
    # pid is the one recorded
    local name=$1; shift
    setsid "$@" >> "$DIR/log/$name.out" 2>&1 < /dev/null 9>&- &  # 9: the lock, not for the daemons to hold
    echo $! > "$DIR/$name.pid"
}

wait_for() {
    # $1 seconds, $2 what, then the test command
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

start() {
    if missing >/dev/null; then install; fi
    mkdir -p "$DIR"
    exec 9> "$DIR/lock"
    flock 9  # two test runs starting at once: the second waits, then finds it running
    if running; then
        say "already running ($CONF)"
        return 0
    fi
    stop_daemons
    mkdir -p "$DIR"/{munge,state,spool,log}
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
                                       chmod 600 "$DIR/munge/munge.key"; }
    write_config
    start_daemon munged munged --foreground --force --socket="$DIR/munge/munge.socket" \
        --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 20 munge test -S "$DIR/munge/munge.socket" ||
        die "munged did not start; see $DIR/log/munged.out and $DIR/log/munged.log"
    start_daemon slurmctld slurmctld -D -f "$CONF"
    wait_for 30 slurmctld bash -c 'timeout 5 scontrol ping 2>/dev/null | grep -q UP' ||
        die "slurmctld did not start; see $DIR/log/slurmctld.log"
    start_daemon slurmd slurmd -D -f "$CONF"
    if ! wait_for 60 node answers; then
        die "the node did not become idle within 60 s ($(sinfo -h -N -o '%t %E' 2>&1 | head -n1));" \
            "see $DIR/log/slurmd.log"
    fi
    say "started ($(sinfo -h -N -o '%N %c CPUs %m MB, %t'))"
    say "use it with: export SLURM_CONF=$CONF"
}

stop_daemons() {
    # in reverse order; SIGTERM, then SIGKILL after 30 s
    local i name pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        if pid_alive "$name"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid" 2>/dev/null || true
            wait_for 30 "$name" bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
}

stop() {
    [[ -d $DIR ]] || { say "not running ($DIR does not exist)"; return 0; }
    exec 9> "$DIR/lock"
    flock 9
    if pid_alive slurmctld; then
        # its jobs first, so no job step outlives the daemons that watch it
        local jobs
        jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            wait_for 45 jobs bash -c '[[ -z $(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null) ]]' || true
        fi
    fi
    stop_daemons
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        if running; then echo "running: SLURM_CONF=$CONF"; sinfo -N; else echo "not running ($DIR)"; exit 1; fi ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    install) install ;;
    *) die "usage: scripts/local_slurm.sh start|stop|status|env|install" ;;
esac
