"""Command line of main_linear_probe.py. Imports nothing heavy (no torch), so that `--help` and a mistyped flag
answer at once; main_linear_probe.py imports its parser from here."""
import argparse
import dataclasses
import hashlib
import json
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
from util.flags import add_bool, bool_flag
from util.subsets import SUBSET_MODES, subsets_for
from util.sweeps import WD_GRIDS, reference_batch

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TAG_FILE = os.path.join(PROJECT_ROOT, layout.TAG_FILE)
HEAD_IMPLS = ("separate", "fused")  # --head_impl: models.heads.MultiHead(fused=...)
DIAGNOSTICS = ("feature_importance", "cat_validate_network")
TF_NAMES = ("eval", "224px", "32px", "384px", "vit384px")  # datasets/transforms.py builds them
# --eval_datasets: the evaluation-only sets of an ImageNet1k probe (datasets/eval_sets.py reads them)
EVAL_DATASETS = ("imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a")
RESULTS_ROOT = os.path.join(PROJECT_ROOT, "results", "probe")  # under the git-ignored results/


@dataclasses.dataclass(frozen=True)
class ProbeRecipe(Recipe):
    """What a probe computes: a resumed or evaluated run must have been started with the same values (checked on
    resume), and they are hashed into the default --dump_path. Flags, except global_batch and batch_semantics
    (resolve_batch derives them from --batch_size and the process count)."""
    arch: list = recipe_key()
    pretrained: list = recipe_key()
    data_name: str = recipe_key()
    exp_mode: str = recipe_key()
    use_bn: bool = recipe_key()
    headinit: str = recipe_key()
    optimizer: str = recipe_key()
    lr: list = recipe_key()
    wd: list = recipe_key()
    momentum: float = recipe_key()
    nesterov: bool = recipe_key()
    wd_skip_bn: bool = recipe_key()
    epochs: int = recipe_key()
    scheduler_type: str = recipe_key()
    decay_epochs: list = recipe_key()
    gamma: float = recipe_key()
    final_lr: float = recipe_key()
    seed: int = recipe_key()
    tf_name: str = recipe_key()
    img_size: int = recipe_key()
    data_rate: float = recipe_key()
    precision: str = recipe_key()
    feature_cache: str = recipe_key()
    cache_views: int = recipe_key()
    val_split: float = recipe_key()
    lr_last_layer: float = recipe_key()
    beta2: float = recipe_key()
    # what only training depends on: --mode eval_only may evaluate saved heads with another process count
    global_batch: int = recipe_key(derived=True, training_only=True)
    batch_semantics: str = recipe_key(derived=True, training_only=True)
    sync_bn: bool = recipe_key(training_only=True)
    # keys added after the first runs: their value in those runs (so adding one moves no existing run's folder)
    subsets: str = recipe_key(legacy="none")
    head_impl: str = recipe_key(legacy="separate")
    fast_transforms: bool = recipe_key(legacy=False)

    @classmethod
    def canonical(cls, fields, values):
        return dict(fields, optimizer=OPTIMIZER_ALIASES.get(fields["optimizer"], fields["optimizer"]))


# derived from the record: a new recipe flag is a new field of ProbeRecipe (with its legacy value), nothing else
RECIPE_KEYS = ProbeRecipe.keys()
DERIVED_RECIPE_KEYS = ProbeRecipe.keys_where("derived")
TRAINING_ONLY_KEYS = ProbeRecipe.keys_where("training_only")


def recipe_check(args, eval_only=False):
    """check(saved args, path) of a run resumed or evaluated with these flags (util.run.restart_from_checkpoint):
    one UserError line naming the first recipe value that differs. eval_only: the training-only keys (the process
    count, the batch split...) may differ."""
    recipe, skip = ProbeRecipe.of(vars(args)), TRAINING_ONLY_KEYS if eval_only else ()
    return lambda saved_args, path: recipe.check(saved_args, path, skip=skip)
