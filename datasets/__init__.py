"""Transfer datasets of the probe by name, in the README layout under --data_path."""
import os
import re

import numpy as np
import torch

from datasets.cifar import build_cifar
from datasets.images import IMAGENET_HINT, INAT_HINT, INaturalist18, build_image_folder
from datasets.transforms import TF_NAMES, build_transform
from util.misc import UserError

DATA_NAMES = ("cifar10", "cifar100", "inaturalist18", "imagenet1k")
SUBSET_SEED = 0  # the p-percent CIFAR subsets are the same for every run
_PERCENT = re.compile(r"^(cifar10|cifar100)_(\d+(?:\.\d+)?)perc$")


def parse_data_name(data_name):
    """'cifar10_10perc' -> ('cifar10', 10.0); 'inaturalist18' -> ('inaturalist18', None)."""
    match = _PERCENT.match(data_name)
    if match:
        percent = float(match.group(2))
        if not 0 < percent <= 100:
            raise UserError(f"--data_name {data_name}: the percentage must be in (0, 100]")
        return match.group(1), percent
    if data_name not in DATA_NAMES:
        raise UserError(f"unknown --data_name '{data_name}': choose one of {', '.join(DATA_NAMES)} "
                        f"or cifar10_{{p}}perc / cifar100_{{p}}perc")
    return data_name, None


def stratified_subset(targets, fraction, seed):
    """Indices of a seeded, class-balanced fraction of a dataset (at least one sample per class)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = max(1, int(round(len(members) * fraction)))
        keep.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(keep)).tolist()


def build_dataset(data_name, data_path, split, tf_name="eval", img_size=None, download=True, transform=None):
    """(dataset, num_classes) for split 'train' or 'test'. `transform` overrides the preset."""
    base, percent = parse_data_name(data_name)
    if tf_name not in TF_NAMES:
        raise UserError(f"unknown --tf_name '{tf_name}': choose one of {', '.join(TF_NAMES)}")
    family = "cifar" if base.startswith("cifar") else "imagenet"
    if tf_name == "32px" and family != "cifar":
        raise UserError("--tf_name 32px is the CIFAR native-size preset; use eval or 224px (and --img_size) "
                        f"for {base}")
    train = split == "train"
    if transform is None:
        transform = build_transform(family, tf_name, train, img_size)
    if family == "cifar":
        dataset = build_cifar(base, data_path, train, transform, download)
        num_classes = 10 if base == "cifar10" else 100
    elif base == "inaturalist18":
        root = os.path.join(data_path, "inaturalist18")
        if not os.path.isdir(root):
            raise UserError(f"iNaturalist18: folder {root} not found. {INAT_HINT}")
        dataset = INaturalist18(root, split, transform)
        num_classes = len(dataset.class_to_idx)
    else:
        folder = os.path.join(data_path, "imagenet", "train" if train else "val")
        dataset = build_image_folder(folder, "ImageNet1k", IMAGENET_HINT, transform)
        num_classes = len(dataset.classes)
    if percent is not None and train and percent < 100:
        dataset = torch.utils.data.Subset(dataset, stratified_subset(dataset.targets, percent / 100, SUBSET_SEED))
    return dataset, num_classes


def subset_fraction(dataset, rate, seed):
    """Keep a seeded random fraction of a dataset (--data_rate)."""
    if not 0 < rate <= 1:
        raise UserError(f"--data_rate must be in (0, 1], got {rate}")
    if rate == 1:
        return dataset
    count = max(1, int(round(len(dataset) * rate)))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:count].sort().values.tolist()
    return torch.utils.data.Subset(dataset, indices)
