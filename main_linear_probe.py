"""Linear probe (or fine-tuning) of N concatenated pretrained backbones on a transfer dataset.

Single process:  python main_linear_probe.py --tag supervisedimagenet_resnet50_sfadamw_5_step80k --data_name cifar10
torchrun:        torchrun --nproc_per_node 8 main_linear_probe.py ...
slurm:           srun python main_linear_probe.py ...   (see scripts/)
A sweep in one pass: --wd 1e-4 5e-4 1e-3 trains one head per value on the same backbone features.
"""

from arguments.common import apply_device_choice, device_request
from arguments.linear_probe import (
    SCHEDULE_FREE,
    TRAINING_ONLY_KEYS,
    check_args,
    check_same_recipe,
    get_args_parser,
    resolve_batch,
)
from util.cpu_runtime import configure_cpu_runtime

CPU_RUNTIME = None  # util.cpu_runtime's choice of OpenMP settings, logged by main(); set when run as a script
if __name__ == "__main__":  # before the heavy imports: --help and a mistyped flag answer without loading torch,
    ARGS = get_args_parser().parse_args()
    apply_device_choice(ARGS)  # CUDA and OpenMP read their environment once, when torch loads
    CPU_RUNTIME = configure_cpu_runtime()

# ruff: noqa: E402  (the imports below come after the parse above on purpose)
import argparse
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from analysis.knn import knn_log_line, knn_per_head
from datasets import (
    WithTransform,
    build_dataset,
    dataset_targets,
    family_of,
    image_loader,
    reference_sampler_seed,
    stratified_subset,
    subset_fraction,
)
from datasets.transforms import build_transform, crop_size, pipeline_of
from engine import (
    BatchSource,
    CachedBatches,
    Classifier,
    EncodedBatches,
    ImageBatches,
    NonFiniteLoss,
    ShardSampler,
    compile_module,
    evaluate,
    log_diagnostics,
    resolve_precision,
    train_one_epoch,
)
from feature_cache import ExtractionStopped, load_or_build
from models import ConcatEncoder, MultiHead
from models.heads import build_heads, build_optimizer, head_specs, lr_at_epoch, param_groups
from timecat import backbones_recipe, resolve_backbones
from util import log_lines
from util.checkpoint import load_file, save_atomic
from util.cli import UserError, run_main
from util.distributed import all_reduce_sum, any_process, barrier, cleanup, init_distributed, require_cuda_if_requested
from util.logs import (
    append_jsonl,
    claim_run_folder,
    close_logger,
    create_logger,
    log_startup,
    truncate_jsonl,
    use_progress_bar,
    write_json_atomic,
)
from util.misc import requeue_slurm_job, set_seed, stop_outcome
from util.signals import StopSignal
from util.tensorboard import MetricsBoard, require_tensorboard
from util.wandb_log import WandbRun, require_wandb

# ---------------------------------------------------------------- heads and optimisation


# ---------------------------------------------------------------- data
class Splits(NamedTuple):
    """The probe's data: training images augmented and with the test transform, the test set, and the seeded
    positions of the training set used for training and for held-out validation (--data_rate, --val_split)."""
    train_aug: object
    train_plain: object
    test_set: object
    train_positions: list
    val_positions: list
    num_classes: int


