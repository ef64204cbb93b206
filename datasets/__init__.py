"""Transfer datasets of the probe by name, in the README layout under --data_path."""
import os
import re
from typing import NamedTuple

import numpy as np
import torch

from datasets.cifar import build_cifar, percent_subset
from datasets.images import (
    IMAGENET_HINT,
    INAT_HINT,
    INaturalist18,
    UnreadableImage,
    build_image_folder,
    image_loader_for,
)
from util.cli import UserError
from util.signals import StopSafeDataLoader

# imagefolder: any dataset laid out as <data_path>/{train,val}/<class>/<images>, with ImageNet's transforms
DATA_NAMES = ("cifar10", "cifar100", "inaturalist18", "imagenet1k", "imagefolder")
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


def family_of(data_name):
    """'cifar' (CIFAR transforms and statistics) or 'imagenet' (ImageNet and iNat18)."""
    return "cifar" if parse_data_name(data_name)[0].startswith("cifar") else "imagenet"


def dataset_targets(dataset):
    """Class labels of a dataset, through any Subset wrappers."""
    if isinstance(dataset, torch.utils.data.Subset):
        targets = dataset_targets(dataset.dataset)
        return [targets[i] for i in dataset.indices]
    return list(dataset.targets)


def stratified_subset(targets, fraction, seed):
    """Indices of a seeded, class-balanced fraction of a dataset (at least one sample per class); --val_split."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = max(1, int(round(len(members) * fraction)))
        keep.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(keep)).tolist()


def subset_fraction(length, rate, seed):
    """Indices kept by --data_rate, the reference's rule: numpy default_rng(seed + 12345) shuffles 0..n-1 and the
    first int(n * rate) are kept, in that (shuffled) order."""
    if not 0 < rate <= 1:
        raise UserError(f"--data_rate must be in (0, 1], got {rate}")
    if rate == 1:
        return list(range(length))
    count = int(length * rate)
    if count < 1:
        raise UserError(f"--data_rate {rate} keeps no image of the {length} training images: raise it")
    indices = np.arange(length)
    np.random.default_rng(seed + 12345).shuffle(indices)
    return indices[:count].tolist()


def reference_sampler_seed(seed):
    """The seed of the reference's training DistributedSampler: numpy seeded with --seed, then randint(99999)
    (53970 for the reference's seed 31)."""
    return int(np.random.RandomState(seed).randint(99999))


class WithTransform(torch.utils.data.Dataset):
    """A view of a dataset of (PIL image, label) with its own transform, so one dataset serves both the
    augmented training view and the test-transform view without being read twice."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


class SkipUnreadable(torch.utils.data.Dataset):
    """A dataset whose unreadable images come out as None (--skip_bad_images), for collate_readable to drop."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UnreadableImage:
            return None


def collate_readable(samples):
    """(images, labels, kept) of a batch without its unreadable samples (None; images and labels are None when
    none is left); kept marks the survivors, so the count of skipped images leaves DataLoader workers with the
    batch."""
    kept = torch.tensor([s is not None for s in samples], dtype=torch.bool)
    readable = [s for s in samples if s is not None]
    images, labels = torch.utils.data.default_collate(readable) if readable else (None, None)
    return images, labels, kept


class ReadableBatches:
    """The (images, labels) batches of a loader built on collate_readable; .skipped counts the images dropped."""

    def __init__(self, loader):
        self.loader, self.skipped = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels, kept in self.loader:
            self.skipped += int((~kept).sum())
            if images is not None:
                yield images, labels


def image_loader(dataset, skip_bad_images=False, **kwargs):
    """A DataLoader whose workers leave SIGTERM/SIGUSR1 to the main process; with skip_bad_images, batches
    without the unreadable images, counted in .skipped."""
    if not skip_bad_images:
        return StopSafeDataLoader(dataset, **kwargs)
    return ReadableBatches(StopSafeDataLoader(SkipUnreadable(dataset), collate_fn=collate_readable, **kwargs))


class ImageNetRoot(NamedTuple):
    folder: str  # the folder holding train/ and val/
    found: str  # which layout --data_path was, for the start-up log


def imagenet_root(data_path):
    """--data_path may be the README's data root (holding imagenet/) or the ImageNet folder itself (holding
    train/ and val/); the nested layout wins when both exist."""
    nested = os.path.join(data_path, "imagenet")
    if not os.path.isdir(nested) and os.path.isdir(os.path.join(data_path, "train")):
        return ImageNetRoot(data_path, f"the ImageNet folder itself ({data_path} holds train/ and val/)")
    return ImageNetRoot(nested, f"the README data root ({data_path} holds imagenet/)")


def build_dataset(data_name, data_path, split, download=True, decoder="pil"):
    """(dataset of (image, label), num_classes) for split 'train' or 'test'; image files are read with
    --decoder's loader (datasets/images.py: pil gives PIL images, turbo uint8 arrays; CIFAR is in memory, PIL
    images, nothing to decode)."""
    base, percent = parse_data_name(data_name)
    loader = image_loader_for(decoder)
    train = split == "train"
    if base.startswith("cifar"):
        dataset = build_cifar(base, data_path, train, None, download)
        num_classes = 10 if base == "cifar10" else 100
    elif base == "inaturalist18":
        root = os.path.join(data_path, "inaturalist18")
        if not os.path.isdir(root):
            raise UserError(f"iNaturalist18: folder {root} not found. {INAT_HINT}")
        dataset = INaturalist18(root, split, loader=loader)
        num_classes = len(dataset.class_to_idx)
    elif base == "imagefolder":
        folder = os.path.join(data_path, "train" if train else "val")
        dataset = build_image_folder(folder, "imagefolder", "Expected layout: <data_path>/{train,val}/<class>/*",
                                     loader=loader)
        num_classes = len(dataset.classes)
    else:
        folder = os.path.join(imagenet_root(data_path).folder, "train" if train else "val")
        dataset = build_image_folder(folder, "ImageNet1k", IMAGENET_HINT, loader=loader)
        num_classes = len(dataset.classes)
    if base.startswith("cifar") and train:
        # the original reads EVERY CIFAR training set through its fixed permutation: Subset(train,
        # order[:int(50000 * p / 100)]) with p = 100 for a name without _{p}perc, so even a full cifar10 run draws
        # its batches (and --data_rate its fraction) through that order
        dataset = torch.utils.data.Subset(dataset, percent_subset(len(dataset), 100.0 if percent is None else percent))
    return dataset, num_classes
