"""Frozen or trainable torchvision ResNets whose pooled features are concatenated into one wide encoder."""
import torch
import torch.nn as nn
import torchvision

from models.checkpoint_keys import load_backbone_weights
from util.cli import UserError

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")


def build_backbone(arch, num_classes=1000):
    """A torchvision ResNet, randomly initialised (weights come from our own checkpoints)."""
    if arch not in RESNET_ARCHS:
        raise UserError(f"unknown arch '{arch}': choose one of {', '.join(RESNET_ARCHS)}")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


class ConcatEncoder(nn.Module):
    """N backbones whose global-average-pooled features are concatenated in the order given."""

    def __init__(self, archs, checkpoints):
        super().__init__()
        self.backbones = nn.ModuleList()
        self.classifiers = []  # each checkpoint's own fc {'weight', 'bias'}, for --headinit cat_weights
        for arch, path in zip(archs, checkpoints):
            # with a checkpoint every tensor comes from it: build without the random initialisation (seconds for
            # a few ResNet50s on a CPU) and give the tensors memory just before they are loaded
            with torch.device("meta" if path else "cpu"):
                net = build_backbone(arch)
            dim = net.fc.in_features
            net.fc = nn.Identity()
            if path:
                net.to_empty(device="cpu")
            classifier = load_backbone_weights(net, path, arch) if path else {}
            self.classifiers.append(classifier)
            net.out_dim = dim
            self.backbones.append(net)
        self.out_dim = sum(net.out_dim for net in self.backbones)

    def forward(self, x):
        return torch.cat([net(x) for net in self.backbones], dim=1)

    def freeze(self):
        """Eval mode and no gradients: weights and BatchNorm statistics stay exactly as loaded."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
