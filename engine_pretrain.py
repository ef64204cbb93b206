"""Pretraining's loop, beside main_pretrain.py (MAE style): the data order, the optimizer and its schedule, one
optimizer step, schedule-free's averaged weights, the BatchNorm refresh, and the loop that evaluates, saves and
stops. main_pretrain.py owns the flags and the stages that build what this loop runs on.

Everything random in step s is a function of (seed, s, rank), so a resumed run draws what an uninterrupted one
would have, and the global batch of a step is the same images whatever the process count.
"""
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from arguments.pretrain import SCHEDULE_FREE
from engine import LoaderBatches, LoopLog, autocast, evaluate, to_device
from util import layout, log_lines
from util.checkpoint import save_atomic
from util.cli import UserError
from util.distributed import all_reduce_sum, any_process, barrier
from util.misc import AverageMeter, Meters, seed_torch
from util.progress import Progress
from util.sfadamw import AlgoPerfAdamWScheduleFree

STOP_POLL_STEPS = 10  # steps between the (synchronising) checks of a stop signal across processes
# Independent random streams derived from the seed.
EPOCH_STREAM, REFRESH_STREAM, STEP_STREAM = 0, 1, 2


def resume_path_of(dump_path):
    return os.path.join(dump_path, "resume.pth.tar")


def metrics_path_of(dump_path):
    return os.path.join(dump_path, layout.METRICS)


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
    """Endless micro-batches of (index, seed) from step 0, or from starting_at(step) on. Epoch e is a permutation
    drawn from (seed, e); step s takes the next global_batch samples of it (an epoch's tail shorter than a global
    batch is dropped). The global batch is the same set of images whatever the process count: process r takes the
    r-th slice of it, cut into accum_steps micro-batches."""

    def __init__(self, num_samples, seed, global_batch, batch_size, accum_steps, rank):
        self.num_samples, self.seed, self.global_batch = num_samples, seed, global_batch
        self.batch_size, self.accum_steps, self.rank, self.start_step = batch_size, accum_steps, rank, 0
        self.steps_per_epoch = num_samples // global_batch

    def starting_at(self, step):
        """The same order, from the first micro-batch of `step` on (a resumed run); returns the sampler."""
        self.start_step = step
        return self

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
    if args.optimizer == layout.SFADAMW_ALGOPERF:  # AlgoPerf's update: decay at x, bf16 second moment (util/sfadamw.py)
        return AlgoPerfAdamWScheduleFree(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                         weight_decay=args.wd, warmup_steps=args.warmup_steps, r=args.sf_r,
                                         weight_lr_power=args.weight_lr_power, moment_dtype=args.sf_moment_dtype,
                                         foreach=getattr(args, "sf_foreach", False))
    if args.optimizer != layout.SCHEDULEFREE_ADAMW:
        raise ValueError(f"unknown optimizer {args.optimizer!r} (arguments.pretrain.canonical_optimizer names them)")
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
        images, labels = to_device(images, labels, device)  # channels_last: the convolutions' fast layout
        if distributed:  # gradients are all-reduced on the last micro-batch only
            train_model.require_backward_grad_sync = micro == args.accum_steps - 1
        with autocast(device, args.precision):
            logits = train_model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)  # fp32 softmax
        # each micro-batch's share of the mean: the summed gradients are those of one batch of accum_steps x more
        (loss / args.accum_steps).backward()
        loss_sum += loss.detach()  # detached: the logged loss keeps no graph alive
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no zeroing pass: the next backward writes the gradients afresh
    # images: the caller's --bn_refresh_every forward reuses the last micro-batch rather than loading another
    return loss_sum / args.accum_steps, data_wait, images


# ---------------------------------------------------------------- schedule-free weights and BatchNorm
@contextmanager
def at_average(model, optimizer, schedule_free):
    """Parameters at schedule-free's averaged point x inside the block (weights that are evaluated and saved),
    back at the training point y after. y is restored bit-exactly from a copy rather than by the optimizer's
    lerp back, so evaluations and checkpoints never perturb the training trajectory: a run's milestone at step k
    equals the final weights of a k-step run with the same seed. The model is back in train mode after. Without
    schedule_free (SGD) the parameters are the evaluated weights already: only the mode changes."""
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




def save_backbone(model, path, step, stats, args):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # loads anywhere without map_location
    save_atomic({"state_dict": state_dict, "step": step, "seed": args.seed, "arch": args.arch,
                 "run": args.run, "args": vars(args), "val_top1": stats["top1"], "val_top5": stats["top5"]}, path)




# ---------------------------------------------------------------- the loop
class Loaders(NamedTuple):
    """What the loop reads: endless training micro-batches, the BatchNorm refresh batches and validation."""
    train: object  # iterable of (images, labels) micro-batches from the resumed step on (TrainBatches)
    refresh: object  # loader over RefreshBatches (re-iterable; its sampler's step picks the batches)
    refresh_sampler: "RefreshBatches"
    val: object  # loader over this process's shard of the validation split
    val_size: int
    steps_per_epoch: int


