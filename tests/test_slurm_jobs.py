"""The project's own job scripts on a real slurm (scripts/local_slurm.sh, see tests/slurm.py): submitted with sbatch,
warned with USR1 as slurm does before a time limit or a preemption (`scancel --signal=USR1` reaches every task of
the job's steps, not the batch shell, as `#SBATCH --signal=USR1@300` does), requeued by the job itself and resumed;
cancelled with a plain `scancel` (SIGTERM): CANCELLED, not requeued, and a resubmission resumes. Every run ends
with the numbers of an uninterrupted job; a 2-task probe job (gloo, rendezvous from slurm's variables) with those of
one process, a 2-task pretraining job (slow) with an uninterrupted 2-task job's. The totals (jobs submitted,
requeued, results equal) are printed for the closing note of issue 18."""
import json
import os
import re
import subprocess

import pytest
import torch
import yaml
from slurm import LOCAL_SLURM, SMALL_JOB, job_info, sbatch, scancel, slurm, wait_completed, wait_job, wait_text  # noqa: F401 (slurm: fixture)

from helpers import make_checkpoint, make_cifar, make_imagenet
from util.checkpoint import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_SCRIPT = os.path.join(ROOT, "scripts", "lineareval.sbatch")
PRETRAIN_SCRIPT = os.path.join(ROOT, "scripts", "pretrain_timecat.sbatch")
# 200 CIFAR images, 7 iterations per epoch; fp32, workers 0: runs compare bit for bit
PROBE = ["--img_size", "32", "--workers", "0", "--print_freq", "1", "--lr", "0.1", "--precision", "fp32",
         "--epochs", "6", "--decay_epochs", "2", "--no-download"]
PROBE_BATCH = 32
# 4 classes x 8 images, global batch 8: 4 steps per epoch; evaluations and resume states every 20 steps
PRETRAIN = ["--arch", "resnet18", "--img_size", "32", "--global_batch", "8", "--workers", "0", "--precision", "fp32",
            "--warmup_steps", "2", "--lr", "0.01", "--bn_refresh_batches", "2", "--print_freq", "1",
            "--steps", "80", "--save_steps", "40", "--eval_every", "20"]
