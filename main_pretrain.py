"""Supervised ImageNet pretraining of one Time-Cat backbone (schedule-free AdamW ResNet50 by default).

One run = one seed. The Time-Cat table needs runs of 450k (cat1), 200k, 100k and 80k steps; schedule-free
training has no horizon, so one run writes all of its shorter budgets as milestones (--save_steps), and
`python tools/plan_timecat.py` prints the runs of a budget plan and writes their sbatch array and probe tags.

Single process:  python main_pretrain.py --run 0 --data_path data
torchrun:        torchrun --nproc_per_node 8 main_pretrain.py --run 0 --steps 450000 --save_steps 80000 100000 200000
slurm:           sbatch scripts/pretrain_timecat.sbatch   (one array task per run, srun inside)
Toy CPU run:     python main_pretrain.py --arch resnet18 --img_size 32 --global_batch 16 --steps 50 --save_steps 20 \
                     --warmup_steps 5 --eval_every 10 --workers 2 --data_path DIR --output_dir /tmp/toy/ckpt \
                     --dump_path /tmp/toy/run0
"""
import argparse
import inspect
import json
import math
import os
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from datasets import WithTransform, build_dataset, image_loader, imagenet_root
from datasets.transforms import build_transform
from engine import ShardSampler, resolve_precision
from engine_pretrain import (
    EXTRA_RUN_SEED,
    RELEASED_SEEDS,
    SCHEDULE_FREE,
    STEP_STREAM,
    Loaders,
    Pretraining,
    RefreshBatches,
    SeededSamples,
    Start,
    TrainBatches,
    build_optimizer,
    default_seed,
    derive_seed,
    metrics_path_of,
    resume_path_of,
)
from models import RESNET_ARCHS, build_backbone
from models.checkpoint_keys import load_backbone_weights
from models.init import INITS, algoperf_init
from util import layout
from util.checkpoint import load_file
from util.distributed import barrier, cleanup, init_distributed
from util.logs import (
    claim_run_folder,
    close_logger,
    create_logger,
    log_startup,
    truncate_jsonl,
    use_progress_bar,
    write_json_atomic,
)
from util.misc import ArgumentParser, UserError, run_main
from util.sfadamw import MOMENT_DTYPES
from util.signals import StopSignal

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
# The recipe of the released checkpoints (AlgoPerf imagenet_resnet + schedule-free AdamW), and the
# predecessor paper's SGD recipe; flags left unset take these values.
SFADAMW = dict(lr=0.0025, wd=0.08121616522670176, warmup_steps=2799, label_smoothing=0.2)
SGD = dict(lr_per_256=0.1, wd=1e-4, warmup_steps=0, label_smoothing=0.0)
BN_BATCH = 128  # images per forward pass and process (AlgoPerf: 1024 over 8 devices); the rest is accumulation
# A run resumed from its folder must follow the same weight trajectory; these arguments define it.
RECIPE_KEYS = ("arch", "img_size", "global_batch", "optimizer", "lr", "wd", "betas", "eps", "sf_r",
               "weight_lr_power", "warmup_steps", "label_smoothing", "momentum", "schedule", "decay_epochs",
               "gamma", "seed", "batch_size", "precision", "init", "sf_moment_dtype", "init_from")
# The value a recipe key had in run folders written before the key existed (before --init, "sfadamw" was the
# package's optimizer).
# Flags that do not change the weight trajectory (where the run reads and writes, how often it logs, evaluates and
# saves, how it is launched); every flag of get_args_parser is in exactly one of the two lists
# (tests/faults/test_flag_classes.py).
RUN_ONLY_KEYS = ("data_name", "data_path", "workers", "accum_steps", "steps", "save_steps", "eval_every",
                 "bn_refresh_batches", "bn_refresh_every", "run", "output_dir", "dump_path", "start_over", "compile",
                 "max_time", "print_freq", "debug", "dist_timeout", "skip_bad_images")
LEGACY_RECIPE = {"init": "torchvision", "sf_moment_dtype": "bfloat16", "init_from": None}
PRETRAIN_DATA = ("imagenet1k", "imagefolder")


