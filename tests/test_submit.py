"""Submitting the project's jobs as a cluster user does: tools/submit.py's command line (sbatch and script
arguments, grid selection, dry runs that write nothing, the original's slurm flags), the data and checkpoint roots
outside the clone ($TIMECAT_DATA / $TIMECAT_CHECKPOINTS, util/layout.py), the sbatch scripts' defaults and
setup.sh's build choice. The parsing tests need no slurm; the end-to-end ones (at the bottom) run the project's
scripts on the real local slurm (scripts/local_slurm.sh)."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from arguments import linear_probe as probe_args
from arguments import pretrain as pretrain_args
from helpers import make_checkpoint, make_cifar, make_imagenet
from timecat import resolve_backbones
from tools import download, submit
from util import layout, sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_submit(*argv, env=None, cwd=None):
    """tools/submit.py as a user runs it (from anywhere: here, the temp folder)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "submit.py"), *argv], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)


# ---- the command line
def test_arguments_after_the_separators_go_to_sbatch_then_to_every_task():
    assert submit.split_argv(["lineareval", "--sweep", "cifar", "--", "--qos=high", "--", "--epochs", "2", "--",
                              "x"]) == [["lineareval", "--sweep", "cifar"], ["--qos=high"], ["--epochs", "2", "--",
                                                                                               "x"]]
    argv = submit.task_arguments("cifar", "one_pass", 3, probe_args=["--epochs", "2", "--batch_size", "64"])
    assert argv[-4:] == ["--epochs", "2", "--batch_size", "64"]  # last: they win over the task's own
    assert argv[argv.index("--wd") + 1:argv.index("--batch_size")] == list(sweeps.WD_GRIDS["cifar10"])


