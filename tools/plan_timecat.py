"""Time-Cat budget plan: N ResNets of T/N steps each (catN) against one run of the baseline budget (cat1).

    python tools/plan_timecat.py                                  # the paper: T=400k, N=2,4,5, cat1 450k
    python tools/plan_timecat.py --total_steps 400000 --n 8 --baseline_steps 0 --tag_prefix mine
    python tools/plan_timecat.py --print_only                     # the plan, no files

Prints the catN configurations and the runs to train, writes the probe's tags (--tags_out) and an sbatch array
script (--sbatch_out; one array task per run, --gpus_per_task GPUs each). Schedule-free AdamW has no horizon
and main_pretrain.py's data order depends on the seed and step only, so the T/N-step checkpoint of run i is a
milestone of any longer run i: every run trains once, to the longest budget that uses it, and writes the
shorter budgets as milestones.
"""
import argparse
import os
import shlex
import sys

import yaml

from arguments.pretrain import default_seed
from util import layout
from util.cli import ArgumentParser, UserError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# under results/ (ignored): a tool never modifies tracked files unless given their path
DEFAULT_TAGS = os.path.join("results", "timecat_plan", "timecat_plan.yaml")
DEFAULT_SBATCH = os.path.join("results", "timecat_plan", "pretrain_timecat.sbatch")


