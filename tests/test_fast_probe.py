"""Fast probing: feature cache, many heads in one pass, held-out selection, bf16 features."""
import errno
import json
import os

import numpy as np
import pytest
import torch

import main_linear_probe as probe
from helpers import make_checkpoint, make_cifar, run_script
from models import LinearHead
from util.cli import run_main

TINY = ["--img_size", "32", "--workers", "0", "--batch_size", "32", "--print_freq", "5", "--precision", "fp32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("fast")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=200, n_test=61)
    ckpts = [str(base / "a.pth"), str(base / "b.pth")]
    for seed, path in enumerate(ckpts):
        make_checkpoint(path, "resnet18", "raw", seed=seed)
    return {"base": base, "data": data, "ckpts": ckpts}


def run_probe(world, dump, *extra):
    args = probe.get_args_parser().parse_args(["--arch", "resnet18", "--pretrained", *world["ckpts"],
                                               "--data_path", world["data"], "--dump_path", str(dump), *TINY,
                                               *extra])
    probe.main(args)
    return open(os.path.join(dump, "sweep.log" if os.path.exists(os.path.join(dump, "sweep.log"))
                             else "train.log")).read()


def metrics(dump):
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def heads_state(dump):
    return torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=False)["heads"]


# ---------------------------------------------------------------- feature cache
def test_cache_is_built_once_reused_and_invalidated(world, tmp_path):
    cache = tmp_path / "cache"
    first = run_probe(world, tmp_path / "r1", "--epochs", "2", "--feature_cache", str(cache))
    assert first.count("feature cache: computing") == 2  # train and test
    entries = entry_folders(cache)  # one per backbone and split
    assert len(entries) == 4 and all(os.path.isfile(cache / e / "manifest.json") for e in entries)
    feats = np.load(cache / entries[0] / "features.npy")
    assert feats.dtype == np.float16 and feats.shape[1] == 512

    second = run_probe(world, tmp_path / "r2", "--epochs", "2", "--feature_cache", str(cache))
    assert second.count("feature cache: reusing") == 2 and "computing" not in second
    assert [m["test_top1"] for m in metrics(tmp_path / "r1")] == [m["test_top1"] for m in metrics(tmp_path / "r2")]

    other = run_probe(world, tmp_path / "r3", "--epochs", "1", "--feature_cache", str(cache), "--img_size", "40")
    assert other.count("feature cache: computing") == 2  # another transform: other features

    victim = next(e for e in entries if json.load(open(cache / e / "manifest.json"))["key"]["split"] == "test")
    path = cache / victim / "features.npy"
    path.write_bytes(path.read_bytes()[:-100])
    log = run_probe(world, tmp_path / "r4", "--epochs", "1", "--feature_cache", str(cache))
    assert "features.npy is missing or truncated" in log
    data = bytearray(path.read_bytes())
    data[-10:] = b"\x01" * 10
    path.write_bytes(bytes(data))
    assert "corrupt (checksum mismatch)" in run_probe(world, tmp_path / "r5", "--epochs", "1", "--feature_cache",
                                                      str(cache))
    os.remove(cache / victim / "manifest.json")  # as if the writer died before finishing
    assert "no complete manifest" in run_probe(world, tmp_path / "r6", "--epochs", "1", "--feature_cache",
                                               str(cache))


def entry_folders(cache):
    return sorted(e for e in os.listdir(cache) if os.path.isdir(cache / e))


def test_concatenations_share_their_backbones_entries(world, tmp_path):
    """cat2 {a, b} then {a, c}: the second probe extracts c only (train and test), in its one pass per split."""
    cache = tmp_path / "cache"
    run_probe(world, tmp_path / "r1", "--epochs", "1", "--feature_cache", str(cache))
    c = str(tmp_path / "c.pth")
    make_checkpoint(c, "resnet18", "raw", seed=5)
    probe.main(probe.get_args_parser().parse_args([
        "--arch", "resnet18", "--pretrained", world["ckpts"][0], c, "--data_path", world["data"], "--dump_path",
        str(tmp_path / "r2"), *TINY, "--epochs", "1", "--feature_cache", str(cache)]))
    log = open(tmp_path / "r2" / "train.log").read()
    assert log.count("feature cache: extracting") == 2 and log.count("extracting resnet18 c.pth") == 2
    assert log.count("for 1 of 2 backbone(s)") == 2 and len(entry_folders(cache)) == 6


