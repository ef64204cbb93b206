"""Issue 19: the probe reads the same images in the same order as the original code, and catches the slips that
left the rest of the suite green. Expected values are computed here from the order file and the original's
rules (the original release's code, facebookresearch/richreps-timecat), never from the code under test."""
import logging
import os

import numpy as np
import pytest
import torch

import datasets
import main_linear_probe as probe
from arguments.linear_probe import resolve_batch
from datasets.cifar import ORDER_FILE
from helpers import check_probe_args
from models import heads as probe_heads
from probe_setup import build_probe_data, build_probe_model
from util.cli import UserError
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
    check_probe_args(args)
    resolve_batch(args, 1)
    data = build_probe_data(args, DistInfo(), logging.getLogger("test_fidelity"))
    data.train_sampler.set_epoch(epoch)
    positions = list(data.train_sampler)[:args.batch_size]
    return [raw_index(data.train_aug, p) for p in positions], data


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
    with pytest.raises(UserError, match="ignores --data_rate"):
        check_probe_args(args)


def test_cached_training_features_follow_the_fixed_order(tmp_path):
    """The feature cache's training entry holds the images in the probe's (fixed) order: its labels equal the
    generated set's labels read through the order file; a full-CIFAR key differs from the raw-order key of old."""
    from feature_cache import cache_inputs, entry_key
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
    check_probe_args(args)
    args.precision = "fp32"
    key = entry_key(cache_inputs(args), args.arch[0], args.pretrained[0], "train", -1, 60)
    assert key["subset"]["order"] == "cifar_subset_order"
    assert os.path.isdir(cache)


# ---------------------------------------------------------------- pretraining: TF32 and the SGD recipe
def test_pretraining_leaves_tf32_matmuls_at_pytorchs_default_unless_asked():
    """AlgoPerf sets only cudnn.benchmark: fp32 matrix products stay full fp32 unless --tf32."""
    import main_pretrain as pretrain
    from util.run import configure_cuda_numerics
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for argv, tf32 in (([], False), (["--tf32"], True)):
            args = pretrain.get_args_parser().parse_args(argv)
            configure_cuda_numerics(torch.device("cuda"), args.cuda_deterministic, args.tf32)  # what a GPU run sets
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.benchmark is True
            assert torch.backends.cudnn.allow_tf32 == saved[3]  # cuDNN's TF32 left at PyTorch's default
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32) = saved