def get_args_parser():
    p = ArgumentParser("tools/plan_timecat.py", description="Time-Cat budget plan: runs, probe tags, sbatch array",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("budget")
    g.add_argument("--total_steps", type=int, default=400000, help="steps of each catN, split over its N runs "
                   "(paper: 400000)")
    g.add_argument("--n", type=int, nargs="+", default=[2, 4, 5], help="numbers of runs to concatenate "
                   "(paper: 2 4 5)")
    g.add_argument("--baseline_steps", type=int, default=450000, help="steps of the cat1 baseline runs "
                   "(paper: 450000; 0: no baseline)")
    g.add_argument("--baseline_runs", type=int, default=1, help="how many seeds of the baseline (the release "
                   "has 5: every run then trains the full baseline budget)")
    g = p.add_argument_group("layout")
    g.add_argument("--arch", default="resnet50", help="backbone (paper: resnet50)")
    g.add_argument("--output_dir", default=None, help="main_pretrain.py --output_dir in the script (relative: to "
                   "the project folder); default: none, so the runs write under --checkpoint_root / "
                   "$TIMECAT_CHECKPOINTS at run time, and the tags name checkpoints/supervised_pretrain/"
                   "{arch}_sfadamw/..., which the probe resolves under its --checkpoint_root")
    g.add_argument("--dump_root", default=os.path.join("results", "pretrain", "resnet50_sfadamw"),
                   help="run i logs to DUMP_ROOT/run{i}")
    g.add_argument("--tag_prefix", default="supervisedimagenet_resnet50_sfadamw", help="tags are "
                   "PREFIX_run{i} (cat1) and PREFIX_{N}_step{k}k (catN), the original names")
    g.add_argument("--tags_out", default=DEFAULT_TAGS, help="tag file for main_linear_probe.py --tag_file "
                   "(relative: to the project folder)")
    g.add_argument("--sbatch_out", default=DEFAULT_SBATCH, help="sbatch array script (relative: to the project "
                   "folder)")
    g.add_argument("--print_only", action="store_true", help="print the plan, write nothing")
    g = p.add_argument_group("slurm")
    g.add_argument("--gpus_per_task", type=int, default=8, help="GPUs (processes) per run; the global batch "
                   "stays 1024 whatever the count")
    g.add_argument("--cpus_per_gpu", type=int, default=10, help="CPU cores per GPU; the data-loading workers are "
                   "SLURM_CPUS_PER_TASK - 1 at run time, so -- --cpus-per-task=N at submission changes them")
    g.add_argument("--time", default="24:00:00", help="slurm time limit per job (a limit most clusters accept); a "
                   "job reaching it gets SIGUSR1 300 s before, saves its state and requeues itself, so a run longer "
                   "than the limit goes on in the next job")
    g.add_argument("--mem_per_cpu", default="4G", help="slurm --mem-per-cpu (scales with the CPUs a job asks: "
                   "40G per 10-CPU process)")
    g.add_argument("--partition", default=None, help="slurm partition")
    g.add_argument("--data_path", default=None, help="main_pretrain.py --data_path in the script; default: none, "
                   "so the runs read $TIMECAT_DATA, else data/ of the project folder (or pass it at submission: "
                   "tools/submit.py pretrain --data_path DIR)")
    g.add_argument("--extra", default="", help="more main_pretrain.py flags for every run, e.g. '--compile'")
    return p


def step_label(steps):
    return f"{steps // 1000}k" if steps % 1000 == 0 else f"{steps}steps"


def make_plan(args):
    """(configs, runs): configs = [(name, tag, steps per run, [run indices])], runs = {i: set of budgets}."""
    if args.total_steps < 1 or not args.n or min(args.n) < 1:
        raise UserError("--total_steps and every --n must be at least 1")
    if args.baseline_steps < 0 or args.baseline_runs < 0:
        raise UserError("--baseline_steps and --baseline_runs must be 0 or more")
    configs, runs = [], {}
    if args.baseline_steps and args.baseline_runs:
        for i in range(args.baseline_runs):
            configs.append((f"cat1 run{i}", f"{args.tag_prefix}_run{i}", args.baseline_steps, [i]))
    for n in sorted(set(args.n)):
        steps, rest = divmod(args.total_steps, n)
        if rest:
            raise UserError(f"--total_steps {args.total_steps} is not divisible by N={n}")
        configs.append((f"cat{n}", f"{args.tag_prefix}_{n}_step{step_label(steps)}", steps, list(range(n))))
    for _, _, steps, members in configs:
        for i in members:
            runs.setdefault(i, set()).add(steps)
    return configs, runs


def checkpoint_path(args, run, steps, runs):
    """The milestone folder of `steps`, or checkpoints_stepfull for a baseline that is the run's last step
    (the released layout)."""
    final = steps == max(runs[run]) and steps == args.baseline_steps
    released = layout.run_dir_name(args.arch, layout.SFADAMW_ALGOPERF)
    output_dir = args.output_dir or os.path.join(layout.CHECKPOINT_ROOT, released)
    return layout.checkpoint_path(output_dir, steps, run, final)


def save_steps(args, run, runs):
    """Every budget of the run except a baseline written as checkpoints_stepfull."""
    full = max(runs[run])
    return sorted(s for s in runs[run] if not (s == full and s == args.baseline_steps))


def sbatch_script(args, runs, command):
    order = sorted(runs)
    lines = [
        "#!/bin/bash",
        "# Time-Cat pretraining: one array task per ResNet run, each on one node with "
        f"{args.gpus_per_task} GPU(s).",
        f"# Written by: {command}",
        "# Submit from anywhere:  python tools/submit.py pretrain [--script THIS_FILE] [--data_path DIR] "
        "[-- sbatch flags [-- main_pretrain.py flags]]",
        "# (it creates results/slurm/ first: slurm does not start a job whose log folder is missing, and runs sbatch",
        "# from the project folder, where the job runs). Fewer GPUs: -- --ntasks-per-node=2 --gpus-per-node=2 (the",
        "# global batch stays 1024 by accumulation); the data-loading workers follow --cpus-per-task.",
        "# A job that is preempted or reaches its time limit gets SIGUSR1, saves resume.pth.tar, requeues itself,",
        "# and the requeued job resumes at the same step.",
        "#SBATCH --job-name=timecat_pretrain",
        f"#SBATCH --array=0-{len(order) - 1}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks-per-node={args.gpus_per_task}",
        f"#SBATCH --gpus-per-node={args.gpus_per_task}",
        f"#SBATCH --cpus-per-task={args.cpus_per_gpu}",
        f"#SBATCH --mem-per-cpu={args.mem_per_cpu}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=results/slurm/%x-%A_%a.out",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    lines += [
        "set -euo pipefail",
        'cd "$SLURM_SUBMIT_DIR"  # the project folder (tools/submit.py runs sbatch there)',
        "",
        f"RUNS=({' '.join(str(i) for i in order)})",
        f"STEPS=({' '.join(str(max(runs[i])) for i in order)})",
        "SAVE_STEPS=(" + " ".join(f'"{" ".join(map(str, save_steps(args, i, runs)))}"' for i in order) + ")",
        "i=${SLURM_ARRAY_TASK_ID}",
        "run=${RUNS[$i]}",
        "",
        "cpus=${SLURM_CPUS_PER_TASK:-1}",
        "workers=$(( cpus > 1 ? cpus - 1 : 0 ))  # one core per process for the training loop",
        "# the script's arguments (\"$@\", tools/submit.py pretrain ... -- ... -- ARGS) come last and win",
        "srun --kill-on-bad-exit=1 ${PYTHON:-.venv/bin/python} main_pretrain.py \\",
        f"    --arch {args.arch} --run \"$run\" --steps \"${{STEPS[$i]}}\" --save_steps ${{SAVE_STEPS[$i]}} \\",
        f"    --workers \"$workers\" --dump_path {shlex.quote(args.dump_root)}/run\"$run\" \\",
        *([f"    --data_path {shlex.quote(args.data_path)} \\"] if args.data_path else []),
        *([f"    --output_dir {shlex.quote(args.output_dir)} \\"] if args.output_dir else []),
        f"    {args.extra + ' ' if args.extra else ''}\"$@\"",
    ]
    return "\n".join(lines) + "\n"


def main(args, argv=None):
    configs, runs = make_plan(args)
    print(f"Time-Cat plan: catN = N runs of {args.total_steps}/N steps"
          + (f"; cat1 = {args.baseline_runs} run(s) of {args.baseline_steps} steps" if args.baseline_steps else ""))
    print(f"{'config':<10} {'steps/run':>10} {'total':>9}  runs        tag")
    for name, tag, steps, members in configs:
        print(f"{name:<10} {steps:>10} {steps * len(members):>9}  {','.join(map(str, members)):<10}  {tag}")
    print("runs to train (a shorter budget is a milestone of the same seed's longer run):")
    print(f"{'run':>4} {'seed':>6} {'steps':>8}  save_steps")
    for i in sorted(runs):
        print(f"{i:>4} {default_seed(i):>6} {max(runs[i]):>8}  "
              f"{' '.join(map(str, save_steps(args, i, runs))) or '-'}")
    trained = sum(max(s) for s in runs.values())
    separate = sum(steps * len(members) for _, _, steps, members in configs)
    print(f"total training steps: {trained} (trained separately: {separate})")
    if args.print_only:
        return
    tags = {tag: {"arch": [args.arch] * len(members),
                  "pretrained": [checkpoint_path(args, i, steps, runs) for i in members]}
            for _, tag, steps, members in configs}
    command = "python tools/plan_timecat.py" + (" " + " ".join(map(shlex.quote, argv)) if argv else "")
    for path, text in ((args.tags_out, f"# Time-Cat plan tags, written by: {command}\n"
                        + yaml.safe_dump(tags, sort_keys=False)),
                       (args.sbatch_out, sbatch_script(args, runs, command))):
        path = path if os.path.isabs(path) else os.path.join(REPO, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    print(f"train: python tools/submit.py pretrain --script {args.sbatch_out}   "
          f"probe: python main_linear_probe.py --tag_file {args.tags_out} "
          f"--tag {configs[-1][1]} --data_name cifar10")


if __name__ == "__main__":
    run_main(lambda a: main(a, sys.argv[1:]), get_args_parser().parse_args())
