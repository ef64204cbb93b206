"""The linear classifier trained on top of the concatenated features."""
import torch
import torch.nn as nn

from util.misc import UserError


class LinearHead(nn.Module):
    """Optional BatchNorm1d (affine, default momentum/eps) followed by a Linear layer, as the reference probe."""

    def __init__(self, in_dim, num_classes, use_bn=True):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim) if use_bn else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, features):
        return self.linear(self.bn(features))

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