def test_a_changed_checkpoint_invalidates_the_cache(world, tmp_path):
    cache = tmp_path / "cache"
    ckpts = [str(tmp_path / "a.pth"), world["ckpts"][1]]
    make_checkpoint(ckpts[0], "resnet18", "raw", seed=0)
    args = ["--arch", "resnet18", "--pretrained", *ckpts, "--data_path", world["data"], *TINY, "--epochs", "1",
            "--feature_cache", str(cache)]
    probe.main(probe.get_args_parser().parse_args(args + ["--dump_path", str(tmp_path / "r1")]))
    make_checkpoint(ckpts[0], "resnet18", "raw", seed=9)  # retrained in place
    probe.main(probe.get_args_parser().parse_args(args + ["--dump_path", str(tmp_path / "r2")]))
    log = open(tmp_path / "r2" / "train.log").read()
    assert log.count("feature cache: computing") == 2 and log.count("for 1 of 2 backbone(s)") == 2  # a only


def test_full_disk_during_caching_stops_cleanly(world, tmp_path, monkeypatch, capsys):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    cache = tmp_path / "cache"
    args = probe.get_args_parser().parse_args(["--arch", "resnet18", "--pretrained", *world["ckpts"],
                                               "--data_path", world["data"], "--dump_path", str(tmp_path / "r"),
                                               *TINY, "--epochs", "1", "--feature_cache", str(cache)])
    with pytest.raises(SystemExit):
        run_main(probe.main, args)
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the feature cache") and "No space left" in err
    assert not any(name == "manifest.json" for _, _, files in os.walk(cache) for name in files)


def test_cached_views_train_on_augmented_features(world, tmp_path):
    log = run_probe(world, tmp_path / "r", "--epochs", "2", "--feature_cache", str(tmp_path / "c"),
                    "--cache_views", "2")
    assert "computing train view 0" in log and "computing train view 1" in log
    assert max(m["test_top1"] for m in metrics(tmp_path / "r")) > 40


# ---------------------------------------------------------------- many heads in one pass
@pytest.mark.parametrize("cached", [False, True])
def test_a_head_of_a_sweep_equals_the_same_head_trained_alone(world, tmp_path, cached):
    extra = ["--epochs", "2", "--decay_epochs", "1"] + (["--feature_cache", str(tmp_path / "c")] if cached else [])
    log = run_probe(world, tmp_path / "sweep", "--wd", "1e-4", "5e-3", "--lr", "0.1", "0.05", *extra)
    assert "sweep of 4 heads" in log and "Best on test (the reference's rule)" in log
    names = ["wd1e-4_lr0.1", "wd5e-3_lr0.1", "wd1e-4_lr0.05", "wd5e-3_lr0.05"]
    for name in names:
        head_dir = tmp_path / "sweep" / name
        assert "Top-1 test accuracy:" in (head_dir / "train.log").read_text()
        assert json.load(open(head_dir / "args.json"))["wd"] in (1e-4, 5e-3)
    run_probe(world, tmp_path / "alone", "--wd", "5e-3", "--lr", "0.05", *extra)
    sweep, alone = heads_state(tmp_path / "sweep"), heads_state(tmp_path / "alone")
    for key, value in alone.items():
        # bit-identical, not only close: what makes one_pass the default layout of tools/submit.py lineareval
        assert torch.equal(sweep[key.replace("0.", "3.", 1)], value), key
    assert [m["test_top1"] for m in metrics(tmp_path / "sweep" / names[3])] == \
        [m["test_top1"] for m in metrics(tmp_path / "alone")]


