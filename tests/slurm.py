"""The real slurm of the cluster tests: the one-node instance of scripts/local_slurm.sh (started by .ci/run, or by
the first test that needs it, and left running for the next), and small readers of its jobs. Where slurm cannot
start, the tests that need it fail under CI=true and are skipped elsewhere, with one line saying why."""
import os
import re
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SLURM = os.path.join(ROOT, "scripts", "local_slurm.sh")
# resources this machine has: one node, its CPUs, no GPU; every job asks for them on the sbatch line
# this node: 2 CPUs, no GPU. Memory is asked per script: lineareval.sbatch says --mem, pretrain_timecat.sbatch
# --mem-per-cpu, and sbatch refuses the two together
SMALL_JOB = ["--cpus-per-task=1", "--gpus-per-node=0", "--time=00:20:00"]


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the real slurm is needed under CI=true: {reason}")
    pytest.skip(f"no slurm: {reason}")


@pytest.fixture(scope="session")
def slurm():
    """The environment (SLURM_CONF) in which sbatch, scontrol, scancel reach the local slurm."""
    dir_ = os.environ.get("TIMECAT_SLURM_DIR", "/tmp/timecat-slurm")
    env = dict(os.environ, SLURM_CONF=os.path.join(dir_, "slurm.conf"))
    installed = shutil.which("sbatch") and (shutil.which("slurmctld") or os.path.exists("/usr/sbin/slurmctld"))
    if not installed:
        _unavailable("slurm is not installed; `scripts/local_slurm.sh start` installs it (root, apt-get)")
    # the daemons outlive the session: they do not get its TMPDIR (tests/conftest.py), which goes with it
    daemons = {k: v for k, v in env.items() if k != "TMPDIR"}
    done = subprocess.run([LOCAL_SLURM, "start"], env=daemons, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        _unavailable((done.stderr.strip().splitlines() or ["scripts/local_slurm.sh start failed"])[-1])
    return env


def sbatch(env, script, *options, args=(), cwd=ROOT):
    """Submit a script with real sbatch; returns the job id (array task ids look like 12_3)."""
    done = subprocess.run(["sbatch", "--parsable", *options, script, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    array = [o.split("=", 1)[1] for o in options if o.startswith("--array=")]
    return f"{job}_{array[0]}" if array and array[0].isdigit() else job


def job_info(env, job):
    """scontrol's record of a job: {'JobState': 'RUNNING', 'Restarts': '0', ...}; {'JobState': 'PURGED'} once slurm
    forgot an ended job (MinJobAge after its end)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0 and "Invalid job id" in done.stderr:
        return {"JobState": "PURGED"}
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_job(env, job, states, timeout=600):
    """Poll until the job is in one of `states`; returns its record (fails on timeout, with the record)."""
    deadline = time.time() + timeout
    while True:
        info = job_info(env, job)
        if info.get("JobState") in states:
            return info
        assert info["JobState"] != "PURGED", f"job {job} ended and slurm forgot it (MinJobAge) before {states}"
        assert time.time() < deadline, f"job {job} still {info.get('JobState')} after {timeout} s: {info}"
        time.sleep(0.5)


def wait_completed(env, job, output):
    """Wait for the job's end; true when it COMPLETED (for a job slurm already forgot, its output file says)."""
    state = wait_job(env, job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PURGED"))["JobState"]
    if state == "PURGED":
        with open(output, errors="replace") as f:
            return "Top-1 test accuracy" in f.read()
    return state == "COMPLETED"


def wait_text(path, text, env, job, timeout=600):
    """Poll a file until it holds `text` (fails if the job ends first or on timeout)."""
    deadline = time.time() + timeout
    while True:
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                if text in f.read():
                    return
        state = job_info(env, job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), \
            f"job {job} is {state} before '{text}'"
        assert time.time() < deadline, f"'{text}' not in {path} after {timeout} s"
        time.sleep(0.2)


def scancel(env, job, *options):
    done = subprocess.run(["scancel", *options, job], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
