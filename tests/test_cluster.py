"""The path onto a cluster: slurm submission from a fresh clone, the sweep layouts, the CUDA build choice, the
refusal to run on CPU when GPUs were asked for, and the OpenMP settings of CPU runs. No slurm or GPU needed:
sbatch, srun and nvidia-smi are small fakes on PATH that record what they were given."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from util import sweeps
from util.cli import UserError
from util.cpu_runtime import configure_cpu_runtime
from util.distributed import require_cuda_if_requested

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("scripts/lineareval.sbatch", "scripts/pretrain_timecat.sbatch")


def fake_command(folder, name, body):
    """An executable `name` in `folder` running the shell `body`."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(path, 0o755)


def fresh_clone(tmp_path):
    """The files a fresh clone has (no results/), with the project's interpreter reachable as .venv/bin/python."""
    clone = tmp_path / "clone"
    for rel in ("tools/submit.py", "util/__init__.py", "util/cli.py", "util/sweeps.py", "util/layout.py",
                "util/flags.py", "arguments/__init__.py", "arguments/common.py", *SCRIPTS):
        os.makedirs(clone / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), clone / rel)
    (clone / ".venv" / "bin").mkdir(parents=True)
    # the clone's ./setup.sh would install it editable (its root on the path, pyproject.toml); the stand-in
    # interpreter does the same with PYTHONPATH
    python = clone / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{clone}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return clone


def sbatch_paths(script_text):
    """Our own reading of the #SBATCH lines: {option: value} for the options naming paths."""
    found = {}
    for line in script_text.splitlines():
        if line.startswith("#SBATCH"):
            for word in shlex.split(line[len("#SBATCH"):]):
                name, _, value = word.partition("=")
                if name in ("--output", "--error", "--chdir"):
                    found[name] = value
    return found


@pytest.mark.parametrize("command", [["lineareval", "--sweep", "cifar", "--layout", "per_wd"], ["pretrain"]])
def test_submission_from_a_fresh_clone_creates_every_folder_sbatch_needs(tmp_path, command):
    clone, fakes = fresh_clone(tmp_path), tmp_path / "bin"
    assert not (clone / "results").exists()
    # the fake sbatch fails, as slurm does at job start, when the log folder is missing at submission
    fake_command(fakes, "sbatch", 'script="${@: -1}"; out=$(sed -n "s/^#SBATCH --output=//p" "$script"); '
                 '[[ -d "$(dirname "$out")" ]] || { echo "missing $(dirname "$out")" >&2; exit 1; }; '
                 'echo "$@" "SWEEP=$SWEEP" "LAYOUT=$LAYOUT" > "$PWD/sbatch.args"')
    env = dict(os.environ, PATH=f"{fakes}:{os.environ['PATH']}")
    done = subprocess.run([sys.executable, str(clone / "tools" / "submit.py"), *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    script = (clone / "scripts" / ("lineareval.sbatch" if command[0] == "lineareval" else
                                   "pretrain_timecat.sbatch")).read_text()
    paths = sbatch_paths(script)
    assert "--output" in paths
    for value in paths.values():
        assert (clone / os.path.dirname(value)).is_dir(), value
    args = (clone / "sbatch.args").read_text().split()
    if command[0] == "lineareval":  # the array covers the sweep exactly: 2 datasets x 6 wd x 8 configs
        assert "--array=0-95" in args and "--export=ALL" in args and "SWEEP=cifar" in args and "LAYOUT=per_wd" in args


def test_submit_without_slurm_is_one_clear_error(tmp_path):
    clone = fresh_clone(tmp_path)
    # no sbatch anywhere: a PATH of one folder that holds only bash (bash's own folder may hold slurm's commands)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "bash").symlink_to(shutil.which("bash"))
    env = dict(os.environ, PATH=str(bare))
    done = subprocess.run([sys.executable, str(clone / "tools" / "submit.py"), "pretrain"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: sbatch is not on PATH")
    assert "Traceback" not in done.stderr


def run_array_task(tmp_path, script, index, **env_vars):
    """Run an sbatch script as slurm would for one array index; the fake srun records the command."""
    clone, fakes = fresh_clone(tmp_path), tmp_path / "bin"
    fake_command(fakes, "srun", 'printf "%s\\n" "$@" > "$SRUN_RECORD"')
    record = tmp_path / "srun.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "PYTHON", "FEATURE_CACHE"))}
    env.update(PATH=f"{fakes}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(clone), SLURM_ARRAY_TASK_ID=str(index),
               SRUN_RECORD=str(record), **env_vars)
    done = subprocess.run(["bash", str(clone / script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


def probe_flag(argv, name, count=1):
    i = argv.index(name)
    return argv[i + 1:i + 1 + count] if count > 1 else argv[i + 1]


@pytest.mark.parametrize("sweep,index,folder,wd", [
    ("cifar", 8, "lineareval/cifar10_5e-2/resnet50_sfadamw_cat2_step200k", "5e-2"),
    ("cifar", 95, "lineareval_seer/cifar100_5e-3/resnet50_sfadamw/run4", "5e-3"),
    ("inat18", 10, "lineareval/inaturalist18_1e-5/resnet50_sfadamw_cat5_step80k", "1e-5"),
    ("imagenet", 11, "lineareval/imagenet1k_5e-4/resnet50_sfadamw/run0", "5e-4"),
])
def test_reference_layout_task_probes_one_wd_into_the_original_folder(tmp_path, sweep, index, folder, wd):
    argv = run_array_task(tmp_path, "scripts/lineareval.sbatch", index, SWEEP=sweep, LAYOUT="per_wd")
    assert argv[:2] == [".venv/bin/python", "main_linear_probe.py"]  # the project's interpreter
    assert probe_flag(argv, "--dump_path") == f"results/supervised/imagenet/transfer/{folder}"
    assert probe_flag(argv, "--wd") == wd and probe_flag(argv, "--batch_size") == ("256" if sweep == "cifar"
                                                                                    else "32")
    assert probe_flag(argv, "--precision") == "fp32"  # the reference's numerics, never bf16/auto
    assert ("--sync_bn" in argv) == (sweep == "inat18") and "--feature_cache" not in argv


def test_one_pass_layout_trains_the_whole_grid_with_the_cache_and_splits_the_batch(tmp_path):
    argv = run_array_task(tmp_path, "scripts/lineareval.sbatch", 9, SWEEP="cifar", LAYOUT="one_pass",
                          FEATURE_CACHE="/scratch/features", SLURM_NTASKS="4")
    assert probe_flag(argv, "--wd", 6) == list(sweeps.WD_GRIDS["cifar100"])
    assert probe_flag(argv, "--data_name") == "cifar100" and probe_flag(argv, "--batch_size") == "64"
    assert probe_flag(argv, "--feature_cache") == "/scratch/features"
    assert probe_flag(argv, "--tag") == "supervisedimagenet_resnet50_sfadamw_4_step100k"


def test_pretrain_script_runs_the_projects_interpreter(tmp_path):
    argv = run_array_task(tmp_path, "scripts/pretrain_timecat.sbatch", 4)
    assert argv[:3] == ["--kill-on-bad-exit=1", ".venv/bin/python", "main_pretrain.py"]
    assert probe_flag(argv, "--run") == "4" and probe_flag(argv, "--steps") == "80000"


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


def test_cpu_runtime_reaches_torch_when_called_before_the_import():
    code = ("from util.cpu_runtime import configure_cpu_runtime\nr = configure_cpu_runtime(cores=1)\n"
            "import torch\nprint(r.wait_policy, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["PASSIVE", "1"], done.stderr