def test_validation_split_selects_epoch_and_head_on_held_out_data(world, tmp_path):
    log = run_probe(world, tmp_path / "s", "--wd", "1e-4", "1e-2", "--lr", "0.1", "--epochs", "3",
                    "--val_split", "0.2")
    assert "160 train / 40 validation / 61 test images" in log
    chosen = [line for line in log.splitlines() if "Selected on validation: wd" in line]
    assert len(chosen) == 1
    name = chosen[0].split("Selected on validation: ")[1].split()[0]
    head_log = (tmp_path / "s" / name / "train.log").read_text()
    record = metrics(tmp_path / "s" / name)
    best_val = max(record, key=lambda m: m["val_top1"])  # first epoch reaching the best validation accuracy
    assert f"test Acc@1 {best_val['test_top1']:.2f}" in chosen[0]
    assert f"Selected on validation: epoch {best_val['epoch']} val Acc@1 {best_val['val_top1']:.2f}" in head_log
    assert "Val: Loss" in head_log and "over 40 held-out training images" in head_log


def test_malformed_list_values_are_one_line_errors(world, tmp_path, capsys):
    base = ["--arch", "resnet18", "--pretrained", *world["ckpts"], "--data_path", world["data"],
            "--dump_path", str(tmp_path / "d"), *TINY]
    for extra, fragment in ((["--wd", "1e-4", "abc"], "--wd: 'abc' is not a number"),
                            (["--lr", "-0.1"], "--lr: -0.1 must be positive"),
                            (["--wd", "1e-4", "1e-4"], "given twice"),
                            (["--exp_mode", "finetune", "--wd", "1e-4", "1e-3"], "finetune")):
        with pytest.raises(SystemExit):
            run_main(probe.main, probe.get_args_parser().parse_args(base + extra))
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and fragment in err and len(err.splitlines()) == 1
    result = run_script(["main_linear_probe.py", "--epochs", "many"])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == \
        ["error: argument --epochs: invalid int value: 'many' (see main_linear_probe.py --help)"]


# ---------------------------------------------------------------- bf16 backbones
def test_bf16_features_keep_top1_within_a_point(tmp_path):
    """bf16 is an explicit speed option: measured 0.6 points of top-1 on this hard generated set
    (docs/benchmarks.md, "probe precision")."""
    data, cache = str(tmp_path / "data"), tmp_path / "cache"
    make_cifar(data, "cifar10", n_train=300, n_test=1000, seed=3, noise=250)  # hard enough to make mistakes
    ckpt = str(tmp_path / "a.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=4)
    common = ["--arch", "resnet18", "--pretrained", ckpt, "--data_path", data, "--img_size", "32", "--workers",
              "0", "--batch_size", "50", "--epochs", "8", "--feature_cache", str(cache), "--lr", "0.1"]
    for precision in ("fp32", "bf16"):
        probe.main(probe.get_args_parser().parse_args(common + ["--precision", precision, "--dump_path",
                                                               str(tmp_path / precision)]))
    # the head trained on fp32 features, scored on the cached fp32 and bf16 test features
    head = LinearHead(512, 10)
    saved = torch.load(tmp_path / "fp32" / "checkpoint.pth.tar", weights_only=False)["heads"]
    head.load_state_dict({key.split(".", 1)[1]: value for key, value in saved.items()})
    head.eval()
    accuracy = {}
    for entry in entry_folders(cache):
        key = json.load(open(cache / entry / "manifest.json"))["key"]
        if key["split"] == "test":
            features = torch.from_numpy(np.load(cache / entry / "features.npy")).float()
            labels = torch.from_numpy(np.load(cache / entry / "labels.npy"))
            with torch.no_grad():
                accuracy[key["precision"]] = (head(features).argmax(1) == labels).float().mean().item() * 100
    assert set(accuracy) == {"fp32", "bf16"}
    assert accuracy["fp32"] > 30 and abs(accuracy["fp32"] - accuracy["bf16"]) <= 1.0, accuracy