def test_sgd_pretraining_defaults_to_the_predecessors_recipe():
    """90 epochs at batch 256, lr 0.1, momentum 0.9, wd 1e-4, x0.1 at epochs 30 and 60 (arXiv 2212.07346)."""
    import engine_pretrain
    from arguments import pretrain
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
    from arguments import pretrain as pretrain_flags
    from helpers import make_imagenet
    make_imagenet(str(tmp_path / "data"), num_classes=2, n_train=4, n_val=2)
    monkeypatch.setattr(pretrain_flags, "SGD_EPOCHS", 2)  # read by resolve_epoch_steps, beside the parser
    args = pretrain.get_args_parser().parse_args(
        ["--optimizer", "sgd", "--arch", "resnet18", "--img_size", "16", "--global_batch", "4", "--workers", "0",
         "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "ckpt"), "--dump_path",
         str(tmp_path / "run"), "--bn_refresh_batches", "1", "--eval_every", "0", "--print_freq", "1"])
    pretrain.main(args)
    log = (tmp_path / "run" / "train.log").read_text()
    n_train = len([f for _, _, files in os.walk(tmp_path / "data" / "imagenet" / "train") for f in files])
    assert args.steps == 2 * (n_train // 4) and f"Step: [{args.steps}/{args.steps}]" in log
    assert f"2 epochs of {n_train} images at batch 4 = {args.steps} steps" in log


# ---------------------------------------------------------------- acc1: the original's output
def write_log(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_acc1_prints_what_the_originals_scripts_print(tmp_path):
    """`filtering for: , p1, p2`, then per probe run its log's path, its last Epoch[k] with k >= 1 (the original's
    logs end with Epoch[0] validation lines) and its result line; pretraining logs are never listed."""
    import re
    import shutil
    import subprocess

    from helpers import ROOT
    home = tmp_path / "home"
    for script in ("top1acc_final.sh", "top1acc_sofar.sh", "tools/acc1.sh"):
        (home / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, script), home / script)
    prefix = "INFO - 12/03/26 07:00:00 - 0:00:01 - "
    finished = write_log(home / "results/supervised/imagenet/transfer/lineareval/cifar10_1e-2/resnet50_sfadamw_cat2"
                         / "train.log",
                         f"{prefix}Epoch[26] - Iter: [0/196]\tTime 1\n{prefix}Epoch[27] - Iter: [0/196]\tTime 1\n"
                         f"{prefix}Epoch[0] - Iter: [0/40]\tTime 0.1\n"
                         f"{prefix}Test:\tLoss 0.3000\tAcc@1 91.000\tBest Acc@1 so far 91.20\n"
                         f"{prefix}Training of the supervised linear classifier on frozen features completed.\n"
                         f"{' ' * len(prefix)}Top-1 test accuracy: 91.2\n")
    running = write_log(home / "results/probe/cifar10/supervisedimagenet_resnet50_sfadamw_2_step200k/wd0.01-abc"
                        / "train.log", f"{prefix}Epoch[0] - Iter: [0/196]\n{prefix}Epoch[3] - Iter: [50/196]\n"
                        f"{prefix}Test:\tLoss 0.4000\tAcc@1 88.000\tBest Acc@1 so far 88.00\n")
    write_log(home / "results/pretrain/resnet50_sfadamw/run0/train.log",
              f"{prefix}Epoch[5] - Step: [1/2] Loss 1\n{prefix}Top-1 test accuracy: 12.3\n")
    for script in ("top1acc_final.sh", "top1acc_sofar.sh"):
        out = subprocess.run(["./" + script, "cifar10", "cat2|2_step"], cwd=home, capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]})
        assert out.returncode == 0, out.stderr
        wanted = r"Top-1 test accuracy: [0-9]+\.[0-9]+" if "final" in script else r"Best Acc@1 so far [0-9]+\.[0-9]+"
        # a pattern is a grep basic regular expression, as the original's: '|' is literal, no path holds it
        assert out.stdout.splitlines() == ["filtering for: , cifar10, cat2|2_step"]
        out = subprocess.run(["./" + script, "cifar10", "s.*_cat2\\|2_step"], cwd=home, capture_output=True,
                             text=True, env={"PATH": os.environ["PATH"]})
        expected = ["filtering for: , cifar10, s.*_cat2\\|2_step"]
        logs = [line for line in out.stdout.splitlines() if line.endswith("train.log")]
        assert sorted(logs) == sorted("./" + str(log.relative_to(home)) for log in (finished, running))
        for log in logs:
            text = (home / log).read_text()
            expected += [log, re.findall(r"Epoch\[[1-9][0-9]*\]", text)[-1]]
            expected += re.findall(wanted, text)[-1:]
        assert out.stdout.splitlines() == expected
    assert "Epoch[27]" in out.stdout and "Epoch[0]" not in out.stdout and "pretrain" not in out.stdout


# ---------------------------------------------------------------- slips in the protocol's core (issue 19, item 9)
def probe_args(tmp_path, *argv):
    args = probe.get_args_parser().parse_args([*argv, "--dump_path", str(tmp_path / "run")])
    check_probe_args(args)
    resolve_batch(args, 1)
    args.precision = "fp32"
    return args