# ---------------------------------------------------------------- arguments
def get_args_parser():
    p = ArgumentParser("main_pretrain.py", description="Time-Cat supervised pretraining of one backbone",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_data_args(p)
    add_batch_args(p)
    add_optimisation_args(p)
    add_bn_args(p)
    add_run_args(p)
    return p


def add_model_and_data_args(p):
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default="resnet50", help=f"torchvision ResNet, one of {', '.join(RESNET_ARCHS)} "
                   "(reference: resnet50)")
    g.add_argument("--data_name", default="imagenet1k", choices=PRETRAIN_DATA, help="dataset of the probe's "
                   "registry (reference: imagenet1k); imagefolder: any <data_path>/{train,val}/<class>/ tree")
    g.add_argument("--data_path", default=os.path.join(PROJECT_ROOT, "data"),
                   help="imagenet1k: the README's data root (holding imagenet/) or the ImageNet folder itself "
                   "(holding train/ and val/)")
    g.add_argument("--init", default="algoperf", choices=INITS, help="initialisation (reference: algoperf: "
                   "truncated-normal convs, N(0, 0.01^2) classifier, zero last BatchNorm per residual branch)")
    g.add_argument("--img_size", type=int, default=224, help="training crop; validation resizes to 8/7 of it "
                   "and center-crops (reference: 224; 32 or less for CPU-scale runs)")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per process "
                   "(recommended: CPU cores per GPU minus one)")


def add_batch_args(p):
    g = p.add_argument_group("batch and budget")
    g.add_argument("--global_batch", type=int, default=1024, help="images per optimizer step over all processes "
                   "(reference: 1024); = batch_size x processes x accum_steps")
    g.add_argument("--batch_size", type=int, default=None, help="images per forward pass and process, the "
                   f"BatchNorm batch (recommended and reference: {BN_BATCH}, AlgoPerf's 1024 over 8 devices); "
                   "default: that, or the per-process batch when smaller")
    g.add_argument("--accum_steps", type=int, default=None, help="gradient-accumulation micro-steps per optimizer "
                   "step; default: derived from --global_batch and --batch_size")
    g.add_argument("--steps", type=int, default=450000, help="optimizer steps of this run (reference: 450000 for "
                   "cat1; a catN run needs 400000/N)")
    g.add_argument("--save_steps", type=int, nargs="*", default=[80000, 100000, 200000],
                   help="milestones written as checkpoints_step{k}/ (k = steps/1000) besides checkpoints_stepfull/ "
                   "(reference: 80000 100000 200000, the cat5/cat4/cat2 budgets)")
    g.add_argument("--eval_every", type=int, default=5000, help="steps between validations (0: only at milestones "
                   "and the end); each also saves the resume state")