def build_data(args, dist_info, logger):
    """Training (augmented and with the test transform), test set and the seeded positions used for training
    and held-out validation (--data_rate, --val_split)."""
    family = family_of(args.data_name)
    if dist_info.is_main:  # one process downloads, the others wait
        train_base, num_classes = build_dataset(args.data_name, args.data_path, "train", args.download,
                                                args.decoder, args.fast_transforms)
    barrier()
    if not dist_info.is_main:
        train_base, num_classes = build_dataset(args.data_name, args.data_path, "train", False, args.decoder,
                                                args.fast_transforms)
    test_base, _ = build_dataset(args.data_name, args.data_path, "test", False, args.decoder, args.fast_transforms)
    kept = subset_fraction(len(train_base), args.data_rate, args.seed)
    train_base = torch.utils.data.Subset(train_base, kept)
    recipe = backbones_recipe(args.data_name, args.arch, args.allow_mixed_transforms)
    pipeline = pipeline_of(args.decoder, args.fast_transforms)
    train_aug = WithTransform(train_base, build_transform(family, args.tf_name, True, args.img_size, pipeline,
                                                          recipe))
    train_plain = WithTransform(train_base, build_transform(family, args.tf_name, False, args.img_size, pipeline,
                                                            recipe))
    test_set = WithTransform(test_base, build_transform(family, args.tf_name, False, args.img_size, pipeline,
                                                        recipe))
    val_positions = []
    if args.val_split:
        val_positions = stratified_subset(dataset_targets(train_base), args.val_split, args.seed)
    held_out = set(val_positions)
    train_positions = [i for i in range(len(train_base)) if i not in held_out]
    logger.info(f"data: {args.data_name}, {len(train_positions)} train / {len(val_positions)} validation / "
                f"{len(test_set)} test images, {num_classes} classes")
    return Splits(train_aug, train_plain, test_set, train_positions, val_positions, num_classes)


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


class ProbeData(NamedTuple):
    """The splits and the order they are read in: the training sampler (reseeded every epoch), the generator of
    the loader's workers and of the cached views' draws, and whether a last batch of one sample is dropped."""
    splits: Splits
    train_sampler: PositionSampler
    val_sampler: ShardSampler
    test_sampler: ShardSampler
    generator: torch.Generator
    drop_last: bool


def build_probe_data(run):
    """Stage 1: the splits, their samplers, and the check that BatchNorm sees 2 samples or more per batch."""
    args, world = run.args, run.dist.world_size
    splits = build_data(args, run.dist, run.logger)
    train_sampler = PositionSampler(splits.train_positions, run.dist, reference_sampler_seed(args.seed))
    drop_last = drop_single_sample_batch(len(train_sampler), args, world, run.logger)
    per_batch = min(args.batch_size, len(train_sampler)) * (world if args.sync_bn else 1)
    if (args.use_bn or args.exp_mode == "finetune") and per_batch < 2:
        raise UserError(f"BatchNorm needs 2 samples or more per training batch; this run has {per_batch} "
                        f"(--batch_size {args.batch_size}, {len(train_sampler)} training images per process): "
                        f"raise them, or train the head with --no-use_bn")
    return ProbeData(splits, train_sampler, ShardSampler(len(splits.val_positions), run.dist.rank, world),
                     ShardSampler(len(splits.test_set), run.dist.rank, world), torch.Generator(), drop_last)


# ---------------------------------------------------------------- the run and its stages
@dataclass
class ProbeRun:
    """What every stage of a probe reads: the arguments, the processes, the heads and where each one writes."""
    args: argparse.Namespace
    dist: object  # util.distributed's DistInfo: rank, world size, device
    combos: list  # one HeadSpec per head
    head_dirs: list  # each head's folder (--dump_path itself for a single head)
    logger: object  # train.log, or the sweep's sweep.log
    head_loggers: list  # each head's train.log ([logger] for a single head)
    stop: StopSignal
    board: MetricsBoard
    show_bar: bool

    @property
    def sweep(self):
        return len(self.combos) > 1

    @property
    def all_loggers(self):
        """The run's and the heads' loggers, each once."""
        return list({id(lg): lg for lg in [self.logger] + self.head_loggers}.values())

    @property
    def checkpoint_path(self):
        return os.path.join(self.args.dump_path, "checkpoint.pth.tar")

    @property
    def best_paths(self):
        return [os.path.join(d, "best.pth.tar") for d in self.head_dirs]


