"""The probe's loop and its exact evaluation (pretraining's evaluation reuses `evaluate`), MAE-style beside
main_linear_probe.py.

The probe trains one or many heads on a BatchSource of (inputs, labels): features of the frozen encoder computed
on the fly (LoaderBatches with the encoder, the reference's per-epoch mode), read from the feature cache
(CachedBatches), or images when fine-tuning (LoaderBatches without). A model maps inputs to a list of logits, one
per head.
"""
import math
import time
from typing import NamedTuple

import torch

from analysis.knn import knn_log_line, knn_record
from models.heads import batch_scores, sample_losses, stacked_logits
from util import log_lines
from util.cli import UserError
from util.distributed import all_reduce_sum
from util.misc import Meters, global_averages
from util.progress import track


def shard(length, rank, world_size):
    """The evaluation sampler (any sized iterable is one): rank r gets samples r, r+W, r+2W...: every sample exactly
    once over all ranks, no padding duplicates (DistributedSampler pads the last round, which would count some test
    images twice)."""
    return range(rank, length, world_size)


def resolve_precision(precision, device):
    """auto: bf16 where the hardware computes it natively (CUDA with bf16; CPUs whose oneDNN kernels have
    bf16 instructions, AVX512-BF16 or AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device, precision):
    """bf16 autocast where asked for; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def compile_module(module, device, static_shapes=True):
    """torch.compile (--compile). On a GPU with static shapes also CUDA graphs (mode "reduce-overhead": a whole
    forward replays as one graph launch); CPUs and DDP-wrapped steps get the default mode."""
    mode = "reduce-overhead" if device.type == "cuda" and static_shapes else None
    return torch.compile(module, mode=mode)


def to_device(images, labels, device):
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=non_blocking)


# ---------------------------------------------------------------- batch sources
class BatchSource:
    """Re-iterable batches of (inputs, labels) on the device, for training and exact evaluation: features for the
    heads (fp32), or images that still go through the encoder (holds_images; fine-tuning). .skipped counts the
    unreadable images dropped so far (--skip_bad_images); .last_seconds is the encoder's time for the batch just
    handed out, which the training log's Data column leaves out; .device is where the batches are."""
    holds_images = False
    skipped = 0
    last_seconds = 0.0
    device = torch.device("cpu")  # where its batches are (the loops' collectives run there)

    def __len__(self):
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError


class LoaderBatches(BatchSource):
    """The batches of a DataLoader on the device (channels_last): its images (encoder None: fine-tuning,
    pretraining's validation), or the frozen encoder's features computed batch by batch (no autograd, fp32 out for
    the heads): the reference's per-epoch mode. The encoder's forward is timed apart from data loading:
    .last_seconds (the batch just handed out) and .seconds (the current pass), so that the training log's Data
    column measures loading only. On a GPU the forward runs asynchronously: what it costs beyond its launch lands in
    the iteration's Time, never in Data."""

    def __init__(self, loader, device, encoder=None, precision="fp32"):
        self.loader, self.device, self.encoder, self.precision = loader, device, encoder, precision
        self.holds_images = encoder is None
        self.seconds = self.last_seconds = 0.0

    def __len__(self):
        return len(self.loader)

    @property
    def skipped(self):
        return getattr(self.loader, "skipped", 0)  # datasets.image_loader counts them with --skip_bad_images

    def __iter__(self):
        self.seconds = 0.0
        for images, labels in self.loader:
            images, labels = to_device(images, labels, self.device)
            if self.holds_images:
                yield images, labels
                continue
            start = time.time()  # after the batch arrived: loading is the Data column's, the forward is not
            # inference_mode: the frozen encoder keeps no graph and no version counters (less memory, faster)
            with torch.inference_mode(), autocast(self.device, self.precision):
                features = self.encoder(images)
            features = features.float().clone()  # clone: a normal tensor again, the heads need autograd on it
            self.last_seconds = time.time() - start
            self.seconds += self.last_seconds
            yield features, labels


