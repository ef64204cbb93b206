"""Linear probe (or fine-tuning) of N concatenated pretrained backbones on a transfer dataset.

Single process:  python main_linear_probe.py --tag supervisedimagenet_resnet50_sfadamw_5_step80k --data_name cifar10
torchrun:        torchrun --nproc_per_node 8 main_linear_probe.py ...
slurm:           srun python main_linear_probe.py ...   (see scripts/)
A sweep in one pass: --wd 1e-4 5e-4 1e-3 trains one head per value on the same backbone features.
"""
import argparse
import math
import os
import shutil
import time

import torch
import torch.nn as nn
import yaml

from datasets import (WithTransform, build_dataset, dataset_targets, family_of, image_loader,
                      reference_sampler_seed, stratified_subset, subset_fraction)
from datasets.transforms import build_transform
from engine import (CachedBatches, NonFiniteLoss, ShardSampler, autocast, block_spans, cat_validate, encoded_batches,
                    evaluate, feature_importance, image_batches, resolve_precision, train_one_epoch)
from models import RESNET_ARCHS, ConcatEncoder, LinearHead, MultiHead
from util.checkpoint import load_file, save_atomic
from util.distributed import all_reduce_sum, any_process, barrier, cleanup, init_distributed
from util import log_lines
from feature_cache import load_or_build
from util.logs import (append_jsonl, claim_run_folder, close_logger, create_logger, log_startup, truncate_jsonl,
                       use_progress_bar, write_json_atomic)
from util.flags import add_bool, bool_flag
from util.misc import ArgumentParser, UserError, requeue_slurm_job, run_main, set_seed
from util.signals import StopSignal

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAG_FILE = os.path.join(PROJECT_ROOT, "configs", "pretrained_checkpoints.yaml")
# The reference scripts' batch (they ran as one process): the default GLOBAL batch here.
REFERENCE_BATCH = {"cifar": 256, "imagenet": 32}
SCHEDULE_FREE = "schedulefree_adamw"
DIAGNOSTICS = ("feature_importance", "cat_validate_network")
# A resumed run must have been started with the same recipe; these arguments define it.
RECIPE_KEYS = ("arch", "pretrained", "data_name", "exp_mode", "use_bn", "headinit", "optimizer", "lr", "wd",
               "momentum", "nesterov", "wd_skip_bn", "epochs", "scheduler_type", "decay_epochs", "gamma",
               "final_lr", "seed", "tf_name", "img_size", "data_rate", "precision", "feature_cache", "cache_views",
               "val_split", "lr_last_layer", "beta2", "global_batch", "batch_semantics", "sync_bn")
# what only training depends on: --mode eval_only may evaluate saved heads with another process count
TRAINING_ONLY_KEYS = ("global_batch", "batch_semantics", "sync_bn")


# ---------------------------------------------------------------- arguments
def get_args_parser():
    p = ArgumentParser("main_linear_probe.py", description="Time-Cat linear probe of concatenated backbones")
    add_backbone_args(p.add_argument_group("backbones"))
    add_head_args(p.add_argument_group("head and optimisation (defaults = the reference protocol)"))
    add_data_args(p.add_argument_group("data"))
    add_speed_args(p.add_argument_group("speed (options that trade fidelity to the reference for speed)"))
    add_run_args(p.add_argument_group("run"))
    add_legacy_args(p.add_argument_group("flags of the original repository with no effect here (accepted and "
                                         "logged as ignored, so its command lines run unchanged)"))
    return p


def add_backbone_args(g):
    g.add_argument("--tag", default=None, help="named set of checkpoints from --tag_file; fills --arch and "
                   "--pretrained (e.g. supervisedimagenet_resnet50_sfadamw_5_step80k)")
    g.add_argument("--tag_file", default=DEFAULT_TAG_FILE, help="YAML file of tags: {tag: {arch: [...], "
                   "pretrained: [...]}}; relative checkpoint paths are relative to the project folder")
    g.add_argument("--arch", nargs="+", default=None, help="one torchvision ResNet name per backbone, or one "
                   "for all (reference: resnet50)")
    g.add_argument("--pretrained", nargs="+", default=None, help="one checkpoint per backbone; features are "
                   "concatenated in this order")
    g.add_argument("--exp_mode", default="lineareval", choices=["lineareval", "finetune"],
                   help="lineareval: frozen backbones (reference); finetune: the whole network trains")


