"""Small generic helpers: seeding, meters, accuracy, git revision, file locks and checksums, slurm requeue. The
command-line conventions (ArgumentParser, UserError, run_main) live in util/cli.py. numpy and torch are imported
when a helper needs them."""
import errno
import fcntl
import hashlib
import os
import random
import shutil
import subprocess
import time

from util.cli import UserError


def lock_file(file, wait=False):
    """POSIX lock on an open file, held until it is closed or the process ends (even by SIGKILL), and not
    inherited by forked DataLoader workers. True: locked; False: another process holds it (without wait);
    None: the file system has no locks (the caller goes on unlocked)."""
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError as exc:
        return False if exc.errno in (errno.EAGAIN, errno.EACCES) else None


def sha256sum(path):
    """The SHA-256 (hex) of a file, read in 16 MiB blocks (checkpoints and archives of many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def set_seed(seed):
    import numpy as np  # here, not at the top: util.misc is imported by --help paths

    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch(seed)


def seed_torch(seed):
    """torch.manual_seed for the devices in use. torch.manual_seed itself, while no GPU is initialised (every CPU
    run), queues a deferred seeding per accelerator kind, each with a formatted stack trace: ~2 ms and a few KB that
    are never freed, per call; a loop that seeds every step would pay it 450k times."""
    import torch

    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def git_revision():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("-dirty" if dirty else "")


class AverageMeter:
    """Running sum and count of a scalar (weighted by batch size). A value may be a device tensor: it is then summed
    on the device, without a host synchronisation per update (total: the starting sum, e.g. a zero tensor)."""

    def __init__(self, total=0.0, count=0):
        self.sum, self.count, self.val = total, count, 0.0

    def update(self, val, n=1):
        self.val = val if hasattr(val, "device") else float(val)
        self.sum += self.val if n == 1 else self.val * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


class Meters:
    """The meters of one stretch of a training loop and its start time (MAE's MetricLogger): the probe's epoch
    (engine.epoch_meters), pretraining's steps since the last log line and since the last evaluation
    (engine_pretrain), an evaluation's batch times; each head's metrics in the probe (a Meters per head). names: new
    AverageMeters; meters: name -> a meter (or a list of Meters) of its own; each readable as an attribute."""

    def __init__(self, *names, **meters):
        self.start = time.time()
        self.meters = {**{name: AverageMeter() for name in names}, **meters}

    def __getattr__(self, name):
        try:
            return self.__dict__["meters"][name]
        except KeyError:
            raise AttributeError(name) from None

    def seconds(self):
        return time.time() - self.start


def global_averages(meters, last_n, device):
    """Each Meters' {name: (last batch's value, average so far)}, summed over every process in one all-reduce (a
    collective: all ranks call it at the same iteration; MAE's synchronize_between_processes), so a log line and
    metrics.jsonl report the global batch, not rank 0's share. last_n: this process's samples in its last batch."""
    from util.distributed import all_reduce_sum  # here: util/misc.py is imported by light paths too

    named = [(k, name, m) for k, group in enumerate(meters) for name, m in group.meters.items()]
    totals = all_reduce_sum([x for _, _, m in named for x in (m.val * last_n, last_n, m.sum, m.count)], device)
    out = [{} for _ in meters]
    for j, (k, name, _) in enumerate(named):
        val_sum, val_n, total, count = totals[4 * j:4 * j + 4]
        out[k][name] = (val_sum / max(val_n, 1), total / max(count, 1))
    return out


def requeue_slurm_job(logger):
    """Ask slurm to requeue this job (rank 0 only, after SIGUSR1: see util/signals.py); a no-op outside slurm, a
    one-line error on a slurm node without scontrol."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" \
        or os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if not shutil.which("scontrol"):
        raise UserError("the run stopped cleanly (a rerun resumes) but cannot requeue its slurm job: scontrol is "
                        "not on the PATH of this node; requeue it by hand or fix the PATH in the job script")
    try:  # bounded: a stopped run must exit before slurm's KillWait, answered or not
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=20)
        outcome = "ok" if result.returncode == 0 else result.stderr.strip()
    except subprocess.TimeoutExpired:
        outcome = "no answer from slurm within 20 s; requeue the job by hand (scontrol requeue)"
    logger.info(f"scontrol requeue {job}: {outcome}")


def stop_outcome(requeue):
    """The end of a "Stopped by ..." line: whether the slurm job requeues itself (SIGUSR1, slurm's warning) or not
    (SIGTERM: scancel)."""
    return "requeueing the job" if requeue else "not requeued (SIGTERM is a cancel; SIGUSR1 requeues)"