def main(args):
    resolve_backbones(args)  # --tag or --arch/--pretrained (and --data_name) first, then every other flag
    check_args(args)
    if args.tensorboard:
        require_tensorboard()
    if args.wandb:
        require_wandb()
    apply_device_choice(args)  # --device cpu when main() is called directly (as a script: before torch loaded)
    require_cuda_if_requested(device_request(args))  # a GPU job on a CPU-only torch stops here, in one line
    dist_info = init_distributed(debug=args.debug, timeout_minutes=args.dist_timeout)
    resolve_batch(args, dist_info.world_size)
    args.precision = resolve_precision(args.precision, dist_info.device)
    combos = head_specs(args)
    sweep = len(combos) > 1
    head_dirs = [os.path.join(args.dump_path, spec.name) if sweep else args.dump_path for spec in combos]
    for directory in head_dirs:
        os.makedirs(directory, exist_ok=True)
    lock = claim_run_folder(args.dump_path, dist_info, head_dirs)  # before any log line: a refused run writes nothing
    logger = create_logger(args.dump_path, dist_info.rank, "sweep.log" if sweep else "train.log")
    if CPU_RUNTIME is not None:
        logger.info(CPU_RUNTIME.line)
    head_loggers = [create_logger(d, dist_info.rank, console=False) for d in head_dirs] if sweep else [logger]
    try:
        wandb_run = (WandbRun(args.dump_path, args.wandb, vars(args), "epoch", logger)
                     if args.wandb and dist_info.is_main else None)
        with StopSignal() as stop, MetricsBoard(args.tensorboard and dist_info.is_main, "epoch", wandb_run) as board:
            probe(ProbeRun(args, dist_info, combos, head_dirs, logger, head_loggers, stop, board,
                           use_progress_bar(dist_info.is_main)))
    finally:
        for lg in {id(lg): lg for lg in [logger] + head_loggers}.values():
            close_logger(lg)
        if lock is not None:
            lock.close()
        cleanup()


def probe(run):
    """The probe's stages, in order."""
    log_start(run)
    data = build_probe_data(run)
    model = build_probe_model(run, data.splits.num_classes)
    optimizer = build_optimizer(param_groups(model.heads, model.encoder, run.combos, run.args), run.args)
    try:
        sources = build_batch_sources(run, data, model)
    except ExtractionStopped as exc:  # a stop signal during the feature cache's extraction
        return stopped(run, where=f"during the {exc}", resumes="the extraction at its next chunk")
    if run.args.mode == "eval_only":
        return evaluate_saved_heads(run, model, optimizer, sources)
    progress = resume_or_start(run, model, optimizer)
    if train_epochs(run, data, model, optimizer, sources, progress):
        report(run, progress, has_val=sources.val_count > 0)


def log_start(run):
    """Stage 0: the start-up lines of every log, the seed, cuDNN's settings."""
    args, world = run.args, run.dist.world_size
    for lg in run.head_loggers if run.sweep else [run.logger]:
        log_startup(lg, args, run.dist, args.batch_size * world, args.lr if run.sweep else args.lr[0])
    if run.sweep:
        run.logger.info(f"sweep of {len(run.combos)} heads on one backbone pass: "
                        f"{', '.join(spec.name for spec in run.combos)}")
    if args.ignored:
        run.logger.info("ignored (flags of the original with no effect here): "
                        + ", ".join(f"--{name} {getattr(args, name)}" for name in args.ignored))
    set_seed(args.seed)
    if run.dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.cuda_deterministic
        torch.backends.cudnn.deterministic = args.cuda_deterministic


# ---------------------------------------------------------------- model
class ProbeModel(NamedTuple):
    encoder: nn.Module  # the concatenated backbones (frozen unless fine-tuning)
    heads: MultiHead  # one head per HeadSpec
    trained: nn.Module  # what the optimizer trains: the heads, or encoder + heads (DDP-wrapped with processes)
    eval_model: nn.Module  # what evaluation runs on its batch source's inputs
    finetune: bool