class CachedBatches(BatchSource):
    """Batches of cached features in the order of `batches` (a torch BatchSampler: the sampler, the batch size,
    whether a last incomplete batch is dropped), the same order the per-epoch mode would see.
    views: one N x D tensor per stored view; with several, each sample draws one at random each epoch from
    `generator`. Unreadable images (label -1 in the cache, --skip_bad_images) are dropped from their batch and
    counted in .skipped, as the per-epoch loaders do."""

    def __init__(self, views, labels, batches, device, generator=None):
        self.views, self.labels, self.batches, self.device, self.generator = views, labels, batches, device, generator
        self.skipped = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        # the epoch's order (the sampler reseeds it); the view draws cover every sample, a dropped last batch's too
        indices = torch.tensor(list(self.batches.sampler), dtype=torch.long)
        size = self.batches.batch_size
        choice = None
        if len(self.views) > 1:  # one draw per sample per epoch, from the seeded generator: resumable
            choice = torch.randint(len(self.views), (len(indices),), generator=self.generator)
        for b in range(len(self)):  # len() already leaves out a dropped last batch (drop_last)
            rows = indices[b * size:(b + 1) * size]
            which = None if choice is None else choice[b * size:(b + 1) * size]
            readable = self.labels[rows] >= 0  # label -1: an image the cache skipped as unreadable
            if not readable.all():
                self.skipped += int((~readable).sum())
                rows, which = rows[readable], None if which is None else which[readable]
                if not len(rows):  # a batch of only unreadable images: nothing to train or score on
                    continue
            if which is None:
                features = self.views[0][rows]
            else:
                features = self.gather_views(rows, which)
            # fp16 storage -> fp32 for the heads; non_blocking: the copy overlaps the previous step on a GPU
            yield (features.to(self.device, non_blocking=True).float(),
                   self.labels[rows].to(self.device, non_blocking=True))

    def gather_views(self, rows, which):
        """Row rows[j] of view which[j], for every j; on the views' device (host memory or the GPU)."""
        device = self.views[0].device
        features = torch.empty(len(rows), self.views[0].shape[1], dtype=self.views[0].dtype, device=device)
        for k, view in enumerate(self.views):
            mask = which == k
            features[mask.to(device)] = view[rows[mask].to(device)]
        return features


def feature_batches(source, encoder, precision):
    """(features, labels) of a source: images (fine-tuning) go through the encoder, features pass as they are."""
    for inputs, labels in source:
        if source.holds_images:
            with torch.no_grad(), autocast(inputs.device, precision):
                inputs = encoder(inputs).float()
        yield inputs, labels


# ---------------------------------------------------------------- loops
def mean_losses(stacked, labels):
    """Each head's mean cross-entropy over the batch: a (heads,) tensor (the training loss)."""
    return sample_losses(stacked, labels).mean(dim=1)


def epoch_meters(heads):
    """The meters of one training epoch (util.misc.Meters, as pretraining's loop keeps its own): the batch and
    data-loading times, and each head's training metrics (a Meters per head; every name reaches metrics.jsonl as
    train_{name}, through train_one_epoch and epoch_record)."""
    return Meters("batch_time", "data_time", heads=[Meters("loss", "top1") for _ in range(heads)])


def update_head_meters(meters, values, stacked, labels):
    """values: each head's loss; stacked: the heads' logits (stacked_logits)."""
    n = len(labels)
    hits = stacked.argmax(dim=2).eq(labels).sum(dim=1).tolist()  # one host sync for every head
    for head_meters, value, hit in zip(meters.heads, values, hits):
        head_meters.loss.update(value, n)
        head_meters.top1.update(hit * 100.0 / n, n)


def epoch_averages(views):
    """util.misc.global_averages' epoch-so-far averages: each head's {metric: average}."""
    return [{name: avg for name, (_, avg) in view.items()} for view in views]


class LoopLog(NamedTuple):
    """How the loops log, fixed for a run: each head's logger (in head order; the original's iteration lines go to
    every one), a line every print_freq batches, last_line: also each training epoch's last batch (--extra_log_lines:
    its running averages are the epoch's), bar: a tqdm bar on a terminal (util.progress lines in a file)."""
    loggers: tuple = ()
    print_freq: int = 50
    last_line: bool = False
    bar: bool = False