TALLY = {"submitted": 0, "requeued": 0, "cancelled": 0, "equal_results": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=200, n_test=61)
    make_imagenet(data, num_classes=4, n_train=8, n_val=3)
    ckpt = str(base / "a.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=1)
    # every tag the sweeps name, as one tiny backbone: the array task picks its tag; the test gives the tag file
    with open(os.path.join(ROOT, "configs", "pretrained_checkpoints.yaml")) as f:
        tags = {tag: {"arch": ["resnet18"], "pretrained": [ckpt]} for tag in yaml.safe_load(f)}
    (base / "tags.yaml").write_text(yaml.safe_dump(tags))
    return {"base": base, "data": data, "tags": str(base / "tags.yaml")}


def submit_probe(env, world, name, *extra, tasks=1):
    """Array task 8 of the CIFAR sweep (reference layout), on tiny data; the probe's flags after the script."""
    TALLY["submitted"] += 1
    base = world["base"]
    return sbatch(env, PROBE_SCRIPT, *SMALL_JOB, "--array=8", f"--ntasks-per-node={tasks}",
                  f"--output={base}/{name}.out", "--export=ALL,SWEEP=cifar,LAYOUT=per_wd",
                  args=["--tag_file", world["tags"], "--data_path", world["data"], "--dump_path", str(base / name),
                        "--batch_size", str(PROBE_BATCH // tasks), *PROBE, *extra])


def submit_pretrain(env, world, name, tasks=1):
    """Array task 4 (run 4) of the pretraining script on tiny data; main_pretrain.py's flags after the script."""
    TALLY["submitted"] += 1
    base = world["base"]
    # the script asks --mem-per-cpu (its 8 x 10 CPUs); sbatch refuses --mem beside it: the same kind, smaller
    small = [o.replace("--mem=", "--mem-per-cpu=") for o in SMALL_JOB]
    return sbatch(env, PRETRAIN_SCRIPT, *small, "--array=4", f"--ntasks-per-node={tasks}",
                  f"--output={base}/{name}.out",
                  args=["--data_path", world["data"], "--output_dir", str(base / name / "ckpt"),
                        "--dump_path", str(base / name / "run"), *PRETRAIN])


@pytest.fixture(scope="module")
def references(slurm, world):  # noqa: F811
    """The uninterrupted one-process jobs every scenario compares with, submitted once (they run beside them)."""
    jobs = {"probe": submit_probe(slurm, world, "probe_reference"),
            "pretrain": submit_pretrain(slurm, world, "pretrain_reference")}

    def done(kind):
        output = world["base"] / f"{kind}_reference.out"
        assert wait_completed(slurm, jobs[kind], output), read(output)[-3000:]
        return world["base"] / f"{kind}_reference"
    return done


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def metrics(path, drop=("seconds", "img_per_s")):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def probe_result(dump):
    return {"heads": load_file(str(dump / "checkpoint.pth.tar"))["heads"],
            "best": load_file(str(dump / "best.pth.tar"))["head"], "metrics": metrics(dump / "metrics.jsonl"),
            "final": re.findall(r"Top-1 test accuracy: .*", read(dump / "train.log"))}


def pretrain_result(out):
    ckpts = {folder: load_file(str(out / "ckpt" / folder / "checkpoint_run4.pth.tar"))
             for folder in ("checkpoints_step40steps", "checkpoints_stepfull")}
    return {"weights": {k: v["state_dict"] for k, v in ckpts.items()}, "top1": {k: v["val_top1"] for k, v in
                                                                                 ckpts.items()},
            "metrics": metrics(out / "run" / "metrics.jsonl")}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_twice(env, job, log, progress, resumed, stopped_line):
    """USR1 mid-run (the job requeues itself and resumes), then a plain scancel mid-rerun (CANCELLED, not
    requeued). `progress(n)`: a log text that the nth start reaches only after a resumable point."""
    wait_text(log, progress(1), env, job)
    scancel(env, job, "--signal=USR1")
    wait_text(log, resumed, env, job)  # the requeued job started again and resumed
    TALLY["requeued"] += 1
    assert int(job_info(env, job)["Restarts"]) == 1
    wait_text(log, progress(2), env, job)
    scancel(env, job)
    # CANCELLED once the job's processes are gone (COMPLETING until then): a requeue asked by the job would have
    # happened by now
    info = wait_job(env, job, ("CANCELLED", "COMPLETED", "FAILED"))
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info
    TALLY["cancelled"] += 1
    text = read(log)
    assert re.search(stopped_line("SIGUSR1") + r".*requeueing the job", text), text[-3000:]
    assert re.search(stopped_line("SIGTERM") + r".*not requeued", text), text[-3000:]


def test_probe_job_requeues_on_usr1_cancels_on_scancel_and_resumes_exactly(slurm, world, references):  # noqa: F811
    base = world["base"]
    job = submit_probe(slurm, world, "probe_interrupted")
    interrupt_twice(slurm, job, base / "probe_interrupted" / "train.log",
                    progress=lambda n: "Epoch[2] - Iter: [3/" if n == 1 else "Epoch[4] - Iter: [3/",
                    resumed="Resumed from", stopped_line=lambda sig: rf"Stopped by {sig} during epoch \d")
    assert "Traceback" not in read(base / "probe_interrupted.out")
    # a resubmission of the cancelled task resumes and ends as the uninterrupted job
    again = submit_probe(slurm, world, "probe_interrupted")
    assert wait_completed(slurm, again, base / "probe_interrupted.out")
    assert read(base / "probe_interrupted" / "train.log").count("Resumed from") == 2
    got, expected = probe_result(base / "probe_interrupted"), probe_result(references("probe"))
    assert same_tensors(got["heads"], expected["heads"]) and same_tensors(got["best"], expected["best"])
    assert got["metrics"] == expected["metrics"] and got["final"] == expected["final"]
    TALLY["equal_results"] += 1


def test_pretrain_job_requeues_on_usr1_cancels_on_scancel_and_resumes_exactly(slurm, world, references):  # noqa: F811
    base = world["base"]
    job = submit_pretrain(slurm, world, "pretrain_interrupted")
    log = base / "pretrain_interrupted" / "run" / "train.log"
    interrupt_twice(slurm, job, log, progress=lambda n: "Step: [15/" if n == 1 else "Step: [50/",
                    resumed="Resumed from step", stopped_line=lambda sig: rf"Stopped by {sig} at step \d+")
    again = submit_pretrain(slurm, world, "pretrain_interrupted")
    assert wait_completed(slurm, again, base / "pretrain_interrupted.out"), \
        read(base / "pretrain_interrupted.out")[-3000:]
    assert "Traceback" not in read(base / "pretrain_interrupted.out")
    got, expected = pretrain_result(base / "pretrain_interrupted"), pretrain_result(references("pretrain"))
    assert all(same_tensors(got["weights"][k], expected["weights"][k]) for k in expected["weights"])
    assert got["top1"] == expected["top1"] and got["metrics"] == expected["metrics"]
    TALLY["equal_results"] += 1


def usr1_then_complete(env, job, log, progress):
    """USR1 once mid-run (every task of the step gets it); the job requeues itself, resumes and completes."""
    wait_text(log, progress, env, job)
    scancel(env, job, "--signal=USR1")
    wait_text(log, "Resumed from", env, job)
    TALLY["requeued"] += 1
    info = wait_job(env, job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info


def test_two_task_probe_job_rendezvous_from_slurm_requeues_and_ends_as_one_process(slurm, world):  # noqa: F811
    """srun starts 2 CPU processes (gloo); they meet from slurm's variables, both get USR1, the job requeues and
    resumes, and ends with the one-process job's heads (the per-process batch is half the global one; both on the
    feature cache, so both see the same features, as tests/test_distributed_probe.py)."""
    base = world["base"]
    cached = ["--epochs", "20", "--decay_epochs", "8"]  # epochs on cached features are short: time to signal one
    one = submit_probe(slurm, world, "probe_one_cached", *cached, "--feature_cache", str(base / "cache_one"))
    two = submit_probe(slurm, world, "probe_two_tasks", *cached, "--feature_cache", str(base / "cache_two"),
                       tasks=2)
    usr1_then_complete(slurm, two, base / "probe_two_tasks" / "train.log", "Epoch[3] - Iter: [2/")
    out, log = read(base / "probe_two_tasks.out"), read(base / "probe_two_tasks" / "train.log")
    assert "Traceback" not in out and "launcher slurm" in log and "world size: 2," in log, out[-3000:]
    assert wait_completed(slurm, one, base / "probe_one_cached.out")
    heads = [load_file(str(base / run / "checkpoint.pth.tar"))["heads"] for run in ("probe_one_cached",
                                                                                    "probe_two_tasks")]
    assert heads[0].keys() == heads[1].keys()
    for key in heads[0]:
        assert torch.allclose(heads[0][key].float(), heads[1][key].float(), rtol=1e-3, atol=1e-5), key
    got, expected = (metrics(base / run / "metrics.jsonl") for run in ("probe_two_tasks", "probe_one_cached"))
    assert [m["epoch"] for m in got] == [m["epoch"] for m in expected]
    for a, b in zip(got, expected):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3) and abs(a["test_top1"] -
                                                                                   b["test_top1"]) <= 0.5
    TALLY["equal_results"] += 1


@pytest.mark.slow
def test_two_task_pretrain_job_rendezvous_from_slurm_requeues_and_resumes_exactly(slurm, world):  # noqa: F811
    """A 2-task pretraining job (gloo, slurm's variables) warned with USR1, requeued and resumed ends as an
    uninterrupted 2-task job, bit for bit. (Not as one process: every random draw of step s is a function of (seed,
    s, rank), so 2 processes augment their halves of the batch with other draws than one process does.)"""
    base = world["base"]
    reference = submit_pretrain(slurm, world, "pretrain_two_reference", tasks=2)
    job = submit_pretrain(slurm, world, "pretrain_two_tasks", tasks=2)
    usr1_then_complete(slurm, job, base / "pretrain_two_tasks" / "run" / "train.log", "Step: [15/")
    assert "Traceback" not in read(base / "pretrain_two_tasks.out")
    assert "world size: 2," in read(base / "pretrain_two_tasks" / "run" / "train.log")
    assert wait_completed(slurm, reference, base / "pretrain_two_reference.out")
    got, expected = pretrain_result(base / "pretrain_two_tasks"), pretrain_result(base / "pretrain_two_reference")
    assert all(same_tensors(got["weights"][k], expected["weights"][k]) for k in expected["weights"])
    assert got["top1"] == expected["top1"] and got["metrics"] == expected["metrics"]
    TALLY["equal_results"] += 1

def test_local_slurm_start_on_a_running_instance_is_a_no_op(slurm):  # noqa: F811
    """Several test runs share one instance: a second `start` answers at once and leaves it running."""
    again = subprocess.run([LOCAL_SLURM, "start"], env=slurm, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    status = subprocess.run([LOCAL_SLURM, "status"], env=slurm, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and re.search(r"\b(idle|mix|alloc)", status.stdout), status.stdout


def test_tally(capsys):
    """The totals of this module's jobs, for the closing note (run last in the file)."""
    with capsys.disabled():
        print(f"\nreal slurm: {TALLY['submitted']} jobs submitted, {TALLY['requeued']} requeued by USR1 and resumed, "
              f"{TALLY['cancelled']} cancelled by scancel and resubmitted, {TALLY['equal_results']} final results "
              "equal to the uninterrupted job's")
