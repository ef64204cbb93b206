"""The linear classifier trained on top of the concatenated features."""
import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn

from util.cli import UserError


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
