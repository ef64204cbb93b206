"""Each fact of the original release's linear-probe protocol (its code and six sbatch scripts) checked against the
code: transforms by their parameters, optimizer groups and decay, schedule, head init, batch per dataset, subset
indices, sampler seed, drop_last, log formats."""
import hashlib
import math

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import BatchSampler
from torchvision import transforms as T

import main_linear_probe as probe
from arguments.linear_probe import resolve_batch
from datasets import reference_sampler_seed, subset_fraction
from datasets.cifar import ORDER_FILE, percent_subset, reference_order
from datasets.transforms import build_transform
from engine import CachedBatches
from helpers import check_probe_args
from models import LinearHead
from models import heads as probe_heads
from models.heads import build_optimizer, param_groups
from probe_setup import drop_single_sample_batch
from util import log_lines
from util.cli import UserError


def args_for(tmp_path, *extra):
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    args = probe.get_args_parser().parse_args(["--arch", "resnet50", "--pretrained", str(ckpt), *extra])
    check_probe_args(args)
    return args


def steps(transform):
    return {type(t).__name__: t for t in transform.transforms}


def test_test_resize_is_the_truncated_eight_sevenths():
    for size, resize in ((224, 256), (32, 36)):
        for family in ("cifar", "imagenet"):
            preset = "32px" if size == 32 else "eval"
            if family == "imagenet" and preset == "32px":
                continue
            test = steps(build_transform(family, preset, False))
            assert test["Resize"].size == resize and test["CenterCrop"].size == (size, size)


def test_transforms_match_the_reference_parameters():
    cifar = steps(build_transform("cifar", "224px", True))
    crop = cifar["RandomResizedCrop"]
    assert crop.size == (224, 224) and crop.scale == (0.8, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BICUBIC and "RandomHorizontalFlip" in cifar
    assert cifar["Normalize"].mean == (0.4914, 0.4822, 0.4465) and cifar["Normalize"].std == (0.2023, 0.1994, 0.2010)
    assert steps(build_transform("cifar", "224px", False))["Resize"].interpolation == T.InterpolationMode.BICUBIC
    imagenet = steps(build_transform("imagenet", "eval", True))
    crop = imagenet["RandomResizedCrop"]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BILINEAR
    assert imagenet["Normalize"].mean == (0.485, 0.456, 0.406)


def test_defaults_are_the_reference_protocol(tmp_path):
    args = args_for(tmp_path)
    assert (args.precision, args.optimizer, args.nesterov, args.momentum, args.lr_values, args.epochs,
            args.decay_epochs, args.gamma, args.seed, args.use_bn, args.wd_skip_bn, args.headinit,
            args.scheduler_type) == ("fp32", "sgd", True, 0.9, [0.01], 28, [8, 16, 24], 0.1, 31, True, True,
                                     "normal", "step")
    assert [probe_heads.lr_at_epoch(e, 0.01, args) for e in (0, 8, 16, 24)] == pytest.approx([0.01, 1e-3, 1e-4, 1e-5])
    cosine = args_for(tmp_path, "--scheduler_type", "cosine", "--final_lr", "0.001", "--epochs", "10")
    assert probe_heads.lr_at_epoch(5, 0.01, cosine) == pytest.approx(0.001 + 0.009 * 0.5)


@pytest.mark.parametrize("data_name,world,per_process", [("cifar10", 1, 256), ("cifar100_10perc", 2, 128),
                                                        ("imagenet1k", 1, 32), ("inaturalist18", 4, 8)])
def test_reference_batch_is_global_and_split_across_processes(tmp_path, data_name, world, per_process):
    args = args_for(tmp_path, "--data_name", data_name)
    resolve_batch(args, world)
    assert (args.batch_size, args.global_batch, args.batch_semantics) == (per_process, per_process * world, "global")
    assert args.sync_bn == (world > 1)
    given = args_for(tmp_path, "--data_name", data_name, "--batch_size", "64")
    resolve_batch(given, world)
    assert (given.batch_size, given.global_batch) == (64, 64 * world)
    with pytest.raises(UserError, match="does not split"):
        resolve_batch(args_for(tmp_path, "--data_name", data_name), 3)


def test_head_init_and_bn():
    torch.manual_seed(0)
    head = LinearHead(4096, 1000)
    head.init_weights("normal")
    assert head.linear.bias.abs().max() == 0 and abs(head.linear.weight.std().item() - 0.01) < 2e-4
    assert isinstance(head.bn, torch.nn.BatchNorm1d) and head.bn.affine and head.bn.momentum == 0.1


def groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g["lr"]) for g in optimizer.param_groups for p in g["params"]
            if id(p) in names}