def test_concatenated_features_start_with_the_first_backbones_own_output(tmp_path):
    """Backbones of different widths (resnet18: 512, resnet50: 2048) in the order given: the first 512 columns of
    the encoder the probe builds are resnet18's own pooled features, the next 2048 resnet50's."""
    import torchvision

    from helpers import make_checkpoint
    states = {}
    for arch in ("resnet18", "resnet50"):
        states[arch] = make_checkpoint(str(tmp_path / f"{arch}.pth"), arch, "raw", seed=len(arch))
    args = probe_args(tmp_path, "--arch", "resnet18", "resnet50", "--pretrained", str(tmp_path / "resnet18.pth"),
                      str(tmp_path / "resnet50.pth"))
    encoder = build_probe_model(args, DistInfo(), probe_heads.head_records(args), 10,
                                logging.getLogger("test_fidelity")).encoder
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(images)
        own = []
        for arch in ("resnet18", "resnet50"):
            net = getattr(torchvision.models, arch)(weights=None)
            net.load_state_dict(states[arch])
            net.fc = torch.nn.Identity()
            own.append(net.eval()(images))
    assert features.shape == (3, 512 + 2048)
    torch.testing.assert_close(features[:, :512], own[0], rtol=1e-3, atol=1e-3)  # channels_last: other summation order
    torch.testing.assert_close(features[:, 512:], own[1], rtol=1e-3, atol=1e-3)  # channels_last: other summation order


def one_hot_batches(predicted, labels, batch_size):
    """A CachedBatches of 'features' that are logits: one-hot on `predicted` (10 classes), in sequential order."""
    from torch.utils.data import BatchSampler

    from engine import CachedBatches, shard
    features = torch.nn.functional.one_hot(torch.tensor(predicted), 10).float()
    return CachedBatches([features], torch.tensor(labels), BatchSampler(shard(len(labels), 0, 1), batch_size, False),
                         torch.device("cpu"))


def test_test_top1_counts_readable_images_only():
    """--skip_bad_images: 10 test images, 2 unreadable (label -1 in the cache); 6 of the 8 readable are right:
    top-1 75%, not 60%."""
    from engine import evaluate
    predicted = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    labels = [0, 1, 2, 3, 4, 5, 9, 9, -1, -1]
    stats = evaluate(lambda x: [x], one_hot_batches(predicted, labels, 4), "fp32", 10, num_heads=1)[0]
    assert stats["skipped"] == 2 and stats["top1"] == 75.0


def test_training_top1_is_per_sample_over_unequal_batches():
    """Batches of 4 and 2 samples: 1 of 4 right, then 2 of 2: the epoch's top-1 is 3/6 = 50%, not the mean of the
    batches' 25% and 100% (62.5%). lr 0 keeps the predictions fixed while the real loop runs."""
    from engine import LoopLog, train_one_epoch
    head = torch.nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(10))
    model = type("Heads", (torch.nn.Module,), {"forward": lambda self, x: [head(x)]})()
    model.head = head
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": 0.0, "head": 0}], lr=0.0)
    batches = one_hot_batches([0, 1, 2, 3, 4, 5], [0, 9, 9, 9, 4, 5], 4)
    train, completed = train_one_epoch(model, batches, optimizer, 0,
                                       LoopLog((logging.getLogger("test_fidelity"),), print_freq=50))
    assert completed and len(batches) == 2 and [head["top1"] for head in train] == [50.0]


# ---------------------------------------------------------------- best != last, eval_only, the original's log lines
PREFIX_RE = r"INFO - \d\d/\d\d/\d\d \d\d:\d\d:\d\d - \d+:\d\d:\d\d - "


def messages(log_text):
    """(message, prefix length) of every line of a train.log; continuation lines have prefix length 0."""
    import re
    out = []
    for line in log_text.splitlines():
        match = re.match(PREFIX_RE, line)
        out.append((line[match.end():], match.end()) if match else (line, 0))
    return out


