"""The path onto a cluster without a cluster: what each task of a sweep runs (tools/submit.py's own output), the
CUDA build choice (a stand-in nvidia-smi: no GPU driver here), the refusal to run on CPU when GPUs were asked for,
and the OpenMP settings of CPU runs. The scripts on the real slurm: tests/test_slurm_jobs.py, tests/test_submit.py."""
import os
import shutil
import subprocess
import sys

import pytest

from util import sweeps
from util.cli import UserError
from util.cpu_runtime import configure_cpu_runtime
from util.distributed import require_cuda_if_requested

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_command(folder, name, body):
    """An executable `name` in `folder` running the shell `body`."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(path, 0o755)


def task_argv(sweep, layout, index, processes=1, feature_cache=None):
    """What lineareval.sbatch hands to every srun task of one array index: `tools/submit.py task`'s lines (the
    scripts themselves run on the real slurm in tests/test_slurm_jobs.py and tests/test_submit.py)."""
    command = [sys.executable, os.path.join(ROOT, "tools", "submit.py"), "task", "--sweep", sweep, "--layout", layout,
               "--index", str(index), "--processes", str(processes), "--workers", "8"]
    command += ["--feature_cache", feature_cache] if feature_cache else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def probe_flag(argv, name, count=1):
    i = argv.index(name)
    return argv[i + 1:i + 1 + count] if count > 1 else argv[i + 1]


@pytest.mark.parametrize("sweep,index,folder,wd", [
    ("cifar", 8, "lineareval/cifar10_5e-2/resnet50_sfadamw_cat2_step200k", "5e-2"),
    ("cifar", 95, "lineareval_seer/cifar100_5e-3/resnet50_sfadamw/run4", "5e-3"),
    ("inat18", 10, "lineareval/inaturalist18_1e-5/resnet50_sfadamw_cat5_step80k", "1e-5"),
    ("imagenet", 11, "lineareval/imagenet1k_5e-4/resnet50_sfadamw/run0", "5e-4"),
])
def test_reference_layout_task_probes_one_wd_into_the_original_folder(sweep, index, folder, wd):
    argv = task_argv(sweep, "per_wd", index)
    assert probe_flag(argv, "--dump_path") == f"results/supervised/imagenet/transfer/{folder}"
    assert probe_flag(argv, "--wd") == wd and probe_flag(argv, "--batch_size") == ("256" if sweep == "cifar"
                                                                                    else "32")
    assert probe_flag(argv, "--precision") == "fp32"  # the reference's numerics, never bf16/auto
    assert ("--sync_bn" in argv) == (sweep == "inat18") and "--feature_cache" not in argv


def test_one_pass_layout_trains_the_whole_grid_with_the_cache_and_splits_the_batch():
    argv = task_argv("cifar", "one_pass", 9, processes=4, feature_cache="/scratch/features")
    assert probe_flag(argv, "--wd", 6) == list(sweeps.WD_GRIDS["cifar100"])
    assert probe_flag(argv, "--data_name") == "cifar100" and probe_flag(argv, "--batch_size") == "64"
    assert probe_flag(argv, "--feature_cache") == "/scratch/features"
    assert probe_flag(argv, "--tag") == "supervisedimagenet_resnet50_sfadamw_4_step100k"


def test_sweeps_are_the_reference_grids_and_folders():
    assert sweeps.WD_GRIDS["inaturalist18"] == ("1e-6", "1e-5", "1e-4")
    assert sweeps.WD_GRIDS["imagenet1k"] == ("1e-4", "5e-4")
    counts = {(s, layout): len(sweeps.sweep_tasks(s, layout)) for s in sweeps.SWEEPS for layout in sweeps.LAYOUTS}
    assert counts == {("cifar", "per_wd"): 96, ("inat18", "per_wd"): 24, ("imagenet", "per_wd"): 16,
                      ("cifar", "one_pass"): 16, ("inat18", "one_pass"): 8, ("imagenet", "one_pass"): 8}
    folders = [t.dump_path for s in sweeps.SWEEPS for t in sweeps.sweep_tasks(s)]
    assert len(set(folders)) == len(folders)  # no two tasks share a folder


# ---- the CUDA build: setup.sh's choice from the driver, and the refusal to run on CPU
@pytest.mark.parametrize("driver,choice", [(None, "locked"), ("590.44.01", "locked"), ("575.57.08", "cu128"),
                                           ("550.54.15", "cu126"), ("470.256.02", "none")])
def test_setup_picks_the_torch_build_for_the_driver(tmp_path, driver, choice):
    path = os.path.dirname(shutil.which("bash")) + ":/usr/bin:/bin"
    if driver:
        fake_command(tmp_path, "nvidia-smi", f'echo "{driver}"')
        path = f"{tmp_path}:{path}"
    done = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), "--detect-cuda"], capture_output=True,
                          text=True, env=dict(os.environ, PATH=path), timeout=60)
    assert done.returncode == 0 and done.stdout.split()[0] == choice, done.stdout + done.stderr


def test_setup_rejects_an_unknown_build_before_installing():
    done = subprocess.run(["bash", os.path.join(ROOT, "setup.sh")], capture_output=True, text=True,
                          env=dict(os.environ, CUDA="cu999"), timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: CUDA=cu999")


@pytest.mark.parametrize("env,device", [({"SLURM_GPUS_ON_NODE": "4"}, None), ({"CUDA_VISIBLE_DEVICES": "0,1"}, None),
                                        ({}, "cuda")])
def test_a_job_that_asked_for_gpus_refuses_to_run_on_cpu(env, device):
    with pytest.raises(UserError, match=r"asked for GPUs .*is_available\(\) is False: torch .*CUDA=cu126"):
        require_cuda_if_requested(device, env=env, cuda_available=False)


@pytest.mark.parametrize("env,device", [({}, None), ({"CUDA_VISIBLE_DEVICES": ""}, None),
                                        ({"SLURM_GPUS_ON_NODE": "4"}, "cpu"), ({"SLURM_GPUS_ON_NODE": "0"}, None)])
def test_cpu_runs_that_asked_for_no_gpu_go_on(env, device):
    require_cuda_if_requested(device, env=env, cuda_available=False)


# ---- OpenMP on shared cores
def test_cpu_runtime_defaults_keep_the_users_values_and_share_the_cores():
    env = {}
    chosen = configure_cpu_runtime(env, cores=8)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "8"} and "PASSIVE (chosen)" in chosen.line
    env = {"OMP_WAIT_POLICY": "ACTIVE", "LOCAL_WORLD_SIZE": "4"}
    chosen = configure_cpu_runtime(env, cores=8)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["OMP_NUM_THREADS"] == "2" and "ACTIVE (user)" in chosen.line
    env = {"OMP_NUM_THREADS": "3", "SLURM_NTASKS_PER_NODE": "2(x2)"}
    assert configure_cpu_runtime(env, cores=8).threads == "3"
    # a slurm task given 1 CPU on a node that does not bind CPUs (its affinity shows all 8) runs 1 thread
    env = {"SLURM_CPUS_PER_TASK": "1", "SLURM_NTASKS_PER_NODE": "1"}
    chosen = configure_cpu_runtime(env, cores=8)
    assert env["OMP_NUM_THREADS"] == "1" and "1 CPUs per slurm task" in chosen.line


def test_cpu_runtime_reaches_torch_when_called_before_the_import():
    code = ("from util.cpu_runtime import configure_cpu_runtime\nr = configure_cpu_runtime(cores=1)\n"
            "import torch\nprint(r.wait_policy, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["PASSIVE", "1"], done.stderr
