"""Tiny datasets and checkpoints in the real on-disk formats, generated for the tests, the benchmark and the demo
(a library module: tools import it, never tests/)."""
import json
import os
import pickle

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from datasets.eval_sets import EVAL_SETS, IMAGENET_WNIDS, release_wnids

PALETTE = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40], [220, 40, 220],
                    [40, 220, 220], [250, 140, 20], [120, 60, 200], [30, 30, 30], [240, 240, 240]])


def class_image(label, rng, size=32, noise=25):
    """An image whose mean colour tells its class, plus noise: learnable by a probe in a few steps."""
    base = PALETTE[label % len(PALETTE)] * (0.6 + 0.4 * ((label // len(PALETTE)) % 2))
    noise = rng.normal(0, noise, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_cifar(data_path, name="cifar10", n_train=200, n_test=60, seed=0, noise=25):
    """torchvision's CIFAR folder under data_path/cifar/, with n_train / n_test images."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    folder = os.path.join(data_path, "cifar", "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n):
        labels = [i % num_classes for i in range(n)]
        data = np.stack([class_image(y, rng, noise=noise).transpose(2, 0, 1).reshape(-1) for y in labels])
        out = {"data": data, label_key: labels, "filenames": ["x.png"] * n}
        if name == "cifar100":
            out["coarse_labels"] = [y // 5 for y in labels]
        return out

    def dump(obj, filename):
        with open(os.path.join(folder, filename), "wb") as f:
            pickle.dump(obj, f)

    if name == "cifar10":
        for i in range(5):
            dump(batch(n_train // 5), f"data_batch_{i + 1}")
        dump(batch(n_test), "test_batch")
        dump({"label_names": [f"c{i}" for i in range(10)]}, "batches.meta")
    else:
        dump(batch(n_train), "train")
        dump(batch(n_test), "test")
        dump({"fine_label_names": [f"c{i}" for i in range(100)],
              "coarse_label_names": [f"s{i}" for i in range(20)]}, "meta")
    return folder


def write_jpeg(path, label, rng, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(class_image(label, rng, size)).save(path, quality=90)


def _upsample(array, width, height, resample):
    """An H x W x C float32 array resized channel by channel (PIL's float mode)."""
    return np.stack([np.asarray(Image.fromarray(array[..., c], mode="F").resize((width, height), resample))
                     for c in range(array.shape[-1])], -1)


def natural_image(label, rng, width, height):
    """A photo-like RGB image: smooth colour gradients tinted by the class, a few sharp-edged shapes, and
    luminance-heavy noise at 1-32 px scales whose strength varies over the image (smooth and textured areas), so
    a JPEG of it costs what a photo of the same size costs to decode (ImageNet-like bytes per pixel at quality 90)."""
    tint = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], np.float32)
    base = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32) * 0.5 + 0.5 * tint
    pic = Image.fromarray(_upsample(base, width, height, Image.BICUBIC).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for _ in range(rng.integers(2, 7)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(10, width // 2 + 11), y0 + rng.integers(10, height // 2 + 11)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = np.asarray(pic, dtype=np.float32).copy()
    strength = _upsample(rng.uniform(0, 1, (3, 3, 1)).astype(np.float32), width, height, Image.BICUBIC) ** 2 * 2.2
    for scale, amplitude in ((1, 80), (2, 38), (4, 14), (8, 10), (32, 14)):
        h, w = -(-height // scale), -(-width // scale)
        noise = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
        noise = 1.45 * noise.mean(-1, keepdims=True) + 0.15 * noise  # mostly luminance, as in photos
        if scale > 1:
            noise = _upsample(noise, w * scale, h * scale, Image.BILINEAR)
        img += amplitude * noise[:height, :width] * (strength if scale < 8 else 1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ImageNet-like image sizes: widths around 400 px (log-normal), the common aspect ratios, landscape and portrait
ASPECTS, ASPECT_SHARES = (4 / 3, 3 / 2, 1.0, 5 / 4, 3 / 4, 2 / 3), (0.4, 0.15, 0.15, 0.1, 0.12, 0.08)


def imagenet_like_size(rng):
    width = int(np.clip(rng.lognormal(np.log(400), 0.25), 100, 1600))
    return width, int(np.clip(width / rng.choice(ASPECTS, p=ASPECT_SHARES), 80, 1600))


def make_jpeg_folder(root, n_images, num_classes=10, seed=0, quality=90):
    """root/{train,val}/c{k}/*.JPEG: n_images ImageNet-like JPEGs (natural_image, imagenet_like_size, quality 90,
    PIL's default 4:2:0 chroma subsampling), 4/5 in train and 1/5 in val; returns the list of file paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_images):
        label = i % num_classes
        split = "val" if (i // num_classes) % 5 == 4 else "train"  # every class in both splits
        path = os.path.join(root, split, f"c{label:03d}", f"img{i:06d}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        natural_image(label, rng, *imagenet_like_size(rng)).save(path, quality=quality)
        paths.append(path)
    return paths


def make_imagenet(data_path, num_classes=4, n_train=8, n_val=3, size=40, wnids=None):
    """data_path/imagenet/{train,val}/<wnid>/*.JPEG; wnids: real class names (sorted: class k is wnids[k]), else
    n00000000, n00000001, ..."""
    rng = np.random.default_rng(0)  # the same images every time
    wnids = sorted(wnids) if wnids else [f"n{c:08d}" for c in range(num_classes)]
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(wnids):
            for i in range(n):
                write_jpeg(os.path.join(data_path, "imagenet", split, wnid, f"img_{c}_{i}.JPEG"), c, rng, size)
    return os.path.join(data_path, "imagenet")


def make_eval_sets(data_path, wnids, per_class=2, size=40, seed=1, names=None):
    """The evaluation-only sets of datasets/eval_sets.py in their releases' layouts under data_path, per_class JPEGs
    of each of `wnids` (ImageNet wnids; class colour: the wnid's position in sorted(wnids), as make_imagenet's) that
    the release has: ImageNet-v2 folders named by ImageNet class index (<hash>.jpeg), Sketch by wnid (*.JPEG), R and
    A by wnid (*.jpg), only their 200 classes. Returns {name: [(path, wnid)]}."""
    rng = np.random.default_rng(seed)
    colour = {w: k for k, w in enumerate(sorted(wnids))}
    written = {}
    for name in names or EVAL_SETS:
        spec = EVAL_SETS[name]
        release = set(release_wnids(spec))
        ext = {"imagenet_v2": ".jpeg", "imagenet_sketch": ".JPEG"}.get(name, ".jpg")
        written[name] = []
        for wnid in sorted(w for w in wnids if w in release):
            folder = str(IMAGENET_WNIDS.index(wnid)) if spec.by_index else wnid
            for i in range(per_class):
                stem = f"{rng.integers(1 << 40):010x}" if spec.by_index else f"{name}_{i}"
                path = os.path.join(data_path, spec.folder, folder, stem + ext)
                write_jpeg(path, colour[wnid], rng, size)
                written[name].append((path, wnid))
    return written


def make_inat(data_path, category_ids=(7477, 12, 300, 8000), n_train=6, n_val=2, size=40, seed=0):
    """data_path/inaturalist18/{train2018.json,val2018.json,train_val2018/...} in the COCO style of iNat18."""
    rng = np.random.default_rng(seed)
    root = os.path.join(data_path, "inaturalist18")
    categories = [{"id": c, "name": f"species {c}", "supercategory": "Plantae"} for c in category_ids]
    image_id = 0
    for split, n in (("train", n_train), ("val", n_val)):
        images, annotations = [], []
        for label, category in enumerate(sorted(category_ids)):
            for i in range(n):
                file_name = f"train_val2018/Plantae/{category}/{split}_{i}_{image_id:05d}.jpg"
                write_jpeg(os.path.join(root, file_name), label, rng, size)
                images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": category})
                image_id += 1
        with open(os.path.join(root, f"{split}2018.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories,
                       "info": {}, "licenses": []}, f)
    return root


def algoperf_keys(state_dict):
    """torchvision ResNet keys -> AlgoPerf's (DDP + torch.compile prefix, downsample.conv / downsample.bn)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.bn.")
        out[f"_orig_mod.module.{key}"] = value
    return out


def make_checkpoint(path, arch="resnet18", fmt="raw", seed=0, num_classes=1000):
    """A randomly initialised torchvision backbone saved in one of the formats users bring.
    Returns the torchvision state_dict that was saved (with fc)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BN statistics, so a test can see them survive loading
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    if fmt == "raw":
        obj = state
    elif fmt == "state_dict":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif fmt == "model":
        obj = {"model": state, "args": None}
    elif fmt == "algoperf":
        obj = {"model_params": algoperf_keys(state), "optimizer_state": {"state": {}, "param_groups": []},
               "model_state": None, "train_state": {"validation_goal_reached": False, "accumulated_time": 1.0},
               "eval_results": [({"validation/accuracy": np.float64(0.5)}, 100)], "global_step": 80000,
               "preemption_count": 0}
    elif fmt == "model0":
        obj = {"state_dict": {f"module.model0.{k}": v for k, v in state.items()}}
    elif fmt == "backbone":
        obj = {"model": {f"backbone.{k}": v for k, v in state.items()}}
    else:
        raise ValueError(fmt)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path)
    return state