def test_dry_run_prints_the_selected_tasks_and_the_command_and_writes_nothing(tmp_path):
    before = set(os.listdir(ROOT)), os.path.exists(os.path.join(ROOT, "results", "slurm"))
    done = run_submit("lineareval", "--sweep", "cifar", "--layout", "per_wd", "--data", "cifar100", "--config",
                      "cat5_step80k", "run0", "--wd", "1e-4", "--dry_run", "--data_path", str(tmp_path / "my data"),
                      "--", "--partition=gpu", "--", "--epochs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    # the reference grid: index = ((dataset * 6 + wd) * 8 + config); cifar100, 1e-4 (third wd), cat5 / run0
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [("66", "cifar100", "cat5_step80k", "1e-4", "5"),
                                                              ("67", "cifar100", "run0", "1e-4", "6")]
    command = done.stdout.splitlines()[-1]
    assert "sbatch --export=ALL --array=66-67 --time=6:00:00 --partition=gpu scripts/lineareval.sbatch" in command
    assert f"TIMECAT_DATA='{tmp_path / 'my data'}'" in command and "PROBE_ARGS='--epochs 2'" in command
    assert "SWEEP=cifar LAYOUT=per_wd" in command
    assert (set(os.listdir(ROOT)), os.path.exists(os.path.join(ROOT, "results", "slurm"))) == before
    assert not os.listdir(tmp_path)


def test_one_pass_is_the_default_and_a_wd_selection_narrows_its_heads():
    tasks = sweeps.sweep_tasks("imagenet")
    assert len(tasks) == 8 and all(t.wds == sweeps.WD_GRIDS["imagenet1k"] for t in tasks)
    args = submit.get_args_parser().parse_args(["list", "--sweep", "inat18", "--wd", "0.00001", "--config",
                                                "run2"])
    args.sbatch_args = args.script_args = []
    [(index, task)] = submit.selected(args)
    assert (index, task.wds, task.extra) == (5, ("1e-5",), ("--sync_bn",))  # 0.00001 is the grid's 1e-5
    argv = submit.task_arguments("inat18", "one_pass", index, wds=["1e-5"])
    assert argv[argv.index("--wd") + 1] == "1e-5" and argv[argv.index("--wd") + 2] == "--batch_size"


@pytest.mark.parametrize("argv,fragment", [
    (["lineareval", "--sweep", "cifar", "--data", "imagenet1k"], "--data imagenet1k is not in --sweep cifar"),
    (["lineareval", "--sweep", "cifar", "--wd", "1e-9"], "no task of --sweep cifar matches"),
    (["lineareval", "--sweep", "cifar", "--wd", "x"], "'x' is not a number"),
    (["list", "--sweep", "cifar", "--", "--qos=x"], "takes no arguments after --"),
    (["lineareval", "--sweep", "cifar", "--launcher", "submitit", "--", "-p", "gpu"], "--name=value"),
])
def test_user_errors_are_one_line(argv, fragment):
    done = run_submit(*argv, "--dry_run" if argv[0] == "lineareval" else "--layout=one_pass")
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_submit_without_slurm_is_one_clear_error(tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH with no sbatch (slurm may be installed in /usr/bin on this machine)
    done = run_submit("pretrain", env={"PATH": str(tmp_path / "bin")}, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: sbatch is not on PATH"), done.stderr
    assert "Traceback" not in done.stderr and not os.listdir(tmp_path / "bin")


def test_original_slurm_flags_mean_what_their_names_say():
    args = submit.get_args_parser().parse_args(["lineareval", "--sweep", "cifar", "--hours", "1.5", "--nodes", "2",
                                                "--tasks_per_node", "4", "--gpus_per_node", "4", "--cpus_per_task",
                                                "6", "--mem", "32G", "--constraint", "a100", "--gres", "gpu:4",
                                                "--exclude", "n1", "--job_name", "p", "--account", "lab",
                                                "--partition", "gpu", "--qos", "high"])
    args.sbatch_args = ["--reservation=r1"]
    assert submit.slurm_flag_options(args) == [
        "--time=1:30:00", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--mem=32G",
        "--constraint=a100", "--gres=gpu:4", "--exclude=n1", "--job-name=p", "--account=lab", "--partition=gpu",
        "--qos=high"]
    params = submit.submitit_parameters(args, hours=5)
    assert params["timeout_min"] == 90 and (params["nodes"], params["tasks_per_node"], params["gpus_per_node"],
                                            params["cpus_per_task"]) == (2, 4, 4, 6)
    assert (params["slurm_mem"], params["name"], params["slurm_constraint"], params["slurm_account"],
            params["slurm_partition"], params["slurm_qos"], params["slurm_exclude"], params["slurm_gres"]) == \
        ("32G", "p", "a100", "lab", "gpu", "high", "n1", "gpu:4")
    assert params["slurm_additional_parameters"] == {"requeue": True, "reservation": "r1"}
    assert params["slurm_signal_delay_s"] == 300
    # unset: the sweep's resources (the original's CIFAR script: 1 GPU, 8 CPUs, 64G) and the sweep's time
    bare = submit.get_args_parser().parse_args(["lineareval", "--sweep", "cifar"])
    bare.sbatch_args = []
    params = submit.submitit_parameters(bare, hours=6)
    assert (params["timeout_min"], params["tasks_per_node"], params["gpus_per_node"], params["cpus_per_task"],
            params["slurm_mem"]) == (360, 1, 1, 8, "64G")


def test_the_original_time_limits_per_sweep():
    hours = {s: max(sweeps.task_hours(t) for t in sweeps.sweep_tasks(s)) for s in sweeps.SWEEPS}
    assert hours == {"cifar": 6, "imagenet": 12, "inat18": 12}
    cat_only = [t for t in sweeps.sweep_tasks("inat18") if not t.config.startswith("run")]
    assert {sweeps.task_hours(t) for t in cat_only} == {5}
    assert submit.slurm_time(5) == "5:00:00" and submit.slurm_time(0.25) == "0:15:00"
    assert submit.array_ranges([7, 0, 1, 2, 5, 9, 8]) == "0-2,5,7-9"


# ---- the sbatch scripts
def sbatch_lines(name):
    with open(os.path.join(ROOT, "scripts", name)) as f:
        text = f.read()
    return text, {line.split()[1].split("=")[0]: line.split()[1].partition("=")[2]
                  for line in text.splitlines() if line.startswith("#SBATCH")}


def test_sbatch_scripts_run_in_the_submit_folder_with_defaults_clusters_accept():
    for name in ("lineareval.sbatch", "pretrain_timecat.sbatch"):
        text, options = sbatch_lines(name)
        assert "CAT_EXP_HOME" not in text and 'cd "$SLURM_SUBMIT_DIR"' in text  # never another clone's folder
        assert "OMP_NUM_THREADS" not in text  # the project's own thread choice (util/cpu_runtime.py) stays
        assert "--data_path data" not in text and "--workers 9" not in text
        assert options["--signal"] == "USR1@300" and "--requeue" in options
    _, probe = sbatch_lines("lineareval.sbatch")
    assert (probe["--cpus-per-task"], probe["--mem"], probe["--time"]) == ("8", "64G", "12:00:00")
    text, pre = sbatch_lines("pretrain_timecat.sbatch")
    assert pre["--mem-per-cpu"] == "4G" and pre["--time"] == "24:00:00"
    assert 'workers=$(( cpus > 1 ? cpus - 1 : 0 ))' in text and text.rstrip().endswith('"$@"')


def test_submitit_pretraining_runs_what_the_shipped_script_runs():
    text, _ = sbatch_lines("pretrain_timecat.sbatch")
    steps = text.split("\nSTEPS=(")[1].split(")")[0].split()
    saves = [s.split() for s in shlex.split(text.split("\nSAVE_STEPS=(")[1].split(")")[0])]
    plan = submit.pretrain_runs()
    assert [str(n) for n, _ in plan.values()] == steps
    assert [list(map(str, s)) for _, s in plan.values()] == saves
    argv = submit.pretrain_arguments(2, workers=4, script_args=["--steps", "9"])
    assert argv[:8] == ["--arch", "resnet50", "--run", "2", "--steps", "100000", "--save_steps", "80000"]
    assert argv[argv.index("--workers") + 1] == "3" and argv[-2:] == ["--steps", "9"]  # one core for the loop


# ---- data and checkpoints outside the clone
def test_the_roots_default_to_the_environment_then_to_the_clone(monkeypatch, tmp_path):
    monkeypatch.delenv(layout.DATA_ENV, raising=False)
    monkeypatch.delenv(layout.CHECKPOINTS_ENV, raising=False)
    args = probe_args.get_args_parser().parse_args([])
    assert (args.data_path, args.checkpoint_root) == (os.path.join(ROOT, "data"), os.path.join(ROOT, "checkpoints"))
    monkeypatch.setenv(layout.DATA_ENV, str(tmp_path / "my data"))
    monkeypatch.setenv(layout.CHECKPOINTS_ENV, str(tmp_path / "my ckpts"))
    for parser in (probe_args.get_args_parser(), pretrain_args.get_args_parser()):
        args = parser.parse_args([])
        assert (args.data_path, args.checkpoint_root) == (str(tmp_path / "my data"), str(tmp_path / "my ckpts"))
    assert download.get_args_parser().parse_args([]).checkpoint_root == str(tmp_path / "my ckpts")
    root = str(tmp_path / "my ckpts")
    assert layout.resolve_tag_path("checkpoints/supervised_pretrain/a/b.pth", ROOT, root) == \
        os.path.join(root, "supervised_pretrain", "a", "b.pth")
    assert layout.resolve_tag_path("other/b.pth", ROOT, root) == os.path.join(ROOT, "other", "b.pth")
    assert layout.resolve_tag_path("/abs/b.pth", ROOT, root) == "/abs/b.pth"


def test_pretraining_writes_under_the_checkpoint_root(tmp_path):
    args = pretrain_args.get_args_parser().parse_args(["--checkpoint_root", str(tmp_path / "my ckpts")])
    pretrain_args.check_args(args)
    assert args.output_dir == str(tmp_path / "my ckpts" / "supervised_pretrain" / "resnet50_sfadamw")


def test_download_places_the_release_where_the_probe_tags_look(tmp_path, monkeypatch, capsys):
    from test_download import make_archive

    archive = tmp_path / "release.tar.gz"
    archive.write_bytes(make_archive())
    root = tmp_path / "my ckpts"
    monkeypatch.setenv(layout.CHECKPOINTS_ENV, str(root))
    download.main(download.get_args_parser().parse_args(["--archive", str(archive)]))
    out = capsys.readouterr().out
    assert "Tags complete (8/8)" in out and f"under {root}" in out, out
    args = probe_args.get_args_parser().parse_args(["--tag", "supervisedimagenet_resnet50_sfadamw_5_step80k"])
    resolve_backbones(args)
    assert args.pretrained[4] == str(root / "supervised_pretrain" / "resnet50_sfadamw" / "checkpoints_step80"
                                     / "checkpoint_run4.pth.tar")
    assert all(os.path.isfile(p) for p in args.pretrained)


# ---- setup.sh's build choice
def test_setup_takes_the_build_as_a_flag_and_rejects_unknown_ones():
    for argv, fragment in ((["--cuda", "cu999"], "error: CUDA=cu999 is not one of locked, cpu, cu126, cu128, cu130"),
                           (["--cuda"], "error: --cuda needs a build"), (["--bogus"], "error: unknown argument")):
        done = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), *argv], capture_output=True, text=True,
                              timeout=60, env={k: v for k, v in os.environ.items() if k != "CUDA"})
        assert done.returncode == 2 and done.stderr.startswith(fragment), done.stderr
    path = os.path.dirname(shutil.which("bash")) + ":/usr/bin:/bin"
    done = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), "--detect-cuda"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PATH=path))
    if shutil.which("nvidia-smi", path=path) is None:
        assert done.stdout.startswith("locked no nvidia-smi")