def add_optimisation_args(p):
    g = p.add_argument_group("optimisation (unset values follow --optimizer's reference recipe)")
    g.add_argument("--optimizer", default="sfadamw", choices=[*SCHEDULE_FREE, "sgd"],
                   help="sfadamw: schedule-free AdamW as AlgoPerf's submission updates it (the released "
                   "checkpoints; reference); sfadamw_package: the schedulefree package's AdamWScheduleFree (decay "
                   "at y); sgd: the predecessor paper's 90-epoch recipe")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (reference: sfadamw 0.0025 at any "
                   "batch; sgd 0.1 x global_batch / 256)")
    g.add_argument("--wd", type=float, default=None, help="decoupled weight decay (reference: sfadamw "
                   "0.08121616522670176; sgd 1e-4)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.9955159689799007],
                   help="sfadamw betas (reference: 0.9 0.9955159689799007)")
    g.add_argument("--eps", type=float, default=1e-8, help="sfadamw epsilon (reference: 1e-8)")
    g.add_argument("--sf_moment_dtype", default="bfloat16", choices=sorted(MOMENT_DTYPES), help="sfadamw: "
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
    g.add_argument("--output_dir", default=None, help="checkpoint root; default: "
                   "checkpoints/supervised_pretrain/{arch}_{optimizer} (the layout the probe's tags read)")
    g.add_argument("--dump_path", default=None, help="this run's folder (train.log, metrics.jsonl, args.json, "
                   "resume.pth.tar); default: results/pretrain/{arch}_{optimizer}/run{run}")
    g.add_argument("--init_from", default=None, help="start step 0 from these weights instead of --init (fine-tune, "
                   "or continue with a new budget and a fresh optimizer): a checkpoint of this script, an AlgoPerf "
                   "checkpoint (model_params with _orig_mod./module. keys) or a torchvision state_dict; the "
                   "classifier is kept when its shape fits (reference: unset)")
    g.add_argument("--start_over", action="store_true", help="discard the resume state of --dump_path and "
                   "start from step 0 (the default resumes)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="reference and "
                   "recommended: fp32 (TF32 matmuls on GPUs, as PyTorch allowed on the reference's GPUs); bf16: "
                   "autocast, faster, not the reference numerics (see docs/benchmarks.md); auto = bf16 on GPUs and "
                   "on CPUs with bf16 instructions, fp32 elsewhere")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward/backward")
    g.add_argument("--max_time", default=None, help="wall-clock budget of this process ([[D-]H:]M:S or seconds): "
                   "save the resume state and stop cleanly once it is spent, before a job's time limit")
    g.add_argument("--print_freq", type=int, default=100, help="steps between log lines")
    g.add_argument("--debug", action="store_true", help="force a single process")
    g.add_argument("--dist_timeout", type=float, default=30.0, help="minutes a process waits for the others "
                   "(start-up rendezvous and every collective) before it stops with an error")
    g.add_argument("--skip_bad_images", action="store_true", help="skip unreadable image files (counted and "
                   "reported in the log) instead of stopping at the first one")


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
    if args.arch not in RESNET_ARCHS:
        raise UserError(f"unknown --arch '{args.arch}': choose one of {', '.join(RESNET_ARCHS)}")
    for name in ("steps", "global_batch", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
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
    beyond = [s for s in args.save_steps if not 0 < s <= args.steps]
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
        args.output_dir = os.path.join(PROJECT_ROOT, layout.CHECKPOINT_ROOT, name)
    if args.dump_path is None:
        args.dump_path = os.path.join(PROJECT_ROOT, "results", "pretrain", name, f"run{args.run}")
    args.max_seconds = parse_duration(args.max_time) if args.max_time else None


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


# ---------------------------------------------------------------- data
class PretrainData(NamedTuple):
    train_set: torch.utils.data.Dataset  # (augmented image, label)
    val_set: torch.utils.data.Dataset  # (test-transformed image, label)
    num_classes: int


def build_pretrain_data(args, logger):
    """The training and validation splits from the probe's dataset registry, with the pretraining transforms."""
    if args.data_name == "imagenet1k":
        logger.info(f"data: --data_path is {imagenet_root(args.data_path).found}")
    train, num_classes = build_dataset(args.data_name, args.data_path, "train", download=False)
    val, _ = build_dataset(args.data_name, args.data_path, "test", download=False)
    if val.classes != train.classes:
        raise UserError(f"{args.data_name}: val has {len(val.classes)} class folders and train {len(train.classes)}"
                        f", or they differ by name; both splits need the same class folders")
    if len(train) < args.global_batch:
        raise UserError(f"{args.data_name}: {len(train)} training images, fewer than one global batch "
                        f"({args.global_batch}); lower --global_batch")
    return PretrainData(WithTransform(train, build_transform("imagenet", "eval", True, args.img_size)),
                        WithTransform(val, build_transform("imagenet", "eval", False, args.img_size)), num_classes)


# ---------------------------------------------------------------- state on disk
def check_same_recipe(saved_args, args, path):
    keys = RECIPE_KEYS + (("steps",) if args.optimizer == "sgd" and args.schedule == "cosine" else ())
    saved = {k: saved_args.get(k, LEGACY_RECIPE.get(k)) for k in keys}
    if "init" not in saved_args and saved["optimizer"] == "sfadamw":
        saved["optimizer"] = "sfadamw_package"
    changed = [k for k in keys if saved[k] != getattr(args, k)]
    if changed:
        k = changed[0]
        raise UserError(f"{path} was written by a run with --{k} {saved[k]} (now {getattr(args, k)}); "
                        f"use another --dump_path/--output_dir, or --start_over to overwrite it")


def check_previous_run(args, resume_path):
    """A run folder (or this run's checkpoints) left by another recipe is refused unless --start_over."""
    if args.start_over:
        return
    if os.path.exists(resume_path):
        check_same_recipe(load_file(resume_path, "resume state")["args"], args, resume_path)
        return
    args_json = os.path.join(args.dump_path, "args.json")
    if os.path.exists(args_json):
        with open(args_json) as f:
            check_same_recipe(json.load(f), args, args_json)
    if os.path.isdir(args.output_dir):
        for folder in sorted(os.listdir(args.output_dir)):
            path = os.path.join(args.output_dir, folder, layout.run_file_name(args.run))
            if layout.parse_step_folder(folder) and os.path.isfile(path):
                check_same_recipe(load_file(path, "checkpoint")["args"], args, path)
                return


def build_model(args, num_classes, logger):
    """The backbone at step 0: AlgoPerf's (or torchvision's) initialisation, or --init_from's weights."""
    model = build_backbone(args.arch, num_classes)
    if args.init == "algoperf":
        algoperf_init(model)
    if args.init_from:
        load_initial_weights(model, args, logger)
    return model


def load_initial_weights(model, args, logger):
    """--init_from: backbone weights (BatchNorm statistics included) and, when its shape fits, the classifier."""
    classifier_layer, model.fc = model.fc, nn.Identity()  # the loader reads backbones; the fc is split off
    try:
        classifier = load_backbone_weights(model, args.init_from, args.arch)
    finally:
        model.fc = classifier_layer
    fits = classifier.get("weight") is not None and classifier["weight"].shape == model.fc.weight.shape
    if fits:
        model.fc.load_state_dict(classifier)
    logger.info(f"initialised from {args.init_from} (classifier {'loaded' if fits else 'from --init: no match'})")


# ---------------------------------------------------------------- main
def main(args):
    check_args(args)
    dist_info = init_distributed(debug=args.debug, timeout_minutes=args.dist_timeout)
    if dist_info.is_main:
        os.makedirs(args.dump_path, exist_ok=True)
    barrier()
    lock = claim_run_folder(args.dump_path, dist_info)  # before any log line: a refused run writes nothing
    logger = create_logger(args.dump_path, dist_info.rank)
    try:
        with StopSignal() as stop:  # early: a signal during the (long) dataset scan still ends in a clean stop
            pretrain(args, dist_info, logger, stop)
    finally:
        close_logger(logger)
        if lock is not None:
            lock.close()
        cleanup()


def pretrain(args, dist_info, logger, stop):
    """The stages of one run, in order; the loop itself is engine_pretrain.Pretraining."""
    started = time.time()
    prepare_run(args, dist_info, logger)
    data = build_pretrain_data(args, logger)
    seeded = SeededSamples(data.train_set)
    loaders = build_eval_loaders(args, data, seeded, dist_info, logger)
    model, optimizer, train_model = build_training_model(args, data.num_classes, dist_info, logger)
    start = resume_or_start(args, model, optimizer, dist_info, logger)
    log_recipe(args, dist_info.world_size, loaders.steps_per_epoch, start.step, logger)
    loaders = loaders._replace(train=build_train_loader(args, seeded, start.step, dist_info))
    run = Pretraining(args, dist_info, logger, model, optimizer, train_model, loaders, best_acc=start.best_acc,
                      show_bar=use_progress_bar(dist_info.is_main))
    run.train(start, stop, started)


def prepare_run(args, dist_info, logger):
    """The batch split over processes, the precision, the recipe check against the run folder, the banner."""
    resolve_batch(args, dist_info.world_size)
    args.precision = resolve_precision(args.precision, dist_info.device)
    check_previous_run(args, resume_path_of(args.dump_path))
    log_startup(logger, args, dist_info, args.global_batch, args.lr)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters with --precision fp32
        torch.backends.cudnn.allow_tf32 = True


def loader_options(args, dist_info):
    return dict(num_workers=args.workers, pin_memory=dist_info.device.type == "cuda")


def build_eval_loaders(args, data, seeded, dist_info, logger):
    """The refresh and validation loaders. They run every few thousand steps and release their workers (and
    memory) in between; the training loader (build_train_loader) is one endless iterator for the whole run."""
    rank, world = dist_info.rank, dist_info.world_size
    refresh_sampler = RefreshBatches(len(data.train_set), args.seed, args.batch_size, args.bn_refresh_batches,
                                     rank, world)
    refresh = image_loader(seeded, args.skip_bad_images, batch_sampler=refresh_sampler,
                           **loader_options(args, dist_info))
    val = image_loader(data.val_set, args.skip_bad_images, batch_size=args.batch_size,
                       sampler=ShardSampler(len(data.val_set), rank, world), **loader_options(args, dist_info))
    steps_per_epoch = len(data.train_set) // args.global_batch
    logger.info(f"data: {len(data.train_set)} train / {len(data.val_set)} val images, {data.num_classes} classes, "
                f"{steps_per_epoch} steps per epoch")
    return Loaders(None, refresh, refresh_sampler, val, len(data.val_set), steps_per_epoch)


def build_train_loader(args, seeded, start_step, dist_info):
    """Endless training micro-batches from start_step on, whose workers live for the whole run."""
    sampler = TrainBatches(len(seeded), args.seed, args.global_batch, args.batch_size, args.accum_steps,
                           dist_info.rank, start_step)
    return image_loader(seeded, args.skip_bad_images, batch_sampler=sampler,
                        prefetch_factor=4 if args.workers else None, **loader_options(args, dist_info))


def build_training_model(args, num_classes, dist_info, logger):
    """The model at step 0 (a function of the seed), its optimizer, and what the steps call (compiled, DDP)."""
    device = dist_info.device
    torch.manual_seed(derive_seed(args.seed, STEP_STREAM, 0))  # the initialisation is a function of the seed
    model = build_model(args, num_classes, logger).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    train_model = torch.compile(model) if args.compile else model
    if dist_info.distributed:  # each process keeps its own BatchNorm statistics; refresh_bn averages them
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(ddp).parameters else {"broadcast_buffers": False}  # renamed in torch 2.15
        train_model = ddp(train_model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    return model, optimizer, train_model


def resume_or_start(args, model, optimizer, dist_info, logger):
    """Load the resume state of --dump_path (unless --start_over), or clear what a previous run left; args.json."""
    resume_path, metrics_path = resume_path_of(args.dump_path), metrics_path_of(args.dump_path)
    start = Start()
    if os.path.exists(resume_path) and not args.start_over:
        state = load_file(resume_path, "resume state")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # the training loss of the steps since the last evaluation, summed over processes (a stop mid-interval)
        start = Start(state["step"], state["best_acc"], *state.get("since_eval", (0.0, 0)))
        logger.info(f"Resumed from step {start.step} ({resume_path}), best Acc@1 so far {start.best_acc:.2f}")
        if dist_info.is_main:  # records of steps the resume state does not hold (a crash before it was saved)
            truncate_jsonl(metrics_path, lambda r: r["step"] <= start.step)
    elif dist_info.is_main:
        for stale in (resume_path, metrics_path):
            if os.path.exists(stale):
                os.remove(stale)
    if dist_info.is_main:
        write_json_atomic(vars(args), os.path.join(args.dump_path, "args.json"))
    return start


def log_recipe(args, world, steps_per_epoch, start_step, logger):
    milestones = [s for s in args.save_steps if s > start_step]
    logger.info(f"recipe: {args.arch} {args.img_size}px, {args.optimizer} lr {args.lr:g} wd {args.wd:g} "
                + (f"betas {tuple(args.betas)} r {args.sf_r:g} weight_lr_power {args.weight_lr_power:g} "
                   if args.optimizer in SCHEDULE_FREE else f"momentum {args.momentum} {args.schedule} schedule ")
                + f"warmup {args.warmup_steps} steps, label smoothing {args.label_smoothing:g}; global batch "
                f"{args.global_batch} = {args.batch_size} per process x {world} process(es) x {args.accum_steps} "
                f"accumulation step(s); {args.steps} steps = {args.steps / steps_per_epoch:.1f} epochs; precision "
                f"{args.precision}; seed {args.seed} (run {args.run}); milestones {milestones} -> {args.output_dir}")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
