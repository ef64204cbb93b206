"""Command line of main_pretrain.py, its flag checks and recipe record, and the run -> seed convention. Imports
nothing heavy (no torch), so that `--help` and a mistyped flag answer at once; main_pretrain.py and
tools/plan_timecat.py import from here."""
import argparse
import dataclasses
import math
import os

from arguments.common import (
    add_checkpoint_root_arg,
    add_data_path_arg,
    add_data_pipeline_args,
    add_device_arg,
    add_launcher_args,
    add_wandb_arg,
)
from arguments.recipe import Recipe, recipe_key
from util import layout
from util.cli import ArgumentParser, UserError, add_alias
from util.cpu_runtime import default_workers
from util.flags import add_bool

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED_SEEDS = (2, 550, 23, 477, 8529)  # seeds of the released runs 0..4
EXTRA_RUN_SEED = 10000  # run i >= 5 defaults to seed 10000 + i, clear of the released ones
BN_BATCH = 128  # images per forward pass and process (AlgoPerf: 1024 over 8 devices); the rest is accumulation
SCHEDULE_FREE = (layout.SFADAMW_ALGOPERF, layout.SCHEDULEFREE_ADAMW)
# --optimizer spellings accepted for a canonical name: sfadamw, the released checkpoints' name (AlgoPerf's update),
# and this script's earlier name of the package's optimizer; args.json and checkpoints hold the canonical name
OPTIMIZER_ALIASES = {"sfadamw": layout.SFADAMW_ALGOPERF, "sfadamw_package": layout.SCHEDULEFREE_ADAMW}
PRETRAIN_DATA = ("imagenet1k", "imagefolder")
# --optimizer sgd: the predecessor paper's recipe (arXiv 2212.07346, its ImageNet recipe): 90 epochs
# at batch 256, lr 0.1, momentum 0.9, wd 1e-4, lr x0.1 at epochs 30 and 60 (and 90, the end)
SGD_EPOCHS, SGD_BATCH = 90, 256
SFADAMW_BATCH, SFADAMW_STEPS, SFADAMW_SAVE_STEPS = 1024, 450000, [80000, 100000, 200000]


@dataclasses.dataclass(frozen=True)
class PretrainRecipe(Recipe):
    """The flags that define a run's weight trajectory: a run resumed from its folder (or its checkpoints) must
    have the same values (main_pretrain.check_previous_run)."""

    hint = "another --dump_path/--output_dir"  # a run's checkpoints are checked too
    arch: str = recipe_key()
    img_size: int = recipe_key()
    global_batch: int = recipe_key()
    optimizer: str = recipe_key()
    lr: float = recipe_key()
    wd: float = recipe_key()
    betas: list = recipe_key()
    eps: float = recipe_key()
    sf_r: float = recipe_key()
    weight_lr_power: float = recipe_key()
    warmup_steps: int = recipe_key()
    label_smoothing: float = recipe_key()
    momentum: float = recipe_key()
    schedule: str = recipe_key()
    decay_epochs: list = recipe_key()
    gamma: float = recipe_key()
    seed: int = recipe_key()
    batch_size: int = recipe_key()
    precision: str = recipe_key()
    # keys added after the first runs, with their value in those runs
    init: str = recipe_key(legacy="torchvision")
    sf_moment_dtype: str = recipe_key(legacy="bfloat16")
    init_from: str = recipe_key(legacy=None)
    fast_transforms: bool = recipe_key(legacy=False)
    # the budget is run-only (a schedule-free run has no horizon), except where a cosine schedule ends at it
    steps: int = recipe_key(compare=False)

    @classmethod
    def canonical(cls, fields, values):
        # before --init existed, sfadamw was the package's optimizer
        return dict(fields, optimizer=canonical_optimizer(fields["optimizer"], legacy="init" not in values))

    def compared_keys(self):
        return self.keys() + (("steps",) if self.optimizer == "sgd" and self.schedule == "cosine" else ())


# derived from the record: a new recipe flag is a new field of PretrainRecipe (with its legacy value), nothing else
RECIPE_KEYS = PretrainRecipe.keys()
# Flags that do not change the weight trajectory (where the run reads and writes, how often it logs, evaluates and
# saves, how it is launched); every flag of get_args_parser is in exactly one of the two lists
# (tests/faults/test_flag_classes.py).
RUN_ONLY_KEYS = ("data_name", "data_path", "workers", "accum_steps", "steps", "save_steps", "eval_every",
                 "bn_refresh_batches", "bn_refresh_every", "run", "output_dir", "dump_path", "start_over", "compile",
                 "max_time", "print_freq", "debug", "dist_timeout", "skip_bad_images", "device", "local_rank",
                 "tensorboard", "wandb", "cuda_deterministic", "tf32", "checkpoint_root", "decoder", "sf_foreach")
