"""Training and exact evaluation loops shared by the scripts."""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from util.distributed import all_reduce_sum
from util.misc import AverageMeter, correct_topk


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


def autocast(device, precision):
    """bf16 autocast where asked for; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(images, labels, device):
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=non_blocking)


def train_one_epoch(model, frozen_encoder, loader, optimizer, epoch, args, device, logger, should_stop=None,
                    show_bar=False):
    """One epoch. `model` maps the frozen encoder's features to logits (lineareval; the encoder runs under
    inference_mode) or images to logits (finetune, frozen_encoder=None). Returns (loss, top-1 %, completed)."""
    loss_meter, top1_meter, batch_time, data_time = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    lr = optimizer.param_groups[0]["lr"]
    n = len(loader)
    end = time.time()
    for i, (images, labels) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_bar)):
        if should_stop is not None and should_stop():
            return loss_meter.avg, top1_meter.avg, False
        images, labels = to_device(images, labels, device)
        data_time.update(time.time() - end)
        if frozen_encoder is not None:
            with torch.inference_mode(), autocast(device, args.precision):
                features = frozen_encoder(images)
            logits = model(features.float().clone())  # a normal tensor again: the head needs autograd; fp32 head
        else:
            with autocast(device, args.precision):
                logits = model(images).float()
        loss = F.cross_entropy(logits, labels)
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(f"the training loss is {loss.item()} at epoch {epoch}, iteration {i}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        top1 = correct_topk(logits, labels, (1,))[0] * 100.0 / len(labels)
        loss_meter.update(loss.item(), len(labels))
        top1_meter.update(top1, len(labels))
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == n - 1:
            logger.info(f"Epoch[{epoch}] - Iter: [{i}/{n}] Time {batch_time.val:.3f} ({batch_time.avg:.3f}) "
                        f"Data {data_time.val:.3f} ({data_time.avg:.3f}) Loss {loss_meter.val:.4f} "
                        f"({loss_meter.avg:.4f}) Prec {top1_meter.val:.3f} ({top1_meter.avg:.3f}) LR {lr:.6g}")
    return loss_meter.avg, top1_meter.avg, True


@torch.no_grad()
def evaluate(model, loader, device, precision, expected_count, show_bar=False):
    """Exact loss / top-1 / top-5 (%) over the whole split, summed across ranks; `model` maps images to logits."""
    loss_sum, correct1, correct5, count = 0.0, 0, 0, 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not show_bar):
        images, labels = to_device(images, labels, device)
        with autocast(device, precision):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        c1, c5 = correct_topk(logits, labels, (1, 5))
        correct1, correct5, count = correct1 + c1, correct5 + c5, count + len(labels)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    if int(count) != expected_count:
        raise RuntimeError(f"evaluation counted {int(count)} samples, the split has {expected_count}")
    return {"loss": loss_sum / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count}
