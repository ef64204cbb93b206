"""Submit the project's slurm jobs from a fresh clone: create every folder the script's #SBATCH lines name, then
call sbatch (slurm does not start a job whose --output folder is missing, and `results/` is not in the clone).

    python tools/submit.py lineareval --sweep cifar                      # the reference layout: 96 tasks, one per wd
    python tools/submit.py lineareval --sweep cifar --layout one_pass    # 16 tasks, each trains the whole wd grid
    python tools/submit.py lineareval --sweep imagenet --layout one_pass --feature_cache /scratch/feats
    python tools/submit.py pretrain                                      # scripts/pretrain_timecat.sbatch
    python tools/submit.py lineareval --sweep inat18 --dry_run -- --partition=gpu --gpus-per-node=4

Arguments after `--` go to sbatch. `tools/submit.py task` is what scripts/lineareval.sbatch runs inside a task:
it prints the main_linear_probe.py arguments of one array index, one per line. The grids are util/sweeps.py's.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys

from util.cli import ArgumentParser  # one-line errors, defaults shown once; torch-free
from util.sweeps import LAYOUTS, SWEEPS, sweep_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEAREVAL = os.path.join("scripts", "lineareval.sbatch")
PRETRAIN = os.path.join("scripts", "pretrain_timecat.sbatch")
PATH_OPTIONS = {"--output": "output", "-o": "output", "--error": "error", "-e": "error", "--chdir": "chdir",
                "-D": "chdir"}


class SubmitError(Exception):
    """A user error of this tool: one line, exit code 2 (the tool stays torch-free so it answers at once)."""


def sbatch_options(script_text, extra=()):
    """{output, error, chdir} named by the script's #SBATCH lines, then by sbatch arguments (which win)."""
    words = []
    for line in script_text.splitlines():
        if line.startswith("#SBATCH"):
            words += shlex.split(line[len("#SBATCH"):], comments=True)
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops reading #SBATCH lines at the first command
    words += list(extra)
    found = {}
    for i, word in enumerate(words):
        name, sep, value = word.partition("=")
        if name in PATH_OPTIONS:
            if not sep:  # "-o path" / "--output path"
                value = words[i + 1] if i + 1 < len(words) else ""
            found[PATH_OPTIONS[name]] = value
        elif word[:2] in ("-o", "-e", "-D") and len(word) > 2 and not word.startswith("--"):
            found[PATH_OPTIONS[word[:2]]] = word[2:]  # "-opath"
    return found


def folders_to_create(options, submit_dir):
    """Folders slurm needs before the job starts: the working directory and the log files' folders."""
    workdir = os.path.join(submit_dir, options.get("chdir", "."))
    folders = [workdir]
    for key in ("output", "error"):
        folder = os.path.dirname(options.get(key, ""))
        if "%" in folder:
            raise SubmitError(f"#SBATCH --{key} folder {folder!r} has a slurm pattern; keep patterns in the "
                              "file name so the folder can be created before submission")
        if folder:
            folders.append(os.path.join(workdir, folder))
    return folders


def sbatch_command(script, array, exports, extra):
    command = ["sbatch"]
    if array:
        command.append(f"--array={array}")
    if exports:
        command.append("--export=" + ",".join(["ALL"] + [f"{k}={v}" for k, v in exports.items()]))
    return command + list(extra) + [script]


def submit(script, array, exports, extra, dry_run):
    """Create the folders, then run (or print) sbatch from the project folder."""
    if not os.path.isfile(os.path.join(REPO, script)):
        raise SubmitError(f"no sbatch script {script}; write it first (tools/plan_timecat.py --sbatch_out)")
    with open(os.path.join(REPO, script)) as f:
        options = sbatch_options(f.read(), extra)
    for folder in folders_to_create(options, REPO):
        os.makedirs(folder, exist_ok=True)
    command = sbatch_command(script, array, exports, extra)
    print(" ".join(map(shlex.quote, command)))
    if dry_run:
        return 0
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: submit from a slurm login node (or add --dry_run to print the "
                          "command)")
    return subprocess.run(command, cwd=REPO).returncode


