"""Process-group setup for a plain process, torchrun or slurm's srun, and the few collectives we need."""
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from util.cli import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def first_slurm_host(nodelist):
    """First host of a slurm node list such as 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass  # scontrol is not on every compute node's PATH; the list format is simple enough to parse
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_environment(env=None):
    """(launcher, rank, world_size, local_rank) from torchrun's variables, else slurm's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    # sbatch also sets SLURM_PROCID/SLURM_NTASKS in the batch shell; only srun sets SLURM_STEP_NUM_TASKS
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return ("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                int(env.get("SLURM_LOCALID", 0)))
    return "single", 0, 1, 0


def init_distributed(debug=False, timeout_minutes=30):
    """Join the process group (nccl on GPU, gloo on CPU). --debug forces one process, as the reference does.
    timeout_minutes bounds the rendezvous and every collective: a rank whose peers never come (or died) fails
    instead of waiting forever."""
    launcher, rank, world_size, local_rank = ("single", 0, 1, 0) if debug else launch_environment()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank, world_size, local_rank, device, launcher)
    if world_size > 1:
        if launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ["SLURM_STEP_NODELIST"]
                                                                  if "SLURM_STEP_NODELIST" in os.environ
                                                                  else os.environ["SLURM_JOB_NODELIST"]))
            os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=timedelta(minutes=timeout_minutes),
                                    device_id=device if device.type == "cuda" else None)
        except dist.DistError as exc:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            hint = f"Did every process start, and can this node reach {where}?"
            if device.type == "cuda" and local_rank >= torch.cuda.device_count():  # seen: NCCL's "invalid usage"
                hint = (f"Local rank {local_rank} shares one of this node's {torch.cuda.device_count()} GPU(s) with "
                        f"another process, which NCCL refuses: launch at most one process per GPU "
                        f"(--nproc_per_node), or run on CPUs with --device cpu.")
            raise UserError(f"rank {rank} of {world_size} could not join the process group at {where} within "
                            f"{timeout_minutes:g} min (--dist_timeout): "
                            f"{str(exc).strip().splitlines()[0].rstrip('.')}. {hint}") from None
    return info


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (identity for a single process)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj):
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_process(flag, device):
    """True on every process when `flag` is true on at least one (identity for a single process): the processes of
    a run take decisions such as "stop now" together, at the same iteration."""
    if dist.is_available() and dist.is_initialized():
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)
    return bool(flag)


# slurm's variables that say the job was given GPUs (sbatch/srun --gpus*, --gres=gpu)
SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_PER_NODE",
                       "SLURM_GPUS_PER_TASK")


def gpu_request(device_flag=None, env=None):
    """Why the job clearly asked for GPUs ('--device cuda', 'SLURM_GPUS_ON_NODE=4', ...), or None."""
    env = os.environ if env is None else env
    if device_flag is not None:
        return f"--device {device_flag}" if str(device_flag).startswith("cuda") else None  # the user chose
    for name in SLURM_GPU_VARIABLES:
        value = env.get(name, "").strip()
        if value and value not in ("0", "(null)"):
            return f"{name}={value}"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "none", "NoDevFiles"):  # an empty or -1 value hides the GPUs on purpose
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return None


def nvidia_driver_version():
    """The loaded NVIDIA kernel driver's version, or None when there is none."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+\.[0-9.]+)", f.read())
        return match.group(1) if match else "unknown"
    except OSError:
        return None


def require_cuda_if_requested(device_flag=None, env=None, cuda_available=None):
    """Refuse to run on the CPU when the job clearly asked for GPUs but this torch cannot use them: a UserError
    naming the driver and the build (an old driver with a new CUDA build silently gives is_available() False)."""
    reason = gpu_request(device_flag, env)
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if reason is None or available:
        return
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda \
        else f"torch {torch.__version__} is a CPU-only build"
    driver = nvidia_driver_version()
    driver = "no NVIDIA driver is loaded on this node" if driver is None else f"NVIDIA driver {driver}"
    raise UserError(f"the job asked for GPUs ({reason}) but torch.cuda.is_available() is False: {build}, "
                    f"{driver}; an older driver needs an older CUDA build: rerun `CUDA=cu126 ./setup.sh` (or "
                    f"cu128; see README 'Use on a cluster'), or run on CPU with CUDA_VISIBLE_DEVICES= set empty")
