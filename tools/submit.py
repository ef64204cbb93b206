"""Submit the project's slurm jobs from anywhere: create every folder the script's #SBATCH lines name, then call
sbatch from the project folder (the jobs run there; slurm does not start a job whose --output folder is missing,
and `results/` is not in a fresh clone).

    python tools/submit.py lineareval --sweep cifar                      # 16 tasks, each trains the whole wd grid
    python tools/submit.py lineareval --sweep cifar --layout per_wd      # the reference's 96 tasks, one per wd
    python tools/submit.py lineareval --sweep cifar --data cifar100 --config cat5_step80k --dry_run   # one task
    python tools/submit.py lineareval --sweep imagenet --feature_cache /scratch/feats
    python tools/submit.py lineareval --sweep inat18 --partition gpu -- --qos=high -- --epochs 10 --workers 6
    python tools/submit.py lineareval --sweep cifar --launcher submitit --hours 6 --gpus_per_node 1
    python tools/submit.py list --sweep cifar                            # which array index is which task
    python tools/submit.py pretrain --data_path /datasets -- --gpus-per-node=2 --ntasks-per-node=2 -- --steps 1000

The command line: `tools/submit.py COMMAND [flags] [-- sbatch flags [-- script flags]]`. After the first `--`,
sbatch options (they come after ours, so they win); after a second `--`, flags for the script of every task
(lineareval: main_linear_probe.py; pretrain: main_pretrain.py), placed last so they win over the task's own.
The data and checkpoints may live outside the clone: --data_path and --checkpoint_root (defaults $TIMECAT_DATA and
$TIMECAT_CHECKPOINTS, else the clone's data/ and checkpoints/; util/layout.py owns the names) reach every task as
those variables. `--dry_run` prints the tasks and the command and writes nothing. `tools/submit.py task` is what
scripts/lineareval.sbatch runs inside a task: it prints one array index's main_linear_probe.py arguments, one per
line. The grids are util/sweeps.py's.
"""
import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from arguments.common import add_checkpoint_root_arg, add_data_path_arg
from util import layout
from util.cli import ArgumentParser  # one-line errors, defaults shown once; torch-free
from util.sweeps import CONFIGS, DEFAULT_LAYOUT, LAYOUTS, SWEEPS, WD_GRIDS, sweep_tasks, task_hours

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEAREVAL = os.path.join("scripts", "lineareval.sbatch")
PRETRAIN = os.path.join("scripts", "pretrain_timecat.sbatch")
SUBMITIT_FOLDER = os.path.join("results", "submitit")  # submitit's pickles and logs, %j: the job id
PATH_OPTIONS = {"--output": "output", "-o": "output", "--error": "error", "-e": "error", "--chdir": "chdir",
                "-D": "chdir"}
# The original probe's slurm flags (vestiges of its submitit launcher, in the original release's code): name ->
# (type, the original's default, sbatch option). Given here, they mean what their names say for either launcher;
# unset, the script's #SBATCH lines (sbatch) or the sweep's values (submitit) apply.
ORIGINAL_SLURM_FLAGS = {
    "hours": (float, 12, "--time"), "nodes": (int, 1, "--nodes"), "tasks_per_node": (int, 8, "--ntasks-per-node"),
    "gpus_per_node": (int, 1, "--gpus-per-node"), "cpus_per_task": (int, 8, "--cpus-per-task"),
    "mem": (str, "64G", "--mem"), "constraint": (str, None, "--constraint"), "gres": (str, None, "--gres"),
    "exclude": (str, None, "--exclude"), "job_name": (str, "submitit", "--job-name"),
    "account": (str, None, "--account"),
}
MORE_SLURM_FLAGS = {"partition": "--partition", "qos": "--qos"}
# What a probe task asks when nothing says otherwise: the original's CIFAR script (1 GPU, 8 CPUs, 64G), one process
SWEEP_RESOURCES = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1, "cpus_per_task": 8, "mem": "64G",
                   "job_name": "timecat-probe"}
# ... and a pretraining run: scripts/pretrain_timecat.sbatch's (tools/plan_timecat.py's defaults), 24 h
PRETRAIN_RESOURCES = {"nodes": 1, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10, "mem": None,
                      "mem_per_cpu": "4G", "job_name": "timecat_pretrain", "hours": 24}


class SubmitError(Exception):
    """A user error of this tool: one line, exit code 2 (the tool stays torch-free so it answers at once)."""