# Choices shown by --help, spelled here so that --help needs no torch; tests/test_cli.py checks that they equal
# their owners' (models.backbones.RESNET_ARCHS, models.init.INITS, util.sfadamw.MOMENT_DTYPES).
ARCH_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
              "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
INIT_NAMES = ("algoperf", "torchvision")
MOMENT_DTYPE_NAMES = ("bfloat16", "float32")


# ---------------------------------------------------------------- arguments
def get_args_parser():
    p = ArgumentParser("main_pretrain.py", description="Time-Cat supervised pretraining of one backbone",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_data_args(p)
    add_batch_args(p)
    add_optimisation_args(p)
    add_bn_args(p)
    add_run_args(p)
    add_alias(p, "wd", "--weight_decay")
    add_alias(p, "workers", "--num_workers")
    return p


def add_model_and_data_args(p):
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default="resnet50", help=f"torchvision ResNet, one of {', '.join(ARCH_NAMES)} "
                   "(reference: resnet50)")
    g.add_argument("--data_name", default="imagenet1k", choices=PRETRAIN_DATA, help="dataset of the probe's "
                   "registry (reference: imagenet1k); imagefolder: any <data_path>/{train,val}/<class>/ tree")
    add_data_path_arg(g, PROJECT_ROOT, "imagenet1k: the README's data root (holding imagenet/) or the ImageNet "
                      "folder itself (holding train/ and val/)")
    g.add_argument("--init", default="algoperf", choices=INIT_NAMES, help="initialisation (reference: algoperf: "
                   "truncated-normal convs, N(0, 0.01^2) classifier, zero last BatchNorm per residual branch)")
    g.add_argument("--img_size", type=int, default=224, help="training crop; validation resizes to 8/7 of it "
                   "and center-crops (reference: 224; 32 or less for CPU-scale runs)")
    add_data_pipeline_args(g)


def add_batch_args(p):
    g = p.add_argument_group("batch and budget")
    g.add_argument("--global_batch", type=int, default=None, help="images per optimizer step over all processes; "
                   f"= batch_size x processes x accum_steps; default and reference: {SFADAMW_BATCH} (sfadamw), "
                   f"{SGD_BATCH} (sgd, the predecessor's)")
    g.add_argument("--batch_size", type=int, default=None, help="images per forward pass and process, the "
                   f"BatchNorm batch (recommended and reference: {BN_BATCH}, AlgoPerf's 1024 over 8 devices); "
                   "default: that, or the per-process batch when smaller")
    g.add_argument("--accum_steps", type=int, default=None, help="gradient-accumulation micro-steps per optimizer "
                   "step; default: derived from --global_batch and --batch_size")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps of this run; default and reference: "
                   f"sfadamw {SFADAMW_STEPS} (cat1; a catN run needs 400000/N); sgd {SGD_EPOCHS} epochs of the "
                   "training set (the predecessor's; 90 x 5004 = 450360 on ImageNet at batch 256)")
    g.add_argument("--save_steps", type=int, nargs="*", default=None,
                   help="milestones written as checkpoints_step{k}/ (k = steps/1000) besides checkpoints_stepfull/; "
                   "default and reference: sfadamw 80000 100000 200000 (the cat5/cat4/cat2 budgets); sgd none")
    g.add_argument("--eval_every", type=int, default=5000, help="steps between validations (0: only at milestones "
                   "and the end); each also saves the resume state")


