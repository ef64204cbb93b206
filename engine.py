"""Training and exact evaluation loops shared by the scripts.

The probe trains one or many heads on batches of (inputs, labels): features of the frozen encoder computed on
the fly (encoded_batches, the reference's per-epoch mode) or read from the feature cache (cached_batches), or
images when fine-tuning. A model maps inputs to a list of logits, one per head.
"""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from util.distributed import all_reduce_sum
from util.misc import AverageMeter, UserError, correct_topk


class ShardSampler(torch.utils.data.Sampler):
    """Rank r gets samples r, r+W, r+2W...: every sample exactly once over all ranks, no padding duplicates
    (DistributedSampler pads the last round, which would count some test images twice)."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class NonFiniteLoss(Exception):
    """The training loss became NaN or Inf."""


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


def to_device(images, labels, device):
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=non_blocking)


# ---------------------------------------------------------------- batch sources
def image_batches(loader, device):
    for images, labels in loader:
        yield to_device(images, labels, device)


def encoded_batches(loader, encoder, device, precision):
    """Features of the frozen encoder, computed batch by batch (no autograd, fp32 out for the heads)."""
    for images, labels in image_batches(loader, device):
        with torch.inference_mode(), autocast(device, precision):
            features = encoder(images)
        yield features.float().clone(), labels  # clone: a normal tensor again, the heads need autograd on it


class CachedBatches:
    """Batches of cached features in the order of `sampler` (the same order the per-epoch mode would see).
    views: one N x D tensor per stored view; with several, each sample draws one at random each epoch.
    Unreadable images (label -1 in the cache, --skip_bad_images) are dropped from their batch and counted in
    .skipped, as the per-epoch loaders do."""

    def __init__(self, views, labels, sampler, batch_size, device, drop_last=False, generator=None):
        self.views, self.labels, self.sampler = views, labels, sampler
        self.batch_size, self.device, self.drop_last, self.generator = batch_size, device, drop_last, generator
        self.skipped = 0

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        choice = None
        if len(self.views) > 1:
            choice = torch.randint(len(self.views), (len(indices),), generator=self.generator)
        for b in range(len(self)):
            rows = indices[b * self.batch_size:(b + 1) * self.batch_size]
            which = None if choice is None else choice[b * self.batch_size:(b + 1) * self.batch_size]
            readable = self.labels[rows] >= 0
            if not readable.all():
                self.skipped += int((~readable).sum())
                rows, which = rows[readable], None if which is None else which[readable]
                if not len(rows):
                    continue
            if which is None:
                features = self.views[0][rows]
            else:
                features = torch.empty(len(rows), self.views[0].shape[1], dtype=self.views[0].dtype)
                for k, view in enumerate(self.views):
                    features[which == k] = view[rows[which == k]]
            yield (features.to(self.device, non_blocking=True).float(),
                   self.labels[rows].to(self.device, non_blocking=True))


# ---------------------------------------------------------------- loops
def train_one_epoch(model, batches, num_batches, optimizer, epoch, args, device, loggers, should_stop=None,
                    show_bar=False):
    """One epoch of every head. Each head's loss depends on its own parameters only, so the summed loss
    gives each head exactly the gradient it would get alone. Returns (losses, top-1s, completed)."""
    heads = len(loggers)
    loss_meters = [AverageMeter() for _ in range(heads)]
    top1_meters = [AverageMeter() for _ in range(heads)]
    batch_time, data_time = AverageMeter(), AverageMeter()
    lrs = [next(g["lr"] for g in optimizer.param_groups if g["head"] == h) for h in range(heads)]
    end = time.time()
    for i, (inputs, labels) in enumerate(tqdm(batches, total=num_batches, desc=f"epoch {epoch}", leave=False,
                                              disable=not show_bar)):
        if should_stop is not None and should_stop():
            return [m.avg for m in loss_meters], [m.avg for m in top1_meters], False
        data_time.update(time.time() - end)
        with autocast(device, args.precision if args.exp_mode == "finetune" else "fp32"):
            logits = [out.float() for out in model(inputs)]
        losses = [F.cross_entropy(out, labels) for out in logits]
        values = torch.stack([loss.detach() for loss in losses]).tolist()
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLoss(f"the training loss is {values} at epoch {epoch}, iteration {i}")
        optimizer.zero_grad(set_to_none=True)
        sum(losses).backward()
        optimizer.step()
        batch_time.update(time.time() - end)
        for h in range(heads):
            loss_meters[h].update(values[h], len(labels))
            top1_meters[h].update(correct_topk(logits[h], labels, (1,))[0] * 100.0 / len(labels), len(labels))
            if i % args.print_freq == 0 or i == num_batches - 1:
                loggers[h].info(
                    f"Epoch[{epoch}] - Iter: [{i}/{num_batches}] Time {batch_time.val:.3f} ({batch_time.avg:.3f}) "
                    f"Data {data_time.val:.3f} ({data_time.avg:.3f}) Loss {loss_meters[h].val:.4f} "
                    f"({loss_meters[h].avg:.4f}) Prec {top1_meters[h].val:.3f} ({top1_meters[h].avg:.3f}) "
                    f"LR {lrs[h]:.6g}")
        end = time.time()
    return [m.avg for m in loss_meters], [m.avg for m in top1_meters], True


@torch.no_grad()
def evaluate(model, batches, device, precision, expected_count, show_bar=False, num_heads=None, source=None):
    """Exact loss / top-1 / top-5 (%) over a whole split, summed across ranks. `batches` yields (images or
    features, labels); `model` maps inputs to logits (returns one dict) or, with num_heads, to a list of
    logits, one per head (returns a list of dicts). `source`, the loader or cached batches behind `batches`,
    counts in .skipped the unreadable images it dropped (--skip_bad_images): those are reported as 'skipped'
    and not scored."""
    sums = torch.zeros(num_heads or 1, 3, dtype=torch.float64)
    count, skipped = 0, getattr(source, "skipped", 0)
    for inputs, labels in tqdm(batches, desc="eval", leave=False, disable=not show_bar):
        if inputs.dim() == 4:
            inputs, labels = to_device(inputs, labels, device)
        with autocast(device, precision):
            outputs = model(inputs)
        for h, out in enumerate([outputs] if num_heads is None else outputs):
            out = out.float()
            c1, c5 = correct_topk(out, labels, (1, 5))
            sums[h] += torch.tensor([F.cross_entropy(out, labels, reduction="sum").item(), c1, c5],
                                    dtype=torch.float64)
        count += len(labels)
    totals = all_reduce_sum(sums.flatten().tolist() + [count, getattr(source, "skipped", 0) - skipped], device)
    count, skipped = int(totals[-2]), int(totals[-1])
    if count + skipped != expected_count:
        raise RuntimeError(f"evaluation counted {count} samples and {skipped} unreadable ones, the split has "
                           f"{expected_count}")
    if not count:
        raise UserError(f"all {skipped} images of the evaluation split are unreadable")
    stats = [{"loss": totals[3 * h] / count, "top1": 100.0 * totals[3 * h + 1] / count,
              "top5": 100.0 * totals[3 * h + 2] / count, "skipped": skipped} for h in range(len(sums))]
    return stats[0] if num_heads is None else stats
