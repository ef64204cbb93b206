"""Frozen or trainable torchvision classifiers cut in front of their classifier, whose pooled features are
concatenated into one wide encoder.

Any torchvision classification model is a backbone (`backbone_archs()`, by its torchvision name). Its feature is
what its own forward computes in front of its last nn.Linear, the classifier, which is replaced by an Identity
(its width is that Linear's in_features). Per family, that tensor is:

    resnet, resnext, wide_resnet, regnet,       global average pool + flatten, before fc
    shufflenet, googlenet, inception
    convnext                                     average pool, then the classifier's LayerNorm2d and Flatten
                                                 (they belong to the feature); only classifier[2] is dropped
    vit                                          the class token after the encoder's final LayerNorm (encoder.ln);
                                                 heads.head is the classifier
    efficientnet, mobilenet_v2, mnasnet          average pool + flatten, before classifier = (Dropout, Linear)
    swin                                         norm + permute + average pool + flatten, before head
    mobilenet_v3, maxvit, vgg, alexnet           the output of the classifier's hidden layers, before its last Linear
    densenet                                     relu + average pool + flatten, before classifier

SqueezeNet ends in a convolution, not a Linear, and is refused. googlenet and inception_v3 are built without their
auxiliary classifiers (a checkpoint's aux weights are ignored). ViT and MaxViT take a fixed input size, given at
construction (`image_size`): a ViT checkpoint's positional embedding fixes it.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision

from models.checkpoint_keys import load_backbone_weights
from util.cli import UserError

# Pretraining (main_pretrain.py) trains these; the probe and load_encoder take any of backbone_archs().
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
# Families (torchvision's module of the builder) whose constructor takes a fixed input size, and its keyword.
SIZE_KWARG = {"vision_transformer": "image_size", "maxvit": "input_size"}
# Built without the auxiliary classifiers (training-only outputs); their checkpoint weights are ignored.
NO_AUX = {"googlenet": ("aux1.", "aux2."), "inception": ("AuxLogits.",)}
# torchvision computes RegNet's block widths with tensor operations, which the meta device cannot evaluate: RegNets
# are built on the CPU (a random initialisation that the checkpoint then overwrites).
NOT_ON_META = ("regnet",)
# The ResNet family keeps the reference's transform (resize 256, crop 224, bilinear) whatever torchvision's weights
# recommend (resnext101_64x4d's weights say resize 232): the original probed every ResNet so.
REFERENCE_FAMILIES = ("resnet",)


def backbone_archs():
    """Every torchvision classification model name (not detection, segmentation, video or quantized models)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def arch_family(arch):
    """The torchvision module that builds `arch`: 'resnet', 'regnet', 'vision_transformer', 'convnext', ..."""
    if arch not in backbone_archs():
        raise UserError(f"unknown arch '{arch}': give a torchvision classification model name (e.g. resnet50, "
                        f"vit_b_16, convnext_tiny, regnet_y_400mf, efficientnet_b0, swin_t; the list: "
                        f"torchvision.models.list_models(module=torchvision.models))")
    return torchvision.models.get_model_builder(arch).__module__.rpartition(".")[2]


def build_backbone(arch, num_classes=1000, image_size=None):
    """A torchvision classification model, randomly initialised (weights come from our own checkpoints).
    image_size: the input size of the families that fix it (ViT, MaxViT); None = torchvision's default (224)."""
    family = arch_family(arch)
    kwargs = {"weights": None, "num_classes": num_classes}
    if family in NO_AUX:
        kwargs.update(aux_logits=False, init_weights=False)
    if family in SIZE_KWARG and image_size:
        kwargs[SIZE_KWARG[family]] = image_size if family != "maxvit" else (image_size, image_size)
    try:
        return torchvision.models.get_model(arch, **kwargs)
    except ValueError as exc:  # e.g. MaxViT's input size not divisible by its partitions
        raise UserError(f"cannot build {arch} for {image_size or 224}-px inputs: "
                        f"{str(exc).splitlines()[0]}") from None


