"""CIFAR10/100 through torchvision, with a structural check instead of the release's md5 sums, and the
reference's fixed order of the `_{p}perc` training subsets."""
import functools
import hashlib
import os
import pickle

import numpy as np
import torchvision

from util.cli import UserError

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
FILES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
         "cifar100": {"train": ["train"], "test": ["test"]}}
META = {"cifar10": "batches.meta", "cifar100": "meta"}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
# The original code's fixed permutation of the 50,000 CIFAR training indices (hard-coded there; the same for
# CIFAR10 and CIFAR100): `cifar{10,100}_{p}perc` is its first int(50000 * p / 100) indices. The file is a copy,
# one index per line, of the fixed permutation the original release's CIFAR loader reads (its subset order
# file, facebookresearch/richreps-timecat); its sha256 is checked on every load.
ORDER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar_subset_order.txt")
ORDER_SHA256 = "62449412dbc0784f0dc5ba9515f8d17a3e2caa52d72c407728a1f6ee3cef3c19"
CIFAR_TRAIN_SIZE = 50000


@functools.lru_cache(maxsize=1)
def reference_order():
    """The reference's permutation of 0..49999, checked against its sha256."""
    with open(ORDER_FILE, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != ORDER_SHA256:
        raise UserError(f"{ORDER_FILE} is damaged (sha256 mismatch): restore it with `git checkout -- {ORDER_FILE}`")
    order = [int(line) for line in raw.split()]
    if sorted(order) != list(range(CIFAR_TRAIN_SIZE)):
        raise UserError(f"{ORDER_FILE} is not a permutation of 0..{CIFAR_TRAIN_SIZE - 1}")
    return order


def percent_subset(length, percent):
    """Training indices of `cifar*_{percent}perc`: the first int(50000 * percent / 100) of the reference order,
    in that order, exactly the reference's subset. A training set of another size (a generated test set, a
    variant) keeps the order's indices below its size, in the same order, and the first int(length * percent /
    100) of them: the reference's rule when length is 50,000."""
    order = reference_order() if length == CIFAR_TRAIN_SIZE else [i for i in reference_order() if i < length]
    count = int(length * percent / 100)
    if count < 1:
        raise UserError(f"{percent}% of {length} training images keeps none: raise the percentage")
    return order[:count]


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
        if not os.path.isdir(data_path):  # a typo in --data_path must not fill a new folder with a download
            raise UserError(f"--data_path {data_path} does not exist; {name} is expected under "
                            f"{os.path.join(data_path, 'cifar')}: create the folder to let the run download it "
                            f"there, or run `python tools/prepare_data.py cifar`")
        os.makedirs(root, exist_ok=True)
        try:
            base.__base__(root=root, train=True, download=True)
        except Exception as exc:
            raise UserError(f"{name} not found under {root} and the download failed ({exc}); "
                            f"fetch it from https://www.cs.toronto.edu/~kriz/cifar.html into {root}") from None
    check_cifar_files(root, name)
    return base(root=root, train=train, transform=transform, download=False)