def build_probe_model(run, num_classes):
    """Stage 2: the encoder and every head; only what trains is wrapped in DDP."""
    args, dist_info, device = run.args, run.dist, run.dist.device
    crop = crop_size(family_of(args.data_name), args.tf_name, args.img_size,
                     backbones_recipe(args.data_name, args.arch, args.allow_mixed_transforms))
    encoder = ConcatEncoder(args.arch, args.pretrained, crop).to(device).to(memory_format=torch.channels_last)
    finetune = args.exp_mode == "finetune"
    if not finetune:
        encoder.freeze()
        if args.compile:  # the frozen forward only: a fine-tuned encoder's checkpoint keeps its plain keys
            encoder = compile_module(encoder, device)
    heads = build_heads([net.out_dim for net in encoder.backbones], num_classes, run.combos, encoder.classifiers,
                        args, dist_info.world_size)
    if args.sync_bn and dist_info.distributed and finetune:  # the backbones' BNs too, as the reference's --sync_bn
        if device.type != "cuda":
            raise UserError("fine-tuning with synchronised BatchNorm across processes needs GPUs (torch's "
                            "SyncBatchNorm); pass --sync_bn False, or run one process")
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    heads.to(device)
    run.logger.info(f"encoder: {len(args.arch)} backbone(s) {args.arch}, {encoder.out_dim}-d features, "
                    f"{args.precision}; head: {'BatchNorm1d + ' if args.use_bn else ''}Linear({encoder.out_dim}, "
                    f"{num_classes}) x {len(run.combos)}")
    classifier = Classifier(encoder, heads, args.precision)
    trained = classifier if finetune else heads
    if dist_info.distributed:  # only what trains is wrapped: the frozen encoder needs no gradient sync
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    return ProbeModel(encoder, heads, trained, classifier if finetune else heads, finetune)


def set_eval_mode(model, optimizer, args):
    model.eval_model.eval()
    if args.optimizer == SCHEDULE_FREE:
        optimizer.eval()  # schedule-free: evaluate at the averaged weights


# ---------------------------------------------------------------- batch sources
class Sources(NamedTuple):
    """engine.BatchSource of each split (re-iterable, counting what they skip), the split sizes evaluation checks
    its counts against, and each head's kNN result (--knn, rank 0; else None)."""
    train: BatchSource
    test: BatchSource
    val: BatchSource
    test_count: int
    val_count: int
    knn: list


def build_batch_sources(run, data, model):
    """Stage 3: features on the fly (the reference), from the cache, or images when fine-tuning."""
    splits, n = data.splits, len(run.combos)
    if run.args.feature_cache:
        train, test, val, knn = cached_sources(run, data, model.encoder)
    else:
        train, test, val = loader_sources(run, data, model)
        knn = [None] * n
    return Sources(train, test, val, len(splits.test_set), len(splits.val_positions), knn)


def loader_sources(run, data, model):
    """Train/test/val sources over image loaders: encoded by the frozen encoder, or images when fine-tuning."""
    args, device, splits = run.args, run.dist.device, data.splits

    def loader(dataset, sampler, **kw):
        return image_loader(dataset, args.skip_bad_images, batch_size=args.batch_size, sampler=sampler,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0, **kw)  # no worker start-up every epoch

    loaders = (loader(splits.train_aug, data.train_sampler, drop_last=data.drop_last, generator=data.generator),
               loader(splits.test_set, data.test_sampler),
               loader(torch.utils.data.Subset(splits.train_plain, splits.val_positions), data.val_sampler))
    if model.finetune:
        return [ImageBatches(lo, device) for lo in loaders]
    return [EncodedBatches(lo, model.encoder, device, args.precision) for lo in loaders]


def cached_sources(run, data, encoder):
    """Train/test/val sources over the feature cache (computed once, then reused), and --knn's results."""
    args, dist_info, device, splits = run.args, run.dist, run.dist.device, data.splits

    def cached(dataset, split, view):
        return load_or_build(encoder, dataset, args.feature_cache, args, dist_info, split, view, run.logger,
                             run.show_bar, run.stop)

    plain_features, plain_labels = cached(splits.train_plain, "train", -1)
    test_features, test_labels = cached(splits.test_set, "test", -1)
    views = [plain_features]
    if args.cache_views:
        views = [cached(splits.train_aug, "train", k)[0] for k in range(args.cache_views)]
    views, plain_features, test_features = place_features(views, plain_features, test_features, device, run.logger)
    val_rows = torch.tensor(splits.val_positions, dtype=torch.long)
    train = CachedBatches(views, plain_labels, data.train_sampler, args.batch_size, device, data.drop_last,
                          data.generator)
    test = CachedBatches([test_features], test_labels, data.test_sampler, args.batch_size, device)
    val = CachedBatches([plain_features[val_rows]], plain_labels[val_rows], data.val_sampler, args.batch_size,
                        device)
    knn = [None] * len(run.combos)
    if args.knn and dist_info.is_main:  # only rank 0 logs; the features are fixed, so once per run
        knn = knn_per_head(args.knn, run.combos, [net.out_dim for net in encoder.backbones],
                           (plain_features, plain_labels, splits.train_positions), (test_features, test_labels),
                           device, run.logger)
    return train, test, val, knn