# ---- on the real local slurm (scripts/local_slurm.sh): the project's scripts, submitted by tools/submit.py
LOCAL_SLURM = os.path.join(ROOT, "scripts", "local_slurm.sh")
# this machine's node: no GPU, 2 CPUs, little memory; everything else is the scripts' own
SMALL_NODE = ["--gpus-per-node=0", "--cpus-per-task=1"]
TAG = "supervisedimagenet_resnet50_sfadamw_run0"  # the sweep's tag for run0, redefined below on a small ResNet18


@pytest.fixture(scope="module")
def slurm():
    """The environment that reaches the one-node slurm of scripts/local_slurm.sh (started if it is not running,
    never stopped here: other test runs share it)."""
    why = None
    if not os.path.exists(LOCAL_SLURM):
        why = "scripts/local_slurm.sh is missing"
    else:
        start = subprocess.run(["bash", LOCAL_SLURM, "start"], capture_output=True, text=True, timeout=600)
        if start.returncode:
            why = f"scripts/local_slurm.sh start failed: {start.stderr.strip().splitlines()[-1:]}"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no local slurm: {why}")
        pytest.skip(f"no local slurm: {why}")
    env = {}
    for line in subprocess.run(["bash", LOCAL_SLURM, "env"], capture_output=True, text=True, timeout=60,
                               check=True).stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    return env


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Data and checkpoints outside the clone, in folders whose names hold a space; a tag file there gives the
    sweep's run0 tag a small ResNet18, by a checkpoints/... path that resolves under the checkpoint root."""
    base = tmp_path_factory.mktemp("roots")
    data, ckpts = base / "my data", base / "my ckpts"
    make_cifar(str(data), "cifar10", n_train=400, n_test=100)
    make_imagenet(str(data), num_classes=4, n_train=8, n_val=3, size=24)
    make_checkpoint(str(ckpts / "supervised_pretrain" / "small" / "run0.pth"), "resnet18", "raw", seed=0)
    (ckpts / "tags.yaml").write_text(f"{TAG}:\n  arch: [resnet18]\n  pretrained: "
                                     "[checkpoints/supervised_pretrain/small/run0.pth]\n")
    return {"base": base, "data": data, "ckpts": ckpts}