def classifier_name(net, arch):
    """The dotted name of the model's classifier: its last nn.Linear ('fc', 'heads.head', 'classifier.2', ...)."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError(f"{arch} has no Linear classifier (it ends in a convolution): it has no pooled feature "
                        f"in front of a classifier to concatenate; choose another architecture")
    return linears[-1]


def cut_classifier(net, arch):
    """Replace the classifier by an Identity; returns (its dotted name, the feature width in front of it)."""
    name = classifier_name(net, arch)
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name)
    dim = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return name, dim


def feature_dim(arch, image_size=None):
    """The pooled feature width of an architecture (built on the meta device where it can be: no memory)."""
    on_meta = arch_family(arch) not in NOT_ON_META
    with torch.device("meta" if on_meta else "cpu"):
        return cut_classifier(build_backbone(arch, image_size=image_size), arch)[1]


class ConcatEncoder(nn.Module):
    """N backbones whose pooled features are concatenated in the order given.

    image_size: the input crop, for the families whose constructor fixes it (ViT, MaxViT); others take any size.
    """

    def __init__(self, archs, checkpoints, image_size=224):
        super().__init__()
        self.backbones = nn.ModuleList()
        self.classifiers = []  # each checkpoint's own classifier {'weight', 'bias'}, for --headinit cat_weights
        for arch, path in zip(archs, checkpoints):
            family = arch_family(arch)
            # with a checkpoint every tensor comes from it: build without the random initialisation (seconds for
            # a few ResNet50s on a CPU) and give the tensors memory just before they are loaded
            on_meta = bool(path) and family not in NOT_ON_META
            with torch.device("meta" if on_meta else "cpu"):
                net = build_backbone(arch, image_size=image_size)
            name, dim = cut_classifier(net, arch)
            if on_meta:
                net.to_empty(device="cpu")
            classifier = (load_backbone_weights(net, path, arch, classifier=name, ignored=NO_AUX.get(family, ()))
                          if path else {})
            self.classifiers.append(classifier)
            net.out_dim, net.arch = dim, arch
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


# ---------------------------------------------------------------- input transforms per architecture
class InputRecipe(NamedTuple):
    """The evaluation transform an architecture expects on ImageNet-like images: resize the short side to `resize`,
    centre-crop `crop`, with `interpolation` ('bilinear', 'bicubic'), then normalise with mean/std."""
    crop: int
    resize: int
    interpolation: str
    mean: tuple
    std: tuple

    def describe(self):
        return f"resize {self.resize}, crop {self.crop}, {self.interpolation}"


def input_recipe(arch):
    """torchvision's evaluation transform for `arch` (its IMAGENET1K_V1 weights, else DEFAULT: metadata only,
    nothing is downloaded); None for the ResNet family, which keeps the reference's transform."""
    if arch_family(arch) in REFERENCE_FAMILIES:
        return None
    weights = torchvision.models.get_model_weights(arch)
    chosen = weights.__members__.get("IMAGENET1K_V1", weights.DEFAULT)
    preset = chosen.transforms()
    return InputRecipe(preset.crop_size[0], preset.resize_size[0], preset.interpolation.value,
                       tuple(preset.mean), tuple(preset.std))


def encoder_recipe(archs, allow_mixed=False):
    """The one input transform of a concatenation: None (the reference's) when every backbone takes it.

    Backbones that expect different transforms are refused (one line) unless allow_mixed, which feeds every backbone
    the first one's."""
    recipes = [input_recipe(arch) for arch in archs]
    reference = InputRecipe(224, 256, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    effective = [r or reference for r in recipes]
    different = [i for i, r in enumerate(effective) if r != effective[0]]
    if different and not allow_mixed:
        j = different[0]
        raise UserError(f"the backbones expect different input transforms: {archs[0]} ({effective[0].describe()}) "
                        f"and {archs[j]} ({effective[j].describe()}); probe them separately, or allow feeding "
                        f"every backbone {archs[0]}'s transform (--allow_mixed_transforms, "
                        f"load_encoder(allow_mixed_transforms=True))")
    return recipes[0]
