"""OpenMP settings for CPU runs, chosen before torch is imported (OpenMP reads them once, when torch loads it).

With OpenMP's default wait policy, idle threads spin for a while before sleeping; when other processes share the
cores (a second job, DataLoader workers, the other ranks of a CPU torchrun) the spinning threads steal the cores
the working ones need and a run can become several times slower (measured on the 2-core development machine: a
4-value cached sweep took 38 s beside a pretraining job, 9 s with OMP_WAIT_POLICY=PASSIVE). So, unless the user
set them: OMP_WAIT_POLICY=PASSIVE, and OMP_NUM_THREADS = the cores this process may use divided by the processes
of the job on this node. A value the user set is always kept.

Call at the very top of a script, before `import torch`:

    from util.cpu_runtime import configure_cpu_runtime
    CPU_RUNTIME = configure_cpu_runtime()   # a line to log once the logger exists

Depends on nothing of ours and imports nothing heavy.
"""
import os
import sys
from typing import NamedTuple

# launchers' count of processes on this node: torchrun, then slurm's srun
LOCAL_PROCESS_VARIABLES = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE")


class CpuRuntime(NamedTuple):
    wait_policy: str
    threads: str
    chosen: tuple  # names of the variables this module set (the others were the user's)
    line: str


def available_cores():
    """Cores this process may run on (its affinity mask, which slurm and taskset restrict), else all cores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes(env):
    """Processes of this job sharing the node's cores (1 outside a launcher)."""
    for name in LOCAL_PROCESS_VARIABLES:
        value = env.get(name, "")
        digits = value.split("(")[0].split(",")[0]  # slurm writes e.g. "4(x2)" or "4,2"
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def default_workers(env=None, cores=None):
    """DataLoader workers per process when --workers is not given: the CPUs slurm gave each task
    (SLURM_CPUS_PER_TASK), else this process's share of its affinity mask, less one for the process itself."""
    env = os.environ if env is None else env
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = int(slurm)
    else:
        cpus = (available_cores() if cores is None else cores) // local_processes(env)
    return max(1, cpus - 1)


def configure_cpu_runtime(env=None, cores=None):
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS in `env` (default os.environ) where the user has not; return
    a CpuRuntime whose .line says what was chosen and why."""
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else cores
    chosen = []
    if not env.get("OMP_WAIT_POLICY"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # idle threads sleep instead of spinning on shared cores
        chosen.append("OMP_WAIT_POLICY")
    processes = local_processes(env)
    share = cores // processes
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < share:  # slurm gave the task fewer CPUs than its affinity shows (a
        share = int(slurm)                           # cluster without CPU binding): keep to what it was given
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, share))  # never more threads than cores per process
        chosen.append("OMP_NUM_THREADS")
    why = f"chosen: {cores} cores / {processes} process(es)"
    why += f", {slurm} CPUs per slurm task" if share < cores // processes else ""
    parts = [f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} ({'chosen' if 'OMP_WAIT_POLICY' in chosen else 'user'})",
             f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} ({why if 'OMP_NUM_THREADS' in chosen else 'user'})"]
    late = "torch" in sys.modules and env is os.environ and chosen
    line = "CPU runtime: " + ", ".join(parts) + (" [torch was already imported: applies to new processes only]"
                                                 if late else "")
    return CpuRuntime(env["OMP_WAIT_POLICY"], env["OMP_NUM_THREADS"], tuple(chosen), line)