def train_one_epoch(model, batches, optimizer, epoch, log, should_stop=None):
    """One epoch of every head over the BatchSource `batches`. Each head's loss depends on its own parameters only,
    so the summed loss gives each head exactly the gradient it would get alone. Returns (each head's {"loss",
    "top1"}: epoch averages over every process, completed). The heads run in fp32 (the encoder's precision is
    applied inside the model when it trains). should_stop: a collective every rank calls at every iteration (False:
    carry on). A NaN or Inf loss raises FloatingPointError before its step reaches the weights."""
    device, num_batches = batches.device, len(batches)
    meters, last_n = epoch_meters(len(log.loggers)), 0  # last_n: samples of the last batch on this process
    # the lr each head's log line shows: its first parameter group's (its Linear, listed first by param_groups); a
    # fused group ("heads") serves several heads at one lr
    lrs = [next(g["lr"] for g in optimizer.param_groups if h in g.get("heads", (g["head"],)))
           for h in range(len(log.loggers))]
    end = time.time()
    # a bar on a terminal, progress lines (rate, ETA) in a log file, where tqdm does not draw
    for i, (inputs, labels) in enumerate(track(batches, f"epoch {epoch}", num_batches, log.bar)):
        if should_stop is not None and should_stop():  # a collective: every rank stops at the same iteration
            return epoch_averages(global_averages(meters.heads, last_n, device)), False
        # Data = loading only: the frozen encoder's forward (per-epoch mode, LoaderBatches) is timed apart
        meters.data_time.update(time.time() - end - getattr(batches, "last_seconds", 0.0))
        stacked = stacked_logits(model(inputs))  # fp32 logits: the loss of a bf16 head flips predictions
        losses = mean_losses(stacked, labels)  # every head's loss in one operation, whatever the head count
        # one host sync for all heads' losses (not one .item() each); the values feed the meters and the check
        values = losses.detach().tolist()
        if not all(math.isfinite(v) for v in values):  # stop before a NaN step reaches the weights
            raise FloatingPointError(f"the training loss is {values} at epoch {epoch}, iteration {i}")
        optimizer.zero_grad(set_to_none=True)  # no zeroing pass: backward writes the gradients afresh
        losses.sum().backward()  # heads share no parameter: each gets the gradient of its own loss
        optimizer.step()
        meters.batch_time.update(time.time() - end)
        update_head_meters(meters, values, stacked.detach(), labels)
        last_n = len(labels)
        # the original's lines: every print_freq iterations; --extra_log_lines adds each epoch's last (its
        # running averages are the epoch's). Every rank reaches the same i: the sum over processes is safe
        if i % log.print_freq == 0 or (i == num_batches - 1 and log.last_line):
            views = global_averages(meters.heads, last_n, device)  # the global batch's, not rank 0's share
            times = {"time": (meters.batch_time.val, meters.batch_time.avg),
                     "data": (meters.data_time.val, meters.data_time.avg)}
            for h, lg in enumerate(log.loggers):
                lg.info(log_lines.iteration_line(epoch, i, num_batches, {**times, "loss": views[h]["loss"],
                                                                         "prec": views[h]["top1"]}, lrs[h]))
        end = time.time()
    return epoch_averages(global_averages(meters.heads, last_n, device)), True