def add_head_args(g):
    add_bool(g, "use_bn", True, "BatchNorm1d before the Linear layer (reference: True)")
    g.add_argument("--classifier", default="linear", choices=["linear"], help="head type (reference: linear)")
    g.add_argument("--headinit", default="normal", choices=["normal", "none", "cat_weights"],
                   help="normal: N(0, 0.01^2) weights, zero bias (reference); none: PyTorch default; "
                   "cat_weights: the backbones' own classifiers, averaged")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "schedulefree_adamw", "sfadamw"],
                   help="reference: sgd; schedulefree_adamw (alias sfadamw) is schedule-free AdamW with betas "
                   "(--momentum, 0.999); adam uses betas (--momentum, --beta2)")
    g.add_argument("--lr", nargs="+", default=["0.01"], help="learning rate(s), not scaled with the batch "
                   "(reference: 0.01); several values train one head each in the same pass")
    g.add_argument("--lr_last_layer", type=float, default=None, help="learning rate of the head's Linear layer "
                   "(default and reference: --lr)")
    g.add_argument("--wd", nargs="+", default=["5e-4"], help="weight decay(s) of the Linear layer; several "
                   "values train one head each in the same pass. Reference sweeps: CIFAR 1e-2 5e-2 1e-4 5e-4 1e-3 "
                   "5e-3; ImageNet 1e-4 5e-4; iNat18 1e-6 1e-5 1e-4")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, Adam's beta1 (reference: 0.9)")
    g.add_argument("--beta2", type=float, default=0.99, help="Adam's beta2 (the original's default: 0.99)")
    add_bool(g, "nesterov", None, "Nesterov momentum, SGD only (default and reference: True with SGD)")
    add_bool(g, "wd_skip_bn", True, "no weight decay on parameters whose name contains 'bn' (reference: True)")
    g.add_argument("--epochs", type=int, default=28, help="training epochs (reference: 28)")
    g.add_argument("--scheduler_type", default="step", choices=["step", "cosine", "constant"],
                   help="per-epoch lr schedule, for every optimizer (reference: step)")
    g.add_argument("--decay_epochs", type=int, nargs="+", default=[8, 16, 24],
                   help="step schedule: epochs where the lr is multiplied by --gamma (reference: 8 16 24)")
    g.add_argument("--gamma", type=float, default=0.1, help="step schedule factor (reference: 0.1)")
    g.add_argument("--final_lr", type=float, default=0.0, help="cosine schedule: lr reached at the end")
    g.add_argument("--seed", type=int, default=31, help="random seed (reference: 31)")


def add_data_args(g):
    g.add_argument("--data_name", default="cifar10", help="cifar10, cifar100, cifar10_{p}perc, "
                   "cifar100_{p}perc, inaturalist18, imagenet1k, or imagefolder (any <data_path>/{train,val}/"
                   "<class>/ folders, with ImageNet's transforms)")
    g.add_argument("--data_path", default=os.path.join(PROJECT_ROOT, "data"),
                   help="root of the README data layout (cifar/, imagenet/, inaturalist18/)")
    add_bool(g, "download", True, "download CIFAR with torchvision into an existing --data_path when it is "
             "missing (reference: True)")
    g.add_argument("--tf_name", default="eval", choices=["eval", "224px", "32px"],
                   help="transform preset: eval/224px = the reference's 224-px transforms, 32px = CIFAR native")
    g.add_argument("--img_size", type=int, default=None, help="crop size overriding the preset (test resize "
                   "= int(8/7 of it)), to run any dataset at CPU scale (reference: 224)")
    g.add_argument("--data_rate", type=float, default=1.0, help="fraction of the training set kept, the "
                   "reference's seeded rule (reference: 1)")
    g.add_argument("--val_split", type=float, default=0.0, help="hold out this seeded fraction of the training "
                   "set to select the epoch and head honestly (recommended: 0.1; reference: 0, best on test)")
    g.add_argument("--batch_size", type=int, default=None, help="batch PER PROCESS. Not given: the reference's "
                   "batch (256 CIFAR, 32 ImageNet/iNat18) is the GLOBAL batch, split across the processes")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per process")