@pytest.fixture(scope="module")
def best_before_last(tmp_path_factory):
    """A real 3-epoch probe whose best test top-1 is not its last epoch's (lr 0.1 on this seeded data: the test
    top-1 goes 30.0, 50.0, 32.5 on CPU; the tests check the premise, not the values)."""
    import json

    from helpers import make_checkpoint, make_cifar
    base = tmp_path_factory.mktemp("best_before_last")
    make_cifar(str(base / "data"), "cifar10", n_train=100, n_test=40)
    make_checkpoint(str(base / "a.pth"), "resnet18", "raw", seed=0)
    argv = ["--arch", "resnet18", "--pretrained", str(base / "a.pth"), "--data_path", str(base / "data"),
            "--dump_path", str(base / "run"), "--img_size", "16", "--workers", "0", "--batch_size", "32",
            "--epochs", "3", "--lr", "0.1"]
    probe.main(probe.get_args_parser().parse_args(argv))
    metrics = [json.loads(line) for line in open(base / "run" / "metrics.jsonl")]
    best = max(range(3), key=lambda e: metrics[e]["test_top1"])
    assert metrics[best]["test_top1"] > metrics[-1]["test_top1"], "premise: the best epoch is not the last"
    return base / "run", argv, metrics, best, (base / "run" / "train.log").read_text()


def test_the_best_epoch_is_reported_with_its_best_checkpoint(best_before_last):
    dump, _, metrics, best, log = best_before_last
    top1 = metrics[best]["test_top1"]
    assert log.rstrip().endswith(f"Top-1 test accuracy: {top1:.1f}")
    saved = torch.load(dump / "best.pth.tar", weights_only=False)
    last = torch.load(dump / "checkpoint.pth.tar", weights_only=False)
    assert saved["epoch"] == best + 1 and saved["best_acc"] == top1 and last["epoch"] == 3
    last_weight = next(v for k, v in last["heads"].items() if k.endswith("linear.weight"))
    assert not torch.equal(saved["head"]["linear.weight"], last_weight)


@pytest.mark.parametrize("which", ["last", "best"])
def test_eval_only_writes_the_originals_test_line(best_before_last, which):
    """--mode eval_only evaluates checkpoint.pth.tar (the last epoch, the original's) by default, best.pth.tar with
    --eval_checkpoint best; its line is the original's, byte for byte: `Test:\\tLoss x\\tAcc@1 y\\t`."""
    dump, argv, metrics, best, _ = best_before_last
    before = (dump / "train.log").read_text()
    extra = [] if which == "last" else ["--eval_checkpoint", "best"]
    probe.main(probe.get_args_parser().parse_args(argv + ["--mode", "eval_only", *extra]))
    added = messages((dump / "train.log").read_text()[len(before):])
    record = metrics[-1] if which == "last" else metrics[best]
    path = dump / ("checkpoint.pth.tar" if which == "last" else "best.pth.tar")
    assert f"Found checkpoint at {path}" in [m for m, _ in added]
    assert added[-1][0] == f"Test:\tLoss {record['test_loss']:.4f}\tAcc@1 {record['test_top1']:.3f}\t"
    assert added[-2][0].startswith("Epoch[0] - Iter: [0/2]\tTime ")  # the original's validation line


def test_train_log_has_the_originals_lines_in_its_order(best_before_last):
    """Per epoch: the banner, the training lines (every 50 iterations, with Data), the validation lines
    (`Epoch[0]`, no Data), the Test line; at the end one message of two lines, the second indented to the
    message column. Nothing else between them."""
    import re
    _, _, metrics, best, log = best_before_last
    lines = messages(log)
    first = next(i for i, (m, _) in enumerate(lines) if m.startswith("============ Starting epoch 0"))
    body = [m for m, _ in lines[first:]]
    best_so_far = 0.0
    for epoch in range(3):
        best_so_far = max(best_so_far, metrics[epoch]["test_top1"])
        banner, train, evaluation, test = body[4 * epoch:4 * epoch + 4]
        assert banner == f"============ Starting epoch {epoch} ... ============"
        assert re.fullmatch(rf"Epoch\[{epoch}\] - Iter: \[0/4\]\tTime \S+ \(\S+\)\tData \S+ \(\S+\)\tLoss \S+ \(\S+\)"
                            r"\tPrec \S+ \(\S+\)\tLR 0\.1", train)
        assert re.fullmatch(r"Epoch\[0\] - Iter: \[0/2\]\tTime \S+ \(\S+\)\tLoss \S+ \(\S+\)\tPrec \S+ \(\S+\)\t",
                            evaluation)
        assert test == f"Test:\tLoss {metrics[epoch]['test_loss']:.4f}\tAcc@1 {metrics[epoch]['test_top1']:.3f}\t" \
                       f"Best Acc@1 so far {best_so_far:.2f}"
    closing = lines[first + 12:first + 14]
    assert closing[0][0] == "Training of the supervised linear classifier on frozen features completed."
    assert closing[1] == (" " * closing[0][1] + f"Top-1 test accuracy: {metrics[best]['test_top1']:.1f}", 0)
    assert len(body) == 14


