"""Issue 19: the probe reads the same images in the same order as the original code, and catches the slips that
left the rest of the suite green. Expected values are computed here from the order file and the original's
documented rules (REFERENCE.md, "Exact details of the original code"), never from the code under test."""
import logging
import os

import numpy as np
import pytest
import torch

import datasets
import main_linear_probe as probe
from datasets.cifar import ORDER_FILE
from util.distributed import DistInfo

REFERENCE_SAMPLER_SEED = 53970  # numpy.random.seed(31); numpy.random.randint(99999): the original's sampler seed


def read_order_file():
    with open(ORDER_FILE) as f:
        return [int(line) for line in f if line.strip()]


def original_first_batch(n_images, percent, data_rate, batch, epoch=0, seed=31):
    """The image indices of the original's first training batch, from its documented composition:
    Subset(train, order[:int(50000 * p / 100)]), then --data_rate's default_rng(seed + 12345) shuffle of that set,
    then DistributedSampler(seed=s) (one process) with set_epoch(epoch)."""
    order = read_order_file()
    assert n_images == 50000 and sorted(order) == list(range(50000))
    train = order[:int(50000 * percent / 100)]
    if data_rate < 1:
        idx = np.arange(len(train))
        np.random.default_rng(seed + 12345).shuffle(idx)
        train = [train[i] for i in idx[:int(len(train) * data_rate)]]
    np.random.seed(seed)
    sampler_seed = np.random.randint(99999)
    assert sampler_seed == REFERENCE_SAMPLER_SEED
    sampler = torch.utils.data.DistributedSampler(range(len(train)), num_replicas=1, rank=0, seed=sampler_seed)
    sampler.set_epoch(epoch)
    return [train[i] for i in list(sampler)[:batch]]


class FakeCIFAR(torch.utils.data.Dataset):
    """A CIFAR training set of 50,000 items whose item i is (i, label): the image index itself."""

    def __init__(self, n=50000):
        self.targets = [i % 10 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return i, self.targets[i]


def raw_index(dataset, position):
    """The index in the raw training set of `position` in a stack of Subset/WithTransform wrappers."""
    while not isinstance(dataset, FakeCIFAR):
        if isinstance(dataset, torch.utils.data.Subset):
            position = dataset.indices[position]
        dataset = dataset.dataset
    return position


def probe_first_batch(tmp_path, monkeypatch, argv, epoch=0):
    """The raw image indices of the first training batch the probe itself builds (its build_probe_data: the
    splits and the training sampler the loaders and the feature cache read)."""
    monkeypatch.setattr(datasets, "build_cifar", lambda name, path, train, transform, download: FakeCIFAR())
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    args = probe.get_args_parser().parse_args(["--arch", "resnet50", "--pretrained", str(ckpt), "--dump_path",
                                               str(tmp_path / "run"), *argv])
    probe.check_args(args)
    probe.resolve_batch(args, 1)
    run = type("Run", (), {"args": args, "dist": DistInfo(), "logger": logging.getLogger("test_fidelity")})()
    data = probe.build_probe_data(run)
    data.train_sampler.set_epoch(epoch)
    positions = list(data.train_sampler)[:args.batch_size]
    return [raw_index(data.splits.train_aug, p) for p in positions], data


@pytest.mark.parametrize("data_name,percent,rate", [("cifar10", 100, 1.0), ("cifar10", 100, 0.1),
                                                    ("cifar100_10perc", 10, 1.0), ("cifar10_20perc", 20, 0.5)])
def test_first_cifar_batch_holds_the_originals_images(tmp_path, monkeypatch, data_name, percent, rate):
    """Full CIFAR too is read through the fixed order, --data_rate acts on that permuted set, and the sampler the
    probe builds is DistributedSampler(seed=53970): the same 256 images as the original's first batch."""
    argv = ["--data_name", data_name] + (["--data_rate", str(rate)] if rate < 1 else [])
    ours, data = probe_first_batch(tmp_path, monkeypatch, argv)
    assert data.train_sampler.inner.seed == REFERENCE_SAMPLER_SEED
    assert len(ours) == 256 and ours == original_first_batch(50000, percent, rate, 256)
    ours_epoch3, _ = probe_first_batch(tmp_path, monkeypatch, argv, epoch=3)
    assert ours_epoch3 == original_first_batch(50000, percent, rate, 256, epoch=3) != ours


def test_inat_data_rate_is_refused_in_one_line(tmp_path):
    """The original's iNat18 loader ignores --data_rate; here it is refused rather than applied silently."""
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    args = probe.get_args_parser().parse_args(["--arch", "resnet50", "--pretrained", str(ckpt), "--data_name",
                                               "inaturalist18", "--data_rate", "0.5"])
    with pytest.raises(probe.UserError, match="ignores --data_rate"):
        probe.check_args(args)


def test_cached_training_features_follow_the_fixed_order(tmp_path):
    """The feature cache's training entry holds the images in the probe's (fixed) order: its labels equal the
    generated set's labels read through the order file; a full-CIFAR key differs from the raw-order key of old."""
    from feature_cache import entry_key
    from helpers import make_checkpoint, make_cifar
    data, cache = str(tmp_path / "data"), tmp_path / "cache"
    make_cifar(data, "cifar10", n_train=60, n_test=20)
    make_checkpoint(str(tmp_path / "a.pth"), "resnet18", "raw", seed=0)
    argv = ["--arch", "resnet18", "--pretrained", str(tmp_path / "a.pth"), "--data_path", data, "--dump_path",
            str(tmp_path / "run"), "--img_size", "16", "--workers", "0", "--batch_size", "20", "--epochs", "1",
            "--feature_cache", str(cache)]
    probe.main(probe.get_args_parser().parse_args(argv))
    from datasets.cifar import build_cifar
    raw_labels = build_cifar("cifar10", data, True, None, False).targets
    expected = [raw_labels[i] for i in read_order_file() if i < 60]
    label_files = sorted(cache.rglob("labels.npy"), key=lambda p: -len(np.load(p)))
    assert np.load(label_files[0]).tolist() == expected  # the 60-image training entry (the test one has 20)
    args = probe.get_args_parser().parse_args(argv)
    probe.check_args(args)
    args.precision = "fp32"
    assert entry_key(args, "train", -1, 60)["subset"]["order"] == "cifar_subset_order"
    assert os.path.isdir(cache)


# ---------------------------------------------------------------- pretraining: TF32 and the SGD recipe
def test_pretraining_leaves_tf32_matmuls_at_pytorchs_default_unless_asked():
    """AlgoPerf sets only cudnn.benchmark: fp32 matrix products stay full fp32 unless --tf32."""
    import main_pretrain as pretrain
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for argv, tf32 in (([], False), (["--tf32"], True)):
            args = pretrain.get_args_parser().parse_args(argv)
            pretrain.configure_cuda_numerics(args)
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.benchmark is True
            assert torch.backends.cudnn.allow_tf32 == saved[3]  # cuDNN's TF32 left at PyTorch's default
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32) = saved


