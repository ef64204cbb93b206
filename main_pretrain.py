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

from arguments.common import apply_device_choice, device_request
from arguments.pretrain import (
    SCHEDULE_FREE,
    PretrainRecipe,
    check_args,
    get_args_parser,
    resolve_batch,
    resolve_epoch_steps,
)
from util.cpu_runtime import configure_cpu_runtime

CPU_RUNTIME = None  # util.cpu_runtime's choice of OpenMP settings, logged by main(); set when run as a script
if __name__ == "__main__":  # before the heavy imports: --help and a mistyped flag answer without loading torch,
    ARGS = get_args_parser().parse_args()
    apply_device_choice(ARGS)  # CUDA and OpenMP read their environment once, when torch loads
    CPU_RUNTIME = configure_cpu_runtime()

# ruff: noqa: E402  (the imports below come after the parse above on purpose)
import inspect
import json
import os
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from datasets import WithTransform, build_dataset, image_loader, imagenet_root
from datasets.transforms import build_transform, pipeline_of
from engine import compile_module, resolve_precision, shard
from engine_pretrain import (
    STEP_STREAM,
    Loaders,
    Pretraining,
    RefreshBatches,
    SeededSamples,
    Start,
    TrainBatches,
    build_optimizer,
    derive_seed,
    metrics_path_of,
    resume_path_of,
)
from models import build_backbone
from models.checkpoint_keys import load_backbone_weights
from models.init import algoperf_init
from util import layout
from util.checkpoint import load_file
from util.cli import UserError, run_main
from util.logs import log_startup, truncate_jsonl, use_progress_bar
from util.run import configure_cuda_numerics, open_run, start_processes


# ---------------------------------------------------------------- data
class PretrainData(NamedTuple):
    train_set: torch.utils.data.Dataset  # (augmented image, label)
    val_set: torch.utils.data.Dataset  # (test-transformed image, label)
    num_classes: int


def build_pretrain_data(args, logger):
    """The training and validation splits from the probe's dataset registry, with the pretraining transforms."""
    if args.data_name == "imagenet1k":
        logger.info(f"data: --data_path is {imagenet_root(args.data_path).found}")
    read = dict(download=False, decoder=args.decoder)
    train, num_classes = build_dataset(args.data_name, args.data_path, "train", **read)
    val, _ = build_dataset(args.data_name, args.data_path, "test", **read)
    if val.classes != train.classes:
        raise UserError(f"{args.data_name}: val has {len(val.classes)} class folders and train {len(train.classes)}"
                        f", or they differ by name; both splits need the same class folders")
    if len(train) < args.global_batch:
        raise UserError(f"{args.data_name}: {len(train)} training images, fewer than one global batch "
                        f"({args.global_batch}); lower --global_batch")
    pipeline = pipeline_of(args.decoder, args.fast_transforms)
    return PretrainData(WithTransform(train, build_transform("imagenet", "eval", True, args.img_size, pipeline)),
                        WithTransform(val, build_transform("imagenet", "eval", False, args.img_size, pipeline)),
                        num_classes)


# ---------------------------------------------------------------- state on disk
def check_previous_run(args, resume_path):
    """A run folder (or this run's checkpoints) left by another recipe is refused unless --start_over."""
    recipe = PretrainRecipe.of(vars(args))
    if args.start_over:
        return
    if os.path.exists(resume_path):
        recipe.check(load_file(resume_path, "resume state")["args"], resume_path)
        return
    args_json = os.path.join(args.dump_path, layout.ARGS_JSON)
    if os.path.exists(args_json):
        with open(args_json) as f:
            recipe.check(json.load(f), args_json)
    if os.path.isdir(args.output_dir):
        for folder in sorted(os.listdir(args.output_dir)):
            path = os.path.join(args.output_dir, folder, layout.run_file_name(args.run))
            if layout.parse_step_folder(folder) and os.path.isfile(path):
                recipe.check(load_file(path, "checkpoint")["args"], path)
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
    """Check the flags, start the processes, open the run folder (util/run.py), then pretrain()."""
    check_args(args)
    apply_device_choice(args)  # --device cpu when main() is called directly (as a script: before torch loaded)
    dist_info = start_processes(args, device_request(args))
    with open_run(args, dist_info, "step", cpu_runtime=CPU_RUNTIME) as run:
        pretrain(args, run)