def add_speed_args(g):
    g.add_argument("--feature_cache", default=None, help="folder of cached backbone features: computed once "
                   "with the test transform, reused by every later run with the same backbones and data "
                   "(recommended for sweeps; reference: off, features recomputed every epoch)")
    g.add_argument("--cache_views", type=int, default=0, help="with --feature_cache: also cache K augmented "
                   "views of the training set and train on a random one per sample (0: test-transform features)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="backbone forward precision (recommended and reference: fp32, PyTorch's default TF32 "
                   "settings); bf16 is faster and moves top-1 slightly; auto = bf16 where the hardware has it. "
                   "The heads always train and evaluate in fp32")


def add_run_args(g):
    g.add_argument("--dump_path", default=os.path.join(PROJECT_ROOT, "results", "probe"),
                   help="folder of train.log, metrics.jsonl, args.json and checkpoints (a sweep: one "
                   "subfolder wd{wd}_lr{lr} per head)")
    g.add_argument("--mode", default="train", choices=["train", "eval_only"],
                   help="eval_only: evaluate the best saved head(s) of --dump_path")
    add_bool(g, "start_over", False, "discard the state in --dump_path and start from epoch 0 (the default "
             "resumes)")
    add_bool(g, "sync_bn", None, "synchronise BatchNorm statistics across processes (head, and backbones when "
             "fine-tuning); default: on whenever there is more than one process, so statistics are over the "
             "global batch as in the reference's single process")
    add_bool(g, "debug", False, "force a single process, as the reference scripts did")
    g.add_argument("--eval_freq", type=int, default=1, help="epochs between evaluations (reference: 1; only 1 "
                   "is supported)")
    g.add_argument("--save_freq", type=int, default=999, help="also keep checkpoint_epoch{k}.pth.tar every k "
                   "epochs (reference: 999)")
    g.add_argument("--custom_eval_func", nargs="*", default=[], choices=DIAGNOSTICS,
                   help="diagnostics logged after each evaluation, as the original's")
    add_bool(g, "cuda_deterministic", False, "deterministic cuDNN kernels (slower)")
    g.add_argument("--dist_timeout", type=float, default=30.0, help="minutes a process waits for the others "
                   "(start-up rendezvous and every collective) before it stops with an error")
    g.add_argument("--print_freq", type=int, default=50, help="iterations between log lines (reference: 50)")
    add_bool(g, "skip_bad_images", False, "skip unreadable image files (counted and reported in the log) "
             "instead of stopping at the first one")


def add_legacy_args(g):
    """The original's flags that have no meaning here; a value that would change the result is refused."""
    for name in ("config", "dist_url", "gpu", "reweight_path", "headpretrained", "richway"):
        g.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    for name in ("world_size", "rank"):  # the launcher's environment sets them here
        g.add_argument(f"--{name}", type=int, default=None, help=argparse.SUPPRESS)
    for name in ("skip_pool", "save_init"):
        g.add_argument(f"--{name}", nargs="?", const=True, default=None, type=bool_flag, help=argparse.SUPPRESS)


def resolve_backbones(args):
    """Fill args.arch / args.pretrained from --tag, and check they pair up and exist."""
    if args.tag:
        if args.arch or args.pretrained:
            raise UserError("give either --tag or --arch/--pretrained, not both")
        if not os.path.isfile(args.tag_file):
            raise UserError(f"tag file {args.tag_file} not found")
        try:
            with open(args.tag_file) as f:
                tags = yaml.safe_load(f) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read the tag file {args.tag_file}: {str(exc).splitlines()[0]}") from None
        if not isinstance(tags, dict) or args.tag not in tags:
            raise UserError(f"unknown --tag '{args.tag}': {args.tag_file} defines "
                            f"{', '.join(sorted(map(str, tags))) if isinstance(tags, dict) else 'no tags'}")
        try:
            args.arch = [str(a) for a in tags[args.tag]["arch"]]
            args.pretrained = [p if os.path.isabs(p) else os.path.join(PROJECT_ROOT, p)
                               for p in map(str, tags[args.tag]["pretrained"])]
        except (KeyError, TypeError):
            raise UserError(f"tag '{args.tag}' of {args.tag_file} needs an arch list and a pretrained list") from None
    if not args.arch or not args.pretrained:
        raise UserError("name the backbones: --tag NAME, or --arch A [A ...] with --pretrained P [P ...]")
    if len(args.arch) == 1 and len(args.pretrained) > 1:
        args.arch = args.arch * len(args.pretrained)
    if len(args.arch) != len(args.pretrained):
        raise UserError(f"--arch has {len(args.arch)} entries but --pretrained has {len(args.pretrained)}: "
                        f"give one arch per checkpoint (or a single arch for all)")
    unknown = [a for a in args.arch if a not in RESNET_ARCHS]
    if unknown:
        raise UserError(f"unknown arch '{unknown[0]}' (--arch): choose one of {', '.join(RESNET_ARCHS)}")
    empty = [p for p in args.pretrained if os.path.isfile(p) and os.path.getsize(p) == 0]
    if empty:
        raise UserError(f"checkpoint {empty[0]} is empty (0 bytes): a download or copy was cut short; fetch it "
                        f"again")
    missing = [p for p in args.pretrained if not os.path.isfile(p)]
    if missing:  # fail before any data is read or downloaded
        raise UserError(f"checkpoint not found: {missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        ("; `python tools/download.py` fetches the released ones" if args.tag else ""))


def parse_values(name, texts, allow_zero):
    """Floats of a list flag, keeping the text as given (it names the head's folder)."""
    values = []
    for text in texts:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--{name}: '{text}' is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise UserError(f"--{name}: {text} must be {'non-negative' if allow_zero else 'positive'}")
        values.append(value)
    if len(set(values)) != len(values):
        raise UserError(f"--{name}: a value is given twice")
    return values


def check_args(args):
    """Every flag checked before any data is scanned or downloaded; one `error:` line for each problem."""
    resolve_backbones(args)
    check_numbers(args)
    check_optimizer(args)
    args.lr_values = parse_values("lr", args.lr, allow_zero=False)
    args.wd_values = parse_values("wd", args.wd, allow_zero=True)
    if args.exp_mode == "finetune" and (len(args.lr) > 1 or len(args.wd) > 1 or args.feature_cache):
        raise UserError("--exp_mode finetune trains the backbones: it takes one --lr and one --wd and no "
                        "--feature_cache")
    if args.tf_name == "32px" and family_of(args.data_name) != "cifar":
        raise UserError(f"--tf_name 32px is the CIFAR native-size preset; use eval (and --img_size) for "
                        f"{args.data_name}")
    if args.cache_views and not args.feature_cache:
        raise UserError("--cache_views needs --feature_cache DIR")
    if args.eval_freq != 1:
        raise UserError("--eval_freq: only 1 (evaluate after every epoch, the reference's) is supported")
    check_dump_path(args.dump_path)
    args.ignored = check_legacy(args)


def check_numbers(args):
    for name in ("epochs", "print_freq", "save_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.workers < 0 or args.cache_views < 0:
        raise UserError("--workers and --cache_views must be 0 or more")
    if args.img_size is not None and args.img_size < 8:
        raise UserError("--img_size must be at least 8")
    if not 0 <= args.val_split < 1:
        raise UserError("--val_split must be in [0, 1)")
    if not 0 < args.data_rate <= 1:
        raise UserError(f"--data_rate must be in (0, 1], got {args.data_rate}")
    if not 0 <= args.seed < 2**32 - 12345:
        raise UserError("--seed must be 0 or more (and below 2**32 - 12345, numpy's seed range)")
    for name in ("momentum", "gamma", "final_lr", "beta2"):
        if not 0 <= getattr(args, name) < math.inf:
            raise UserError(f"--{name} must be a finite number, 0 or more")
    if args.lr_last_layer is not None and not 0 < args.lr_last_layer < math.inf:
        raise UserError("--lr_last_layer must be a positive number")
    if not 0 < args.dist_timeout < math.inf:
        raise UserError("--dist_timeout must be a positive number of minutes")


def check_optimizer(args):
    """The reference's rules: Nesterov with SGD only (on by default), Adam's beta2 below 1."""
    if args.optimizer == SCHEDULE_FREE:
        args.optimizer = SCHEDULE_FREE  # one name in args.json and the recipe check
    if args.nesterov is None:
        args.nesterov = args.optimizer == "sgd"
    if args.nesterov and args.optimizer != "sgd":
        raise UserError(f"--nesterov is for --optimizer sgd only, not {args.optimizer}: drop it or pass "
                        f"--nesterov False")
    if args.optimizer == "sgd" and args.nesterov and not args.momentum:
        raise UserError("Nesterov momentum needs --momentum above 0 (or --nesterov False)")
    if args.optimizer != "sgd" and not (args.momentum < 1 and args.beta2 < 1):
        raise UserError("--momentum and --beta2 are Adam's betas here: both must be below 1")


def check_dump_path(path):
    if not path or not path.strip():
        raise UserError("--dump_path is empty: give the folder of the run's logs and checkpoints")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--dump_path {path} is a file, not a folder: give a folder for the run")


def check_legacy(args):
    """Names of the original's flags given with no effect here; values that would change the result are
    refused rather than silently ignored."""
    for name in ("reweight_path", "headpretrained", "richway", "skip_pool", "save_init"):
        if getattr(args, name) not in (None, False, "", "none", "None"):
            raise UserError(f"--{name} {getattr(args, name)}: the original's option is not supported here; "
                            f"drop it (the reference's linear-probe runs did not use it)")
    return [name for name in ("config", "dist_url", "gpu", "world_size", "rank") if getattr(args, name) is not None]


def resolve_batch(args, world):
    """--batch_size is per process; without it the reference's batch is the global batch, split across the
    processes, so N processes see the batches of the reference's single process."""
    if args.batch_size is None:
        reference = REFERENCE_BATCH[family_of(args.data_name)]
        if reference % world:
            raise UserError(f"the reference batch {reference} does not split over {world} processes: use a "
                            f"process count that divides it, or give --batch_size (per process)")
        args.batch_size, args.batch_semantics = reference // world, "global"
    else:
        args.batch_semantics = "per_process"
    args.global_batch = args.batch_size * world
    # on by default with several processes; with one, synchronising is a no-op (as the reference's --debug runs
    # with --sync_bn True), recorded as off so such a run's recipe equals the plain one
    args.sync_bn = world > 1 and args.sync_bn is not False


# ---------------------------------------------------------------- heads and optimisation
def head_combos(args):
    """(lr, wd, name) of each head; a single head writes to --dump_path itself, a sweep to <name>/."""
    return [(lr, wd, f"wd{wd_text}_lr{lr_text}") for lr, lr_text in zip(args.lr_values, args.lr)
            for wd, wd_text in zip(args.wd_values, args.wd)]


def build_heads(in_dim, num_classes, combos, classifiers, args, world):
    """Every head starts from the same seeded initialisation, as it would alone; its BatchNorm is global over the
    processes with --sync_bn (the default for more than one)."""
    heads = []
    for _ in combos:
        torch.manual_seed(args.seed)
        head = LinearHead(in_dim, num_classes, args.use_bn, global_bn=args.sync_bn and world > 1)
        head.init_weights(args.headinit, classifiers)
        heads.append(head)
    return MultiHead(heads)


def param_groups(heads, encoder, combos, args):
    """The reference's groups, per head: parameters whose name contains 'bn' get no weight decay under
    --wd_skip_bn (the head BN; the backbones' bn1/bn2/bn3 when fine-tuning, not downsample.1); the head's Linear
    gets --wd and --lr_last_layer (else --lr); other trainable parameters get --wd and --lr."""
    groups = []
    for h, (head, (lr, wd, _)) in enumerate(zip(heads, combos)):
        groups += named_groups(head.named_parameters(), lr, wd, h, args, linear_lr=args.lr_last_layer or lr)
    if args.exp_mode == "finetune":
        lr, wd, _ = combos[0]
        groups += named_groups(encoder.named_parameters(), lr, wd, 0, args)
    return groups


def named_groups(named_parameters, lr, wd, head, args, linear_lr=None):
    """Non-empty groups 'bn' (decay 0 with --wd_skip_bn), 'linear' (a head's Linear) and 'other'."""
    parts = {"linear": [], "other": [], "bn": []}  # a head's first group holds its Linear: its lr is logged
    for name, param in named_parameters:
        part = "bn" if "bn" in name else "linear" if name.startswith("linear.") and linear_lr else "other"
        parts[part].append(param)
    settings = {"bn": (lr, 0.0 if args.wd_skip_bn else wd), "linear": (linear_lr, wd), "other": (lr, wd)}
    return [{"params": params, "lr": settings[part][0], "base_lr": settings[part][0],
             "weight_decay": settings[part][1], "head": head, "part": part} for part, params in parts.items() if params]


def build_optimizer(groups, args):
    """SGD (global weight_decay 0: the groups carry it), Adam with betas (momentum, beta2), schedule-free AdamW
    with betas (momentum, 0.999), as the reference."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr_values[0], momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=0.0)
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr_values[0], betas=(args.momentum, args.beta2))
    import schedulefree
    return schedulefree.AdamWScheduleFree(groups, lr=args.lr_values[0], betas=(args.momentum, 0.999))


def lr_at_epoch(epoch, base_lr, args):
    """The schedule is a pure function of the epoch, so a resumed run needs nothing but the epoch."""
    if args.scheduler_type == "step":
        return base_lr * args.gamma ** sum(epoch >= e for e in args.decay_epochs)
    if args.scheduler_type == "cosine":
        return args.final_lr + (base_lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return base_lr


class Classifier(nn.Module):
    """Encoder followed by the heads: images to one logits per head. The encoder runs at --precision, the heads
    always in fp32 (a bf16 head flips a few percent of the predictions)."""

    def __init__(self, encoder, heads, precision):
        super().__init__()
        self.encoder, self.heads, self.precision = encoder, heads, precision

    def forward(self, images):
        with autocast(images.device, self.precision):
            features = self.encoder(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.heads(features.float())


# ---------------------------------------------------------------- data
def build_data(args, dist_info, logger):
    """Training (augmented and with the test transform), test set and the seeded positions used for training
    and held-out validation (--data_rate, --val_split)."""
    family = family_of(args.data_name)
    if dist_info.is_main:  # one process downloads, the others wait
        train_base, num_classes = build_dataset(args.data_name, args.data_path, "train", args.download)
    barrier()
    if not dist_info.is_main:
        train_base, num_classes = build_dataset(args.data_name, args.data_path, "train", False)
    test_base, _ = build_dataset(args.data_name, args.data_path, "test", False)
    kept = subset_fraction(len(train_base), args.data_rate, args.seed)
    train_base = torch.utils.data.Subset(train_base, kept)
    train_aug = WithTransform(train_base, build_transform(family, args.tf_name, True, args.img_size))
    train_plain = WithTransform(train_base, build_transform(family, args.tf_name, False, args.img_size))
    test_set = WithTransform(test_base, build_transform(family, args.tf_name, False, args.img_size))
    val_positions = []
    if args.val_split:
        val_positions = stratified_subset(dataset_targets(train_base), args.val_split, args.seed)
    held_out = set(val_positions)
    train_positions = [i for i in range(len(train_base)) if i not in held_out]
    logger.info(f"data: {args.data_name}, {len(train_positions)} train / {len(val_positions)} validation / "
                f"{len(test_set)} test images, {num_classes} classes")
    return train_aug, train_plain, test_set, train_positions, val_positions, num_classes


def drop_single_sample_batch(per_process, args, world, logger):
    """The reference keeps the last incomplete batch; only a trailing batch of one sample meeting a BatchNorm that
    sees it alone (training-mode BatchNorm cannot normalise a single sample) is dropped, and the log says so."""
    has_bn = args.use_bn or args.exp_mode == "finetune"
    alone = world == 1 or not args.sync_bn
    single = per_process > args.batch_size and per_process % args.batch_size == 1
    if has_bn and alone and single:
        logger.info(f"the last training batch of each epoch holds 1 sample per process and is dropped "
                    f"(BatchNorm cannot train on a single sample); {per_process - 1} of {per_process} are used")
        return True
    return False


class PositionSampler(torch.utils.data.Sampler):
    """DistributedSampler over the training positions (seeded shuffle, set_epoch), yielding the positions."""

    def __init__(self, positions, dist_info, seed):
        self.positions = positions
        self.inner = torch.utils.data.DistributedSampler(positions, num_replicas=dist_info.world_size,
                                                         rank=dist_info.rank, shuffle=True, seed=seed)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return (self.positions[i] for i in self.inner)

    def __len__(self):
        return len(self.inner)


# ---------------------------------------------------------------- main
def main(args):
    check_args(args)
    dist_info = init_distributed(debug=args.debug, timeout_minutes=args.dist_timeout)
    resolve_batch(args, dist_info.world_size)
    args.precision = resolve_precision(args.precision, dist_info.device)
    combos = head_combos(args)
    sweep = len(combos) > 1
    head_dirs = [os.path.join(args.dump_path, name) if sweep else args.dump_path for _, _, name in combos]
    for directory in head_dirs:
        os.makedirs(directory, exist_ok=True)
    lock = claim_run_folder(args.dump_path, dist_info, head_dirs)  # before any log line: a refused run writes nothing
    logger = create_logger(args.dump_path, dist_info.rank, "sweep.log" if sweep else "train.log")
    head_loggers = [create_logger(d, dist_info.rank, console=False) for d in head_dirs] if sweep else [logger]
    try:
        with StopSignal() as stop:
            probe(args, dist_info, combos, head_dirs, logger, head_loggers, stop)
    finally:
        for lg in {id(lg): lg for lg in [logger] + head_loggers}.values():
            close_logger(lg)
        if lock is not None:
            lock.close()
        cleanup()


def probe(args, dist_info, combos, head_dirs, logger, head_loggers, stop):
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    show_bar = use_progress_bar(dist_info.is_main)
    sweep = len(combos) > 1
    for lg in head_loggers if sweep else [logger]:
        log_startup(lg, args, dist_info, args.batch_size * world, args.lr if sweep else args.lr[0])
    if sweep:
        logger.info(f"sweep of {len(combos)} heads on one backbone pass: {', '.join(n for _, _, n in combos)}")
    if args.ignored:
        logger.info("ignored (flags of the original with no effect here): "
                    + ", ".join(f"--{name} {getattr(args, name)}" for name in args.ignored))
    set_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.cuda_deterministic
        torch.backends.cudnn.deterministic = args.cuda_deterministic

    # ---- data
    train_aug, train_plain, test_set, train_positions, val_positions, num_classes = build_data(args, dist_info,
                                                                                               logger)
    train_sampler = PositionSampler(train_positions, dist_info, reference_sampler_seed(args.seed))
    loader_generator = torch.Generator()
    loader_kwargs = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    drop_last = drop_single_sample_batch(len(train_sampler), args, world, logger)
    per_batch = min(args.batch_size, len(train_sampler)) * (world if args.sync_bn else 1)
    if (args.use_bn or args.exp_mode == "finetune") and per_batch < 2:
        raise UserError(f"BatchNorm needs 2 samples or more per training batch; this run has {per_batch} "
                        f"(--batch_size {args.batch_size}, {len(train_sampler)} training images per process): "
                        f"raise them, or train the head with --no-use_bn")
    val_sampler = ShardSampler(len(val_positions), rank, world)

    # ---- model
    encoder = ConcatEncoder(args.arch, args.pretrained).to(device).to(memory_format=torch.channels_last)
    finetune = args.exp_mode == "finetune"
    if not finetune:
        encoder.freeze()
    heads = build_heads(encoder.out_dim, num_classes, combos, encoder.classifiers, args, world)
    if args.sync_bn and dist_info.distributed and finetune:  # the backbones' BNs too, as the reference's --sync_bn
        if device.type != "cuda":
            raise UserError("fine-tuning with synchronised BatchNorm across processes needs GPUs (torch's "
                            "SyncBatchNorm); pass --sync_bn False, or run one process")
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    heads.to(device)
    logger.info(f"encoder: {len(args.arch)} backbone(s) {args.arch}, {encoder.out_dim}-d features, "
                f"{args.precision}; head: {'BatchNorm1d + ' if args.use_bn else ''}Linear({encoder.out_dim}, "
                f"{num_classes}) x {len(combos)}")
    classifier = Classifier(encoder, heads, args.precision)
    trained = classifier if finetune else heads
    if dist_info.distributed:  # only what trains is wrapped: the frozen encoder needs no gradient sync
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    optimizer = build_optimizer(param_groups(heads, encoder, combos, args), args)

    # ---- batch sources: features on the fly (reference), from the cache, or images when fine-tuning
    def loader(dataset, sampler, **kw):
        return image_loader(dataset, args.skip_bad_images, batch_size=args.batch_size, sampler=sampler,
                            **loader_kwargs, **kw)

    train_loader = loader(train_aug, train_sampler, drop_last=drop_last, generator=loader_generator)
    test_loader = loader(test_set, ShardSampler(len(test_set), rank, world))
    val_loader = loader(torch.utils.data.Subset(train_plain, val_positions), val_sampler)
    if args.feature_cache:
        cached = lambda ds, split, view: load_or_build(encoder, ds, args.feature_cache, args, dist_info, split,
                                                       view, logger, show_bar)
        plain_features, plain_labels = cached(train_plain, "train", -1)
        test_features, test_labels = cached(test_set, "test", -1)
        views = [plain_features]
        if args.cache_views:
            views = [cached(train_aug, "train", k)[0] for k in range(args.cache_views)]
        views, plain_features, test_features = place_features(views, plain_features, test_features, device,
                                                              logger)
        val_rows = torch.tensor(val_positions, dtype=torch.long)
        # sources are re-iterable; each counts the unreadable images it drops (.skipped, --skip_bad_images)
        train_source = CachedBatches(views, plain_labels, train_sampler, args.batch_size, device, drop_last,
                                     loader_generator)
        test_source = CachedBatches([test_features], test_labels, ShardSampler(len(test_set), rank, world),
                                    args.batch_size, device)
        val_source = CachedBatches([plain_features[val_rows]], plain_labels[val_rows], val_sampler,
                                   args.batch_size, device)
        train_batches, test_batches, val_batches = (lambda: train_source), (lambda: test_source), (lambda: val_source)
    else:
        train_source, test_source, val_source = train_loader, test_loader, val_loader
        if finetune:
            train_batches = lambda: image_batches(train_loader, device)
            test_batches = lambda: image_batches(test_loader, device)
            val_batches = lambda: image_batches(val_loader, device)
        else:
            train_batches = lambda: encoded_batches(train_loader, encoder, device, args.precision)
            test_batches = lambda: encoded_batches(test_loader, encoder, device, args.precision)
            val_batches = lambda: encoded_batches(val_loader, encoder, device, args.precision)
    num_train_batches = len(train_source)
    eval_model = classifier if finetune else heads

    # ---- resume, or evaluate saved heads
    checkpoint_path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    best_paths = [os.path.join(d, "best.pth.tar") for d in head_dirs]
    if args.mode == "eval_only":
        epochs = []
        for head, path in zip(heads, best_paths):
            state = load_file(path, "saved head")
            check_same_recipe(state["args"], args, path, skip=TRAINING_ONLY_KEYS)
            head.load_state_dict(state["head"])
            if "encoder" in state:
                encoder.load_state_dict(state["encoder"])
            epochs.append(state["epoch"] - 1)
        eval_model.eval()
        if args.optimizer == SCHEDULE_FREE:
            optimizer.eval()
        for h, stats in enumerate(evaluate(eval_model, test_batches(), device, args.precision, len(test_set),
                                           show_bar, num_heads=len(combos), source=test_source)):
            head_loggers[h].info(f"Test: Loss {stats['loss']:.4f} Acc@1 {stats['top1']:.3f} Acc@5 "
                                 f"{stats['top5']:.3f} (head of epoch {epochs[h]} from {best_paths[h]})"
                                 + unreadable_note(stats))
        return
    n = len(combos)
    # best_test starts below 0, so a head that never rises above 0% still writes best.pth.tar
    start_epoch, best_test, best_val, selected = 0, [-1.0] * n, [-1.0] * n, [None] * n
    if os.path.exists(checkpoint_path) and not args.start_over:
        state = load_file(checkpoint_path, "run checkpoint")
        check_same_recipe(state["args"], args, checkpoint_path)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        if "encoder" in state:
            encoder.load_state_dict(state["encoder"])
        start_epoch, best_test, best_val, selected = (state["epoch"], state["best_test"], state["best_val"],
                                                      state["selected"])
        for lg in head_loggers if sweep else [logger]:
            lg.info(f"Resumed from {checkpoint_path} at epoch {start_epoch}")
        if dist_info.is_main:  # records of epochs the checkpoint does not hold (a crash before it was saved)
            for directory in head_dirs:
                truncate_jsonl(os.path.join(directory, "metrics.jsonl"), lambda r: r["epoch"] < start_epoch)
    elif dist_info.is_main:
        for stale in [checkpoint_path] + best_paths + [os.path.join(d, "metrics.jsonl") for d in head_dirs]:
            if os.path.exists(stale):
                os.remove(stale)
    if dist_info.is_main:
        write_json_atomic(vars(args), os.path.join(args.dump_path, "args.json"))
        for directory, (lr, wd, name) in zip(head_dirs, combos):
            write_json_atomic(dict(vars(args), lr=lr, wd=wd, head=name), os.path.join(directory, "args.json"))

    # ---- train
    # the processes agree on a stop at every iteration, so they all stop at the same one (slurm signals them at
    # different moments)
    stop_agreed = lambda: any_process(stop(), device)
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at_epoch(epoch, group["base_lr"], args)
        # per-epoch seeds: an epoch's shuffling and augmentations do not depend on where the run resumed
        train_sampler.set_epoch(epoch)
        set_seed(args.seed + 1000 * epoch + rank)
        loader_generator.manual_seed(args.seed + 1000 * epoch + rank)
        trained.train()  # the heads, or encoder + heads when fine-tuning; a frozen encoder stays in eval mode
        if args.optimizer == SCHEDULE_FREE:
            optimizer.train()
        skipped_before = getattr(train_source, "skipped", 0)
        try:
            train_loss, train_top1, completed = train_one_epoch(trained, train_batches(), num_train_batches,
                                                                optimizer, epoch, args, device, head_loggers,
                                                                stop_agreed, show_bar and not sweep)
        except NonFiniteLoss as exc:
            raise UserError(f"{exc}; {last_good_state(epoch, checkpoint_path)}. Lower --lr?") from None
        if not completed:
            for lg in {id(lg): lg for lg in [logger] + head_loggers}.values():
                lg.info(f"Stopped by {stop.received or 'a stop signal to another process'} during epoch {epoch}; a rerun resumes from epoch {epoch} "
                        f"({checkpoint_path})")
            if dist_info.is_main:
                requeue(logger)
            return
        eval_model.eval()
        if args.optimizer == SCHEDULE_FREE:
            optimizer.eval()  # schedule-free: evaluate at the averaged weights
        test_stats = evaluate(eval_model, test_batches(), device, args.precision, len(test_set), show_bar,
                              num_heads=n, source=test_source)
        val_stats = evaluate(eval_model, val_batches(), device, args.precision, len(val_positions),
                             num_heads=n, source=val_source) if val_positions else [None] * n
        diverged = [h for h in range(n) if not math.isfinite(test_stats[h]["loss"])]
        if diverged:  # weights that went non-finite in the epoch's last step are never saved as a good state
            h = diverged[0]
            raise UserError(f"the test loss is {test_stats[h]['loss']} after epoch {epoch}"
                            + (f" (head {combos[h][2]})" if sweep else "")
                            + f"; {last_good_state(epoch, checkpoint_path)}. Lower --lr?")
        if args.skip_bad_images:
            train_skipped = int(all_reduce_sum([train_source.skipped - skipped_before], device)[0])
            for lg in {id(lg): lg for lg in [logger] + head_loggers}.values():
                lg.info(f"Skipped {train_skipped} unreadable training images in epoch {epoch} (--skip_bad_images)")
        improved = []
        for h in range(n):
            test, val, lg = test_stats[h], val_stats[h], head_loggers[h]
            improved.append(test["top1"] > best_test[h])
            best_test[h] = max(best_test[h], test["top1"])
            lg.info(log_lines.test_line(test["loss"], test["top1"], best_test[h]))
            log_diagnostics(args, heads[h], encoder, test_batches, lg, device)
            lg.info(f"Test: Acc@5 {test['top5']:.3f} over {len(test_set) - test['skipped']} images"
                    + unreadable_note(test))
            if val is not None:
                if val["top1"] > best_val[h]:
                    best_val[h], selected[h] = val["top1"], (epoch, val["top1"], test["top1"])
                lg.info(f"Val: Loss {val['loss']:.4f} Acc@1 {val['top1']:.3f} Best Val Acc@1 so far "
                        f"{best_val[h]:.2f} over {len(val_positions) - val['skipped']} held-out training images"
                        + unreadable_note(val))
            if sweep:
                logger.info(f"epoch {epoch} {combos[h][2]}: test Acc@1 {test['top1']:.3f} (best {best_test[h]:.2f})"
                            + (f", val Acc@1 {val['top1']:.3f}" if val is not None else ""))
        if dist_info.is_main:
            state = {"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "best_test": best_test, "best_val": best_val, "selected": selected, "args": vars(args)}
            if finetune:
                state["encoder"] = encoder.state_dict()
            for h in range(n):
                if improved[h]:
                    head_state = {"head": heads[h].state_dict(), "epoch": epoch + 1, "best_acc": best_test[h],
                                  "args": vars(args)}
                    if finetune:
                        head_state["encoder"] = encoder.state_dict()
                    save_atomic(head_state, best_paths[h])
                record = {"epoch": epoch, "train_loss": train_loss[h], "train_top1": train_top1[h],
                          "test_loss": test_stats[h]["loss"], "test_top1": test_stats[h]["top1"],
                          "test_top5": test_stats[h]["top5"], "lr": lr_at_epoch(epoch, combos[h][0], args),
                          "seconds": round(time.time() - start, 3)}
                if val_stats[h] is not None:
                    record.update(val_loss=val_stats[h]["loss"], val_top1=val_stats[h]["top1"])
                if args.skip_bad_images:
                    record.update(train_skipped=train_skipped, test_skipped=test_stats[h]["skipped"])
                append_jsonl(record, os.path.join(head_dirs[h], "metrics.jsonl"))
            save_atomic(state, checkpoint_path)
            if (epoch + 1) % args.save_freq == 0:  # the reference's checkpoint_epoch{k}.pth.tar
                save_atomic(state, os.path.join(args.dump_path, f"checkpoint_epoch{epoch + 1}.pth.tar"))
        barrier()

    # ---- report
    for h in range(n):
        head_loggers[h].info(log_lines.final_message(best_test[h]))
        if selected[h] is not None:
            e, v, t = selected[h]
            head_loggers[h].info(f"Selected on validation: epoch {e} val Acc@1 {v:.2f} test Acc@1 {t:.2f}")
    if sweep:
        best = max(range(n), key=lambda h: best_test[h])
        logger.info(f"Best on test (the reference's rule): {combos[best][2]} Acc@1 {best_test[best]:.2f}")
        if val_positions:
            pick = max(range(n), key=lambda h: selected[h][1])
            e, v, t = selected[pick]
            logger.info(f"Selected on validation: {combos[pick][2]} epoch {e} val Acc@1 {v:.2f} test Acc@1 {t:.2f}")


def log_diagnostics(args, head, encoder, test_batches, logger, device):
    """--custom_eval_func, after each evaluation, with the original's names and line format."""
    spans = block_spans([net.out_dim for net in encoder.backbones])
    head.eval()
    if "feature_importance" in args.custom_eval_func:
        logger.info(log_lines.diagnostic_line("feature_importance", feature_importance(head, spans)))
    if "cat_validate_network" in args.custom_eval_func:
        batches = ((features_of(encoder, x, args.precision), y) for x, y in test_batches())
        logger.info(log_lines.diagnostic_line("cat_validate_network", cat_validate(head, batches, spans, device)))


def features_of(encoder, inputs, precision):
    """Images (fine-tuning) through the encoder; features (the probe's batches) as they are."""
    if inputs.dim() != 4:
        return inputs
    with torch.no_grad(), autocast(inputs.device, precision):
        return encoder(inputs).float()


def requeue(logger):
    """Requeue the slurm job after a stop; scontrol missing on a slurm node is a one-line error, not a crash."""
    if (os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_ARRAY_JOB_ID")) and not shutil.which("scontrol"):
        raise UserError("the run stopped cleanly (a rerun resumes) but cannot requeue its slurm job: scontrol is "
                        "not on the PATH of this node; requeue it by hand or fix the PATH in the job script")
    requeue_slurm_job(logger)


def place_features(views, plain, test, device, logger):
    """Cached features go to the GPU when they fit in half its free memory; else they stay memory-mapped."""
    if device.type != "cuda":
        return views, plain, test
    unique = {id(t): t for t in views + [plain, test]}
    needed = sum(t.numel() * t.element_size() for t in unique.values())
    if needed > 0.5 * torch.cuda.mem_get_info(device)[0]:
        logger.info(f"feature cache: {needed / 1e9:.1f} GB stay in host memory (too large for the GPU)")
        return views, plain, test
    moved = {key: t.to(device) for key, t in unique.items()}
    return [moved[id(v)] for v in views], moved[id(plain)], moved[id(test)]


def last_good_state(epoch, checkpoint_path):
    return f"the last good state is in {checkpoint_path}" if epoch else "no checkpoint was written"


def unreadable_note(stats):
    return f" ({stats['skipped']} unreadable skipped)" if stats["skipped"] else ""


def check_same_recipe(saved_args, args, path, skip=()):
    changed = [k for k in RECIPE_KEYS if k not in skip and saved_args.get(k) != getattr(args, k)]
    if changed:
        k = changed[0]
        raise UserError(f"{path} was written by a run with --{k} {saved_args.get(k)} (now {getattr(args, k)}); "
                        f"use another --dump_path, or --start_over to overwrite it")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