def add_optimisation_args(p):
    g = p.add_argument_group("optimisation (unset values follow --optimizer's reference recipe)")
    g.add_argument("--optimizer", default=layout.SFADAMW_ALGOPERF, choices=[*SCHEDULE_FREE, "sgd", *OPTIMIZER_ALIASES],
                   help="sfadamw_algoperf (alias sfadamw): schedule-free AdamW as AlgoPerf's submission updates it "
                   "(the released checkpoints; reference); schedulefree_adamw (alias sfadamw_package): the "
                   "schedulefree package's AdamWScheduleFree (decay at y), another trajectory; sgd: the "
                   "predecessor paper's recipe (arXiv 2212.07346): 90 epochs at batch 256, lr 0.1, "
                   "momentum 0.9, wd 1e-4, lr x0.1 at epochs 30 and 60, no warmup, no label smoothing; each value "
                   "given on the command line replaces its default")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (reference: sfadamw 0.0025 at any "
                   "batch; sgd 0.1 x global_batch / 256)")
    g.add_argument("--wd", type=float, default=None, help="decoupled weight decay (reference: sfadamw "
                   "0.08121616522670176; sgd 1e-4)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.9955159689799007],
                   help="sfadamw betas (reference: 0.9 0.9955159689799007)")
    g.add_argument("--eps", type=float, default=1e-8, help="sfadamw epsilon (reference: 1e-8)")
    g.add_argument("--sf_moment_dtype", default="bfloat16", choices=sorted(MOMENT_DTYPE_NAMES), help="sfadamw: "
                   "dtype of the second moment (reference: bfloat16, as AlgoPerf's submission keeps it)")
    g.add_argument("--sf_r", type=float, default=0.75, help="sfadamw polynomial weighting power r of the average "
                   "(AlgoPerf submission: 0.75; the schedulefree package default is 0)")
    g.add_argument("--weight_lr_power", type=float, default=2.0, help="sfadamw averaging weight = lr^power "
                   "(reference: 2)")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps (reference: sfadamw "
                   "2799 = 0.02 x 0.75 x 186666; sgd 0)")
    g.add_argument("--label_smoothing", type=float, default=None, help="(reference: sfadamw 0.2; sgd 0)")
    g.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (reference: 0.9)")
    g.add_argument("--schedule", default="step", choices=["step", "cosine"], help="sgd learning-rate schedule "
                   "(reference: step); cosine decays to 0 at --steps")
    g.add_argument("--decay_epochs", type=int, nargs="*", default=[30, 60], help="sgd step schedule: epochs "
                   "where the lr is multiplied by --gamma (reference: 30 60, over 90 epochs)")
    g.add_argument("--gamma", type=float, default=0.1, help="sgd step schedule factor (reference: 0.1)")


def add_bn_args(p):
    g = p.add_argument_group("schedule-free BatchNorm statistics")
    g.add_argument("--bn_refresh_batches", type=int, default=50, help="training batches per process forwarded "
                   "at the averaged weights x to recompute BatchNorm statistics before each evaluation and "
                   "checkpoint (recommended: 50; 0 keeps the statistics gathered during training)")
    g.add_argument("--bn_refresh_every", type=int, default=0, help="also update the statistics at x with the "
                   "current batch every K steps (AlgoPerf's second schedule-free entry: 3; 0: off)")


def add_run_args(p):
    g = p.add_argument_group("run")
    g.add_argument("--run", type=int, default=0, help="run index i: checkpoint_run{i}.pth.tar; runs 0-4 default "
                   f"to the released seeds {', '.join(map(str, RELEASED_SEEDS))}")
    g.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order and augmentation; "
                   f"default: the released seed of --run (run >= 5: {EXTRA_RUN_SEED} + run)")
    add_checkpoint_root_arg(g, PROJECT_ROOT, "the folder holding supervised_pretrain/ (the layout the probe's "
                            "tags read)")
    g.add_argument("--output_dir", default=None, help="this recipe's checkpoint folder; default: "
                   "<checkpoint_root>/supervised_pretrain/{arch}_{optimizer}")
    g.add_argument("--dump_path", default=None, help="this run's folder (train.log, metrics.jsonl, args.json, "
                   "resume.pth.tar); default: results/pretrain/{arch}_{optimizer}/run{run}")
    g.add_argument("--init_from", default=None, help="start step 0 from these weights instead of --init (fine-tune, "
                   "or continue with a new budget and a fresh optimizer): a checkpoint of this script, an AlgoPerf "
                   "checkpoint (model_params with _orig_mod./module. keys) or a torchvision state_dict; the "
                   "classifier is kept when its shape fits (reference: unset)")
    add_bool(g, "start_over", False, "discard the resume state of --dump_path and "
                   "start from step 0 (otherwise a rerun resumes)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="reference and "
                   "recommended: fp32 (PyTorch's default TF32 settings, see --tf32); bf16: "
                   "autocast, faster, not the reference numerics (see docs/benchmarks.md); auto = bf16 on GPUs and "
                   "on CPUs with bf16 instructions, fp32 elsewhere")
    add_bool(g, "tf32", False, "TF32 matrix products on GPUs (torch.backends.cuda.matmul.allow_tf32): faster fp32 "
             "linear layers, other rounding (reference: off, PyTorch's default, as AlgoPerf leaves it; AlgoPerf "
             "sets only cudnn.benchmark, and cuDNN convolutions use TF32 by PyTorch's default either way)")
    add_bool(g, "compile", False, "torch.compile the training forward/backward (on a GPU without DDP also CUDA "
             "graphs: mode reduce-overhead); docs/benchmarks.md")
    add_bool(g, "sf_foreach", False, "sfadamw: the update as torch._foreach_* calls over all parameters (fewer "
             "kernels; bit-identical on CPU, tests/test_sfadamw.py) (reference: off)")
    add_bool(g, "cuda_deterministic", False, "deterministic cuDNN kernels, no autotuning: on a GPU, two runs (and a "
             "run and its resumption) give bit-identical weights, slower (docs/benchmarks.md); CPU runs always do "
             "(recommended: off for speed; on to compare runs bit for bit)")
    g.add_argument("--max_time", default=None, help="wall-clock budget of this process ([[D-]H:]M:S or seconds): "
                   "save the resume state and stop cleanly once it is spent, before a job's time limit")
    g.add_argument("--print_freq", type=int, default=100, help="steps between log lines")
    add_bool(g, "debug", False, "force a single process")
    add_device_arg(g)
    add_launcher_args(g)
    g.add_argument("--dist_timeout", type=float, default=30.0, help="minutes a process waits for the others "
                   "(start-up rendezvous and every collective) before it stops with an error")
    add_bool(g, "tensorboard", False, "TensorBoard events beside train.log (train/test loss and top-1, test "
             "top-5, lr); needs the optional tensorboard package (`uv sync --extra tensorboard`); metrics.jsonl "
             "stays the record")
    add_wandb_arg(g)
    add_bool(g, "skip_bad_images", False, "skip unreadable image files (counted and "
                   "reported in the log) instead of stopping at the first one")


