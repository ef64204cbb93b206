"""Time-Cat in miniature: the whole experiment on a laptop CPU, with the project's real scripts, no download.

    python tools/demo.py                 # about 10 minutes on 2 CPU cores
    python tools/demo.py --quick         # a smoke run in well under a minute (tiny budget, numbers meaningless)

1. Generates a procedural image dataset into data/demo/ (deterministic). Every pretraining image carries three
   cues that each predict its class on their own: the background colour, the shape of the central object and
   the orientation of its stripes. Two transfer tasks each need one cue with the other two made random:
   `shape` and `texture`. The probe of the pretraining task itself is the analogue of the ImageNet column.
2. Pretrains small ResNets with main_pretrain.py at a fixed budget of T steps: cat1 is one run of T steps, catN is
   N runs of T/N steps on other seeds; `direct` is the same network trained from scratch for T steps on each
   transfer task itself (the paper's comparison: pretraining elsewhere against training on the task); each
   comparison is repeated over --groups seed groups.
3. Probes each configuration on each task with main_linear_probe.py (feature cache, a weight-decay sweep in one
   pass; catN with --subsets prefix, so its cat1 ... catN curve comes from the same probe), then
   tools/summarize.py prints the table (mean ± std over the groups), the cat-n curve, and draws both plots.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import time
from typing import NamedTuple

# numpy and PIL are imported inside the functions that use them,
# so that --help answers without loading them
from util import layout
from util.cli import ArgumentParser, UserError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
CLASSES = 4
# background colours (RGB) of the four classes; they are dimmed and jittered per image
HUES = ((200, 60, 60), (60, 180, 60), (60, 80, 200), (190, 170, 50))
TASKS = ("mixture", "shape", "texture")  # mixture: the pretraining task itself


# ---------------------------------------------------------------- the dataset
def _grid():
    import numpy as np
    return np.mgrid[0:SIZE, 0:SIZE]


def shape_mask(kind, cx, cy, r):
    """square, disk, triangle or cross centred at (cx, cy) with half-size r."""
    import numpy as np
    yy, xx = _grid()
    dx, dy = xx - cx, yy - cy
    if kind == 0:
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == 1:
        return dx ** 2 + dy ** 2 <= r * r
    if kind == 2:
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))


def stripes(kind, phase, period=4):
    """Horizontal, vertical or one of two diagonal stripe patterns of 0/1."""
    yy, xx = _grid()
    t = (yy, xx, xx + yy, xx - yy)[kind]
    return ((t + phase) // (period // 2)) % 2


def draw(shape, texture, colour, rng):
    import numpy as np
    from PIL import Image
    background = np.array(HUES[colour], dtype=float) * 0.5 + 60 + rng.normal(0, 20, 3)
    img = np.tile(background, (SIZE, SIZE, 1))
    r = rng.uniform(7, 10)
    cx, cy = rng.uniform(12, 20, 2)
    mask = shape_mask(shape, cx, cy, r)
    pattern = stripes(texture, int(rng.integers(0, 4)))
    foreground = np.where(pattern[..., None] > 0, 230.0, 90.0) + rng.normal(0, 10, 3)
    img[mask] = foreground[mask]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def generate(root, per_class_train, per_class_test, seed):
    """data/demo/{mixture,shape,texture}/{train,val}/c{k}/*.png (main_pretrain.py reads mixture/ as an
    imagefolder). Skipped when the same specification is already there."""
    import numpy as np
    spec = {"version": 1, "train": per_class_train, "test": per_class_test, "seed": seed, "size": SIZE}
    manifest = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest) and json.load(open(manifest)) == spec:
        return False
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for task in TASKS:
        for split, count in (("train", per_class_train), ("val", per_class_test)):
            for label in range(CLASSES):
                folder = os.path.join(root, task, split, f"c{label}")
                os.makedirs(folder)
                for i in range(count):
                    cues = rng.integers(0, CLASSES, 3)  # shape, texture, colour drawn at random...
                    if task == "mixture":
                        cues[:] = label  # ...except in the pretraining mixture, where all three give the class
                    else:
                        cues[TASKS.index(task) - 1] = label  # ...and the one cue a transfer task needs
                    draw(*cues, rng).save(os.path.join(folder, f"{i:05d}.png"))
    with open(manifest, "w") as f:
        json.dump(spec, f)
    return True


# ---------------------------------------------------------------- stages
class Interrupted(Exception):
    """A stop signal reached a stage: the stage saved its state and returned, the demo ends there."""


def quietly(main, argv, parser):
    """Run a project script's main in this process; its console output goes to its own train.log only. The scripts
    turn SIGTERM/SIGUSR1 into a clean stop of the run; the demo then stops too, instead of going on to the next
    stage."""
    from util.signals import StopSignal
    with StopSignal() as stop, contextlib.redirect_stdout(io.StringIO()):
        main(parser().parse_args(argv))
    if stop():
        raise Interrupted(stop.received)


class PretrainJob(NamedTuple):
    group: int  # seed group
    run: int  # run index inside the group
    steps: int  # the run's budget
    milestones: list  # budgets it saves (its own last step included)
    output: str  # checkpoint root of the group
    task: str = "mixture"  # the images it trains on: the pretraining mixture, or a transfer task (direct)


DIRECT = "direct"  # the folder of a direct run's probed checkpoint: summarize's steps column reads 'direct'


class Plan(NamedTuple):
    jobs: list  # PretrainJob, in training order
    configs: dict  # configuration name -> the checkpoint files it probes


def plan(args):
    """The pretraining runs and, per configuration, the checkpoint files they write (the layout owner's paths).
    In each group run 0 trains the full budget T and saves its T/N-step prefix on the way (the same weights as a
    separate T/N-step run with that seed); runs 1..N-1 train T/N steps."""
    short, jobs, configs = args.steps // args.n, [], {}
    for group in range(args.groups):
        output = os.path.join(args.out, "checkpoints", f"group{group}")
        jobs.append(PretrainJob(group, 0, args.steps, sorted({short, args.steps}), output))
        jobs += [PretrainJob(group, run, short, [short], output) for run in range(1, args.n)]
        configs[f"cat1_group{group}"] = [layout.checkpoint_path(output, args.steps, 0)]
        configs[f"cat{args.n}_group{group}"] = [layout.checkpoint_path(output, short, run) for run in range(args.n)]
        for task in TASKS[1:]:  # direct: trained on the transfer task itself, T steps, its own seed
            jobs.append(PretrainJob(group, 0, args.steps, [args.steps], os.path.join(output, task), task))
    return Plan(jobs, configs)


def direct_checkpoint(args, job):
    """Where a direct run's final checkpoint is probed from: <group>/<task>/direct/, a folder name that keeps it
    out of the cat1 row (tools/summarize.py reads the steps of a checkpoint from its folder)."""
    return os.path.join(job.output, DIRECT, layout.run_file_name(0))


def publish_direct(args, job):
    """Copy the direct run's final checkpoint to direct_checkpoint()."""
    target = direct_checkpoint(args, job)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(layout.checkpoint_path(job.output, job.steps, 0), target)
    return target


def pretrain(args, job):
    import main_pretrain
    group, run, steps, milestones, output, task = job
    seed = 1000 * group + run + 1 + (500 + 100 * TASKS.index(task) if task != "mixture" else 0)
    quietly(main_pretrain.main, [
        "--arch", args.arch, "--img_size", str(SIZE), "--data_name", "imagefolder",
        "--data_path", os.path.join(args.data, task),
        "--global_batch", str(args.batch), "--steps", str(steps), "--save_steps", *map(str, milestones),
        "--warmup_steps", str(max(1, steps // 10)), "--eval_every", "0", "--bn_refresh_batches", "10",
        "--run", str(run), "--seed", str(seed), "--workers", str(args.workers),
        "--precision", "fp32", "--print_freq", "50", "--output_dir", output,
        "--dump_path", os.path.join(args.out, "pretrain", f"group{group}", f"run{run}" if task == "mixture"
                                    else f"direct_{task}"), "--start_over",
    ], main_pretrain.get_args_parser)


def probe(args, task, name, checkpoints, subsets="none"):
    import main_linear_probe
    quietly(main_linear_probe.main, ["--subsets", subsets,
        "--arch", args.arch, "--pretrained", *checkpoints, "--data_name", "imagefolder",
        "--data_path", os.path.join(args.data, task), "--img_size", str(SIZE), "--precision", "fp32",
        "--feature_cache", os.path.join(args.out, "feature_cache"), "--wd", *args.wd, "--lr", str(args.lr),
        "--epochs", str(args.epochs), "--decay_epochs", *map(str, args.decay_epochs), "--batch_size", "64",
        "--workers", str(args.workers), "--print_freq", "1000", "--start_over",
        "--dump_path", os.path.join(args.out, "probe", task, name),
    ], main_linear_probe.get_args_parser)


def run_pretraining(args, jobs, stage):
    """Every pretraining job in order; returns {task: [(group, checkpoint)]} of the direct runs."""
    direct = {}
    for job in jobs:
        pretrain(args, job)
        if job.task != "mixture":
            direct.setdefault(job.task, []).append((job.group, publish_direct(args, job)))
            stage(f"trained direct on {job.task}, seed group {job.group + 1}/{args.groups}: {args.steps} steps")
        elif job.run == args.n - 1:
            stage(f"pretrained seed group {job.group + 1}/{args.groups}: cat1 = 1 x {args.steps} steps, "
                  f"cat{args.n} = {args.n} x {short_budget(args)} steps")
    return direct


def short_budget(args):
    return args.steps // args.n


def get_args_parser():
    p = ArgumentParser("tools/demo.py", description="Time-Cat in miniature on a CPU: generate data, pretrain "
                       "cat1 and catN at equal budget, probe, summarise")
    p.add_argument("--quick", action="store_true", help="tiny budget and data, for a smoke test (seconds)")
    p.add_argument("--steps", type=int, default=None, help="pretraining budget T of each configuration "
                   "(default 128; quick 8)")
    p.add_argument("--n", type=int, default=None, help="catN: N runs of T/N steps (default 4; quick 2)")
    p.add_argument("--groups", type=int, default=None, help="seed groups: each repeats the comparison "
                   "(default 2: about 10 minutes on 2 cores; quick 1)")
    p.add_argument("--per_class", type=int, default=None, help="training images per class and task "
                   "(default 250, test: 100; quick 20, test 5)")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet of the backbones")
    p.add_argument("--batch", type=int, default=None, help="pretraining global batch (default 64; quick 16)")
    p.add_argument("--epochs", type=int, default=None, help="probe epochs (default 10; quick 2)")
    p.add_argument("--wd", nargs="+", default=["5e-4", "5e-3"], help="probe weight-decay sweep (one pass)")
    p.add_argument("--lr", type=float, default=0.05, help="probe learning rate")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--data", default=os.path.join(REPO, "data", "demo"), help="where the dataset is generated")
    p.add_argument("--out", default=os.path.join(REPO, "results", "demo"), help="checkpoints, runs, table")
    return p


def main(args):
    quick = args.quick
    args.steps = args.steps or (8 if quick else 128)
    args.n = args.n or (2 if quick else 4)
    args.groups = args.groups or (1 if quick else 2)
    args.per_class = args.per_class or (20 if quick else 250)
    args.epochs = args.epochs or (2 if quick else 10)
    args.batch = args.batch or (16 if quick else 64)
    args.decay_epochs = [max(1, round(args.epochs * 0.6)), max(1, round(args.epochs * 0.8))]
    if args.n < 2 or args.steps % args.n or args.groups < 1 or args.per_class < 2:
        raise UserError("--n must be at least 2 and divide --steps; --groups >= 1; --per_class >= 2")
    start = time.time()

    def stage(text):
        print(f"[{time.time() - start:6.1f} s] {text}", flush=True)

    per_class_test = 5 if quick else max(2, args.per_class * 2 // 5)
    made = generate(args.data, args.per_class, per_class_test, seed=0)
    stage(f"data: {'generated' if made else 'reusing'} {args.data} ({len(TASKS)} tasks x {CLASSES} classes x "
          f"{args.per_class} train / {per_class_test} test images)")
    shutil.rmtree(os.path.join(args.out, "probe"), ignore_errors=True)

    try:
        run_stages(args, stage)
    except Interrupted as exc:
        stage(f"stopped by {exc}: rerun `python tools/demo.py` to start over")
        raise SystemExit(128 + signal.Signals[str(exc)].value) from None


def run_stages(args, stage):
    """Pretraining, probes, summary."""
    jobs, configs = plan(args)
    direct = run_pretraining(args, jobs, stage)
    missing = [path for paths in configs.values() for path in paths if not os.path.isfile(path)]
    if missing:  # a bug, not a user error: the plan and main_pretrain.py disagree on the layout
        raise RuntimeError(f"pretraining did not write {missing[0]}")
    for task in TASKS:
        for name, checkpoints in configs.items():
            probe(args, task, name, checkpoints, "prefix" if len(checkpoints) > 1 else "none")
        for group, checkpoint in direct.get(task, []):
            probe(args, task, f"direct_group{group}", [checkpoint])
        stage(f"probed {task}: {len(configs) + len(direct.get(task, []))} configurations x {len(args.wd)} weight "
              f"decays")

    from tools import summarize
    summary = summarize.get_args_parser().parse_args(["--root", os.path.join(args.out, "probe"),
                                                      "--csv", os.path.join(args.out, "summary.csv"),
                                                      "--plot", os.path.join(args.out, "summary.png")])
    summarize.main(summary)
    stage(f"done: runs in {os.path.join(args.out, 'probe')}")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