def test_optimizer_groups_follow_the_bn_name_rule(tmp_path):
    args = args_for(tmp_path, "--exp_mode", "finetune", "--wd", "1e-3", "--lr_last_layer", "0.5")
    encoder = torch.nn.Module()
    encoder.net = torchvision.models.resnet18()
    heads = probe_heads.build_heads([512], 10, probe_heads.head_records(args), [], args, 1)
    optimizer = build_optimizer(param_groups(heads, encoder, probe_heads.head_records(args), args), args)
    assert optimizer.defaults["weight_decay"] == 0 and optimizer.defaults["nesterov"]
    head = groups_by_name(heads[0], optimizer)
    assert head["bn.weight"] == (0.0, 0.01) and head["linear.weight"] == (1e-3, 0.5) == head["linear.bias"]
    backbone = groups_by_name(encoder, optimizer)
    assert backbone["net.layer1.0.bn1.weight"] == (0.0, 0.01) and backbone["net.bn1.bias"] == (0.0, 0.01)
    # the original's rule (issue 19): every backbone parameter without 'bn' in its name joins the head's group,
    # with --lr_last_layer (its head test is always true); downsample.1 is a BatchNorm whose name lacks 'bn'
    assert backbone["net.layer2.0.downsample.1.weight"] == (1e-3, 0.5)
    assert backbone["net.conv1.weight"] == (1e-3, 0.5) and backbone["net.fc.weight"] == (1e-3, 0.5)
    # without --lr_last_layer every group has --lr
    args = args_for(tmp_path, "--exp_mode", "finetune", "--wd", "1e-3")
    optimizer = build_optimizer(param_groups(heads, encoder, probe_heads.head_records(args), args), args)
    assert groups_by_name(encoder, optimizer)["net.conv1.weight"] == (1e-3, 0.01)


def test_optimizer_variants(tmp_path):
    def build(*extra):
        args = args_for(tmp_path, *extra)
        heads = probe_heads.build_heads([8], 3, probe_heads.head_records(args), [], args, 1)
        return build_optimizer(param_groups(heads, None, probe_heads.head_records(args), args), args)
    assert build("--optimizer", "adam").defaults["betas"] == (0.9, 0.99)
    assert build("--optimizer", "adam", "--beta2", "0.95", "--momentum", "0.8").defaults["betas"] == (0.8, 0.95)
    sf = build("--optimizer", "schedulefree_adamw")
    assert sf.defaults["betas"] == (0.9, 0.999)
    alias = args_for(tmp_path, "--optimizer", "sfadamw")
    assert alias.scheduler_type == "step" and alias.optimizer == "schedulefree_adamw"  # the schedule still applies
    with pytest.raises(UserError, match="--nesterov is for --optimizer sgd"):
        args_for(tmp_path, "--optimizer", "adam", "--nesterov", "True")


def test_cifar_subset_order_is_the_reference_file():
    with open(ORDER_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            "62449412dbc0784f0dc5ba9515f8d17a3e2caa52d72c407728a1f6ee3cef3c19"
    order = reference_order()
    assert percent_subset(50000, 10) == order[:5000] and order[:3] == [11841, 19602, 45519]
    assert percent_subset(50000, 1) == order[:500] and len(percent_subset(50000, 33.3)) == int(50000 * 33.3 / 100)


def test_data_rate_and_sampler_seed_are_the_reference_rules():
    expected = np.arange(1000)
    np.random.default_rng(31 + 12345).shuffle(expected)
    assert subset_fraction(1000, 0.25, 31) == expected[:250].tolist()
    assert reference_sampler_seed(31) == 53970


def test_last_incomplete_batch_is_kept(tmp_path):
    args = args_for(tmp_path, "--batch_size", "256")
    features, labels = torch.zeros(50000, 2), torch.zeros(50000, dtype=torch.long)
    drop = drop_single_sample_batch(50000, args, 1, None)
    batches = CachedBatches([features], labels, BatchSampler(range(50000), 256, drop), "cpu")
    assert not drop and len(batches) == 196 and len(list(batches)[-1][1]) == 80

    class Log:
        lines = []
        info = lines.append
    assert drop_single_sample_batch(257, args, 1, Log) and "dropped" in Log.lines[0]
    assert not drop_single_sample_batch(257, args_for(tmp_path, "--batch_size", "256", "--use_bn", "False"),
                                              1, Log)


def test_log_lines_are_the_original_format_and_parse_both_styles():
    line = log_lines.iteration_line(3, 50, 196, {"time": (0.1234, 0.2), "data": (0.01, 0.02), "loss": (1.23456, 2.5),
                                                 "prec": (75.0, 70.12345)}, 0.001)
    assert line == ("Epoch[3] - Iter: [50/196]\tTime 0.123 (0.200)\tData 0.010 (0.020)\tLoss 1.2346 (2.5000)\t"
                    "Prec 75.0000 (70.1235)\tLR 0.001")
    assert log_lines.test_line(1.5, 70.1234, 71.256) == "Test:\tLoss 1.5000\tAcc@1 70.123\tBest Acc@1 so far 71.26"
    assert log_lines.final_message(71.26) == ("Training of the supervised linear classifier on frozen features "
                                              "completed.\nTop-1 test accuracy: 71.3")
    old = "INFO - 2026-01-01 10:00:00 - 0:00:01 - Test: Loss 1.0000 Acc@1 55.000 Best Acc@1 so far 56.00"
    assert log_lines.parse_tests(old + "\n" + log_lines.test_line(1.5, 70.0, 71.0)) == \
        [(1.0, 55.0, 56.0), (1.5, 70.0, 71.0)]
    assert log_lines.parse_final(log_lines.final_message(71.26)) == 71.3
    assert log_lines.ITERATION_RE.search(line) and math.isclose(float(log_lines.ITERATION_RE.search(line)[11]), 70.1235)