# ---------------------------------------------------------------- evaluate saved heads, resume or start
def evaluate_saved_heads(run, model, optimizer, sources):
    """--mode eval_only: every head on the test set, from the last epoch's checkpoint.pth.tar (the original's) or,
    with --eval_checkpoint best, from each head's best.pth.tar; the original's lines (`Found checkpoint at`, the
    validation lines, `Test:`)."""
    if run.args.eval_checkpoint == "last":
        state = load_file(run.checkpoint_path, "run checkpoint")
        check_same_recipe(state["args"], run.args, run.checkpoint_path, skip=TRAINING_ONLY_KEYS)
        model.heads.load_state_dict(state["heads"])
        if "encoder" in state:
            model.encoder.load_state_dict(state["encoder"])
        found = [(run.checkpoint_path, state["epoch"] - 1)] * len(run.combos)
    else:
        found = []
        for head, path in zip(model.heads, run.best_paths):
            state = load_file(path, "saved head")
            check_same_recipe(state["args"], run.args, path, skip=TRAINING_ONLY_KEYS)
            head.load_state_dict(state["head"])
            if "encoder" in state:
                model.encoder.load_state_dict(state["encoder"])
            found.append((path, state["epoch"] - 1))
    for lg, (path, _) in zip(run.head_loggers, found):
        lg.info(f"Found checkpoint at {path}")
    set_eval_mode(model, optimizer, run.args)
    for h, stats in enumerate(evaluate(model.eval_model, sources.test, run.dist.device, run.args.precision,
                                       sources.test_count, run.show_bar, num_heads=len(run.combos),
                                       loggers=run.head_loggers, print_freq=run.args.print_freq)):
        run.head_loggers[h].info(log_lines.eval_only_line(stats["loss"], stats["top1"]))
        if run.args.extra_log_lines or run.args.skip_bad_images:
            run.head_loggers[h].info(f"Test: Acc@5 {stats['top5']:.3f} over {sources.test_count - stats['skipped']} "
                                     f"images (head of epoch {found[h][1]})" + unreadable_note(stats))


class Selection(NamedTuple):
    """The epoch a head's validation accuracy selects, with its validation and test top-1."""
    epoch: int
    val_top1: float
    test_top1: float


@dataclass
class Progress:
    """Where training stands: the next epoch, and per head the best test top-1, the best validation top-1 and its
    Selection (None before a validation split has scored). Lists indexed by head, as in checkpoint.pth.tar."""
    start_epoch: int
    best_test: list
    best_val: list
    selected: list

    @classmethod
    def fresh(cls, heads):
        # best_test starts below 0, so a head that never rises above 0% still writes best.pth.tar
        return cls(0, [-1.0] * heads, [-1.0] * heads, [None] * heads)

    def state(self, next_epoch):
        """The checkpoint's entries, resuming at next_epoch (plain tuples: a checkpoint loads with weights_only)."""
        return {"epoch": next_epoch, "best_test": self.best_test, "best_val": self.best_val,
                "selected": [None if s is None else tuple(s) for s in self.selected]}


