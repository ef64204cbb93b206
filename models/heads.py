"""The linear classifiers trained on top of the concatenated features: the heads of a run (one per lr/wd value of
the sweep and --subsets subset), their parameter groups and optimizer (nanoGPT's configure_optimizers beside the
model), and the lr schedule."""
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F

from util.cli import UserError
from util.subsets import subset_folder, subsets_for


def distributed_batch():
    """True when statistics over 'the batch' must span several processes (training under torch.distributed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def batch_statistics(x, across_processes):
    """Per-column mean and biased variance of x over the batch (over every process's batch with
    across_processes), and the sample count, as a 1-element tensor. The all-reduces are autograd-aware: gradients
    flow back to every process's samples, as in SyncBatchNorm."""
    if not across_processes:
        count = x.new_full((1,), float(x.shape[0]))
        mean = x.mean(dim=0)
        return mean, ((x - mean) ** 2).mean(dim=0), count
    count = dist_nn.all_reduce(x.new_full((1,), float(x.shape[0])))
    mean = dist_nn.all_reduce(x.sum(dim=0)) / count
    var = dist_nn.all_reduce(((x - mean) ** 2).sum(dim=0)) / count  # two passes: no E[x^2] - E[x]^2 loss
    return mean, var, count


@torch.no_grad()
def update_running_stats(bn, mean, var, count):
    """BatchNorm1d's running statistics after a training batch: momentum average, unbiased variance."""
    bn.num_batches_tracked += 1
    bn.running_mean.lerp_(mean.detach(), bn.momentum)
    bn.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), bn.momentum)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are over the global batch of every process (on any backend, gloo
    included, where torch's SyncBatchNorm needs CUDA), so N processes train, and then evaluate, the head that the
    reference's single process would. Same parameters and buffers as BatchNorm1d; one process: BatchNorm1d."""

    def forward(self, x):
        if not (self.training and distributed_batch()):
            return super().forward(x)
        mean, var, count = batch_statistics(x, across_processes=True)
        update_running_stats(self, mean, var, count)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class LinearHead(nn.Module):
    """Optional BatchNorm1d (affine, default momentum/eps) followed by a Linear layer, as the reference probe.
    global_bn: the BatchNorm's statistics are over every process's batch (GlobalBatchNorm1d).
    columns: the head reads only these columns of its input (a sub-concatenation's features, --subsets); its
    parameters and state_dict are those of a head built on just those features."""

    def __init__(self, in_dim, num_classes, use_bn=True, global_bn=False, columns=None):
        super().__init__()
        bn = GlobalBatchNorm1d if global_bn else nn.BatchNorm1d
        self.bn = bn(in_dim) if use_bn else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        # not saved: the columns follow from the run's --subsets, and the saved head loads into a separate probe
        self.register_buffer("columns", None if columns is None else torch.as_tensor(columns, dtype=torch.long),
                             persistent=False)

    def select(self, features):
        """The columns this head reads (all of them without `columns`)."""
        return features if self.columns is None else features.index_select(1, self.columns)

    def pick(self, vector):
        """The entries of a per-column vector (statistics over every column) at this head's columns."""
        return vector if self.columns is None else vector.index_select(0, self.columns)

    def forward(self, features):
        return self.linear(self.bn(self.select(features)))

    def init_weights(self, how, classifiers=None):
        """normal: N(0, 0.01^2) and zero bias (the reference); none: PyTorch's default;
        cat_weights: the backbones' own classifiers side by side, averaged over backbones."""
        if how == "normal":
            nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
            nn.init.zeros_(self.linear.bias)
        elif how == "cat_weights":
            if not classifiers or any(set(c) != {"weight", "bias"} for c in classifiers):
                raise UserError("--headinit cat_weights needs every checkpoint to contain its fc layer")
            weight = torch.cat([c["weight"] for c in classifiers], dim=1) / len(classifiers)
            bias = torch.stack([c["bias"] for c in classifiers]).mean(dim=0)
            if weight.shape != self.linear.weight.shape:
                raise UserError(f"--headinit cat_weights: the checkpoints' classifiers have {weight.shape[0]} "
                                f"classes but the dataset has {self.linear.weight.shape[0]}")
            with torch.no_grad():
                self.linear.weight.copy_(weight)
                self.linear.bias.copy_(bias)
        elif how != "none":
            raise UserError(f"unknown --headinit '{how}': choose normal, none or cat_weights")


class MultiHead(nn.ModuleList):
    """Several heads on the same features (a hyper-parameter sweep, --subsets) in one pass; returns one logits per
    head. separate: each head's own BatchNorm1d + Linear, bit-identical to a probe of that head alone (the
    reference's numerics). fused: the same function with a fixed number of operations for any number of heads
    (fused_logits), equal up to fp32 rounding; one head is computed the separate way either way."""

    def __init__(self, heads=None, fused=False):
        super().__init__(heads)
        self.fused = fused
        self._layout = None

    def forward(self, features):
        if not self.fused or len(self) == 1:
            return [head(features) for head in self]
        if self._layout is None or self._layout.width != features.shape[1]:
            self._layout = FusedLayout(self, features.shape[1], features.device)
        return fused_logits(self, self._layout, features)


class FusedLayout:
    """Index tensors of fused_logits, computed once. Every head's columns laid end to end form the 'stacked'
    columns (cols: their feature positions; owner: their head). The feature axis splits into atoms, the maximal
    intervals read by the same heads (with --subsets: the backbones' blocks); each atom has, for its heads in order,
    the stacked positions of its columns (take) and the heads' logit positions (out)."""

    def __init__(self, heads, width, device):
        classes = heads[0].linear.out_features
        if any(head.linear.out_features != classes for head in heads):
            raise ValueError("fused heads need the same number of classes")
        cols = [torch.arange(width) if head.columns is None else head.columns.cpu() for head in heads]
        if any(bool((c[1:] <= c[:-1]).any()) for c in cols):
            raise ValueError("fused heads read increasing columns")
        where = []  # where[h][feature position] = stacked position, or -1
        start = 0
        for c in cols:
            positions = torch.full((width,), -1, dtype=torch.long)
            positions[c] = torch.arange(start, start + len(c))
            where.append(positions)
            start += len(c)
        readers = torch.stack([w >= 0 for w in where], dim=1)  # (width, heads): who reads each column
        change = [0] + [j for j in range(1, width) if not torch.equal(readers[j], readers[j - 1])] + [width]
        self.atoms = []
        for lo, hi in zip(change[:-1], change[1:]):
            owners = readers[lo].nonzero().flatten().tolist()
            take = torch.cat([where[h][lo:hi] for h in owners])
            out = torch.cat([torch.arange(h * classes, (h + 1) * classes) for h in owners])
            self.atoms.append((lo, hi, len(owners), take.to(device), out.to(device)))
        self.width, self.classes, self.heads = width, classes, len(heads)
        self.cols = torch.cat(cols).to(device)
        self.owner = torch.cat([torch.full((len(c),), h, dtype=torch.long) for h, c in enumerate(cols)]).to(device)
        self.sizes = [len(c) for c in cols]


def fused_logits(heads, layout, x):
    """Every head of `heads` (a MultiHead) with a fixed number of operations: each head's BatchNorm
    (y = (x - m) / sqrt(v + eps) * gamma + beta) and Linear (W y + bias) are one affine map of x,
    W' = W * s with s = gamma / sqrt(v + eps), and b' = bias + W (beta - (m - c) s) on x - c. In training m, v are
    the batch's statistics, computed once per column (every head reading a column sees the same ones) and c = m;
    in evaluation they are each head's running statistics and c the first head's running mean (the full heads come
    first; every head's running mean is theirs when all trained together). The heads' parameters are laid end to
    end ('stacked', FusedLayout), so each step below is one operation for all heads, and each atom of the feature
    axis is one matrix product with the weights of the heads that read it. Gradients reach W, bias, gamma and beta
    through the same expressions; the running statistics move as BatchNorm1d's."""
    weight = torch.cat([head.linear.weight for head in heads], dim=1)  # (classes, stacked)
    bias = torch.cat([head.linear.bias for head in heads])  # (heads * classes)
    centred, shift = x, None
    if isinstance(heads[0].bn, nn.BatchNorm1d):
        bns = [head.bn for head in heads]
        if heads.training:
            mean, var, count = batch_statistics(x, across_processes=isinstance(bns[0], GlobalBatchNorm1d)
                                                and distributed_batch())
            var = var[layout.cols]
            update_all_running_stats(bns, mean[layout.cols], var, count, layout.sizes)
            centred = x - mean
        else:
            centre = bns[0].running_mean if heads[0].columns is None else x.new_zeros(x.shape[1])
            centred, var = x - centre, torch.cat([bn.running_var for bn in bns])
            shift = centre[layout.cols] - torch.cat([bn.running_mean for bn in bns])  # m - c, negated
        scale = torch.rsqrt(var + bns[0].eps)
        if bns[0].affine:
            scale = scale * torch.cat([bn.weight for bn in bns])
            beta = torch.cat([bn.bias for bn in bns])
            shift = beta if shift is None else beta + shift * scale
        elif shift is not None:
            shift = shift * scale
        if shift is not None:  # bias + W shift, summed over each head's stacked columns
            per_head = weight.new_zeros(layout.classes, layout.heads).index_add(1, layout.owner, weight * shift)
            bias = bias + per_head.t().reshape(-1)
        weight = weight * scale
    logits = bias.expand(x.shape[0], -1)
    for lo, hi, readers, take, out in layout.atoms:
        block = weight.index_select(1, take).view(layout.classes, readers, hi - lo).transpose(0, 1)
        logits = logits.index_add(1, out, centred[:, lo:hi] @ block.reshape(readers * layout.classes, hi - lo).t())
    return list(logits.split(layout.classes, dim=1))


@torch.no_grad()
def update_all_running_stats(bns, mean, var, count, sizes):
    """update_running_stats of many BatchNorms at once: mean and var are their columns' batch statistics laid end
    to end (sizes: each one's share)."""
    torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    torch._foreach_lerp_([bn.running_mean for bn in bns], mean.detach().split(sizes), bns[0].momentum)
    unbiased = var.detach() * (count / (count - 1).clamp(min=1))
    torch._foreach_lerp_([bn.running_var for bn in bns], unbiased.split(sizes), bns[0].momentum)


# ---------------------------------------------------------------- the heads' losses and scores
def stacked_logits(logits):
    """Every head's logits as one fp32 (heads, batch, classes) tensor: each per-head statistic below is then one
    operation for all heads."""
    return torch.stack([out.float() for out in logits])


def sample_losses(stacked, labels):
    """(heads, batch): each head's cross-entropy on each sample, in one operation."""
    heads = stacked.shape[0]
    return F.cross_entropy(stacked.flatten(0, 1), labels.repeat(heads), reduction="none").view(heads, -1)


def batch_scores(stacked, labels):
    """(heads, 3) float64 on the logits' device: each head's summed cross-entropy, top-1 and top-5 hits (k capped at
    the class count) over the batch."""
    losses = sample_losses(stacked, labels)
    hits = stacked.topk(min(5, stacked.shape[2]), dim=2).indices.eq(labels[None, :, None])
    return torch.stack([losses.sum(dim=1).double(), hits[..., :1].any(dim=2).sum(dim=1).double(),
                        hits.any(dim=2).sum(dim=1).double()], dim=1)


# ---------------------------------------------------------------- the run's heads and their optimisation
@dataclass
class Head:
    """One head of the run, the one record the probe keeps per head: its optimisation values, the backbones whose
    features it reads (subset; None: the full concatenation), its folder and log, its module (a LinearHead of the
    MultiHead), its bests, validation's selection and its --knn result."""
    lr: float
    wd: float
    name: str  # wd{wd}_lr{lr}, or sub{i}-{j}/wd{wd}_lr{lr} for a sub-concatenation's head (util/subsets.py)
    subset: Optional[tuple] = None
    folder: Optional[str] = None  # --dump_path for a single head, <dump_path>/<name> for each of several
    logger: object = None
    module: object = None
    best_test: float = -1.0  # below 0, so a head that never rises above 0% still writes best.pth.tar
    best_val: float = -1.0
    # (epoch, val top-1, test top-1) of the epoch validation selects (its val top-1 is best_val); None until a
    # validation split has scored
    selected: Optional[tuple] = None
    knn: object = None  # analysis.knn's result (--knn, rank 0)
    improved: bool = False  # whether the last epoch beat best_test (its best.pth.tar is written)

    def update(self, epoch, test, val):
        """The epoch's test (and validation) scores into the bests and validation's selection."""
        self.improved = test["top1"] > self.best_test
        self.best_test = max(self.best_test, test["top1"])
        if val is not None and val["top1"] > self.best_val:
            self.best_val, self.selected = val["top1"], (epoch, val["top1"], test["top1"])


def head_records(args):
    """Every head: the full concatenation's per lr/wd value, then each --subsets subset's (the full set itself,
    which 'prefix' and 'all' list last, is the full heads). A single head writes to --dump_path itself, several
    to <dump_path>/<name>/."""
    values = [(lr, wd, f"wd{wd_text}_lr{lr_text}") for lr, lr_text in zip(args.lr_values, args.lr)
              for wd, wd_text in zip(args.wd_values, args.wd)]
    n = len(args.pretrained)
    subsets = [s for s in subsets_for(args.subsets, n) if len(s) < n]
    heads = ([Head(lr, wd, name) for lr, wd, name in values]
             + [Head(lr, wd, f"{subset_folder(s)}/{name}", s) for s in subsets for lr, wd, name in values])
    for head in heads:
        head.folder = args.dump_path if len(heads) == 1 or args.dump_path is None else \
            os.path.join(args.dump_path, head.name)
    return heads


def heads_state(heads, next_epoch):
    """The checkpoint's progress entries, resuming at next_epoch: lists indexed by head as checkpoint.pth.tar has
    always held them (plain tuples: a checkpoint loads with weights_only)."""
    return {"epoch": next_epoch, "best_test": [h.best_test for h in heads], "best_val": [h.best_val for h in heads],
            "selected": [h.selected for h in heads]}


def load_heads_state(heads, state):
    """heads_state's entries back into the heads; returns the epoch to resume at."""
    for h, head in enumerate(heads):
        selected = state["selected"][h]
        head.best_test, head.best_val = state["best_test"][h], state["best_val"][h]
        head.selected = None if selected is None else tuple(selected)
    return state["epoch"]


def block_spans(dims):
    """[(start, end)] of each backbone's block of the concatenated features."""
    ends = [sum(dims[:k + 1]) for k in range(len(dims))]
    return [(end - dim, end) for end, dim in zip(ends, dims)]


def subset_columns(dims, subset):
    """Column positions of the backbones `subset` in the concatenation of features of widths `dims`."""
    spans = block_spans(dims)
    return [c for i in subset for c in range(*spans[i])]


def build_heads(dims, num_classes, heads, classifiers, args, world):
    """Every head starts from the seeded initialisation it would get alone, on its backbones' features (so a
    subset head draws exactly what a separate probe of those backbones draws); its BatchNorm is global over the
    processes with --sync_bn (the default for more than one)."""
    modules = []
    for head in heads:
        subset = head.subset or tuple(range(len(dims)))
        torch.manual_seed(args.seed)  # each head's draw is the one it would get alone
        module = LinearHead(sum(dims[i] for i in subset), num_classes, args.use_bn,
                            global_bn=args.sync_bn and world > 1,
                            columns=None if head.subset is None else subset_columns(dims, subset))
        module.init_weights(args.headinit, classifiers and [classifiers[i] for i in subset])
        modules.append(module)
    return MultiHead(modules, fused=args.head_impl == "fused")


def param_groups(multihead, encoder, heads, args):
    """The reference's groups, per head: parameters whose name contains 'bn' get no weight decay under
    --wd_skip_bn (the head BN; the backbones' bn1/bn2/bn3 when fine-tuning, not downsample.1); the head's Linear
    gets --wd and --lr_last_layer (else --lr). Fine-tuning, the backbones' other parameters get --wd and, as in
    the original, --lr_last_layer when it is given (its test for 'a head parameter' is always true, so every
    parameter without 'bn' in its name joins the head's group), else --lr."""
    groups = []
    for h, (module, head) in enumerate(zip(multihead, heads)):
        groups += named_groups(module.named_parameters(), h, (head.lr, head.wd), args.wd_skip_bn,
                               linear_lr=args.lr_last_layer or head.lr)
    if args.exp_mode == "finetune":
        groups += named_groups(encoder.named_parameters(), 0, (heads[0].lr, heads[0].wd), args.wd_skip_bn,
                               linear_lr=args.lr_last_layer, all_linear=True)
    return merge_equal_groups(groups) if args.head_impl == "fused" else groups


def merge_equal_groups(groups):
    """--head_impl fused: the heads' groups with equal settings as one group ('heads' lists them; 'head' is the
    first), so an optimizer step is a fixed number of operations too. Each parameter gets the same update."""
    merged = {}
    for group in groups:
        key = (group["lr"], group["weight_decay"], group["part"])
        if key in merged:
            merged[key]["params"] += group["params"]
            merged[key]["heads"].append(group["head"])
        else:
            merged[key] = dict(group, params=list(group["params"]), heads=[group["head"]])
    return list(merged.values())


def named_groups(named_parameters, head, lr_wd, wd_skip_bn, linear_lr=None, all_linear=False):
    """Non-empty groups 'bn' (decay 0 with --wd_skip_bn), 'linear' (a head's Linear; with all_linear, every
    parameter without 'bn' in its name, the original's rule for the backbones) and 'other', of head number `head`
    at (lr, weight decay) lr_wd."""
    lr, wd = lr_wd
    parts = {"linear": [], "other": [], "bn": []}  # a head's first group holds its Linear: its lr is logged
    for name, param in named_parameters:
        # linear_lr None (fine-tuning without --lr_last_layer): no separate group, the backbones train at --lr
        is_linear = (all_linear or name.startswith("linear.")) and linear_lr
        # the original's substring test: 'bn' in the name, so a ResNet's downsample.1 BatchNorm is still decayed
        part = "bn" if "bn" in name else "linear" if is_linear else "other"
        parts[part].append(param)
    settings = {"bn": (lr, 0.0 if wd_skip_bn else wd), "linear": (linear_lr, wd), "other": (lr, wd)}
    return [{"params": params, "lr": settings[part][0], "base_lr": settings[part][0],
             "weight_decay": settings[part][1], "head": head, "part": part} for part, params in parts.items() if params]


def build_optimizer(groups, args):
    """SGD (global weight_decay 0: the groups carry it), Adam with betas (momentum, beta2), the `schedulefree`
    package's AdamWScheduleFree with betas (momentum, 0.999), as the reference."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr_values[0], momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=0.0)
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr_values[0], betas=(args.momentum, args.beta2))
    import schedulefree
    return schedulefree.AdamWScheduleFree(groups, lr=args.lr_values[0], betas=(args.momentum, 0.999))


def lr_at_epoch(epoch, base_lr, args):
    """The schedule is a pure function of the epoch, so a resumed run needs nothing but the epoch. The value is
    the reference's to the last bit (its MultiStepLR / CosineAnnealingLR, stepped once per epoch, multiply the lr
    in a chain: 0.01 -> 0.0001 at epoch 16, where 0.01 * 0.1 ** 2 is 0.00010000000000000002), so the logged LR
    and the update match the original's."""
    if args.scheduler_type not in ("step", "cosine"):
        return base_lr
    return _scheduled_lr(epoch, base_lr, (args.scheduler_type, tuple(args.decay_epochs), args.gamma, args.epochs,
                                          args.final_lr))


@functools.lru_cache(maxsize=4096)
def _scheduled_lr(epoch, base_lr, schedule):
    """torch's own scheduler on a one-parameter optimizer, stepped `epoch` times; schedule: (kind, decay epochs,
    gamma, epochs, final lr)."""
    kind, decay_epochs, gamma, epochs, final_lr = schedule
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    if kind == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(decay_epochs), gamma=gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=final_lr)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no optimizer step is meant
        warnings.simplefilter("ignore")
        for _ in range(epoch):
            scheduler.step()
    return optimizer.param_groups[0]["lr"]
