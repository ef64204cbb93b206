"""AlgoPerf's initialisation of its ResNet (imagenet_resnet workload), applied to a torchvision ResNet.

Facts from AlgoPerf's imagenet_resnet workload (its PyTorch ResNet): every Conv2d weight is drawn from a
normal truncated at two standard deviations whose scale is sqrt(1 / fan_in) / 0.87962566103423978 (the divisor is
the standard deviation of a unit normal truncated at +-2, so the drawn weights have std sqrt(1 / fan_in));
BatchNorm weight 1, bias 0; the classifier N(0, 0.01^2), bias 0; the last BatchNorm of every residual branch
(bn3 of a Bottleneck, bn2 of a BasicBlock) starts at weight 0, so every block starts as the identity.
"""
import math

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
CLASSIFIER_STD = 0.01
INITS = ("algoperf", "torchvision")


def conv_std(conv):
    """The std of AlgoPerf's truncated normal for this convolution (before truncation)."""
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return math.sqrt(1.0 / fan_in) / TRUNCATED_NORMAL_STD


@torch.no_grad()
def algoperf_init(model):
    """Re-initialise a torchvision ResNet in place as AlgoPerf initialises its own; returns the model."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            std = conv_std(m)
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, CLASSIFIER_STD)
            m.bias.zero_()
    for m in model.modules():  # zero-init the residual branch's last BatchNorm: each block starts as identity
        if isinstance(m, Bottleneck):
            m.bn3.weight.zero_()
        elif isinstance(m, BasicBlock):
            m.bn2.weight.zero_()
    return model
