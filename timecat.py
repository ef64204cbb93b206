"""The Time-Cat encoder from Python: a tag of the tag file, or checkpoint paths, to the frozen concatenated encoder
and its test transform. `hubconf.py` exposes the same function to torch.hub.

    from timecat import load_encoder
    encoder, transform = load_encoder("supervisedimagenet_resnet50_sfadamw_5_step80k")
    features = encoder(transform(image).unsqueeze(0))      # (1, 10240): five 2048-d blocks, in the tag's order

Checkpoints are read from local files only; `python tools/download.py` fetches the released ones (downloading is
that tool's job, not the loader's). This module composes models/ (the encoder) and datasets/ (its transform),
which do not import each other.
"""
import os

import torch

from datasets import family_of
from datasets.transforms import build_transform
from models.backbones import ConcatEncoder, encoder_recipe
from models.encoder import DEFAULT_TAG_FILE, pair_backbones, read_tag
from util.cli import UserError

CHECKPOINT_SUFFIXES = (".pth", ".tar", ".pt", ".bin", ".ckpt")


def load_encoder(tag_or_checkpoints, arch="resnet50", tag_file=DEFAULT_TAG_FILE, image_size=None, device="cpu",
                 allow_mixed_transforms=False, checkpoint_root=None):
    """The frozen concatenated encoder (eval mode, no gradients) and its test transform (PIL image -> tensor).

    tag_or_checkpoints: a tag of `tag_file` (configs/pretrained_checkpoints.yaml, e.g.
        'supervisedimagenet_resnet50_sfadamw_5_step80k'), or one checkpoint path, or a list of them (every format
        the probe reads; features are concatenated in that order).
    arch: with paths, one torchvision classification model name for all, or a list with one per checkpoint
        (default resnet50, the released checkpoints'); a tag names its own.
    image_size: the crop size (default: the architectures' own, 224 for ResNets); a ViT needs its training size.
    checkpoint_root: where a tag's checkpoints/... paths point (default: $TIMECAT_CHECKPOINTS, else the clone's
        checkpoints/), as the probe's --checkpoint_root.
    allow_mixed_transforms: accept backbones that expect different input transforms, feeding every backbone the
        first one's (otherwise refused).
    Returns (encoder, transform): encoder(x) is (batch, encoder.out_dim), the backbones' pooled features in order,
    encoder.backbones[i].out_dim the width of block i. Errors are util.cli.UserError, with a one-line message.
    """
    text = os.fspath(tag_or_checkpoints) if isinstance(tag_or_checkpoints, (str, os.PathLike)) else None
    # a name that is no file, has no path separator and no checkpoint suffix is a tag
    tagged = (text is not None and not os.path.isfile(text) and os.sep not in text
              and not text.endswith(CHECKPOINT_SUFFIXES))
    if tagged:
        archs, paths = read_tag(text, tag_file, checkpoint_root)
    else:
        paths = [text] if text is not None else [os.fspath(p) for p in tag_or_checkpoints]
        archs = [arch] if isinstance(arch, str) else list(arch)
    archs = pair_backbones(archs, paths, tagged)
    recipe = encoder_recipe(archs, allow_mixed_transforms)
    transform = build_transform("imagenet", "eval", False, image_size, recipe=recipe)
    crop = image_size or (recipe.crop if recipe else 224)
    encoder = ConcatEncoder(archs, paths, image_size=crop).freeze()
    return encoder.to(torch.device(device)), transform


def resolve_backbones(args):
    """The probe's --tag, or --arch/--pretrained, to args.arch/args.pretrained, checked to pair up and exist; and
    the one-line error of backbones that expect different transforms, before any data is read."""
    if args.tag:
        if args.arch or args.pretrained:
            raise UserError("give either --tag or --arch/--pretrained, not both")
        args.arch, args.pretrained = read_tag(args.tag, args.tag_file, args.checkpoint_root)
    args.arch = pair_backbones(args.arch, args.pretrained, tagged=bool(args.tag))
    backbones_recipe(args.data_name, args.arch, args.allow_mixed_transforms)


def backbones_recipe(data_name, archs, allow_mixed):
    """The backbones' input transform on ImageNet-like data (None: the reference's; CIFAR: always the reference's)."""
    if family_of(data_name) != "imagenet":
        return None
    return encoder_recipe(archs, allow_mixed)