# ---- the command line around sbatch
def split_argv(argv):
    """(ours, sbatch's, the script's): `tools/submit.py ... -- SBATCH ... -- SCRIPT ...`."""
    argv = list(argv)
    parts = [[], [], []]
    part = 0
    for word in argv:
        if word == "--" and part < 2:
            part += 1
        else:
            parts[part].append(word)
    return parts


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


def slurm_time(hours):
    """sbatch --time of a number of hours (minutes rounded up): 5 -> 5:00:00, 0.25 -> 0:15:00."""
    minutes = max(1, -int(-float(hours) * 60 // 1))
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def slurm_flag_options(args):
    """sbatch options of the slurm flags given on our command line (the original's names and --partition/--qos)."""
    options = []
    for name, (_, _, option) in ORIGINAL_SLURM_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            options.append(f"{option}={slurm_time(value) if name == 'hours' else value}")
    for name, option in MORE_SLURM_FLAGS.items():
        if getattr(args, name, None) is not None:
            options.append(f"{option}={getattr(args, name)}")
    return options


def sbatch_command(script, array, options, extra, script_args):
    command = ["sbatch", "--export=ALL"]  # the variables below reach the job even where SBATCH_EXPORT=NONE
    if array:
        command.append(f"--array={array}")
    return command + list(options) + list(extra) + [script] + list(script_args)


def show_command(exports, command):
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in exports.items()] + [shlex.quote(w) for w in command])


def root_exports(args):
    """The data and checkpoint roots, as the variables every script and tool reads (util/layout.py)."""
    return {layout.DATA_ENV: os.path.abspath(args.data_path),
            layout.CHECKPOINTS_ENV: os.path.abspath(args.checkpoint_root)}


def submit(script, array, exports, options, args, script_args=()):
    """Create the folders (not with --dry_run), then run (or print) sbatch from the project folder with `exports`
    in its environment."""
    if not os.path.isfile(os.path.join(REPO, script)):
        raise SubmitError(f"no sbatch script {script}; write it first (tools/plan_timecat.py --sbatch_out)")
    with open(os.path.join(REPO, script)) as f:
        found = sbatch_options(f.read(), args.sbatch_args)
    folders = folders_to_create(found, REPO)  # checked (no slurm pattern) even in a dry run
    command = sbatch_command(script, array, options, args.sbatch_args, script_args)
    print(show_command(exports, command))
    if args.dry_run:
        return 0
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: submit from a slurm login node (or add --dry_run to print the "
                          "command)")
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    return subprocess.run(command, cwd=REPO, env={**os.environ, **exports}).returncode


# ---- the probe sweeps
def selected(args):
    """[(array index, task)] of the sweep that --data / --config / --wd select (all by default)."""
    for data in args.data or ():
        if data not in SWEEPS[args.sweep]:
            raise SubmitError(f"--data {data} is not in --sweep {args.sweep} ({', '.join(SWEEPS[args.sweep])})")
    wanted = {float(w) for w in args.wd or ()}
    chosen = [(i, t) for i, t in enumerate(sweep_tasks(args.sweep, args.layout, args.wd))
              if (not args.data or t.data in args.data) and (not args.config or t.config in args.config)
              and t.wds and (not wanted or any(float(w) in wanted for w in t.wds))]
    if not chosen:
        raise SubmitError(f"no task of --sweep {args.sweep} matches --data/--config/--wd (grids: "
                          f"{'; '.join(f'{d} ' + ' '.join(WD_GRIDS[d]) for d in SWEEPS[args.sweep])}); "
                          "`tools/submit.py list --sweep ...` shows the tasks")
    return chosen