# The original's slurm flags (its add_slurm_params, in the original release's code): name -> (type,
# default, help). Where the job runs, never what it computes: run-only, out of the recipe and the folder hash.
SLURM_FLAGS = {
    "hours": (float, 12, "wall-clock limit of the job in hours"),
    "tasks_per_node": (int, 8, "tasks (processes) per node"),
    "cpus_per_task": (int, 8, "CPUs per task"),
    "gpus_per_node": (int, 1, "GPUs per node"),
    "nodes": (int, 1, "number of nodes"),
    "mem": (str, "64G", "memory per node"),
    "constraint": (str, None, "slurm --constraint"),
    "gres": (str, None, "slurm --gres"),
    "exclude": (str, None, "nodes to exclude"),
    "job_name": (str, "submitit", "slurm job name"),
    "account": (str, None, "slurm account"),
    "server": (str, "nyu", "the original's cluster name"),
}
SLURM_KEYS = tuple(SLURM_FLAGS)
SCHEDULE_FREE = layout.SCHEDULEFREE_ADAMW  # the `schedulefree` package's AdamWScheduleFree
# --optimizer spellings of a canonical name (sfadamw: this project's alias; the original's probe spells it
# schedulefree_adamw, its choices sgd, adam, schedulefree_adamw); args.json and checkpoints hold the canonical
OPTIMIZER_ALIASES = {"sfadamw": SCHEDULE_FREE}
# Flags not compared on resume: where the run reads and writes, what it logs, how it is launched, and flags whose
# effect the recipe records through another key (--tag/--tag_file as arch/pretrained, --batch_size as
# global_batch); the original's flags with no effect here. Every flag of get_args_parser is in exactly one of
# RECIPE_KEYS and RUN_ONLY_KEYS (tests/faults/test_flag_classes.py).
RUN_ONLY_KEYS = ("tag", "tag_file", "classifier", "knn", "data_path", "download", "batch_size", "workers",
                 "dump_path", "mode", "start_over", "debug", "device", "eval_freq", "save_freq", "custom_eval_func",
                 "cuda_deterministic", "dist_timeout", "print_freq", "tensorboard", "wandb", "skip_bad_images",
                 "config", "dist_url", "gpu", "reweight_path", "headpretrained", "richway", "world_size", "rank",
                 "local_rank", "skip_pool", "save_init", "eval_checkpoint", "extra_log_lines",
                 "checkpoint_root", "allow_mixed_transforms", "decoder", "compile", "eval_datasets") + SLURM_KEYS


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
    add_slurm_args(p.add_argument_group("slurm (the original's flags, with its defaults: where a job runs, not what "
                                        "it computes; a launcher reads them, a direct run ignores them)"))
    add_aliases(p)
    return p


def add_aliases(p):
    """The field's common names for the same options (MAE/DINO spellings)."""
    add_alias(p, "dump_path", "--output_dir")
    add_alias(p, "wd", "--weight_decay")
    add_alias(p, "workers", "--num_workers")


def add_backbone_args(g):
    g.add_argument("--tag", default=None, help="named set of checkpoints from --tag_file; fills --arch and "
                   "--pretrained (e.g. supervisedimagenet_resnet50_sfadamw_5_step80k)")
    g.add_argument("--tag_file", default=DEFAULT_TAG_FILE, help="YAML file of tags: {tag: {arch: [...], "
                   "pretrained: [...]}}; relative checkpoint paths checkpoints/... are relative to --checkpoint_root, "
                   "others to the project folder")
    add_checkpoint_root_arg(g, PROJECT_ROOT, "the folder holding supervised_pretrain/, where the tags' "
                            "checkpoints/... paths point")
    g.add_argument("--arch", nargs="+", default=None, help="one torchvision classification model name per "
                   "backbone (resnet50, vit_b_16, convnext_tiny, regnet_y_400mf, efficientnet_b0, swin_t, ...), or "
                   "one for all (reference: resnet50)")
    g.add_argument("--pretrained", nargs="+", default=None, help="one checkpoint per backbone; features are "
                   "concatenated in this order")
    add_bool(g, "allow_mixed_transforms", False, "accept backbones that expect different input transforms on "
             "ImageNet-like data (e.g. resnet50 and swin_t), feeding every backbone the first one's (recommended "
             "and reference: False, refused with one line)")
    g.add_argument("--exp_mode", default="lineareval", choices=["lineareval", "finetune"],
                   help="lineareval: frozen backbones (reference); finetune: the whole network trains")


