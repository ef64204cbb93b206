"""Transforms of the reference probe: per-dataset presets (eval, 224px, 32px, 384px, vit384px), any crop size via
--img_size, and the input recipe of backbones that expect another one than the reference's
(models.backbones.input_recipe).

Three pipelines compute them (--decoder, --fast_transforms; docs/benchmarks.md "data"):
- reference (default): torchvision's PIL transforms, ToTensor, Normalize.
- turbo (--decoder turbo): the same PIL operations on simplejpeg's uint8 array, in a cheaper order: the training
  crop is cut from the array before PIL sees it (PIL copies only the crop, not the whole image), the flip is done on
  the tensor, ToTensor + Normalize are one pass over the pixels (ToNormalizedTensor): the same tensor bit for bit.
- fast (--fast_transforms, an opt-in recipe key): crop, resize and flip on uint8 tensors (torchvision's
  vectorised uint8 resampling), then ToNormalizedTensor; the same random draws (crop boxes, flips) as the
  reference; pixels within one level of PIL's resampling (tests/test_decoders.py).
"""
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# the 0.5 normalisation of the original ViT release and of timm's 384-px ViTs (vit384px; an assumption: the
# original's values are not in its README; README, "Evaluation-only datasets and presets")
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TF_NAMES = ("eval", "224px", "32px", "384px", "vit384px")
PRESET_CROPS = {"32px": 32, "384px": 384, "vit384px": 384}
PIPELINES = ("reference", "turbo", "fast")


def crop_size(family, tf_name, img_size=None, recipe=None):
    """The crop the encoder sees: --img_size, else the preset's (32px: 32, 384px and vit384px: 384), else the
    backbones' recipe's on ImageNet-like data (224 for the reference)."""
    if img_size:
        return img_size
    if tf_name in PRESET_CROPS:
        return PRESET_CROPS[tf_name]
    return recipe.crop if recipe is not None and family != "cifar" else 224


def pipeline_of(decoder="pil", fast_transforms=False):
    """The transform pipeline of --decoder / --fast_transforms."""
    return "fast" if fast_transforms else "turbo" if decoder == "turbo" else "reference"


def uint8_chw(pic):
    """A PIL RGB image (or an H x W x 3 uint8 array) as a 3 x H x W uint8 tensor viewing the same memory."""
    with warnings.catch_warnings():  # read-only pixels are only ever read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(pic)).permute(2, 0, 1)


class ToNormalizedTensor:
    """ToTensor() then Normalize(mean, std) in one pass: uint8 -> float32, / 255, - mean, / std, in place on one
    new tensor (torchvision's pair makes four); bit-identical to the pair (tests/test_decoders.py)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            pixels = pic
        elif isinstance(pic, np.ndarray) or getattr(pic, "mode", None) == "RGB":
            pixels = uint8_chw(pic)
        else:  # another PIL mode: torchvision's own conversion
            return self.reference(pic)
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return out.div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class TurboRandomResizedCropFlip:
    """The reference's RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize, bit for bit, on an
    H x W x 3 uint8 array (--decoder turbo's) or a PIL image: the same random draws in the same order; the crop box
    is cut from the array, PIL resizes it with torchvision's PIL resize (the reference's crop then resize), and the
    flip reverses the tensor's columns (a permutation: exact). tests/test_decoders.py checks the equality."""

    def __init__(self, size, scale, ratio, interpolation, mean, std):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation
        self.to_tensor = ToNormalizedTensor(mean, std)

    def __call__(self, pic):
        if not isinstance(pic, np.ndarray) and getattr(pic, "mode", None) != "RGB":
            pic = pic.convert("RGB")  # what the reference's loader would have handed over
        pixels = np.asarray(pic)
        top, left, height, width = T.RandomResizedCrop.get_params(uint8_chw(pixels), self.scale, self.ratio)
        crop = Image.fromarray(pixels[top:top + height, left:left + width])
        crop = F.resize(crop, [self.size, self.size], self.interpolation, antialias=True)
        out = uint8_chw(crop)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip(0.5)'s draw, after the crop's as in the reference
            out = out.flip(-1)
        return self.to_tensor(out)