def array_ranges(indices):
    """'0-7,16-23' for sbatch --array."""
    indices, parts, start = sorted(indices), [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def print_tasks(chosen):
    print(f"{'index':>5}  {'dataset':<14} {'config':<14} {'wd':<24} {'hours':>5}  folder")
    for i, t in chosen:
        print(f"{i:>5}  {t.data:<14} {t.config:<14} {' '.join(t.wds):<24} {task_hours(t):>5}  {t.dump_path}")


def sweep_exports(args):
    exports = {"SWEEP": args.sweep, "LAYOUT": args.layout, **root_exports(args)}
    if args.wd:
        exports["WD"] = " ".join(args.wd)
    if args.feature_cache:
        exports["FEATURE_CACHE"] = os.path.abspath(args.feature_cache)
    if args.script_args:
        exports["PROBE_ARGS"] = shlex.join(args.script_args)
    return exports


def task_arguments(sweep, layout_name, index, processes=1, workers=10, feature_cache=None, wds=None,
                   probe_args=()):
    """main_linear_probe.py arguments of one array task (scripts/lineareval.sbatch, the submitit job)."""
    tasks = sweep_tasks(sweep, layout_name, wds)
    if not 0 <= index < len(tasks):
        raise SubmitError(f"array index {index} out of range 0-{len(tasks) - 1} for --sweep {sweep} "
                          f"--layout {layout_name}")
    task = tasks[index]
    if not task.wds:
        raise SubmitError(f"array index {index} of --sweep {sweep} has none of the weight decays --wd {' '.join(wds)}")
    if task.batch % processes:
        raise SubmitError(f"the global batch {task.batch} of {task.data} does not divide over {processes} "
                          "processes; use a divisor")
    argv = ["--tag", task.tag, "--data_name", task.data, "--wd", *task.wds,
            "--batch_size", str(task.batch // processes),  # per process: the global batch stays the reference's
            "--workers", str(workers), "--dump_path", task.dump_path, "--precision", "fp32", *task.extra]
    if feature_cache:
        argv += ["--feature_cache", feature_cache]
    return argv + list(probe_args)  # last: the user's flags win


def lineareval(args):
    chosen = selected(args)
    hours = max(task_hours(t) for _, t in chosen)
    if args.dry_run or args.command == "list":
        print_tasks(chosen)
    if args.command == "list":
        return 0
    if args.launcher == "submitit":
        return submit_with_submitit(args, chosen, hours)
    options = [f"--time={slurm_time(hours)}", *slurm_flag_options(args)]  # a given --hours comes later and wins
    return submit(args.script, array_ranges([i for i, _ in chosen]), sweep_exports(args), options, args)


def pretrain(args):
    if args.launcher == "submitit":
        return submit_with_submitit(args)
    if args.runs is not None:
        raise SubmitError("--runs selects the runs of --launcher submitit; with sbatch, name the array tasks: "
                          "-- --array=0,4")
    return submit(args.script, None, root_exports(args), slurm_flag_options(args), args, args.script_args)


def pretrain_runs():
    """{run: (steps, save_steps)} of the Time-Cat plan the shipped pretraining script runs (tools/plan_timecat.py's
    defaults: the paper's budget)."""
    from tools import plan_timecat
    plan = plan_timecat.get_args_parser().parse_args([])
    _, runs = plan_timecat.make_plan(plan)
    return {i: (max(runs[i]), plan_timecat.save_steps(plan, i, runs)) for i in sorted(runs)}


def pretrain_arguments(run, workers=1, script_args=()):
    """main_pretrain.py arguments of one run of the plan, as scripts/pretrain_timecat.sbatch gives them."""
    steps, save_steps = pretrain_runs()[run]
    return ["--arch", "resnet50", "--run", str(run), "--steps", str(steps), "--save_steps", *map(str, save_steps),
            "--workers", str(max(workers - 1, 0)), "--dump_path", f"results/pretrain/resnet50_sfadamw/run{run}",
            *script_args]


def task(args):
    print("\n".join(task_arguments(args.sweep, args.layout, args.index, args.processes, args.workers,
                                   args.feature_cache, args.wd, shlex.split(args.probe_args or ""))))
    return 0


# ---- submitit (MAE / DINO style): the same tasks, checkpointed and requeued by submitit
class ScriptJob:
    """One task as a submitit job: a probe task of a sweep (main_linear_probe.py) or a pretraining run
    (main_pretrain.py), with the arguments the sbatch scripts give it. submitit calls `checkpoint` on slurm's warning
    signal before the time limit or a preemption (USR2, --signal=USR2@300): the script is asked to stop (SIGTERM: it
    saves a resumable state and exits), and submitit requeues the job with the same task, which resumes."""

    def __init__(self, script, spec):
        self.script, self.spec, self.child = script, spec, None

    def __getstate__(self):
        return {"script": self.script, "spec": self.spec, "child": None}  # the running process stays here

    def arguments(self):
        env = os.environ
        processes, cpus = int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_CPUS_PER_TASK", "1"))
        if self.script == "main_pretrain.py":
            return pretrain_arguments(workers=cpus, **self.spec)
        return task_arguments(processes=processes, workers=cpus, **self.spec)

    def __call__(self):
        argv = self.arguments()
        print(f"{self.script} {shlex.join(argv)}", flush=True)
        # submitit's preemption signal reaches every process of the step: the script leaves it to this process
        self.child = subprocess.Popen([sys.executable, self.script, *argv], cwd=REPO,
                                      preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        # poll, not wait(): submitit's signal handler runs `checkpoint` in this thread, and a wait() it interrupted
        # would hold the lock that checkpoint's own wait for the child needs (it would then never see it exit)
        while self.child.poll() is None:
            time.sleep(0.5)
        if self.child.returncode:
            raise RuntimeError(f"{self.script} exited with code {self.child.returncode} (its train.log says why)")
        return self.spec

    def checkpoint(self, *args, **kwargs):
        import submitit
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # the script saves a resumable state and exits
            try:
                self.child.wait(timeout=240)  # inside slurm's 300 s warning
            except subprocess.TimeoutExpired:
                self.child.kill()
        return submitit.helpers.DelayedSubmission(ScriptJob(self.script, self.spec))


def submitit_parameters(args, hours, resources=SWEEP_RESOURCES):
    """submitit's executor parameters: the original's slurm flags where given, else the task's resources."""
    value = lambda name: getattr(args, name) if getattr(args, name) is not None else resources.get(name)
    params = {"timeout_min": int(round(60 * (args.hours if args.hours is not None else hours))),
              "nodes": value("nodes"), "tasks_per_node": value("tasks_per_node"),
              "gpus_per_node": value("gpus_per_node"), "cpus_per_task": value("cpus_per_task"),
              "name": value("job_name"), "slurm_signal_delay_s": 300, "slurm_additional_parameters": {"requeue": True}}
    if value("mem") is not None:
        params["slurm_mem"] = value("mem")
    elif resources.get("mem_per_cpu"):
        params["slurm_mem_per_cpu"] = resources["mem_per_cpu"]
    for name in ("constraint", "gres", "exclude", "account", "partition", "qos"):
        if getattr(args, name, None) is not None:
            params[f"slurm_{name}"] = getattr(args, name)
    for word in args.sbatch_args:  # `-- --name=value` sbatch options, as submitit writes them
        name, sep, val = word.lstrip("-").partition("=")
        if not word.startswith("--") or not sep:
            raise SubmitError(f"with --launcher submitit, sbatch options after -- are --name=value; got {word!r}")
        params["slurm_additional_parameters"][name.replace("-", "_")] = val
    return params


def submit_with_submitit(args, chosen=None, hours=None):
    """The probe tasks `chosen` of a sweep, or (pretrain) the plan's --runs, as submitit jobs (one array)."""
    try:
        import submitit
    except ImportError:
        raise SubmitError("--launcher submitit needs the submitit package: ./setup.sh installs it (the 'slurm' "
                          "extra), or `pip install submitit`") from None
    if args.command == "pretrain":
        plan = pretrain_runs()
        runs = list(plan) if args.runs is None else args.runs
        for run in runs:
            if run not in plan:
                raise SubmitError(f"--runs {run}: the plan's runs are {', '.join(map(str, plan))}")
        jobs = [(f"run {run}", ScriptJob("main_pretrain.py", {"run": run, "script_args": args.script_args}))
                for run in runs]
        params = submitit_parameters(args, PRETRAIN_RESOURCES["hours"], PRETRAIN_RESOURCES)
    else:
        cache = args.feature_cache and os.path.abspath(args.feature_cache)
        jobs = [(f"index {i} {t.data} {t.config} -> {t.dump_path}",
                 ScriptJob("main_linear_probe.py", {"sweep": args.sweep, "layout_name": args.layout, "index": i,
                                                    "wds": args.wd, "feature_cache": cache,
                                                    "probe_args": args.script_args})) for i, t in chosen]
        params = submitit_parameters(args, hours)
    print(f"submitit: {len(jobs)} task(s), {params}")
    if args.dry_run:
        return 0
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: submit from a slurm login node (or add --dry_run)")
    os.environ.update(root_exports(args))  # the jobs inherit this environment (submitit exports ALL)
    executor = submitit.AutoExecutor(folder=os.path.join(REPO, SUBMITIT_FOLDER, "%j"), cluster="slurm")
    executor.update_parameters(**params)
    with executor.batch():
        submitted = [executor.submit(job) for _, job in jobs]
    for (what, _), job in zip(jobs, submitted):
        print(f"job {job.job_id}: {what} (log {os.path.relpath(job.paths.stdout, REPO)})")
    return 0


# ---- the command line
def wd_value(text):
    """A weight decay as typed (kept as the grid spells it), checked to be a number."""
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return text


def add_slurm_flags(p):
    g = p.add_argument_group("slurm resources (the original probe's flags; unset: the script's #SBATCH lines, "
                             "or the sweep's resources with submitit)")
    for name, (kind, original, option) in ORIGINAL_SLURM_FLAGS.items():
        g.add_argument(f"--{name}", type=kind, default=None, help=f"sbatch {option} (the original's default: "
                       f"{original}{'; unset: the sweep’s time (original: 5-12 h)' if name == 'hours' else ''})")
    for name, option in MORE_SLURM_FLAGS.items():
        g.add_argument(f"--{name}", default=None, help=f"sbatch {option}")


def get_args_parser():
    p = ArgumentParser("tools/submit.py", description="create the folders a slurm script writes to, then sbatch "
                       "it (run from anywhere; jobs run in the project folder). After `--`: sbatch options; after "
                       "a second `--`: the task script's flags")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--dry_run", action="store_true", help="print the tasks and the sbatch command; write nothing")
    add_data_path_arg(run, REPO, "data root the jobs read (exported as $TIMECAT_DATA)")
    add_checkpoint_root_arg(run, REPO, "checkpoint root the jobs read and write (the folder holding "
                            "supervised_pretrain/; exported as $TIMECAT_CHECKPOINTS)")
    run.add_argument("--launcher", default="sbatch", choices=["sbatch", "submitit"], help="sbatch: the project's "
                     "sbatch script (recommended); submitit: the same tasks through submitit (MAE/DINO style)")
    add_slurm_flags(run)
    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--sweep", required=True, choices=sorted(SWEEPS), help="datasets of the sweep")
    grid.add_argument("--layout", default=DEFAULT_LAYOUT, choices=LAYOUTS, help="one_pass: one task per dataset x "
                      "configuration trains the whole wd grid on one backbone pass, each head bit-identical to "
                      "its per_wd task, 2.5x fewer forwards (recommended, default); per_wd: one task per weight "
                      "decay, the reference's layout and folders")
    grid.add_argument("--wd", nargs="+", type=wd_value, default=None, help="only these weight decays of the grid")
    sel = argparse.ArgumentParser(add_help=False)
    sel.add_argument("--data", nargs="+", default=None, choices=sorted(WD_GRIDS), help="only these datasets")
    sel.add_argument("--config", nargs="+", default=None, choices=CONFIGS, help="only these configurations")
    q = sub.add_parser("lineareval", parents=[run, grid, sel], help="the reference probe sweeps (Figure 2)")
    q.add_argument("--feature_cache", default=None, help="the probe's --feature_cache folder (faster, not the "
                   "reference: no per-epoch augmentation; the reference recomputes features every epoch)")
    q.add_argument("--script", default=LINEAREVAL, help="sbatch script, relative to the project folder")
    q.set_defaults(func=lineareval)
    q = sub.add_parser("list", parents=[grid, sel], help="print which array index is which task of a sweep")
    q.set_defaults(func=lineareval, feature_cache=None, dry_run=True)
    q = sub.add_parser("pretrain", parents=[run], help="the Time-Cat pretraining array (tools/plan_timecat.py)")
    q.add_argument("--script", default=PRETRAIN, help="sbatch script, relative to the project folder")
    q.add_argument("--runs", type=int, nargs="+", default=None, help="with --launcher submitit: only these runs of "
                   "the plan (default: all, 0-4); with sbatch: -- --array=...")
    q.set_defaults(func=pretrain)
    q = sub.add_parser("task", parents=[grid], help="print one array task's probe arguments (used by "
                       "scripts/lineareval.sbatch)")
    q.add_argument("--index", type=int, required=True, help="SLURM_ARRAY_TASK_ID")
    q.add_argument("--processes", type=int, default=1, help="processes sharing the global batch (SLURM_NTASKS)")
    q.add_argument("--workers", type=int, default=10, help="data-loading processes (SLURM_CPUS_PER_TASK)")
    q.add_argument("--feature_cache", default=None)
    q.add_argument("--probe_args", default=None, help="more main_linear_probe.py flags, shell-quoted (PROBE_ARGS)")
    q.set_defaults(func=task)
    return p


def main(argv=None):
    ours, sbatch_args, script_args = split_argv(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(ours)
    args.sbatch_args, args.script_args = sbatch_args, script_args
    try:
        if args.command in ("list", "task") and (sbatch_args or script_args):
            raise SubmitError(f"`tools/submit.py {args.command}` takes no arguments after --")
        return args.func(args)
    except (SubmitError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
