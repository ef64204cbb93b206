"""Evaluation-only datasets of an ImageNet1k probe (--eval_datasets): ImageNet-v2, ImageNet-Sketch, ImageNet-R and
ImageNet-A, read in the folder layouts their releases ship, under --data_path (the README data root):

  imagenet_v2      imagenetv2-matched-frequency-format-val/<class index 0..999>/<hash>.jpeg  (10,000 images)
  imagenet_sketch  sketch/<wnid>/*.JPEG                                           (1000 classes, 50,889 images)
  imagenet_r       imagenet-r/<wnid>/*.jpg                                        (200 classes, 30,000 images)
  imagenet_a       imagenet-a/<wnid>/*.jpg                                        (200 classes, 7,500 images)

Labels are the probe's ImageNet1k class indices, found through the wnid (ImageNet-v2's folder k is the k-th wnid of
the standard order, datasets/imagenet_wnids.txt). ImageNet-R and ImageNet-A are scored on their 200 classes only:
the 1000-way head's logits are restricted to those classes (their `mask`, head indices in increasing order) before
the loss, top-1 and top-5, and their labels are positions in that mask: the rule of the releases' evaluation code.
The class lists are the releases' (datasets/imagenet_{r,a}_wnids.txt, with their source).
"""
import os
from typing import NamedTuple

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from datasets.images import load_rgb
from util.cli import UserError

HERE = os.path.dirname(os.path.abspath(__file__))


class EvalSpec(NamedTuple):
    folder: str  # the release's folder under --data_path
    title: str  # its name in log lines and errors
    by_index: bool  # class folders named by ImageNet class index (ImageNet-v2), else by wnid
    classes_file: str  # the release's class list (None: ImageNet's 1000)
    url: str  # the release's archive (tools/prepare_data.py evalsets --download fetches it)
    images: int  # the release's image count (tools/prepare_data.py checks it)