def probe_flags(roots, dump, epochs):
    return ["--tag_file", str(roots["ckpts"] / "tags.yaml"), "--epochs", str(epochs), "--img_size", "32",
            "--batch_size", "50", "--workers", "0", "--no-download", "--dump_path", str(dump)]


def job_id(stdout):
    """The job id sbatch ('Submitted batch job N') or our submitit route ('job N: ...') printed."""
    for line in stdout.splitlines():
        if line.startswith("Submitted batch job "):
            return line.split()[-1]
        if line.startswith("job ") and ":" in line:
            return line.split()[1].rstrip(":")
    raise AssertionError(f"no job id in {stdout!r}")


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)


def job_finished(job, env):
    """Waits until slurm no longer lists the job (array tasks included); returns `scontrol show job`."""
    squeue = lambda: subprocess.run(["squeue", "-h", "-j", job.split("_")[0]], capture_output=True, text=True,
                                    env={**os.environ, **env}, timeout=30).stdout.strip()
    wait_until(lambda: not squeue(), 300, f"job {job} to end")
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30).stdout


def records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: m[k] for k in ("epoch", "train_loss", "train_top1", "test_loss", "test_top1")}
                for m in map(json.loads, f)]


def test_a_sweep_task_with_data_and_checkpoints_outside_the_clone_runs_to_the_end(slurm, roots, tmp_path):
    dump = tmp_path / "out sweep"
    done = run_submit("lineareval", "--sweep", "cifar", "--data", "cifar10", "--config", "run0", "--wd", "1e-4",
                      "5e-4", "--data_path", str(roots["data"]), "--checkpoint_root", str(roots["ckpts"]),
                      "--", *SMALL_NODE, "--mem=2G", "--", *probe_flags(roots, dump, 2),
                      env={**slurm, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    log = os.path.join(ROOT, "results", "slurm", f"timecat-probe-{job}_3.out")
    try:
        state = job_finished(f"{job}_3", slurm)
        assert "JobState=COMPLETED" in state, state
        for head in ("wd1e-4_lr0.01", "wd5e-4_lr0.01"):  # one_pass, narrowed to the two selected weight decays
            assert "Top-1 test accuracy:" in (dump / head / "train.log").read_text()
        recorded = json.loads((dump / "args.json").read_text())
        assert recorded["data_path"] == str(roots["data"])
        assert recorded["pretrained"] == [str(roots["ckpts"] / "supervised_pretrain" / "small" / "run0.pth")]
        with open(log) as f:
            line = next(line for line in f if line.startswith("task 3: "))
        assert shlex.split(line)[3:] == submit.task_arguments("cifar", "one_pass", 3, workers=1,
                                                              wds=["1e-4", "5e-4"],
                                                              probe_args=probe_flags(roots, dump, 2))
    finally:
        if os.path.exists(log):
            os.remove(log)


def test_pretraining_takes_its_own_arguments_and_the_roots_through_submit(slurm, roots, tmp_path):
    done = run_submit("pretrain", "--data_path", str(roots["data"]), "--checkpoint_root", str(roots["ckpts"]), "--",
                      "--array=4", "--ntasks-per-node=1", *SMALL_NODE, "--mem-per-cpu=2G", "--",
                      "--arch", "resnet18", "--img_size", "16", "--global_batch", "8", "--steps", "2", "--save_steps",
                      "--eval_every", "0", "--warmup_steps", "1", "--bn_refresh_batches", "1",
                      "--dump_path", str(tmp_path / "run4"), env={**slurm, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    log = os.path.join(ROOT, "results", "slurm", f"timecat_pretrain-{job}_4.out")
    try:
        state = job_finished(f"{job}_4", slurm)
        assert "JobState=COMPLETED" in state, state
        # run 4 of the array, with the step budget and architecture given on the submit line, written under the
        # checkpoint root (the script names neither the data nor the checkpoint folder)
        assert (roots["ckpts"] / "supervised_pretrain" / "resnet18_sfadamw" / "checkpoints_stepfull" /
                "checkpoint_run4.pth.tar").is_file()
        recorded = json.loads((tmp_path / "run4" / "args.json").read_text())
        assert (recorded["steps"], recorded["run"], recorded["workers"]) == (2, 4, 0)  # 1 CPU: no worker
        assert recorded["data_path"] == str(roots["data"])
    finally:
        if os.path.exists(log):
            os.remove(log)


def test_submitit_job_requeued_by_its_warning_signal_resumes_to_the_uninterrupted_result(slurm, roots, tmp_path):
    pytest.importorskip("submitit")
    dump, env = tmp_path / "out submitit", {**slurm, "OMP_NUM_THREADS": "1"}
    flags = probe_flags(roots, dump, 6)
    done = run_submit("lineareval", "--sweep", "cifar", "--data", "cifar10", "--config", "run0", "--wd", "1e-4",
                      "--launcher", "submitit", "--gpus_per_node", "0", "--cpus_per_task", "1", "--mem", "2G",
                      "--hours", "0.5", "--data_path", str(roots["data"]), "--checkpoint_root", str(roots["ckpts"]),
                      "--", "--", *flags, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    folder = os.path.join(ROOT, submit.SUBMITIT_FOLDER, job)
    try:
        # slurm's warning before the time limit, as submitit asks for it (USR2), once the first epoch is saved
        wait_until(lambda: (dump / "metrics.jsonl").exists() and (dump / "metrics.jsonl").read_text(), 300,
                   "the first epoch")
        subprocess.run(["scancel", "--signal=USR2", job], env={**os.environ, **env}, check=True, timeout=30)
        state = job_finished(job, slurm)
        assert "JobState=COMPLETED" in state and "Restarts=1" in state, state
        log = open(os.path.join(folder, f"{job}_0_log.out")).read()
        assert "Caught signal SIGUSR2" in log and "Resumed from" in log, log[-3000:]
        # the same task uninterrupted, as one plain process
        reference = tmp_path / "reference"
        argv = submit.task_arguments("cifar", "one_pass", 3, processes=1, workers=1, wds=["1e-4"],
                                     probe_args=probe_flags(roots, reference, 6))
        ran = subprocess.run([sys.executable, "main_linear_probe.py", *argv], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, **root_env(roots), "OMP_NUM_THREADS": "1"})
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert records(dump) == records(reference) and len(records(dump)) == 6
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        remove_submitit_links(folder)


def remove_submitit_links(folder):
    """submitit leaves a link to the job's script beside the job folders."""
    parent = os.path.dirname(folder)
    for name in os.listdir(parent):
        if name.startswith(".submission_file_") and os.readlink(os.path.join(parent, name)).startswith(folder):
            os.remove(os.path.join(parent, name))


def root_env(roots):
    return {layout.DATA_ENV: str(roots["data"]), layout.CHECKPOINTS_ENV: str(roots["ckpts"])}


@pytest.mark.slow  # 2-5 min of slurm queueing and requeue delay; the default suite runs the probe's submitit requeue
def test_submitit_pretraining_run_requeued_by_its_warning_signal_ends_with_the_uninterrupted_weights(slurm, roots,
                                                                                                  tmp_path):
    pytest.importorskip("submitit")
    import torch
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    tiny = ["--arch", "resnet18", "--img_size", "16", "--global_batch", "8", "--precision", "fp32", "--steps", "16",
            "--save_steps", "8", "--eval_every", "4", "--warmup_steps", "2", "--bn_refresh_batches", "1",
            "--print_freq", "1"]
    done = run_submit("pretrain", "--launcher", "submitit", "--runs", "4", "--tasks_per_node", "1",
                      "--gpus_per_node", "0", "--cpus_per_task", "1", "--mem", "2G", "--hours", "0.5",
                      "--data_path", str(roots["data"]), "--checkpoint_root", str(tmp_path / "my ckpts"), "--", "--",
                      *tiny, "--dump_path", str(tmp_path / "cut"), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    folder = os.path.join(ROOT, submit.SUBMITIT_FOLDER, job)
    log = tmp_path / "cut" / "train.log"
    try:
        wait_until(lambda: log.exists() and "Step: [5/16]" in log.read_text(), 300, "step 5")
        subprocess.run(["scancel", "--signal=USR2", job], env={**os.environ, **env}, check=True, timeout=30)
        state = job_finished(job, slurm)
        assert "JobState=COMPLETED" in state and "Restarts=1" in state, state
        assert "Resumed from step" in log.read_text()
        # the same run uninterrupted, as one plain process with the arguments the job got
        argv = submit.pretrain_arguments(4, workers=1, script_args=[*tiny, "--dump_path", str(tmp_path / "whole"),
                                                                    "--output_dir", str(tmp_path / "whole ckpt")])
        ran = subprocess.run([sys.executable, "main_pretrain.py", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env={**os.environ, **root_env(roots), "OMP_NUM_THREADS": "1"})
        assert ran.returncode == 0, ran.stderr[-2000:]
        cut = tmp_path / "my ckpts" / "supervised_pretrain" / "resnet18_sfadamw" / "checkpoints_stepfull"
        a = torch.load(cut / "checkpoint_run4.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "whole ckpt" / "checkpoints_stepfull" / "checkpoint_run4.pth.tar",
                       map_location="cpu", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        remove_submitit_links(folder)


def test_setup_without_a_driver_says_which_build_it_installed_and_how_to_choose(tmp_path):
    from test_setup import FAKE_PYTHON3, FAKE_UV  # setup.sh's fakes: no network, no real install
    project, fakes = tmp_path / "project", tmp_path / "bin"
    project.mkdir()
    fakes.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.sh"), project / "setup.sh")
    for name, text in (("python3", FAKE_PYTHON3), ("uv.src", FAKE_UV)):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fakes}:/usr/bin:/bin", LOG=str(tmp_path / "calls.log"),
               FAKE_UV=str(fakes / "uv.src"))
    env.pop("CUDA", None)
    if shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.skip("this machine has an NVIDIA driver")
    done = subprocess.run(["bash", "setup.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "setup: torch build locked (no nvidia-smi" in done.stdout
    assert "no NVIDIA driver on this machine" in done.stdout and "./setup.sh --cuda cu128" in done.stdout
    quiet = subprocess.run(["bash", "setup.sh", "--cuda", "locked"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=60)
    assert quiet.returncode == 0 and "no NVIDIA driver" not in quiet.stdout  # a named build needs no advice