def resume_or_start(run, model, optimizer):
    """Stage 4: resume from checkpoint.pth.tar (same recipe only), or clear a previous run's files; then args.json."""
    if os.path.exists(run.checkpoint_path) and not run.args.start_over:
        progress = resume(run, model, optimizer)
    else:
        progress = Progress.fresh(len(run.combos))
        if run.dist.is_main:
            for stale in [run.checkpoint_path] + run.best_paths + metrics_paths(run):
                if os.path.exists(stale):
                    os.remove(stale)
    if run.dist.is_main:
        write_json_atomic(vars(run.args), os.path.join(run.args.dump_path, "args.json"))
        for directory, spec in zip(run.head_dirs, run.combos):
            write_json_atomic(head_args(run.args, spec), os.path.join(directory, "args.json"))
    return progress


def metrics_paths(run):
    return [os.path.join(d, "metrics.jsonl") for d in run.head_dirs]


def resume(run, model, optimizer):
    state = load_file(run.checkpoint_path, "run checkpoint")
    check_same_recipe(state["args"], run.args, run.checkpoint_path)
    model.heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    if "encoder" in state:
        model.encoder.load_state_dict(state["encoder"])
    progress = Progress(state["epoch"], state["best_test"], state["best_val"],
                        [None if s is None else Selection(*s) for s in state["selected"]])
    for lg in run.head_loggers if run.sweep else [run.logger]:
        lg.info(f"Resumed from {run.checkpoint_path} at epoch {progress.start_epoch}")
    if run.dist.is_main:  # records of epochs the checkpoint does not hold (a crash before it was saved)
        for path in metrics_paths(run):
            truncate_jsonl(path, lambda r: r["epoch"] < progress.start_epoch)
    return progress


# ---------------------------------------------------------------- train epochs
class EpochResult(NamedTuple):
    """One epoch's numbers, per head where a list."""
    epoch: int
    seconds_since: float  # time.time() at the epoch's start
    train_loss: list
    train_top1: list
    test: list  # engine.evaluate's dict per head
    val: list  # the same on the held-out split, or None per head
    improved: list  # whether the head's test top-1 beat its best (best.pth.tar is written)
    train_skipped: Optional[int]  # unreadable training images of the epoch (--skip_bad_images), else None


def train_epochs(run, data, model, optimizer, sources, progress):
    """Stage 5: train, evaluate, log and save every epoch; False when a stop signal ended the run early."""
    # the processes agree on a stop at every iteration, so they all stop at the same one (slurm signals them at
    # different moments)
    stop_agreed = lambda: any_process(run.stop(), run.dist.device)
    for epoch in range(progress.start_epoch, run.args.epochs):
        start = time.time()
        for lg in run.all_loggers:
            lg.info(log_lines.epoch_banner(epoch))
        skipped_before = sources.train.skipped
        trained = train_epoch(run, data, model, optimizer, sources.train, epoch, stop_agreed)
        if trained is None:
            stopped(run, epoch)
            return False
        test_stats, val_stats = evaluate_epoch(run, model, optimizer, sources)
        check_finite(run, test_stats, epoch)
        train_skipped = count_skipped_training(run, sources.train, skipped_before, epoch)
        improved = [log_head_epoch(run, model, sources, progress, h, epoch, test_stats[h], val_stats[h])
                    for h in range(len(run.combos))]
        result = EpochResult(epoch, start, *trained, test_stats, val_stats, improved, train_skipped)
        if run.dist.is_main:
            save_epoch(run, model, optimizer, progress, result, sources.knn)
        barrier()
    return True


def train_epoch(run, data, model, optimizer, source, epoch, stop_agreed):
    """One training epoch of every head: (losses, top-1s) per head, or None when stopped by a signal."""
    args = run.args
    for group in optimizer.param_groups:
        group["lr"] = lr_at_epoch(epoch, group["base_lr"], args)
    # per-epoch seeds: an epoch's shuffling and augmentations do not depend on where the run resumed
    data.train_sampler.set_epoch(epoch)
    set_seed(args.seed + 1000 * epoch + run.dist.rank)
    data.generator.manual_seed(args.seed + 1000 * epoch + run.dist.rank)
    model.trained.train()  # the heads, or encoder + heads when fine-tuning; a frozen encoder stays in eval mode
    if args.optimizer == SCHEDULE_FREE:
        optimizer.train()
    try:
        loss, top1, completed = train_one_epoch(model.trained, source, len(source), optimizer, epoch, args,
                                                run.dist.device, run.head_loggers, stop_agreed,
                                                run.show_bar and not run.sweep)
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}; {last_good_state(epoch, run.checkpoint_path)}. Lower --lr?") from None
    return (loss, top1) if completed else None