def add_head_args(g):
    add_bool(g, "use_bn", True, "BatchNorm1d before the Linear layer (reference: True)")
    g.add_argument("--classifier", default="linear", choices=["linear"], help="head type (reference: linear)")
    g.add_argument("--headinit", default="normal", choices=["normal", "none", "cat_weights"],
                   help="normal: N(0, 0.01^2) weights, zero bias (reference); none: PyTorch default; "
                   "cat_weights: the backbones' own classifiers, averaged")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", SCHEDULE_FREE, *OPTIMIZER_ALIASES],
                   help="reference: sgd; schedulefree_adamw (as the original spells it; alias sfadamw) is the "
                   "schedulefree package's schedule-free AdamW with betas (--momentum, 0.999); adam uses betas "
                   "(--momentum, --beta2)")
    g.add_argument("--lr", nargs="+", default=["0.01"], help="learning rate(s), not scaled with the batch "
                   "(reference: 0.01); several values train one head each in the same pass")
    g.add_argument("--lr_last_layer", type=float, default=None, help="learning rate of the head's Linear layer "
                   "(default and reference: --lr)")
    g.add_argument("--wd", nargs="+", default=["5e-4"], help="weight decay(s) of the Linear layer; several "
                   "values train one head each in the same pass. Reference sweeps: CIFAR "
                   f"{' '.join(WD_GRIDS['cifar10'])}; ImageNet {' '.join(WD_GRIDS['imagenet1k'])}; iNat18 "
                   f"{' '.join(WD_GRIDS['inaturalist18'])}")
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
    g.add_argument("--subsets", default="none", choices=SUBSET_MODES,
                   help="also train heads on sub-concatenations of the backbones in the same pass, each in "
                   "<dump_path>/sub{i}-{j}/wd{wd}_lr{lr}/: each = every backbone alone, prefix = the first k for "
                   "k = 1..N, all = every subset (at most 63); the cat-n curve of tools/summarize.py "
                   "(recommended: prefix; reference: none, one probe per catN)")
    g.add_argument("--head_impl", default="separate", choices=HEAD_IMPLS,
                   help="how several heads (a --wd/--lr sweep, --subsets) are computed: separate = each its own "
                   "BatchNorm1d + Linear, bit-identical to a probe of that head alone; fused = all in one matrix "
                   "product with the BatchNorm folded in, the same function up to fp32 rounding and several times "
                   "faster with many heads (docs/benchmarks.md) (recommended: fused for --subsets all; reference: "
                   "separate)")
    g.add_argument("--knn", type=int, default=0, metavar="K", help="with --feature_cache: also log the K-nearest-"
                   "neighbour accuracy of each head's features (cosine, DINO's weighted vote), next to the Test "
                   "lines (recommended: 20; reference: 0, off)")


def add_data_args(g):
    g.add_argument("--data_name", default="cifar10", help="cifar10, cifar100, cifar10_{p}perc, "
                   "cifar100_{p}perc, inaturalist18, imagenet1k, or imagefolder (any <data_path>/{train,val}/"
                   "<class>/ folders, with ImageNet's transforms)")
    add_data_path_arg(g, PROJECT_ROOT, "root of the README data layout (cifar/, imagenet/, inaturalist18/)")
    add_bool(g, "download", True, "download CIFAR with torchvision into an existing --data_path when it is "
             "missing (reference: True)")
    g.add_argument("--tf_name", default="eval", choices=TF_NAMES,
                   help="transform preset: eval/224px = the reference's 224-px transforms, 32px = CIFAR native, "
                   "384px = the dataset's transforms at crop 384 (test resize 438), vit384px = crop 384 (resize "
                   "438), bicubic, mean = std = 0.5 (recommended and reference: eval)")
    g.add_argument("--eval_datasets", nargs="+", default=[], choices=EVAL_DATASETS, metavar="NAME",
                   help="imagenet1k only: also evaluate the heads on these evaluation-only sets after the last "
                   "epoch and in --mode eval_only (ImageNet-R/-A scored on their 200 classes), in the releases' "
                   f"folders under --data_path; any of {', '.join(EVAL_DATASETS)} (reference: none)")
    g.add_argument("--img_size", type=int, default=None, help="crop size overriding the preset (test resize "
                   "= int(8/7 of it)), to run any dataset at CPU scale (reference: 224)")
    g.add_argument("--data_rate", type=float, default=1.0, help="fraction of the training set kept, the "
                   "reference's seeded rule (reference: 1)")
    g.add_argument("--val_split", type=float, default=0.0, help="hold out this seeded fraction of the training "
                   "set to select the epoch and head honestly (recommended: 0.1; reference: 0, best on test)")
    g.add_argument("--batch_size", type=int, default=None, help="batch PER PROCESS. Not given: the reference's "
                   "batch (256 CIFAR, 32 ImageNet/iNat18) is the GLOBAL batch, split across the processes")
    add_data_pipeline_args(g)


