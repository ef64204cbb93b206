"""Tiny datasets and checkpoints in the real on-disk formats, generated for the tests, the benchmark and the demo
(a library module: tools import it, never tests/)."""
import json
import os
import pickle

import numpy as np
import torch
import torchvision
from PIL import Image

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


def make_imagenet(data_path, num_classes=4, n_train=8, n_val=3, size=40, seed=0):
    """data_path/imagenet/{train,val}/<wnid>/*.JPEG"""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(num_classes):
            for i in range(n):
                write_jpeg(os.path.join(data_path, "imagenet", split, f"n{c:08d}", f"img_{c}_{i}.JPEG"), c, rng, size)
    return os.path.join(data_path, "imagenet")


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