def stopped(run, epoch=None, where=None, resumes=None):
    """After a stop signal: requeue the slurm job when a process got SIGUSR1 (slurm's warning), not on SIGTERM."""
    again = any_process(run.stop.requeue, run.dist.device)  # a collective: every process calls it here
    where = where or f"during epoch {epoch}"
    resumes = resumes or f"from epoch {epoch} ({run.checkpoint_path})"
    for lg in run.all_loggers:
        lg.info(f"Stopped by {run.stop.received or 'a stop signal to another process'} {where}; "
                f"a rerun resumes {resumes}; {stop_outcome(again)}")
    if run.dist.is_main and again:
        requeue(run.logger)


def evaluate_epoch(run, model, optimizer, sources):
    """Every head on the test split, and on the held-out split when --val_split holds one out."""
    n, device, precision = len(run.combos), run.dist.device, run.args.precision
    set_eval_mode(model, optimizer, run.args)
    test = evaluate(model.eval_model, sources.test, device, precision, sources.test_count, run.show_bar,
                    num_heads=n, loggers=run.head_loggers, print_freq=run.args.print_freq)
    val = [None] * n
    if sources.val_count:
        val = evaluate(model.eval_model, sources.val, device, precision, sources.val_count, num_heads=n)
    return test, val


def check_finite(run, test_stats, epoch):
    diverged = [h for h, stats in enumerate(test_stats) if not math.isfinite(stats["loss"])]
    if diverged:  # weights that went non-finite in the epoch's last step are never saved as a good state
        h = diverged[0]
        raise UserError(f"the test loss is {test_stats[h]['loss']} after epoch {epoch}"
                        + (f" (head {run.combos[h].name})" if run.sweep else "")
                        + f"; {last_good_state(epoch, run.checkpoint_path)}. Lower --lr?")


def count_skipped_training(run, source, skipped_before, epoch):
    """--skip_bad_images: the epoch's unreadable training images over every process, logged; else None."""
    if not run.args.skip_bad_images:
        return None
    skipped = int(all_reduce_sum([source.skipped - skipped_before], run.dist.device)[0])
    for lg in run.all_loggers:
        lg.info(f"Skipped {skipped} unreadable training images in epoch {epoch} (--skip_bad_images)")
    return skipped


def log_head_epoch(run, model, sources, progress, h, epoch, test, val):
    """Head h's lines of the epoch, in the original's order (--custom_eval_func diagnostics, then the Test line);
    updates its bests. Returns whether its test top-1 improved."""
    args, lg, count = run.args, run.head_loggers[h], sources.val_count
    improved = test["top1"] > progress.best_test[h]
    progress.best_test[h] = max(progress.best_test[h], test["top1"])
    log_diagnostics(args.custom_eval_func, model.heads[h], run.combos[h].subset, model.encoder, sources.test, lg,
                    args.precision)
    lg.info(log_lines.test_line(test["loss"], test["top1"], progress.best_test[h]))
    if sources.knn[h] is not None:
        lg.info(knn_log_line(sources.knn[h]))
    if args.extra_log_lines or args.skip_bad_images:  # lines the original does not write: opt-in
        lg.info(f"Test: Acc@5 {test['top5']:.3f} over {sources.test_count - test['skipped']} images"
                + unreadable_note(test))
    if val is not None:
        if val["top1"] > progress.best_val[h]:
            progress.best_val[h], progress.selected[h] = val["top1"], Selection(epoch, val["top1"], test["top1"])
        lg.info(f"Val: Loss {val['loss']:.4f} Acc@1 {val['top1']:.3f} Best Val Acc@1 so far "
                f"{progress.best_val[h]:.2f} over {count - val['skipped']} held-out training images"
                + unreadable_note(val))
    if run.sweep:
        run.logger.info(f"epoch {epoch} {run.combos[h].name}: test Acc@1 {test['top1']:.3f} "
                        f"(best {progress.best_test[h]:.2f})"
                        + (f", val Acc@1 {val['top1']:.3f}" if val is not None else ""))
    return improved