def test_the_log_formatter_is_the_originals():
    """Prefix `LEVEL - %x %X - timedelta - `, the elapsed time rounded (not truncated) and written as a timedelta
    past 24 h, continuation lines indented to the message column, an empty message an empty line."""
    import time

    from util import log_lines
    created = time.mktime((2026, 12, 3, 7, 5, 9, 0, 0, -1))
    stamp = time.strftime("%x %X", time.localtime(created))
    assert log_lines.format_record("INFO", created, 93784.4, "a") == f"INFO - {stamp} - 1 day, 2:03:04 - a"
    assert log_lines.format_record("INFO", created, 59.6, "a") == f"INFO - {stamp} - 0:01:00 - a"
    head = f"WARNING - {stamp} - 0:00:02 - "
    assert log_lines.format_record("WARNING", created, 2.0, "x\ny\nz") == f"{head}x\n{' ' * len(head)}y\n" \
                                                                          f"{' ' * len(head)}z"
    assert log_lines.format_record("INFO", created, 2.0, "") == ""


def test_the_step_schedule_is_the_originals_to_the_last_bit(tmp_path):
    """MultiStepLR multiplies in a chain: the logged LR and the update are 0.0001 at epoch 16, not
    0.01 * 0.1 ** 2 = 0.00010000000000000002."""
    args = probe_args(tmp_path, "--arch", "resnet50", "--pretrained", str(tmp_path / "x.pth")) \
        if (tmp_path / "x.pth").write_bytes(b"x") else None
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [8, 16, 24], gamma=0.1)
    for epoch in range(28):
        assert probe_heads.lr_at_epoch(epoch, 0.01, args) == optimizer.param_groups[0]["lr"], epoch
        optimizer.step()
        scheduler.step()
    assert repr(probe_heads.lr_at_epoch(16, 0.01, args)) == "0.0001"


def test_summarize_reads_the_last_training_epoch_of_an_original_log(tmp_path):
    """The original's log ends with `Epoch[0]` validation lines and the closing message: the last epoch is 27."""
    from tools import summarize
    prefix = "INFO - 12/03/26 07:00:00 - 2:00:01 - "
    text = "".join(f"{prefix}============ Starting epoch {e} ... ============\n"
                   f"{prefix}Epoch[{e}] - Iter: [0/196]\tTime 0.1 (0.1)\tData 0.0 (0.0)\tLoss 1.0 (1.0)\t"
                   f"Prec 50.0 (50.0)\tLR 0.01\n"
                   f"{prefix}Epoch[0] - Iter: [0/40]\tTime 0.100 (0.100)\tLoss 1.0000 (1.0000)\tPrec 50.0000 "
                   f"(50.0000)\t\n{prefix}Test:\tLoss 1.0000\tAcc@1 50.000\tBest Acc@1 so far 50.00\n"
                   for e in range(28))
    text += f"{prefix}Training of the supervised linear classifier on frozen features completed.\n" \
            f"{' ' * len(prefix)}Top-1 test accuracy: 50.0\n"
    (tmp_path / "train.log").write_text(text)
    run = summarize.Run(path="x")
    summarize.read_log(str(tmp_path), run, have_metrics=False)
    assert run.last_epoch == 27 and run.finished