EVAL_SETS = {
    # github.com/modestyachts/ImageNetV2 (its archive on the Hugging Face hub); matched-frequency, the usual one
    "imagenet_v2": EvalSpec("imagenetv2-matched-frequency-format-val", "ImageNet-v2", True, None,
                            "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                            "imagenetv2-matched-frequency.tar.gz", 10000),
    # github.com/HaohanWang/ImageNet-Sketch (its archive on the Hugging Face hub)
    "imagenet_sketch": EvalSpec("sketch", "ImageNet-Sketch", False, None,
                                "https://huggingface.co/datasets/songweig/imagenet_sketch/resolve/main/data/"
                                "ImageNet-Sketch.zip", 50889),
    # github.com/hendrycks/imagenet-r and github.com/hendrycks/natural-adv-examples
    "imagenet_r": EvalSpec("imagenet-r", "ImageNet-R", False, "imagenet_r_wnids.txt",
                           "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", 30000),
    "imagenet_a": EvalSpec("imagenet-a", "ImageNet-A", False, "imagenet_a_wnids.txt",
                           "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", 7500),
}
EVAL_NAMES = tuple(EVAL_SETS)


def read_wnids(filename):
    """A class list of datasets/ (one wnid a line; '#' lines are its source)."""
    with open(os.path.join(HERE, filename)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


IMAGENET_WNIDS = read_wnids("imagenet_wnids.txt")


def release_wnids(spec):
    """The wnids of an EvalSpec's release: its class list, else ImageNet's 1000."""
    return read_wnids(spec.classes_file) if spec.classes_file else IMAGENET_WNIDS


def eval_hint(name):
    spec = EVAL_SETS[name]
    layout = "<class index 0..999>" if spec.by_index else "<wnid>"
    return (f"Expected layout: <data_path>/{spec.folder}/{layout}/<images>, as the release unpacks: "
            f"`python tools/prepare_data.py evalsets {name} --download` fetches {spec.url} and unpacks it there.")


def eval_folder(name, data_path, imagenet_folder):
    """The release's folder: under --data_path, or beside the ImageNet folder when --data_path is that folder."""
    spec = EVAL_SETS[name]
    candidates = [os.path.join(data_path, spec.folder),
                  os.path.join(os.path.dirname(os.path.abspath(imagenet_folder)), spec.folder)]
    for folder in candidates:
        if os.path.isdir(folder):
            return folder
    raise UserError(f"--eval_datasets {name}: {spec.title} folder {candidates[0]} not found. {eval_hint(name)}")


class EvalImages(torch.utils.data.Dataset):
    """(PIL image, label) of an evaluation-only set; label: the probe's class index, or for a masked set the
    position of that index in `mask`."""

    def __init__(self, samples, loader=load_rgb):
        self.samples, self.loader = samples, loader
        self.targets = [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.loader(path), label


class EvalSet(NamedTuple):
    name: str
    dataset: EvalImages
    mask: list  # head class indices the logits are restricted to (ImageNet-R/A), or None


def build_eval_set(name, data_path, imagenet_folder, head_wnids, loader=load_rgb):
    """One evaluation-only set, its labels in the probe's class indices; head_wnids: the probe's ImageNet1k classes
    (ImageFolder's sorted wnids: class k is head_wnids[k]). A folder the release does not have, or a class the probe
    does not know, is an error that says what to fix."""
    spec = EVAL_SETS[name]
    folder = eval_folder(name, data_path, imagenet_folder)
    head_index = {wnid: k for k, wnid in enumerate(head_wnids)}
    release = release_wnids(spec)
    known = set(release)
    mask = None
    if spec.classes_file:  # the 200 classes, in head order; labels become positions in the mask
        mask = sorted(head_index[w] for w in release if w in head_index)
        if not mask:
            raise UserError(f"--eval_datasets {name}: the probe's ImageNet1k has none of {spec.title}'s 200 classes "
                            f"(its train/ folders must be named by wnid, as ImageNet's)")
    position = {k: i for i, k in enumerate(mask)} if mask else None
    samples = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if spec.by_index:
            if not entry.name.isdigit() or int(entry.name) >= len(IMAGENET_WNIDS):
                raise UserError(f"--eval_datasets {name}: {entry.path} is not a class index 0..999. "
                                f"{eval_hint(name)}")
            wnid = IMAGENET_WNIDS[int(entry.name)]
        else:
            wnid = entry.name
            if wnid not in known:
                raise UserError(f"--eval_datasets {name}: {entry.path} is not one of {spec.title}'s classes "
                                f"(the wnids of its release). {eval_hint(name)}")
        if wnid not in head_index:
            raise UserError(f"--eval_datasets {name}: class {wnid} ({entry.path}) is not among the probe's "
                            f"{len(head_wnids)} ImageNet1k classes; the probe must train on ImageNet's train/<wnid> "
                            f"folders")
        label = head_index[wnid] if position is None else position[head_index[wnid]]
        samples += [(os.path.join(entry.path, f), label) for f in sorted(os.listdir(entry.path))
                    if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise UserError(f"--eval_datasets {name}: no images under {folder}. {eval_hint(name)}")
    return EvalSet(name, EvalImages(samples, loader), mask)


def restrict_logits(model, mask):
    """The evaluation model of a masked set: each head's logits restricted to the mask's classes (positions in the
    mask are the labels), so argmax and top-5 pick among those classes only."""
    index = torch.tensor(mask, dtype=torch.long)
    on_device = {}  # the index on the outputs' device: copied there once (the first batch), not per head per batch

    def pick(logits):
        if logits.device not in on_device:
            on_device[logits.device] = index.to(logits.device)
        return logits[:, on_device[logits.device]]

    def restricted(inputs):
        outputs = model(inputs)
        if isinstance(outputs, (list, tuple)):
            return [pick(o) for o in outputs]
        return pick(outputs)

    return restricted