def save_epoch(run, model, optimizer, progress, result, knn):
    """Rank 0: best.pth.tar of each improved head, each head's metrics record, checkpoint.pth.tar (atomic)."""
    args, encoder_state = run.args, model.encoder.state_dict() if model.finetune else None
    for h, path in enumerate(run.best_paths):
        if result.improved[h]:
            head_state = {"head": model.heads[h].state_dict(), "epoch": result.epoch + 1,
                          "best_acc": progress.best_test[h], "args": vars(args)}
            if model.finetune:
                head_state["encoder"] = encoder_state
            save_atomic(head_state, path)
        record = epoch_record(run, h, result, knn[h])
        append_jsonl(record, os.path.join(run.head_dirs[h], "metrics.jsonl"))
        run.board.add(record, run.head_dirs[h])  # --tensorboard: the same record as events beside train.log
    state = {"heads": model.heads.state_dict(), "optimizer": optimizer.state_dict(), **progress.state(result.epoch + 1),
             "args": vars(args)}
    if model.finetune:
        state["encoder"] = encoder_state
    save_atomic(state, run.checkpoint_path)
    if (result.epoch + 1) % args.save_freq == 0:  # the reference's checkpoint_epoch{k}.pth.tar
        save_atomic(state, os.path.join(args.dump_path, f"checkpoint_epoch{result.epoch + 1}.pth.tar"))


def epoch_record(run, h, result, knn):
    """Head h's line of metrics.jsonl for the epoch (knn: its --knn result, or None)."""
    test, val = result.test[h], result.val[h]
    record = {"epoch": result.epoch, "train_loss": result.train_loss[h], "train_top1": result.train_top1[h],
              "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
              "lr": lr_at_epoch(result.epoch, run.combos[h].lr, run.args),
              "seconds": round(time.time() - result.seconds_since, 3)}
    if knn is not None:
        record.update(knn_top1=knn.top1, knn_top5=knn.top5, knn_k=knn.k)
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"])
    if result.train_skipped is not None:
        record.update(train_skipped=result.train_skipped, test_skipped=test["skipped"])
    return record


# ---------------------------------------------------------------- report
def report(run, progress, has_val):
    """Stage 6: each head's final lines; a sweep's best head on test (the reference's rule) and on validation."""
    for h, lg in enumerate(run.head_loggers):
        lg.info(log_lines.final_message(progress.best_test[h]))
        if progress.selected[h] is not None:
            e, v, t = progress.selected[h]
            lg.info(f"Selected on validation: epoch {e} val Acc@1 {v:.2f} test Acc@1 {t:.2f}")
    if not run.sweep:
        return
    full = [h for h, spec in enumerate(run.combos) if spec.subset is None]  # a subset head is a cat-n point
    best = max(full, key=lambda h: progress.best_test[h])
    run.logger.info(f"Best on test (the reference's rule): {run.combos[best].name} Acc@1 "
                    f"{progress.best_test[best]:.2f}")
    if has_val:
        pick = max(full, key=lambda h: progress.selected[h].val_top1)
        e, v, t = progress.selected[pick]
        run.logger.info(f"Selected on validation: {run.combos[pick].name} epoch {e} val Acc@1 {v:.2f} test Acc@1 "
                        f"{t:.2f}")


def head_args(args, spec):
    """args.json of one head: the run's arguments with the head's lr and wd; a subset head's lists only its
    backbones (the arguments of the separate probe it equals), so tools/summarize.py counts them."""
    out = dict(vars(args), lr=spec.lr, wd=spec.wd, head=spec.name)
    if spec.subset is not None:
        out.update(arch=[args.arch[i] for i in spec.subset], pretrained=[args.pretrained[i] for i in spec.subset],
                   subset=list(spec.subset), tag=None)
    return out


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


if __name__ == "__main__":
    run_main(main, ARGS)