def canonical_optimizer(name, legacy=False):
    """The canonical name of an --optimizer spelling (OPTIMIZER_ALIASES). legacy: a name read from a run written
    before --init existed, when sfadamw meant the package's optimizer."""
    if legacy and name == "sfadamw":
        return layout.SCHEDULEFREE_ADAMW
    return OPTIMIZER_ALIASES.get(name, name)


def default_seed(run):
    return RELEASED_SEEDS[run] if run < len(RELEASED_SEEDS) else EXTRA_RUN_SEED + run


# ---------------------------------------------------------------- flag checks (torch-free, beside the parser)
# The recipe of the released checkpoints (AlgoPerf imagenet_resnet + schedule-free AdamW), and the
# predecessor paper's SGD recipe; flags left unset take these values.
SFADAMW = dict(lr=0.0025, wd=0.08121616522670176, warmup_steps=2799, label_smoothing=0.2)
SGD = dict(lr_per_256=0.1, wd=1e-4, warmup_steps=0, label_smoothing=0.0)


def parse_duration(text):
    """'90', '1:30', '2:00:00' or '1-12:00:00' -> seconds."""
    try:
        days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
        seconds = 0.0
        for part in clock.split(":"):
            seconds = seconds * 60 + float(part)
        seconds += 86400 * int(days)
    except ValueError:
        raise UserError(f"--max_time {text}: expected seconds or [[D-]H:]M:S") from None
    if seconds <= 0:
        raise UserError(f"--max_time {text} must be positive")
    return seconds