class Start(NamedTuple):
    """Where the run starts: step 0, or the resume state's step with its best accuracy and the training loss
    summed over processes since the last evaluation (a stop mid-interval)."""
    step: int = 0
    best_acc: float = 0.0
    loss_since_eval: float = 0.0
    steps_since_eval: int = 0


def window_meters():
    """The steps since the last log line: seconds spent waiting for data (its count: the steps)."""
    return Meters("data")


def since_eval_meters(device, loss_sum=0.0, steps=0):
    """The training loss of the steps since the last evaluation, summed on the device (no synchronisation per
    step; its count: the steps)."""
    return Meters(loss=AverageMeter(torch.tensor(loss_sum, device=device), steps))


@dataclass
class Pretraining:
    """One run's loop: the model (and its DDP/compiled wrapper), the optimizer, the loaders and the best
    accuracy so far. main_pretrain.py builds it; train() runs the steps from a Start."""
    args: object
    dist_info: object
    logger: object
    model: nn.Module  # the plain model: evaluated, saved and resumed
    optimizer: torch.optim.Optimizer
    train_model: nn.Module  # what the steps call: the model, compiled and/or wrapped in DDP
    loaders: Loaders
    best_acc: float = 0.0
    show_bar: bool = False
    run: object = None  # util.run.Run: its stop signal, the metrics records (metrics.jsonl, the board), the stop line

    @property
    def schedule_free(self):
        return self.args.optimizer in SCHEDULE_FREE

    @property
    def resume_path(self):
        return resume_path_of(self.args.dump_path)

    def resume_state(self, step, since_eval=(0.0, 0)):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "best_acc": self.best_acc, "since_eval": since_eval, "args": vars(self.args)}

    def check_finite(self, value, what, step):
        """A diverged run stops before it saves anything: the resume state on disk stays the last good one."""
        if not math.isfinite(value):
            last = self.resume_path if os.path.exists(self.resume_path) else "none was written"
            raise UserError(f"the {what} is {value} at step {step}; the last resume state: {last}. Lower --lr?")

    def train(self, start, started):
        """Steps start.step+1 .. --steps: log, evaluate and save when due, stop cleanly on a signal or --max_time."""
        args, device = self.args, self.dist_info.device
        batches = iter(self.loaders.train)
        self.model.train()
        if self.schedule_free:
            self.optimizer.train()  # schedule-free trains at y; evaluation switches to x (at_average)
        window = window_meters()
        # the resumed loss sum lives on rank 0 only: the all-reduce at the next evaluation adds it once
        since_eval = since_eval_meters(device, start.loss_since_eval if self.dist_info.is_main else 0.0,
                                       start.steps_since_eval)
        bar = tqdm(total=args.steps, initial=start.step, desc="pretrain", disable=not self.show_bar)
        progress = Progress("pretrain", args.steps, "steps", bar=self.show_bar, start=start.step)  # logs: no tqdm
        if start.step >= args.steps:
            self.logger.info(f"nothing to train: the run is at step {start.step} of --steps {args.steps}")
        for step in range(start.step, args.steps):
            # everything random in step s is a function of (seed, s, rank): a resumed run draws what an
            # uninterrupted one would have
            seed_torch(derive_seed(args.seed, STEP_STREAM, step + 1, self.dist_info.rank))
            lr = lr_at_step(step, args, self.loaders.steps_per_epoch)
            if args.optimizer == "sgd":  # schedule-free applies its warmup itself; SGD is given its lr each step
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            loss, data_wait, images = train_step(self.train_model, self.optimizer, batches, args, device,
                                                 self.dist_info.distributed)
            done = step + 1
            if args.bn_refresh_every and done % args.bn_refresh_every == 0:
                # statistics follow x during training too (a momentum update from this step's last micro-batch)
                with torch.no_grad(), at_average(self.model, self.optimizer, self.schedule_free), \
                        autocast(device, args.precision):
                    self.model(images)
            since_eval.loss.update(loss)  # stays on the device: no synchronisation per step
            window.data.update(data_wait)
            bar.update(1)
            progress.update()
            if done % args.print_freq == 0 or done == args.steps or done == start.step + 1:
                self.log_step(step, lr, loss, window)
                window = window_meters()
            if done == args.steps or done in args.save_steps or (args.eval_every and done % args.eval_every == 0):
                self.evaluate_and_save(done, self.train_record(step, lr, since_eval), since_eval.start)
                since_eval, window = since_eval_meters(device), window_meters()
            # preemption and time limit: every process must stop at the same step
            if done < args.steps and self.should_stop(done, started, since_eval):
                bar.close()
                return
        bar.close()
        barrier()
        self.logger.info(log_lines.final_line(self.best_acc))

    def log_step(self, step, lr, loss, window):
        args = self.args
        loss_value = loss.item()  # synchronises, so the timing covers the device work
        self.check_finite(loss_value, "training loss", step + 1)
        elapsed = window.seconds()
        self.logger.info(log_lines.pretrain_step_line(step // self.loaders.steps_per_epoch, (step + 1, args.steps),
                                                      loss_value, lr, (window.data.count * args.global_batch / elapsed,
                                                                       window.data.avg)))

    def train_record(self, step, lr, since_eval):
        """The metrics line's training part: the mean loss over processes and steps since the last evaluation."""
        train_seconds, steps = since_eval.seconds(), since_eval.loss.count
        world = self.dist_info.world_size
        train_loss = all_reduce_sum([since_eval.loss.sum.item() / steps], self.dist_info.device)[0] / world
        self.check_finite(train_loss, "mean training loss since the last evaluation", step + 1)
        return {"step": step + 1, "epoch": step // self.loaders.steps_per_epoch, "train_loss": train_loss,
                "lr": lr, "img_per_s": round(steps * self.args.global_batch / train_seconds, 2)}

    def should_stop(self, done, started, since_eval):
        """On a stop signal (any process) or --max_time: save the resume state at `done`; requeue the slurm job when
        a process got SIGUSR1 (slurm's warning) or on --max_time, not on a plain SIGTERM (scancel)."""
        args, dist_info, device = self.args, self.dist_info, self.dist_info.device
        if dist_info.distributed and done % STOP_POLL_STEPS:
            return False  # the check is a collective: only every STOP_POLL_STEPS steps
        out_of_time = args.max_seconds is not None and time.time() - started > args.max_seconds
        if not any_process(self.run.stop() or out_of_time, device):
            return False
        loss_sum = all_reduce_sum([since_eval.loss.sum.item()], device)[0]
        self.check_finite(loss_sum, "training loss summed since the last evaluation", done)
        if dist_info.is_main:
            save_atomic(self.resume_state(done, (loss_sum, since_eval.loss.count)), self.resume_path)
        # a collective too (the requeue's agreement): every process calls it here; --max_time requeues, as it is a
        # budget set to end before the time limit
        self.run.report_stopped(f"at step {done}", f"from step {done} ({self.resume_path})",
                                limit=f"--max_time {args.max_time}" if out_of_time else None)
        return True

    def evaluate_and_save(self, step, record, since):
        """Validate (and write the checkpoints due) at x with statistics recomputed at x. The metrics line goes
        before the resume state: a crash between the two leaves a line that the rerun drops and writes again."""
        with at_average(self.model, self.optimizer, self.schedule_free):
            stats = self.validate_at_average(step, record)
            if self.dist_info.is_main:
                self.save_checkpoints(step, stats)
        if self.dist_info.is_main:
            metrics = dict(record, test_loss=stats["loss"], test_top1=stats["top1"], test_top5=stats["top5"],
                           seconds=round(time.time() - since, 3))
            self.run.add_record(metrics)  # metrics.jsonl, and the same record to --tensorboard's events and --wandb
            save_atomic(self.resume_state(step), self.resume_path)

    def validate_at_average(self, step, record):
        args, device, world = self.args, self.dist_info.device, self.dist_info.world_size
        if args.bn_refresh_batches:
            self.loaders.refresh_sampler.step = step  # the refresh batches are a function of (seed, step)
            refresh_bn(self.model, self.loaders.refresh, device, args.precision, world)
        else:
            average_bn_buffers(self.model, world)
        self.model.eval()
        val_size = self.loaders.val_size
        stats = evaluate(self.model, LoaderBatches(self.loaders.val, device), args.precision, val_size,
                         log=LoopLog(bar=self.show_bar))
        self.check_finite(stats["loss"], "validation loss", step)
        self.best_acc = max(self.best_acc, stats["top1"])
        self.logger.info(log_lines.pretrain_test_line(stats["loss"], stats["top1"], self.best_acc))
        self.logger.info(f"Test: Acc@5 {stats['top5']:.3f} over {val_size - stats['skipped']} images at step {step}"
                         + (f" ({stats['skipped']} unreadable skipped)" if stats["skipped"] else ""))
        if args.skip_bad_images:
            skipped = [self.loaders.train.skipped + self.loaders.refresh.skipped]
            train_skipped = int(all_reduce_sum(skipped, device)[0])
            self.logger.info(f"Skipped {train_skipped} unreadable training images since start-up (--skip_bad_images)")
            record.update(train_skipped=train_skipped, test_skipped=stats["skipped"])
        return stats

    def save_checkpoints(self, step, stats):
        """The milestone of `step` (--save_steps) and, at --steps, checkpoints_stepfull/."""
        args = self.args
        paths = ([layout.checkpoint_path(args.output_dir, step, args.run)] if step in args.save_steps else []) \
            + ([layout.checkpoint_path(args.output_dir, step, args.run, final=True)] if step == args.steps else [])
        for path in paths:
            save_backbone(self.model, path, step, stats, args)
            self.logger.info(f"saved {path}")
