"""The linear classifier trained on top of the concatenated features."""
import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn

from util.cli import UserError


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are over the global batch of every process (on any backend, gloo
    included, where torch's SyncBatchNorm needs CUDA), so N processes train, and then evaluate, the head that the
    reference's single process would. Same parameters and buffers as BatchNorm1d; one process: BatchNorm1d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # autograd-aware all-reduces: gradients flow back to every process's samples, as in SyncBatchNorm
        count = dist_nn.all_reduce(x.new_full((1,), float(x.shape[0])))
        mean = dist_nn.all_reduce(x.sum(dim=0)) / count
        var = dist_nn.all_reduce(((x - mean) ** 2).sum(dim=0)) / count  # two passes: no E[x^2] - E[x]^2 loss
        with torch.no_grad():  # running statistics as BatchNorm1d keeps them: unbiased variance, momentum
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
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
    """Several heads on the same features (a hyper-parameter sweep in one pass); returns one logits per head."""

    def forward(self, features):
        return [head(features) for head in self]
