"""Image files on disk: a loader whose errors name the file, ImageFolder (ImageNet) and iNaturalist 2018.

JPEG decoders (--decoder; docs/benchmarks.md "data"):
- pil (default, the reference): PIL's decoder (the libjpeg-turbo inside Pillow's wheels).
- turbo: simplejpeg's libjpeg-turbo with the same settings (accurate integer IDCT, fancy upsampling): the same
  pixels as PIL, bit for bit (tests/test_decoders.py), with less per-file overhead. Optional package:
  `uv sync --extra fastjpeg` (./setup.sh installs every extra).
libjpeg-turbo's fast IDCT and plain upsampling are not offered: measured on ImageNet-like files they save 4% of the
decode and move pixels by 2 levels on average (up to 92 on textured chroma).
Files libjpeg-turbo cannot decode to RGB (PNGs named .JPEG, CMYK JPEGs: a few dozen in ImageNet) are read by PIL
whatever the decoder, which is what the reference does with every file.
"""
import functools
import json
import os

import numpy as np
import torchvision
from PIL import Image

from util.cli import UserError

DECODERS = ("pil", "turbo")
TURBO_COLORSPACES = ("YCbCr", "Gray")  # JPEG colour spaces whose RGB is PIL's, bit for bit (tests/test_decoders.py)


class UnreadableImage(UserError):
    """An image file that is missing, truncated or not an image (--skip_bad_images skips those)."""


def load_rgb(path):
    """Open an image as RGB; a missing, truncated or unreadable file stops the run and names the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"cannot read image {path}: {exc} (--skip_bad_images skips such files)") from None


def require_simplejpeg(what):
    try:
        import simplejpeg
    except ImportError:
        raise UserError(f"{what} needs the simplejpeg package: `uv sync --extra fastjpeg` (./setup.sh installs it), "
                        f"or use --decoder pil") from None
    return simplejpeg


def load_rgb_turbo(path, array=False):
    """load_rgb through simplejpeg: the same pixels as PIL's decoder, as a PIL image, or (array=True, what
    --decoder turbo's transforms take) the H x W x 3 uint8 array itself."""
    import simplejpeg
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UnreadableImage(f"cannot read image {path}: {exc} (--skip_bad_images skips such files)") from None
    pixels = None
    try:  # YCbCr and greyscale JPEGs; CMYK ones (converted otherwise than PIL does) and other files go to PIL
        if simplejpeg.is_jpeg(data) and simplejpeg.decode_jpeg_header(data)[2] in TURBO_COLORSPACES:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        pass
    if pixels is None:  # PIL, as the reference reads every file
        image = load_rgb(path)
        return np.asarray(image) if array else image
    return pixels if array else Image.fromarray(pixels)


def image_loader_for(decoder="pil"):
    """The file loader of --decoder (picklable, for DataLoader workers): pil gives PIL images (the reference);
    turbo gives the decoded H x W x 3 uint8 arrays themselves, which its transforms (the turbo and fast pipelines
    of datasets/transforms.py) take without a PIL image around the whole picture."""
    if decoder not in DECODERS:
        raise UserError(f"unknown --decoder {decoder}: choose one of {', '.join(DECODERS)}")
    if decoder == "pil":
        return load_rgb
    require_simplejpeg("--decoder turbo")
    return functools.partial(load_rgb_turbo, array=True)


def build_image_folder(split_dir, dataset_label, hint, transform=None, loader=load_rgb):
    if not os.path.isdir(split_dir):
        raise UserError(f"{dataset_label}: folder {split_dir} not found. {hint}")
    try:
        return torchvision.datasets.ImageFolder(split_dir, transform=transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{dataset_label}: {split_dir} has no usable class folders ({exc}). {hint}") from None


IMAGENET_HINT = ("Expected layout: <data_path>/imagenet/{train,val}/<wnid>/*.JPEG (ImageNet needs your own "
                 "download from https://www.image-net.org; `python tools/prepare_data.py imagenet` checks it).")
INAT_HINT = ("Expected layout: <data_path>/inaturalist18/{train2018.json,val2018.json,train_val2018/}; "
             "get them from https://ml-inat-competition-datasets.s3.amazonaws.com/2018/ "
             "(`python tools/prepare_data.py inat` extracts and checks them).")


def _read_json(path):
    if not os.path.isfile(path):
        raise UserError(f"iNaturalist18: {path} not found. {INAT_HINT}")
    try:
        with open(path) as f:
            data = json.load(f)
        data["images"], data["annotations"], data["categories"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"iNaturalist18: {path} is not a COCO-style annotation file with images, annotations "
                        f"and categories ({type(exc).__name__}: {exc})") from None
    return data


class INaturalist18(torchvision.datasets.VisionDataset):
    """iNat18 from its COCO-style JSON: label = the image's category, indexed 0..C-1 in sorted category-id
    order of the training file's `categories`, so train and val share one mapping."""

    def __init__(self, root, split, transform=None, loader=load_rgb):
        super().__init__(root, transform=transform)
        self.loader = loader
        categories = _read_json(os.path.join(root, "train2018.json"))["categories"]
        data = _read_json(os.path.join(root, f"{'train' if split == 'train' else 'val'}2018.json"))
        self.class_to_idx = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
        category_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        self.samples = []
        for image in data["images"]:
            if image["id"] not in category_of:
                raise UserError(f"iNaturalist18: image {image['file_name']} has no annotation in {split} JSON")
            category = category_of[image["id"]]
            if category not in self.class_to_idx:
                raise UserError(f"iNaturalist18: category {category} of {image['file_name']} is not among the "
                                f"categories of train2018.json")
            self.samples.append((os.path.join(root, image["file_name"]), self.class_to_idx[category]))
        self.targets = [label for _, label in self.samples]
        if not self.samples:
            raise UserError(f"iNaturalist18: the {split} JSON lists no images")
        first = self.samples[0][0]
        if not os.path.isfile(first):
            raise UserError(f"iNaturalist18: image {first} listed in the JSON is missing. {INAT_HINT}")

    @property
    def classes(self):
        return list(self.class_to_idx)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label