def pretrain(args, run):
    """The stages of one run, in order; the loop itself is engine_pretrain.Pretraining."""
    started = time.time()
    dist_info, logger = run.dist_info, run.logger
    prepare_run(args, dist_info, logger)
    data = build_pretrain_data(args, logger)
    if args.steps is None:  # --optimizer sgd without --steps: the predecessor's 90 epochs of this training set
        resolve_epoch_steps(args, len(data.train_set), logger)
        check_previous_run(args, resume_path_of(args.dump_path))
    seeded = SeededSamples(data.train_set)
    loaders = build_eval_loaders(args, data, seeded, dist_info, logger)
    model, optimizer, train_model = build_training_model(args, data.num_classes, dist_info, logger)
    start = resume_or_start(args, run, model, optimizer)
    log_recipe(args, dist_info.world_size, loaders.steps_per_epoch, start.step, logger)
    loaders = loaders._replace(train=build_train_loader(args, seeded, start.step, dist_info))
    loop = Pretraining(args, dist_info, logger, model, optimizer, train_model, loaders, best_acc=start.best_acc,
                       show_bar=use_progress_bar(dist_info.is_main), run=run)
    loop.train(start, started)


def prepare_run(args, dist_info, logger):
    """The batch split over processes, the precision, the recipe check against the run folder, the banner."""
    resolve_batch(args, dist_info.world_size)
    args.precision = resolve_precision(args.precision, dist_info.device)
    if args.steps is not None:  # else checked once the training set is counted (resolve_epoch_steps)
        check_previous_run(args, resume_path_of(args.dump_path))
    log_startup(logger, args, dist_info, args.global_batch, args.lr)
    # as AlgoPerf's workload: cuDNN autotuning (off with --cuda_deterministic), and PyTorch's default TF32 settings
    # (matrix products in full fp32) unless --tf32
    configure_cuda_numerics(dist_info.device, args.cuda_deterministic, args.tf32)


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
                       sampler=shard(len(data.val_set), rank, world), **loader_options(args, dist_info))
    steps_per_epoch = len(data.train_set) // args.global_batch
    logger.info(f"data: {len(data.train_set)} train / {len(data.val_set)} val images, {data.num_classes} classes, "
                f"{steps_per_epoch} steps per epoch")
    return Loaders(None, refresh, refresh_sampler, val, len(data.val_set), steps_per_epoch)


def build_train_loader(args, seeded, start_step, dist_info):
    """Endless training micro-batches from start_step on, whose workers live for the whole run."""
    sampler = TrainBatches(len(seeded), args.seed, args.global_batch, args.batch_size, args.accum_steps,
                           dist_info.rank).starting_at(start_step)
    return image_loader(seeded, args.skip_bad_images, batch_sampler=sampler,
                        prefetch_factor=4 if args.workers else None, **loader_options(args, dist_info))


def build_training_model(args, num_classes, dist_info, logger):
    """The model at step 0 (a function of the seed), its optimizer, and what the steps call (compiled, DDP)."""
    device = dist_info.device
    torch.manual_seed(derive_seed(args.seed, STEP_STREAM, 0))  # the initialisation is a function of the seed
    model = build_model(args, num_classes, logger).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    train_model = compile_module(model, device, static_shapes=not dist_info.distributed) if args.compile else model
    if dist_info.distributed:  # each process keeps its own BatchNorm statistics; refresh_bn averages them
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(ddp).parameters else {"broadcast_buffers": False}  # renamed in torch 2.15
        train_model = ddp(train_model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    return model, optimizer, train_model


def resume_or_start(args, run, model, optimizer):
    """Load the resume state of --dump_path (unless --start_over), or clear what a previous run left; args.json."""
    resume_path, metrics_path = resume_path_of(args.dump_path), metrics_path_of(args.dump_path)
    state = run.resume_or_start(resume_path, PretrainRecipe.of(vars(args)).check, [metrics_path], model=model,
                                optimizer=optimizer)
    saved = state or {}
    # the training loss of the steps since the last evaluation, summed over processes (a stop mid-interval)
    start = Start(saved.get("step", 0), saved.get("best_acc", 0.0), *saved.get("since_eval", (0.0, 0)))
    if state is not None:
        run.logger.info(f"Resumed from step {start.step} ({resume_path}), best Acc@1 so far {start.best_acc:.2f}")
        if run.dist_info.is_main:  # records of steps the resume state does not hold (a crash before it was saved)
            truncate_jsonl(metrics_path, lambda r: r["step"] <= start.step)
    run.write_args(vars(args))
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
    run_main(main, ARGS)