@torch.no_grad()
def evaluate(model, source, precision, expected_count, num_heads=None, log=LoopLog()):
    """Exact loss / top-1 / top-5 (%) over a whole split, summed across ranks. `source` is a BatchSource of
    (images or features, labels); `model` maps its inputs to logits (returns one dict) or, with num_heads, to a
    list of logits, one per head (returns a list of dicts). The unreadable images the source drops during the pass
    (--skip_bad_images) are reported as 'skipped' and not scored. With log.loggers (one per head), every
    log.print_freq batches each head's log gets the original's validation line (this process's batches, as the
    original's)."""
    device = source.device
    sums = torch.zeros(num_heads or 1, 3, dtype=torch.float64)
    count, skipped = 0, source.skipped  # a source counts its unreadable images over passes: this pass's = the rise
    # images go through the encoder at its precision; cached or computed features meet the heads in fp32
    with_precision = precision if source.holds_images else "fp32"
    meters, end = Meters("batch_time"), time.time()
    total = len(source) if hasattr(source, "__len__") else None
    for i, (inputs, labels) in enumerate(track(source, "eval", total, log.bar)):
        with autocast(device, with_precision):
            outputs = model(inputs)
        # summed on the device: one host sync per evaluation (and per logged line), not three per head and batch
        scores = batch_scores(stacked_logits([outputs] if num_heads is None else outputs), labels)
        sums = sums.to(labels.device) + scores  # float64 sums: exact counts over millions of images
        count += len(labels)
        meters.batch_time.update(time.time() - end)
        if log.loggers and i % log.print_freq == 0:  # this process's batch and running means, as the original's
            n, batch, so_far = len(labels), scores.tolist(), sums.tolist()
            for lg, (loss, top1, _), (loss_sum, top1_sum, _) in zip(log.loggers, batch, so_far):
                lg.info(log_lines.eval_iteration_line(i, total, {
                    "time": (meters.batch_time.val, meters.batch_time.avg), "loss": (loss / n, loss_sum / count),
                    "prec": (100.0 * top1 / n, 100.0 * top1_sum / count)}))
        end = time.time()
    # one all-reduce for every head's sums, the count and the skipped images: the split's totals over all ranks
    totals = all_reduce_sum(sums.flatten().tolist() + [count, source.skipped - skipped], device)
    count, skipped = int(totals[-2]), int(totals[-1])
    if count + skipped != expected_count:  # each image scored exactly once over the ranks (shard: no padding)
        raise RuntimeError(f"evaluation counted {count} samples and {skipped} unreadable ones, the split has "
                           f"{expected_count}")
    if not count:
        raise UserError(f"all {skipped} images of the evaluation split are unreadable")
    stats = [{"loss": totals[3 * h] / count, "top1": 100.0 * totals[3 * h + 1] / count,
              "top5": 100.0 * totals[3 * h + 2] / count, "skipped": skipped} for h in range(len(sums))]
    return stats[0] if num_heads is None else stats


class Classifier(torch.nn.Module):
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


def unreadable_note(stats):
    return f" ({stats['skipped']} unreadable skipped)" if stats["skipped"] else ""


def log_head_epoch(head, test, val, test_count, val_count, extra_lines):
    """A head's lines of the epoch after the diagnostics, in the original's order: Test (with its best), kNN, the
    opt-in Acc@5 line (extra_lines: --extra_log_lines or --skip_bad_images), Val."""
    head.logger.info(log_lines.test_line(test["loss"], test["top1"], head.best_test))
    if head.knn is not None:
        head.logger.info(knn_log_line(head.knn))
    if extra_lines:  # lines the original does not write: opt-in
        head.logger.info(f"Test: Acc@5 {test['top5']:.3f} over {test_count - test['skipped']} images"
                         + unreadable_note(test))
    if val is not None:
        head.logger.info(f"Val: Loss {val['loss']:.4f} Acc@1 {val['top1']:.3f} Best Val Acc@1 so far "
                         f"{head.best_val:.2f} over {val_count - val['skipped']} held-out training images"
                         + unreadable_note(val))


def epoch_record(epoch, train, test, val, knn, extra):
    """A head's line of metrics.jsonl: train_one_epoch's train dict (each metric as train_{name}),
    engine.evaluate's test and val (or None) dicts, its kNN result (or None); extra: lr, seconds and, with
    --skip_bad_images, train_skipped (None: left out)."""
    record = {"epoch": epoch, **{f"train_{name}": value for name, value in train.items()},
              "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"], "lr": extra["lr"],
              "seconds": extra["seconds"]}
    if knn is not None:
        record.update(knn_record(knn))
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"])
    if extra.get("train_skipped") is not None:
        record.update(train_skipped=extra["train_skipped"], test_skipped=test["skipped"])
    return record
