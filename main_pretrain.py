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
from arguments.pretrain import (BN_BATCH, EXTRA_RUN_SEED, PROJECT_ROOT, PRETRAIN_DATA, RELEASED_SEEDS,  # noqa: F401
                                SCHEDULE_FREE, default_seed, get_args_parser)
from util.cpu_runtime import configure_cpu_runtime

CPU_RUNTIME = None  # util.cpu_runtime's choice of OpenMP settings, logged by main(); set when run as a script
if __name__ == "__main__":  # before the heavy imports: --help and a mistyped flag answer without loading torch,
    ARGS = get_args_parser().parse_args()
    apply_device_choice(ARGS)  # CUDA and OpenMP read their environment once, when torch loads
    CPU_RUNTIME = configure_cpu_runtime()

import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datasets import WithTransform, build_dataset, image_loader, imagenet_root  # noqa: E402
from datasets.transforms import build_transform  # noqa: E402
from engine import ShardSampler, autocast, evaluate, resolve_precision, to_device  # noqa: E402
from models import RESNET_ARCHS, build_backbone  # noqa: E402
from models.init import algoperf_init  # noqa: E402
from util import layout  # noqa: E402
from util.checkpoint import load_backbone_weights, load_file, save_atomic  # noqa: E402
from util.distributed import (all_reduce_sum, any_process, barrier, cleanup, init_distributed,  # noqa: E402
                              require_cuda_if_requested)
from util.logs import (append_jsonl, claim_run_folder, close_logger, create_logger, log_startup, truncate_jsonl,  # noqa: E402
                       use_progress_bar, write_json_atomic)
from util.misc import UserError, requeue_slurm_job, run_main  # noqa: E402
from util.sfadamw import AlgoPerfAdamWScheduleFree  # noqa: E402
from util.signals import StopSignal  # noqa: E402
from util.tensorboard import MetricsBoard, require_tensorboard  # noqa: E402

# The recipe of the released checkpoints (AlgoPerf imagenet_resnet + schedule-free AdamW), and the
# predecessor paper's SGD recipe; flags left unset take these values.
SFADAMW = dict(lr=0.0025, wd=0.08121616522670176, warmup_steps=2799, label_smoothing=0.2)
SGD = dict(lr_per_256=0.1, wd=1e-4, warmup_steps=0, label_smoothing=0.0)
STOP_POLL_STEPS = 10  # steps between the (synchronising) checks of a stop signal across processes
# A run resumed from its folder must follow the same weight trajectory; these arguments define it.
RECIPE_KEYS = ("arch", "img_size", "global_batch", "optimizer", "lr", "wd", "betas", "eps", "sf_r",
               "weight_lr_power", "warmup_steps", "label_smoothing", "momentum", "schedule", "decay_epochs",
               "gamma", "seed", "batch_size", "precision", "init", "sf_moment_dtype", "init_from")
# The value a recipe key had in run folders written before the key existed (before --init, "sfadamw" was the
# package's optimizer).
LEGACY_RECIPE = {"init": "torchvision", "sf_moment_dtype": "bfloat16", "init_from": None}
# Independent random streams derived from the seed.
EPOCH_STREAM, REFRESH_STREAM, STEP_STREAM = 0, 1, 2


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


# ---------------------------------------------------------------- data order
def derive_seed(*keys):
    """A 63-bit seed that is a pure function of the keys (independent streams per key tuple)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SeededSamples(torch.utils.data.Dataset):
    """Items are (index, seed): the augmentation of a sample is seeded by its own seed, so it is the same
    whichever worker loads it and wherever the run resumed (torchvision draws from the global torch RNG)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class TrainBatches(torch.utils.data.Sampler):
    """Endless micro-batches of (index, seed) from start_step on. Epoch e is a permutation drawn from
    (seed, e); step s takes the next global_batch samples of it (an epoch's tail shorter than a global batch
    is dropped). The global batch is the same set of images whatever the process count: process r takes the
    r-th slice of it, cut into accum_steps micro-batches."""

    def __init__(self, num_samples, seed, global_batch, batch_size, accum_steps, rank, start_step):
        self.num_samples, self.seed, self.global_batch = num_samples, seed, global_batch
        self.batch_size, self.accum_steps, self.rank, self.start_step = batch_size, accum_steps, rank, start_step
        self.steps_per_epoch = num_samples // global_batch

    def epoch_order(self, epoch):
        rng = np.random.default_rng([self.seed, EPOCH_STREAM, epoch])
        return rng.permutation(self.num_samples), rng.integers(0, 2**63, self.num_samples)

    def __iter__(self):
        step, epoch, order = self.start_step, None, None
        per_process = self.batch_size * self.accum_steps
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = self.epoch_order(epoch)
            first = (step % self.steps_per_epoch) * self.global_batch + self.rank * per_process
            for micro in range(self.accum_steps):
                lo = first + micro * self.batch_size
                yield [(int(i), int(s)) for i, s in zip(order[0][lo:lo + self.batch_size],
                                                         order[1][lo:lo + self.batch_size])]
            step += 1