def test_sgd_pretraining_defaults_to_the_predecessors_recipe():
    """90 epochs at batch 256, lr 0.1, momentum 0.9, wd 1e-4, x0.1 at epochs 30 and 60 (arXiv 2212.07346)."""
    import engine_pretrain
    import main_pretrain as pretrain
    args = pretrain.get_args_parser().parse_args(["--optimizer", "sgd"])
    pretrain.check_args(args)
    assert (args.global_batch, args.lr, args.momentum, args.wd, args.decay_epochs, args.gamma) == \
        (256, 0.1, 0.9, 1e-4, [30, 60], 0.1)
    assert (args.warmup_steps, args.label_smoothing, args.save_steps, args.steps) == (0, 0.0, [], None)
    pretrain.resolve_epoch_steps(args, 1281167, logging.getLogger("test_fidelity"))
    per_epoch = 1281167 // 256
    assert args.steps == 90 * per_epoch == 450360
    lrs = [engine_pretrain.lr_at_step(s, args, per_epoch) for s in (0, 30 * per_epoch - 1, 30 * per_epoch,
                                                                     60 * per_epoch, args.steps - 1)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    assert "2212.07346" in pretrain.get_args_parser().format_help()
    sf = pretrain.get_args_parser().parse_args([])  # schedule-free AdamW keeps its own reference budget
    pretrain.check_args(sf)
    assert (sf.global_batch, sf.steps, sf.save_steps) == (1024, 450000, [80000, 100000, 200000])


def test_sgd_pretraining_without_steps_runs_its_epochs(tmp_path, monkeypatch):
    """The run counts its training set and trains SGD_EPOCHS epochs (2 here, to stay quick)."""
    import main_pretrain as pretrain
    from helpers import make_imagenet
    make_imagenet(str(tmp_path / "data"), num_classes=2, n_train=4, n_val=2)
    monkeypatch.setattr(pretrain, "SGD_EPOCHS", 2)
    args = pretrain.get_args_parser().parse_args(
        ["--optimizer", "sgd", "--arch", "resnet18", "--img_size", "16", "--global_batch", "4", "--workers", "0",
         "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "ckpt"), "--dump_path",
         str(tmp_path / "run"), "--bn_refresh_batches", "1", "--eval_every", "0", "--print_freq", "1"])
    pretrain.main(args)
    log = (tmp_path / "run" / "train.log").read_text()
    n_train = len([f for _, _, files in os.walk(tmp_path / "data" / "imagenet" / "train") for f in files])
    assert args.steps == 2 * (n_train // 4) and f"Step: [{args.steps}/{args.steps}]" in log
    assert f"2 epochs of {n_train} images at batch 4 = {args.steps} steps" in log
