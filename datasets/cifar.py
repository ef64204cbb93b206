"""CIFAR10/100 through torchvision, with a structural check instead of the release's md5 sums."""
import os
import pickle

import numpy as np
import torchvision

from util.misc import UserError

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
FILES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
         "cifar100": {"train": ["train"], "test": ["test"]}}
META = {"cifar10": "batches.meta", "cifar100": "meta"}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}


def cifar_root(data_path, name):
    """ROOT/cifar/ (the README layout), or torchvision's folder directly under ROOT."""
    for root in (os.path.join(data_path, "cifar"), data_path):
        if os.path.isdir(os.path.join(root, FOLDERS[name])):
            return root
    return os.path.join(data_path, "cifar")


def check_cifar_files(root, name):
    """Every batch file exists and unpickles to uint8 images (N x 3072) with N labels in range."""
    num_classes = 10 if name == "cifar10" else 100
    for split in ("train", "test"):
        for filename in FILES[name][split]:
            path = os.path.join(root, FOLDERS[name], filename)
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")  # the release is a Python 2 pickle
                data, labels = np.asarray(batch["data"]), np.asarray(batch[LABEL_KEYS[name]])
            except FileNotFoundError:
                raise UserError(f"{name}: missing {path}; delete {os.path.join(root, FOLDERS[name])} and rerun "
                                f"with --download, or run `python tools/prepare_data.py cifar`") from None
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise UserError(f"{name}: {path} is not a valid CIFAR batch ({type(exc).__name__}); "
                                f"delete it and download again") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or \
                    (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
                raise UserError(f"{name}: {path} is not a valid CIFAR batch (data {data.shape}, "
                                f"{len(labels)} labels); delete it and download again")


def _present(root, name):
    files = [f for split in FILES[name].values() for f in split] + [META[name]]
    return all(os.path.isfile(os.path.join(root, FOLDERS[name], f)) for f in files)


def _without_md5(entries):
    return [[filename, None] for filename, _ in entries]


# Files that exist are trusted once check_cifar_files has validated their structure (re-encoded copies differ
# from the release byte for byte): torchvision checks only presence when an md5 sum is None.
class CheckedCIFAR10(torchvision.datasets.CIFAR10):
    train_list = _without_md5(torchvision.datasets.CIFAR10.train_list)
    test_list = _without_md5(torchvision.datasets.CIFAR10.test_list)
    meta = dict(torchvision.datasets.CIFAR10.meta, md5=None)


class CheckedCIFAR100(torchvision.datasets.CIFAR100):
    train_list = _without_md5(torchvision.datasets.CIFAR100.train_list)
    test_list = _without_md5(torchvision.datasets.CIFAR100.test_list)
    meta = dict(torchvision.datasets.CIFAR100.meta, md5=None)


def build_cifar(name, data_path, train, transform, download):
    base = CheckedCIFAR10 if name == "cifar10" else CheckedCIFAR100
    root = cifar_root(data_path, name)
    if not _present(root, name):
        if not download:
            raise UserError(f"{name} not found under {root}: rerun with --download, or run "
                            f"`python tools/prepare_data.py cifar`")
        os.makedirs(root, exist_ok=True)
        try:
            base.__base__(root=root, train=True, download=True)
        except Exception as exc:
            raise UserError(f"{name} not found under {root} and the download failed ({exc}); "
                            f"fetch it from https://www.cs.toronto.edu/~kriz/cifar.html into {root}") from None
    check_cifar_files(root, name)
    return base(root=root, train=train, transform=transform, download=False)