class RefreshBatches(torch.utils.data.Sampler):
    """The training batches of a BatchNorm refresh: drawn from (seed, step), distinct per process, and apart
    from the training order, so refreshing (or not) never changes what the run trains on."""

    def __init__(self, num_samples, seed, batch_size, num_batches, rank, world_size):
        self.num_samples, self.seed, self.batch_size, self.num_batches = num_samples, seed, batch_size, num_batches
        self.rank, self.world_size, self.step = rank, world_size, 0

    def __iter__(self):
        rng = np.random.default_rng([self.seed, REFRESH_STREAM, self.step])
        count = self.batch_size * self.num_batches * self.world_size
        indices, seeds = rng.integers(0, self.num_samples, count), rng.integers(0, 2**63, count)
        for b in range(self.num_batches):
            lo = (b * self.world_size + self.rank) * self.batch_size
            yield [(int(i), int(s)) for i, s in zip(indices[lo:lo + self.batch_size], seeds[lo:lo + self.batch_size])]

    def __len__(self):
        return self.num_batches


# ---------------------------------------------------------------- optimisation
def build_optimizer(model, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    if args.optimizer == "sfadamw":  # AlgoPerf's update: decay at x, bf16 second moment (util/sfadamw.py)
        return AlgoPerfAdamWScheduleFree(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                         weight_decay=args.wd, warmup_steps=args.warmup_steps, r=args.sf_r,
                                         weight_lr_power=args.weight_lr_power, moment_dtype=args.sf_moment_dtype)
    import schedulefree
    return schedulefree.AdamWScheduleFree(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                          weight_decay=args.wd, warmup_steps=args.warmup_steps, r=args.sf_r,
                                          weight_lr_power=args.weight_lr_power)


def lr_at_step(step, args, steps_per_epoch):
    """Learning rate of optimizer step `step` (0-based); schedule-free applies its warmup itself."""
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    if args.optimizer in SCHEDULE_FREE:
        return args.lr * warmup
    if args.schedule == "cosine":
        return warmup * args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    return warmup * args.lr * args.gamma ** sum(step >= e * steps_per_epoch for e in args.decay_epochs)


def train_step(train_model, optimizer, batches, args, device, distributed):
    """One optimizer step over accum_steps micro-batches. Returns (mean loss as a tensor, seconds spent
    waiting for data, the last micro-batch's images); the loss stays on the device so the step does not
    synchronise."""
    data_wait, loss_sum = 0.0, torch.zeros((), device=device)
    for micro in range(args.accum_steps):
        start = time.perf_counter()
        images, labels = next(batches)
        data_wait += time.perf_counter() - start
        images, labels = to_device(images, labels, device)
        if distributed:  # gradients are all-reduced on the last micro-batch only
            train_model.require_backward_grad_sync = micro == args.accum_steps - 1
        with autocast(device, args.precision):
            logits = train_model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        (loss / args.accum_steps).backward()
        loss_sum += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / args.accum_steps, data_wait, images


# ---------------------------------------------------------------- schedule-free weights and BatchNorm
@contextmanager
def at_average(model, optimizer, args):
    """Parameters at schedule-free's averaged point x inside the block (weights that are evaluated and saved),
    back at the training point y after. y is restored bit-exactly from a copy rather than by the optimizer's
    lerp back, so evaluations and checkpoints never perturb the training trajectory: a run's milestone at step k
    equals the final weights of a k-step run with the same seed. The model is back in train mode after."""
    schedule_free = args.optimizer in SCHEDULE_FREE
    params = list(model.parameters())
    if schedule_free:
        y = [p.detach().clone() for p in params]
        optimizer.eval()
    try:
        yield
    finally:
        model.train()
        if schedule_free:
            optimizer.train()
            with torch.no_grad():
                for p, saved in zip(params, y):
                    p.copy_(saved)


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def average_bn_buffers(model, world_size):
    """Each process gathers statistics on its own batches; the saved ones are their average."""
    if world_size == 1:
        return
    buffers = [b for m in batchnorms(model) for b in (m.running_mean, m.running_var)]
    flat = torch.cat([b.flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


@torch.no_grad()
def refresh_bn(model, loader, device, precision, world_size):
    """Recompute BatchNorm statistics at the current weights: reset, then a cumulative average (momentum None)
    over no-grad train-mode forwards of the refresh batches, so the statistics depend on these weights only."""
    layers = batchnorms(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for images, labels in loader:
        images, _ = to_device(images, labels, device)
        with autocast(device, precision):
            model(images)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    average_bn_buffers(model, world_size)


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


def save_backbone(model, path, step, stats, args):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # loads anywhere without map_location
    save_atomic({"state_dict": state_dict, "step": step, "seed": args.seed, "arch": args.arch,
                 "run": args.run, "args": vars(args), "val_top1": stats["top1"], "val_top5": stats["top5"]}, path)


# ---------------------------------------------------------------- main
def main(args):
    check_args(args)
    if args.tensorboard:
        require_tensorboard()
    apply_device_choice(args)  # --device cpu when main() is called directly (as a script: before torch loaded)
    require_cuda_if_requested(device_request(args))  # a GPU job on a CPU-only torch stops here, in one line
    dist_info = init_distributed(debug=args.debug, timeout_minutes=args.dist_timeout)
    if dist_info.is_main:
        os.makedirs(args.dump_path, exist_ok=True)
    barrier()
    lock = claim_run_folder(args.dump_path, dist_info)  # before any log line: a refused run writes nothing
    logger = create_logger(args.dump_path, dist_info.rank)
    if CPU_RUNTIME is not None:
        logger.info(CPU_RUNTIME.line)
    try:
        with StopSignal() as stop, MetricsBoard(args.tensorboard and dist_info.is_main, "step") as board:
            pretrain(args, dist_info, logger, stop, board)  # early: a signal during the dataset scan stops cleanly
    finally:
        close_logger(logger)
        if lock is not None:
            lock.close()
        cleanup()


def pretrain(args, dist_info, logger, stop, board):
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    started = time.time()
    resolve_batch(args, world)
    args.precision = resolve_precision(args.precision, device)
    show_bar = use_progress_bar(dist_info.is_main)
    resume_path = os.path.join(args.dump_path, "resume.pth.tar")
    check_previous_run(args, resume_path)
    log_startup(logger, args, dist_info, args.global_batch, args.lr)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters with --precision fp32
        torch.backends.cudnn.allow_tf32 = True

    # ---- data
    train_set, val_set, num_classes = build_pretrain_data(args, logger)
    steps_per_epoch = len(train_set) // args.global_batch
    seeded = SeededSamples(train_set)
    # The training loader (below) is one endless iterator whose workers live for the whole run; the refresh and
    # validation loaders run every few thousand steps and release their workers (and memory) in between.
    loader_kwargs = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    refresh_sampler = RefreshBatches(len(train_set), args.seed, args.batch_size, args.bn_refresh_batches, rank, world)
    refresh_loader = image_loader(seeded, args.skip_bad_images, batch_sampler=refresh_sampler, **loader_kwargs)
    val_loader = image_loader(val_set, args.skip_bad_images, batch_size=args.batch_size,
                              sampler=ShardSampler(len(val_set), rank, world), **loader_kwargs)
    logger.info(f"data: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
                f"{steps_per_epoch} steps per epoch")

    # ---- model and optimizer
    torch.manual_seed(derive_seed(args.seed, STEP_STREAM, 0))  # the initialisation is a function of the seed
    model = build_model(args, num_classes, logger).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    train_model = torch.compile(model) if args.compile else model
    if dist_info.distributed:  # each process keeps its own BatchNorm statistics; refresh_bn averages them
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(ddp).parameters else {"broadcast_buffers": False}  # renamed in torch 2.15
        train_model = ddp(train_model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)

    # ---- resume
    start_step, best_acc, loss_since_eval, steps_since_eval = 0, 0.0, 0.0, 0
    if os.path.exists(resume_path) and not args.start_over:
        state = load_file(resume_path, "resume state")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, best_acc = state["step"], state["best_acc"]
        # the training loss of the steps since the last evaluation, summed over processes (a stop mid-interval)
        loss_since_eval, steps_since_eval = state.get("since_eval", (0.0, 0))
        logger.info(f"Resumed from step {start_step} ({resume_path}), best Acc@1 so far {best_acc:.2f}")
        if dist_info.is_main:  # records of steps the resume state does not hold (a crash before it was saved)
            truncate_jsonl(os.path.join(args.dump_path, "metrics.jsonl"), lambda r: r["step"] <= start_step)
    elif dist_info.is_main:
        for stale in (resume_path, os.path.join(args.dump_path, "metrics.jsonl")):
            if os.path.exists(stale):
                os.remove(stale)
    if dist_info.is_main:
        write_json_atomic(vars(args), os.path.join(args.dump_path, "args.json"))
    milestones = [s for s in args.save_steps if s > start_step]
    logger.info(f"recipe: {args.arch} {args.img_size}px, {args.optimizer} lr {args.lr:g} wd {args.wd:g} "
                + (f"betas {tuple(args.betas)} r {args.sf_r:g} weight_lr_power {args.weight_lr_power:g} "
                   if args.optimizer in SCHEDULE_FREE else f"momentum {args.momentum} {args.schedule} schedule ")
                + f"warmup {args.warmup_steps} steps, label smoothing {args.label_smoothing:g}; global batch "
                f"{args.global_batch} = {args.batch_size} per process x {world} process(es) x {args.accum_steps} "
                f"accumulation step(s); {args.steps} steps = {args.steps / steps_per_epoch:.1f} epochs; precision "
                f"{args.precision}; seed {args.seed} (run {args.run}); milestones {milestones} -> {args.output_dir}")

    def resume_state(step, since_eval=(0.0, 0)):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_acc": best_acc, "since_eval": since_eval, "args": vars(args)}

    def check_finite(value, what, step):
        """A diverged run stops before it saves anything: the resume state on disk stays the last good one."""
        if not math.isfinite(value):
            last = resume_path if os.path.exists(resume_path) else "none was written"
            raise UserError(f"the {what} is {value} at step {step}; the last resume state: {last}. Lower --lr?")

    def evaluate_and_save(step, record, since):
        """Validate (and write the checkpoints due) at x with statistics recomputed at x. The metrics line goes
        before the resume state: a crash between the two leaves a line that the rerun drops and writes again."""
        nonlocal best_acc
        final = step == args.steps
        with at_average(model, optimizer, args):
            if args.bn_refresh_batches:
                refresh_sampler.step = step
                refresh_bn(model, refresh_loader, device, args.precision, world)
            else:
                average_bn_buffers(model, world)
            model.eval()
            stats = evaluate(model, val_loader, device, args.precision, len(val_set), show_bar, source=val_loader)
            check_finite(stats["loss"], "validation loss", step)
            best_acc = max(best_acc, stats["top1"])
            logger.info(f"Test: Loss {stats['loss']:.4f} Acc@1 {stats['top1']:.3f} Best Acc@1 so far {best_acc:.2f}")
            logger.info(f"Test: Acc@5 {stats['top5']:.3f} over {len(val_set) - stats['skipped']} images at step {step}"
                        + (f" ({stats['skipped']} unreadable skipped)" if stats["skipped"] else ""))
            if args.skip_bad_images:
                train_skipped = int(all_reduce_sum([train_source.skipped + refresh_loader.skipped], device)[0])
                logger.info(f"Skipped {train_skipped} unreadable training images since start-up (--skip_bad_images)")
                record.update(train_skipped=train_skipped, test_skipped=stats["skipped"])
            if dist_info.is_main:
                paths = ([layout.checkpoint_path(args.output_dir, step, args.run)] if step in args.save_steps else []) \
                    + ([layout.checkpoint_path(args.output_dir, step, args.run, final=True)] if final else [])
                for path in paths:
                    save_backbone(model, path, step, stats, args)
                    logger.info(f"saved {path}")
        if dist_info.is_main:
            metrics = dict(record, test_loss=stats["loss"], test_top1=stats["top1"], test_top5=stats["top5"],
                           seconds=round(time.time() - since, 3))
            append_jsonl(metrics, os.path.join(args.dump_path, "metrics.jsonl"))
            board.add(metrics, args.dump_path)  # --tensorboard: the same record as events beside train.log
            save_atomic(resume_state(step), resume_path)

    # ---- train
    train_source = image_loader(
        seeded, args.skip_bad_images, batch_sampler=TrainBatches(len(train_set), args.seed, args.global_batch,
                                                                 args.batch_size, args.accum_steps, rank, start_step),
        prefetch_factor=4 if args.workers else None, **loader_kwargs)
    batches = iter(train_source)
    model.train()
    if args.optimizer in SCHEDULE_FREE:
        optimizer.train()
    window = dict(start=time.time(), steps=0, data=0.0)  # since the last log line
    since_eval = dict(start=time.time(), loss=torch.tensor(loss_since_eval if dist_info.is_main else 0.0,
                                                           device=device), steps=steps_since_eval)
    bar = tqdm(total=args.steps, initial=start_step, desc="pretrain", disable=not show_bar)
    if start_step >= args.steps:
        logger.info(f"nothing to train: the run is at step {start_step} of --steps {args.steps}")
    for step in range(start_step, args.steps):
        # everything random in step s is a function of (seed, s, rank): a resumed run draws what an
        # uninterrupted one would have
        torch.manual_seed(derive_seed(args.seed, STEP_STREAM, step + 1, rank))
        lr = lr_at_step(step, args, steps_per_epoch)
        if args.optimizer == "sgd":
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss, data_wait, images = train_step(train_model, optimizer, batches, args, device, dist_info.distributed)
        done = step + 1
        if args.bn_refresh_every and done % args.bn_refresh_every == 0:
            # statistics follow x during training too (a momentum update from this step's last micro-batch)
            with torch.no_grad(), at_average(model, optimizer, args), autocast(device, args.precision):
                model(images)
        since_eval["loss"] += loss
        since_eval["steps"] += 1
        window["steps"] += 1
        window["data"] += data_wait
        bar.update(1)
        if done % args.print_freq == 0 or done == args.steps or done == start_step + 1:
            loss_value = loss.item()  # synchronises, so the timing covers the device work
            check_finite(loss_value, "training loss", done)
            elapsed = time.time() - window["start"]
            logger.info(f"Epoch[{step // steps_per_epoch}] - Step: [{done}/{args.steps}] Loss {loss_value:.4f} "
                        f"LR {lr:.6g} img/s {window['steps'] * args.global_batch / elapsed:.1f} "
                        f"data {window['data'] / window['steps']:.3f}s/step")
            window = dict(start=time.time(), steps=0, data=0.0)

        if done == args.steps or done in args.save_steps or (args.eval_every and done % args.eval_every == 0):
            train_seconds = time.time() - since_eval["start"]
            train_loss = all_reduce_sum([since_eval["loss"].item() / since_eval["steps"]], device)[0] / world
            check_finite(train_loss, "mean training loss since the last evaluation", done)
            evaluate_and_save(done, {"step": done, "epoch": step // steps_per_epoch, "train_loss": train_loss,
                                     "lr": lr, "img_per_s": round(since_eval["steps"] * args.global_batch /
                                                                  train_seconds, 2)}, since_eval["start"])
            since_eval = dict(start=time.time(), loss=torch.zeros((), device=device), steps=0)
            window = dict(start=time.time(), steps=0, data=0.0)

        # ---- preemption and time limit: every process must stop at the same step
        if done < args.steps and (not dist_info.distributed or done % STOP_POLL_STEPS == 0):
            out_of_time = args.max_seconds is not None and time.time() - started > args.max_seconds
            if any_process(stop() or out_of_time, device):
                reason = stop.received or (f"--max_time {args.max_time}" if out_of_time else
                                           "a stop signal to another process")
                loss_sum = all_reduce_sum([since_eval["loss"].item()], device)[0]
                check_finite(loss_sum, "training loss summed since the last evaluation", done)
                if dist_info.is_main:
                    save_atomic(resume_state(done, (loss_sum, since_eval["steps"])), resume_path)
                logger.info(f"Stopped by {reason} at step {done}; a rerun resumes from step {done} ({resume_path})")
                if dist_info.is_main:
                    requeue_slurm_job(logger)
                bar.close()
                return
    bar.close()
    barrier()
    logger.info(f"Top-1 test accuracy: {best_acc:.1f}")


if __name__ == "__main__":
    run_main(main, ARGS)