def to_pil(pic):
    """A uint8 array (--decoder turbo's) as the PIL image the reference's test transform resizes."""
    return Image.fromarray(pic) if isinstance(pic, np.ndarray) else pic


class Uint8RandomResizedCrop:
    """RandomResizedCrop + RandomHorizontalFlip(0.5) on a uint8 tensor, with the reference's random draws (the
    same crop boxes and flips for the same seed)."""

    def __init__(self, size, scale, ratio, interpolation):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    def __call__(self, pic):
        pixels = pic if isinstance(pic, torch.Tensor) else uint8_chw(pic)
        top, left, height, width = T.RandomResizedCrop.get_params(pixels, self.scale, self.ratio)
        pixels = F2.resized_crop(pixels, top, left, height, width, [self.size, self.size], self.interpolation,
                                 antialias=True)
        if torch.rand(1) < 0.5:
            pixels = pixels.flip(-1)
        return pixels


class Uint8ResizeCenterCrop:
    """Resize(short side) + CenterCrop on a uint8 tensor."""

    def __init__(self, resize, crop, interpolation):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def __call__(self, pic):
        pixels = pic if isinstance(pic, torch.Tensor) else uint8_chw(pic)
        pixels = F2.resize(pixels, [self.resize], self.interpolation, antialias=True)
        return F2.center_crop(pixels, [self.crop, self.crop])


def build_transform(family, tf_name, train, img_size=None, pipeline="reference", recipe=None):
    """family: 'cifar' or 'imagenet' (ImageNet and iNat18). img_size overrides the preset's crop;
    the test resize is int(8/7 of the crop), the reference's (256 for 224, 36 for 32, 438 for 384). pipeline:
    PIPELINES. 384px: the dataset's transform at crop 384; vit384px: crop 384, bicubic, mean = std = 0.5 on every
    dataset and backbone.

    recipe: None (the reference's transform), or the backbones' own (crop, resize, interpolation, mean, std; see
    models.backbones.InputRecipe), applied to ImageNet-like data at the crop size (resize scaled with it); CIFAR
    keeps the reference's transform for every backbone."""
    if tf_name not in TF_NAMES:
        raise ValueError(f"unknown tf_name {tf_name}")
    if tf_name == "32px" and family != "cifar":
        raise ValueError("the 32px preset is for CIFAR only")
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline}")
    crop = crop_size(family, tf_name, img_size, recipe)
    resize = int(crop * 8 / 7)  # the reference truncates: 224 -> 256, 32 -> 36
    if family == "cifar":
        mean, std = CIFAR_MEAN, CIFAR_STD
        interpolation, scale = T.InterpolationMode.BICUBIC, (0.8, 1.0)
    elif recipe is not None:  # another architecture's own evaluation transform, scaled to the crop
        mean, std = recipe.mean, recipe.std
        interpolation, scale = T.InterpolationMode(recipe.interpolation), (0.08, 1.0)
        resize = crop * recipe.resize // recipe.crop
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        interpolation, scale = T.InterpolationMode.BILINEAR, (0.08, 1.0)  # RandomResizedCrop's defaults
    if tf_name == "vit384px":  # the preset names its normalisation and resampling, whatever the data or backbone
        mean, std, interpolation, resize = VIT_MEAN, VIT_STD, T.InterpolationMode.BICUBIC, int(crop * 8 / 7)
    ratio = (3 / 4, 4 / 3)
    if pipeline == "fast":
        geometry = Uint8RandomResizedCrop(crop, scale, ratio, interpolation) if train else \
            Uint8ResizeCenterCrop(resize, crop, interpolation)
        return T.Compose([geometry, ToNormalizedTensor(mean, std)])
    if pipeline == "turbo":
        if train:
            return TurboRandomResizedCropFlip(crop, scale, ratio, interpolation, mean, std)
        return T.Compose([to_pil, T.Resize(resize, interpolation=interpolation), T.CenterCrop(crop),
                          ToNormalizedTensor(mean, std)])
    if train:
        steps = [T.RandomResizedCrop(crop, scale=scale, ratio=ratio, interpolation=interpolation),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize, interpolation=interpolation), T.CenterCrop(crop)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
