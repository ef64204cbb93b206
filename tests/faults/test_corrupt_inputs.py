"""Fault injection, corrupt inputs (driver: tests/faults/driver.py; docs/reliability.md)."""
import json
import os
import shutil

import pytest

import main_linear_probe as probe
import main_pretrain as pretrain
from driver import PRETRAIN, PROBE, metrics, read, user_error
from helpers import make_cifar


def corrupt_world(world, tmp_path):
    """Copies of the image datasets with bad files: ImageNet 2 bad training images (garbage, truncated) and 1 bad
    validation image; iNat18 a training image missing from disk though listed in the JSON."""
    data = tmp_path / "data"
    shutil.copytree(os.path.join(world["data"], "imagenet"), data / "imagenet")
    shutil.copytree(os.path.join(world["data"], "inaturalist18"), data / "inaturalist18")
    train = data / "imagenet" / "train"
    (train / "n00000001" / "img_1_2.JPEG").write_bytes(b"GIF89a garbage")
    jpeg = train / "n00000003" / "img_3_5.JPEG"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (data / "imagenet" / "val" / "n00000000" / "img_0_1.JPEG").write_bytes(b"")
    listed = json.loads(read(data / "inaturalist18" / "train2018.json"))["images"][5]["file_name"]
    os.remove(data / "inaturalist18" / listed)
    return str(data), listed


def test_corrupt_inputs_stop_with_an_error_naming_the_file(world, tmp_path, capsys):
    data, missing = corrupt_world(world, tmp_path)
    base = ["--pretrained", world["ckpt"], "--data_path", data, *PROBE, "--batch_size", "8", "--epochs", "1"]
    parser = probe.get_args_parser()
    err = user_error(probe.main, parser, [*base, "--dump_path", str(tmp_path / "a"), "--data_name", "imagenet1k",
                                          "--workers", "1"], capsys)
    assert "cannot read image" in err and ("img_1_2.JPEG" in err or "img_3_5.JPEG" in err)
    err = user_error(probe.main, parser, [*base, "--dump_path", str(tmp_path / "c"), "--data_name", "inaturalist18"],
                     capsys)
    assert "cannot read image" in err and missing in err and "No such file" in err

    make_cifar(data, "cifar10", n_train=50, n_test=10)
    batch = os.path.join(data, "cifar", "cifar-10-batches-py", "test_batch")
    with open(batch, "r+b") as f:
        f.truncate(os.path.getsize(batch) // 2)
    err = user_error(probe.main, parser, [*base, "--dump_path", str(tmp_path / "d"), "--data_name", "cifar10"], capsys)
    assert "test_batch is not a valid CIFAR batch" in err

    err = user_error(pretrain.main, pretrain.get_args_parser(),
                     ["--data_path", data, "--output_dir", str(tmp_path / "ck"), "--dump_path", str(tmp_path / "p"),
                      *PRETRAIN, "--steps", "4", "--save_steps"], capsys)
    assert "cannot read image" in err and ".JPEG" in err


@pytest.mark.parametrize("cache", [False, True])
def test_skip_bad_images_counts_and_reports_them(world, tmp_path, cache):
    data, _ = corrupt_world(world, tmp_path)
    extra = ["--feature_cache", str(tmp_path / "cache")] if cache else ["--workers", "1"]  # counts cross workers
    dump = tmp_path / "imagenet"
    probe.main(probe.get_args_parser().parse_args(
        ["--pretrained", world["ckpt"], "--data_path", data, "--dump_path", str(dump), *PROBE, "--batch_size", "8",
         "--epochs", "2", "--data_name", "imagenet1k", "--skip_bad_images", *extra]))
    log = read(dump / "train.log")
    for epoch in range(2):
        assert f"Skipped 2 unreadable training images in epoch {epoch}" in log
    assert log.count("over 11 images (1 unreadable skipped)") == 2 and "Top-1 test accuracy" in log
    assert [(m["train_skipped"], m["test_skipped"]) for m in metrics(dump / "metrics.jsonl")] == [(2, 1)] * 2

    dump = tmp_path / "inat"
    probe.main(probe.get_args_parser().parse_args(
        ["--pretrained", world["ckpt"], "--data_path", data, "--dump_path", str(dump), *PROBE, "--batch_size", "8",
         "--epochs", "1", "--data_name", "inaturalist18", "--skip_bad_images", *extra]))
    log = read(dump / "train.log")
    assert "Skipped 1 unreadable training images in epoch 0" in log and "over 8 images" in log


def test_skip_bad_images_in_pretraining(world, tmp_path):
    data, _ = corrupt_world(world, tmp_path)
    pretrain.main(pretrain.get_args_parser().parse_args(
        ["--data_path", data, "--output_dir", str(tmp_path / "ck"), "--dump_path", str(tmp_path / "run"), *PRETRAIN,
         "--steps", "4", "--save_steps", "--bn_refresh_batches", "0", "--skip_bad_images", "--workers", "1"]))
    log = read(tmp_path / "run" / "train.log")
    assert "Skipped 2 unreadable training images since start-up" in log
    assert "over 11 images at step 4 (1 unreadable skipped)" in log and "Top-1 test accuracy" in log