def task_arguments(args):
    """main_linear_probe.py arguments of one array task, for scripts/lineareval.sbatch."""
    tasks = sweep_tasks(args.sweep, args.layout)
    if not 0 <= args.index < len(tasks):
        raise SubmitError(f"array index {args.index} out of range 0-{len(tasks) - 1} for --sweep {args.sweep} "
                          f"--layout {args.layout}")
    task = tasks[args.index]
    if task.batch % args.processes:
        raise SubmitError(f"the global batch {task.batch} of {task.data} does not divide over {args.processes} "
                          "processes; use a divisor")
    argv = ["--tag", task.tag, "--data_name", task.data, "--wd", *task.wds,
            "--batch_size", str(task.batch // args.processes),  # per process: the global batch stays the reference's
            "--workers", str(args.workers), "--dump_path", task.dump_path, "--precision", "fp32", *task.extra]
    if args.feature_cache:
        argv += ["--feature_cache", args.feature_cache]
    return argv


def lineareval(args):
    count = len(sweep_tasks(args.sweep, args.layout))
    exports = {"SWEEP": args.sweep, "LAYOUT": args.layout}
    if args.feature_cache:
        exports["FEATURE_CACHE"] = os.path.abspath(args.feature_cache)
    return submit(args.script, f"0-{count - 1}", exports, args.sbatch_args, args.dry_run)


def pretrain(args):
    return submit(args.script, None, {}, args.sbatch_args, args.dry_run)


def task(args):
    print("\n".join(task_arguments(args)))
    return 0


def get_args_parser():
    p = ArgumentParser("tools/submit.py", description="create the folders a slurm script writes to, "
                                "then sbatch it (run from anywhere; jobs run in the project folder)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--dry_run", action="store_true", help="create the folders and print the sbatch command only")
    run.add_argument("sbatch_args", nargs="*", help="after --: more sbatch options, e.g. -- --partition=gpu")
    q = sub.add_parser("lineareval", parents=[run], help="the reference probe sweeps (Figure 2)")
    q.add_argument("--sweep", required=True, choices=sorted(SWEEPS), help="datasets of the sweep")
    q.add_argument("--layout", default="per_wd", choices=LAYOUTS, help="per_wd: one task per weight decay, the "
                   "reference's layout and folders (default); one_pass: one task per dataset x configuration "
                   "trains the whole wd grid on one backbone pass (recommended for speed)")
    q.add_argument("--feature_cache", default=None, help="with one_pass: the probe's --feature_cache folder "
                   "(recommended on a shared file system; the reference recomputes features every epoch)")
    q.add_argument("--script", default=LINEAREVAL, help="sbatch script, relative to the project folder")
    q.set_defaults(func=lineareval)
    q = sub.add_parser("pretrain", parents=[run], help="the Time-Cat pretraining array (tools/plan_timecat.py)")
    q.add_argument("--script", default=PRETRAIN, help="sbatch script, relative to the project folder")
    q.set_defaults(func=pretrain)
    q = sub.add_parser("task", help="print one array task's probe arguments (used by scripts/lineareval.sbatch)")
    q.add_argument("--sweep", required=True, choices=sorted(SWEEPS))
    q.add_argument("--layout", default="per_wd", choices=LAYOUTS)
    q.add_argument("--index", type=int, required=True, help="SLURM_ARRAY_TASK_ID")
    q.add_argument("--processes", type=int, default=1, help="processes sharing the global batch (SLURM_NTASKS)")
    q.add_argument("--workers", type=int, default=10, help="data-loading processes (SLURM_CPUS_PER_TASK)")
    q.add_argument("--feature_cache", default=None)
    q.set_defaults(func=task)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return args.func(args)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