def add_speed_args(g):
    g.add_argument("--feature_cache", default=None, help="folder of cached backbone features: computed once "
                   "per backbone with the test transform, reused by every later run (and concatenation) with that "
                   "backbone and data "
                   "(recommended for sweeps; reference: off, features recomputed every epoch)")
    g.add_argument("--cache_views", type=int, default=0, help="with --feature_cache: also cache K augmented "
                   "views of the training set and train on a random one per sample (0: test-transform features)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="backbone forward precision (recommended and reference: fp32, PyTorch's default TF32 "
                   "settings); bf16 is faster and moves top-1 slightly; auto = bf16 where the hardware has it. "
                   "The heads always train and evaluate in fp32")
    add_bool(g, "compile", False, "torch.compile the frozen backbones' forward (on a GPU also CUDA graphs: mode "
             "reduce-overhead); features equal up to float rounding (reference: off)")


def add_run_args(g):
    g.add_argument("--dump_path", default=None,
                   help="folder of train.log, metrics.jsonl, args.json and checkpoints (a sweep: one subfolder "
                   "wd{wd}_lr{lr} per head); default: results/probe/{data_name}/{tag, or N x arch-hash}/"
                   "wd{values}-{recipe hash}, so a rerun of the same command resumes and two different probes "
                   "never share a folder")
    g.add_argument("--mode", default="train", choices=["train", "eval_only"],
                   help="eval_only: evaluate the saved head(s) of --dump_path on the test set (--eval_checkpoint) "
                   "and log the original's `Test:` line")
    g.add_argument("--eval_checkpoint", default="last", choices=["last", "best"],
                   help="--mode eval_only evaluates last: checkpoint.pth.tar, the last epoch's heads (the "
                   "original's), or best: each head's best.pth.tar (the epoch of its `Top-1 test accuracy`)")
    add_bool(g, "start_over", False, "discard the state in --dump_path and start from epoch 0 (otherwise a "
             "rerun resumes)")
    add_bool(g, "sync_bn", None, "synchronise BatchNorm statistics across processes (head, and backbones when "
             "fine-tuning); default: on whenever there is more than one process, so statistics are over the "
             "global batch as in the reference's single process")
    add_bool(g, "debug", False, "force a single process, as the reference scripts did")
    add_device_arg(g)
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
    add_bool(g, "extra_log_lines", False, "also log lines the original does not write: each training epoch's last "
             "iteration line (its running means are the epoch's) and `Test: Acc@5 ... over N images` after each "
             "evaluation (written anyway with --skip_bad_images, which it reports); metrics.jsonl holds the same "
             "numbers (reference: off, train.log line for line as the original's)")
    add_bool(g, "tensorboard", False, "TensorBoard events beside train.log (train/test loss and top-1, test "
             "top-5, lr); needs the optional tensorboard package (`uv sync --extra tensorboard`); metrics.jsonl "
             "stays the record")
    add_wandb_arg(g)
    add_bool(g, "skip_bad_images", False, "skip unreadable image files (counted and reported in the log) "
             "instead of stopping at the first one")


def add_legacy_args(g):
    """The original's flags that have no meaning here; a value that would change the result is refused."""
    for name in ("config", "dist_url", "gpu", "reweight_path", "headpretrained", "richway"):
        g.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    for name in ("world_size", "rank"):  # the launcher's environment sets them here
        g.add_argument(f"--{name}", type=int, default=None, help=argparse.SUPPRESS)
    add_launcher_args(g)
    for name in ("skip_pool", "save_init"):
        g.add_argument(f"--{name}", nargs="?", const=True, default=None, type=bool_flag, help=argparse.SUPPRESS)


def add_slurm_args(g):
    for name, (kind, default, text) in SLURM_FLAGS.items():
        g.add_argument(f"--{name}", type=kind, default=default, help=f"{text} (the original's default: {default})")


def config_name(args):
    """The backbones of a run as a folder name: the tag, else '{N}x{arch}-{hash of the checkpoint paths}'."""
    if args.tag:
        return args.tag
    archs = sorted(set(args.arch or []))
    digest = hashlib.sha256(json.dumps([args.arch, args.pretrained]).encode()).hexdigest()[:6]
    return f"{len(args.pretrained or [])}x{'+'.join(archs) or 'backbone'}-{digest}"


def default_dump_path(args, recipe_keys=RECIPE_KEYS, root=None):
    """results/probe/{data_name}/{config}/wd{values}-{hash}: the weight decays (in increasing order, so the
    order they were typed in does not matter) and a hash of the recipe record (the recipe_keys of ProbeRecipe, as
    the probe checks them on resume; before resolve_batch, the derived keys are None); the same command always
    gives the same folder, any recipe change another one."""
    wds = sorted(float(w) for w in args.wd)
    record, legacy = vars(ProbeRecipe.of(vars(args))), ProbeRecipe.legacy_values()
    recipe = {key: record[key] for key in recipe_keys
              if key != "wd" and not (key in legacy and record[key] == legacy[key])}
    digest = hashlib.sha256(json.dumps([recipe, wds, args.tag], sort_keys=True, default=str).encode()).hexdigest()
    folder = "wd" + "_".join(format(w, "g") for w in wds) + "-" + digest[:8]
    return os.path.join(root or RESULTS_ROOT, args.data_name, config_name(args), folder)


# ---------------------------------------------------------------- flag checks (torch-free, beside the parser)
def is_cifar(data_name):
    """The CIFAR family (its transforms and reference batch); the name was checked by timecat.resolve_backbones."""
    return data_name.startswith("cifar")


def check_args(args):
    """Every flag checked before any data is scanned or downloaded; one `error:` line for each problem. Runs after
    timecat.resolve_backbones (which checks --tag/--arch/--pretrained and --data_name)."""
    check_numbers(args)
    check_optimizer(args)
    args.lr_values = parse_values("lr", args.lr, allow_zero=False)
    args.wd_values = parse_values("wd", args.wd, allow_zero=True)
    if args.exp_mode == "finetune" and (len(args.lr) > 1 or len(args.wd) > 1 or args.feature_cache):
        raise UserError("--exp_mode finetune trains the backbones: it takes one --lr and one --wd and no "
                        "--feature_cache")
    if args.data_rate < 1 and args.data_name == "inaturalist18":
        raise UserError("--data_rate with inaturalist18: the original's iNat18 loader ignores --data_rate, so no "
                        "reference run used a fraction of iNat18; drop --data_rate (or probe a fraction of CIFAR or "
                        "ImageNet)")
    if args.tf_name == "32px" and not is_cifar(args.data_name):
        raise UserError(f"--tf_name 32px is the CIFAR native-size preset; use eval (and --img_size) for "
                        f"{args.data_name}")
    if args.eval_datasets and args.data_name != "imagenet1k":
        raise UserError(f"--eval_datasets {' '.join(args.eval_datasets)}: these are ImageNet test sets, scored by "
                        f"a 1000-way ImageNet head; probe --data_name imagenet1k, or drop --eval_datasets")
    if args.cache_views and not args.feature_cache:
        raise UserError("--cache_views needs --feature_cache DIR")
    subsets_for(args.subsets, len(args.pretrained))  # the one-line error of a mode too large for the backbones
    if args.subsets != "none" and args.exp_mode == "finetune":
        raise UserError("--subsets trains heads on frozen features: it is for --exp_mode lineareval")
    if args.knn < 0:
        raise UserError("--knn must be 0 (off) or a number of neighbours, e.g. 20")
    if args.knn and not args.feature_cache:
        raise UserError("--knn reads the cached features: add --feature_cache DIR (or drop --knn)")
    if args.eval_freq != 1:
        raise UserError("--eval_freq: only 1 (evaluate after every epoch, the reference's) is supported")
    if args.dump_path is None:  # the run's own folder under results/probe/ (README "Where results go")
        args.dump_path = default_dump_path(args)
    check_dump_path(args.dump_path)
    args.ignored = check_legacy(args)


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


def check_numbers(args):
    for name in ("epochs", "print_freq", "save_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.workers is None:
        args.workers = default_workers()
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
    # the alias: one name in args.json, the recipe check and the loop's tests
    args.optimizer = OPTIMIZER_ALIASES.get(args.optimizer, args.optimizer)
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
        reference = reference_batch(args.data_name)  # the reference ran one process: this is the global batch
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