def check_args(args):
    """Fill the recipe defaults and refuse inconsistent flags, before any process group or data."""
    if args.arch not in ARCH_NAMES:
        raise UserError(f"unknown --arch '{args.arch}': choose one of {', '.join(ARCH_NAMES)}")
    args.optimizer = canonical_optimizer(args.optimizer)  # args.json, the recipe check and the log: one name
    fill_schedule_defaults(args)
    for name in ("steps", "global_batch", "print_freq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.workers is None:
        args.workers = default_workers()
    for name in ("eval_every", "workers", "bn_refresh_batches", "bn_refresh_every", "run"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more")
    for name in ("batch_size", "accum_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.img_size < 8:
        raise UserError("--img_size must be at least 8")
    if not 0 < args.dist_timeout < math.inf:
        raise UserError("--dist_timeout must be a positive number of minutes")
    beyond = [s for s in args.save_steps if not 0 < s <= (args.steps or math.inf)]
    if beyond:
        raise UserError(f"--save_steps {beyond[0]} is beyond --steps {args.steps} (milestones must be in 1..steps)")
    args.save_steps = sorted(set(args.save_steps))
    if args.seed is None:
        args.seed = default_seed(args.run)
    if args.seed < 0:
        raise UserError("--seed must be 0 or more")
    recipe = SFADAMW if args.optimizer in SCHEDULE_FREE else SGD
    if args.lr is None:
        args.lr = recipe["lr"] if args.optimizer in SCHEDULE_FREE else recipe["lr_per_256"] * args.global_batch / 256
    for name in ("wd", "warmup_steps", "label_smoothing"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    if not (args.lr > 0 and math.isfinite(args.lr)) or not (0 <= args.wd < math.inf):
        raise UserError("--lr must be positive and --wd non-negative")
    if args.warmup_steps < 0 or not 0 <= args.label_smoothing < 1:
        raise UserError("--warmup_steps must be 0 or more and --label_smoothing in [0, 1)")
    if not (0 < args.betas[0] < 1 and 0 <= args.betas[1] < 1):  # schedule-free divides by beta1
        raise UserError("--betas: the first must be in (0, 1), the second in [0, 1)")
    for name in ("eps", "sf_r", "weight_lr_power", "momentum", "gamma"):
        if not 0 <= getattr(args, name) < math.inf:
            raise UserError(f"--{name} must be a finite number, 0 or more")
    name = layout.run_dir_name(args.arch, args.optimizer)
    if args.output_dir is None:
        args.output_dir = os.path.join(layout.pretrain_root(args.checkpoint_root), name)
    if args.dump_path is None:
        args.dump_path = os.path.join(PROJECT_ROOT, "results", "pretrain", name, f"run{args.run}")
    args.max_seconds = parse_duration(args.max_time) if args.max_time else None


def fill_schedule_defaults(args):
    """The batch, budget and milestones of --optimizer's reference recipe, where not given: sfadamw 1024 images,
    450000 steps, milestones 80k/100k/200k; sgd (the predecessor's) 256 images and 90 epochs (args.steps stays
    None until the training set is counted: resolve_epoch_steps), no milestones."""
    sgd = args.optimizer == "sgd"
    if args.global_batch is None:
        args.global_batch = SGD_BATCH if sgd else SFADAMW_BATCH
    if args.steps is None and not sgd:
        args.steps = SFADAMW_STEPS
    if args.save_steps is None:
        args.save_steps = [] if sgd else list(SFADAMW_SAVE_STEPS)


def resolve_epoch_steps(args, num_train, logger):
    """--optimizer sgd without --steps: SGD_EPOCHS epochs of the training set (the tail of each epoch shorter than
    a global batch is dropped, as the training sampler does)."""
    args.steps = SGD_EPOCHS * (num_train // args.global_batch)
    beyond = [s for s in args.save_steps if s > args.steps]
    if beyond:
        raise UserError(f"--save_steps {beyond[0]} is beyond the {args.steps} steps of {SGD_EPOCHS} epochs "
                        f"(milestones must be in 1..steps)")
    logger.info(f"--optimizer sgd: {SGD_EPOCHS} epochs of {num_train} images at batch {args.global_batch} = "
                f"{args.steps} steps (the predecessor's recipe; --steps sets another budget)")


def resolve_batch(args, world_size):
    """batch_size x world_size x accum_steps = global_batch: the recipe does not depend on the GPU count."""
    per_process, rest = divmod(args.global_batch, world_size)
    if rest:
        raise UserError(f"--global_batch {args.global_batch} is not divisible by the {world_size} processes")
    if args.batch_size is None and args.accum_steps is None:
        args.batch_size = min(BN_BATCH, per_process)  # the BatchNorm batch of the recipe, whatever the GPU count
        if per_process % args.batch_size:
            raise UserError(f"--global_batch {args.global_batch} over {world_size} process(es) is {per_process} "
                            f"images per process, not a multiple of the {BN_BATCH}-image BatchNorm batch; set "
                            f"--batch_size (a divisor of {per_process}) or another --global_batch")
    if args.batch_size is None:
        args.batch_size = per_process // args.accum_steps
    if args.accum_steps is None:
        args.accum_steps = max(1, per_process // args.batch_size)
    if args.batch_size * world_size * args.accum_steps != args.global_batch:
        raise UserError(f"--global_batch {args.global_batch} must equal --batch_size {args.batch_size} x "
                        f"{world_size} processes x --accum_steps {args.accum_steps} "
                        f"(= {args.batch_size * world_size * args.accum_steps})")
    if args.batch_size * math.ceil(args.img_size / 32) ** 2 < 2:  # a ResNet's last feature map: img_size / 32
        raise UserError(f"--batch_size 1 at --img_size {args.img_size} leaves BatchNorm one value per channel in the "
                        f"last stage; use 2 images or more per process and micro-step, or --img_size 33 or more")
