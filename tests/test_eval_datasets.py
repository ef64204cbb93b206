"""--eval_datasets (ImageNet-v2, -Sketch, -R, -A read in their releases' layouts, R and A scored on their 200 classes)
and the 384px / vit384px transform presets, on generated folders."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import main_linear_probe as probe
from arguments.linear_probe import EVAL_DATASETS
from arguments.linear_probe import TF_NAMES as FLAG_TF_NAMES
from datasets import transforms
from datasets.eval_sets import EVAL_NAMES, EVAL_SETS, IMAGENET_WNIDS, build_eval_set, read_wnids, restrict_logits
from engine import batch_scores, stacked_logits
from helpers import expect_user_error, make_checkpoint, make_eval_sets, make_imagenet, run_script
from util import log_lines

R_WNIDS, A_WNIDS = read_wnids("imagenet_r_wnids.txt"), read_wnids("imagenet_a_wnids.txt")
# ImageNet classes 0 (in neither R nor A), 1 (R only), 6 and 11 (both), 7 (neither): a probe of these five classes
WNIDS = [IMAGENET_WNIDS[k] for k in (0, 1, 6, 7, 11)]
TINY = ["--img_size", "32", "--workers", "0", "--batch_size", "8", "--print_freq", "2", "--lr", "0.1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalsets")
    data = str(base / "data")
    make_imagenet(data, n_train=4, n_val=2, wnids=WNIDS)
    written = make_eval_sets(data, WNIDS, per_class=2)
    ckpt = str(base / "ckpt.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=1)
    return {"data": data, "written": written, "ckpt": ckpt, "base": base}


def test_the_class_lists_are_the_releases():
    assert len(IMAGENET_WNIDS) == 1000 == len(set(IMAGENET_WNIDS)) and IMAGENET_WNIDS == sorted(IMAGENET_WNIDS)
    assert IMAGENET_WNIDS[0] == "n01440764" and IMAGENET_WNIDS[-1] == "n15075141"
    for wnids in (R_WNIDS, A_WNIDS):
        assert len(wnids) == 200 == len(set(wnids)) and set(wnids) <= set(IMAGENET_WNIDS)
    # ImageNet-A's first classes in the release's 1000 -> 200 map, ImageNet-R's first wnids
    assert [IMAGENET_WNIDS.index(w) for w in A_WNIDS[:5]] == [6, 11, 13, 15, 17]
    assert R_WNIDS[:3] == ["n01443537", "n01484850", "n01494475"]
    assert (WNIDS[0] not in R_WNIDS + A_WNIDS and WNIDS[1] in R_WNIDS and WNIDS[1] not in A_WNIDS
            and {WNIDS[2], WNIDS[4]} <= set(R_WNIDS) & set(A_WNIDS))
    assert set(EVAL_DATASETS) == set(EVAL_NAMES) and set(FLAG_TF_NAMES) == set(transforms.TF_NAMES)


def test_each_release_layout_is_read_with_the_probes_labels(world):
    imagenet = os.path.join(world["data"], "imagenet")
    head = sorted(WNIDS)  # the probe's classes: ImageFolder's sorted wnids
    v2_folders = {os.path.basename(os.path.dirname(p)) for p, _ in world["written"]["imagenet_v2"]}
    assert v2_folders == {"0", "1", "6", "7", "11"}  # folders named by class index, not wnid
    for name in EVAL_NAMES:
        eval_set = build_eval_set(name, world["data"], imagenet, head)
        samples = dict(eval_set.dataset.samples)
        assert set(samples) == {p for p, _ in world["written"][name]}
        if name in ("imagenet_r", "imagenet_a"):
            release = R_WNIDS if name == "imagenet_r" else A_WNIDS
            assert eval_set.mask == [head.index(w) for w in head if w in release]
            expected = {p: eval_set.mask.index(head.index(w)) for p, w in world["written"][name]}
        else:
            assert eval_set.mask is None
            expected = {p: head.index(w) for p, w in world["written"][name]}
        assert samples == expected, name
        image, label = eval_set.dataset[0]
        assert image.mode == "RGB" and label == eval_set.dataset.targets[0]


def test_the_200_class_mask_scores_the_best_of_its_classes():
    mask = [1, 3]  # the head's classes that are in the set (R or A)
    logits = torch.tensor([[5.0, 1.0, 0.0, 2.0],   # top logit 0 is outside the mask: predicted class 3 (position 1)
                           [0.0, 3.0, 9.0, 1.0]])  # top logit 2 outside: class 1 (position 0)
    restricted = restrict_logits(lambda x: [x], mask)(logits)[0]
    assert restricted.argmax(1).tolist() == [1, 0]
    labels = torch.tensor([1, 0])  # positions in the mask: class 3, class 1
    top1_masked = batch_scores(stacked_logits([restricted]), labels)[0, 1].item()
    top1_full = batch_scores(stacked_logits([logits]), torch.tensor(mask)[labels])[0, 1].item()
    assert (top1_masked, top1_full) == (2, 0)
    assert restrict_logits(lambda x: x, mask)(logits).shape == (2, 2)  # a single head's logits too


def run_probe(world, dump, *extra):
    argv = ["--arch", "resnet18", "--pretrained", world["ckpt"], "--data_path", world["data"], "--data_name",
            "imagenet1k", "--dump_path", str(dump), *TINY, *extra]
    probe.main(probe.get_args_parser().parse_args(argv))


def test_probe_logs_and_records_every_eval_dataset(world, tmp_path):
    dump = tmp_path / "run"
    run_probe(world, dump, "--epochs", "2", "--eval_datasets", *EVAL_NAMES)
    log = (dump / "train.log").read_text()
    found = log_lines.parse_eval_datasets(log)
    images = {name: len(paths) for name, paths in world["written"].items()}
    head = sorted(WNIDS)
    classes = {"imagenet_v2": 5, "imagenet_sketch": 5, "imagenet_r": sum(w in R_WNIDS for w in head),
               "imagenet_a": sum(w in A_WNIDS for w in head)}
    assert set(found) == set(EVAL_NAMES)
    for name, (loss, top1, top5, n, c) in found.items():
        assert (n, c) == (images[name], classes[name]) and 0 <= top1 <= top5 <= 100 and np.isfinite(loss)
    assert top5 == 100.0  # ImageNet-A: 3 classes, top-5 always hits
    assert log.count("Eval imagenet_") == 4  # once: after the last epoch
    assert log.index("Eval imagenet_") > log.rindex("Test:")  # after the last epoch's Test line
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "imagenet_v2_top1" not in records[0]
    for name, (loss, top1, top5, _, _) in found.items():
        assert round(records[1][f"{name}_top1"], 3) == top1 and round(records[1][f"{name}_top5"], 3) == top5
        assert round(records[1][f"{name}_loss"], 4) == loss

    # --mode eval_only evaluates the saved heads on them again: the same numbers, a record of its own
    run_probe(world, dump, "--epochs", "2", "--mode", "eval_only", "--eval_datasets", "imagenet_r", "imagenet_v2")
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["mode"] == "eval_only" and records[-1]["epoch"] == 1
    assert set(records[-1]) == {"epoch", "mode", *(f"{n}_{k}" for n in ("imagenet_r", "imagenet_v2")
                                                   for k in ("loss", "top1", "top5"))}
    again = log_lines.parse_eval_datasets((dump / "train.log").read_text())
    for name in ("imagenet_r", "imagenet_v2"):
        assert again[name][1:] == found[name][1:]


def test_a_sweep_summarises_each_set_and_eval_only_reaches_the_board(world, tmp_path):
    """A sweep's log gets one line per set with every head's top-1; --mode eval_only's record goes, like an epoch's,
    to metrics.jsonl and to --tensorboard's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dump, heads, sets = tmp_path / "sweep", ("wd1e-4_lr0.1", "wd1e-3_lr0.1"), ("imagenet_r", "imagenet_v2")
    run_probe(world, dump, "--epochs", "1", "--wd", "1e-4", "1e-3", "--eval_datasets", *sets)
    sweep_log = (dump / "sweep.log").read_text()
    assert not log_lines.parse_eval_datasets(sweep_log)  # a summary, not read as a head's `Eval` line
    for name in sets:
        [line] = [line for line in sweep_log.splitlines() if f"eval set {name}: " in line]
        for head in heads:
            top1 = log_lines.parse_eval_datasets((dump / head / "train.log").read_text())[name][1]
            assert f"{head} Acc@1 {top1:.3f}" in line

    run_probe(world, dump, "--epochs", "1", "--wd", "1e-4", "1e-3", "--mode", "eval_only", "--eval_datasets",
              "imagenet_r", "--tensorboard")
    for head in heads:
        record = json.loads((dump / head / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["mode"] == "eval_only"
        events = EventAccumulator(str(dump / head)).Reload()
        for key in ("imagenet_r_loss", "imagenet_r_top1", "imagenet_r_top5"):
            [scalar] = events.Scalars(key)
            assert scalar.step == record["epoch"] == 0 and scalar.value == pytest.approx(record[key], rel=1e-6)


def test_refused_with_one_line(world, tmp_path, capsys):
    base = ["--arch", "resnet18", "--pretrained", world["ckpt"], "--dump_path", str(tmp_path / "d"), *TINY,
            "--epochs", "1"]
    expect_user_error([*base, "--data_path", world["data"], "--data_name", "cifar10", "--eval_datasets",
                       "imagenet_r"], capsys, "imagenet1k", "--eval_datasets")
    # a missing folder: where it was looked for and where the release is
    data = tmp_path / "data"
    shutil.copytree(os.path.join(world["data"], "imagenet"), data / "imagenet")
    on = [*base, "--data_path", str(data), "--data_name", "imagenet1k", "--eval_datasets"]
    expect_user_error([*on, "imagenet_a"], capsys, "imagenet-a", "not found", "hendrycks/imagenet-a.tar")
    # ImageNet-v2 unpacked with wnid folders, ImageNet-R holding a class that is not one of its 200
    os.makedirs(data / "imagenetv2-matched-frequency-format-val" / WNIDS[0])
    expect_user_error([*on, "imagenet_v2"], capsys, "not a class index 0..999", "Expected layout")
    os.makedirs(data / "imagenet-r" / WNIDS[0])
    expect_user_error([*on, "imagenet_r"], capsys, "not one of ImageNet-R's classes", WNIDS[0])
    # a class the probe's ImageNet does not have
    os.makedirs(data / "sketch" / IMAGENET_WNIDS[500])
    Image.new("RGB", (8, 8)).save(data / "sketch" / IMAGENET_WNIDS[500] / "a.JPEG")
    expect_user_error([*on, "imagenet_sketch"], capsys, IMAGENET_WNIDS[500], "not among the probe's 5")
    assert not os.path.exists(tmp_path / "d" / "checkpoint.pth.tar")  # refused before training


@pytest.mark.parametrize("tf_name,family,mean,std,interpolation", [
    ("384px", "imagenet", transforms.IMAGENET_MEAN, transforms.IMAGENET_STD, "bilinear"),
    ("384px", "cifar", transforms.CIFAR_MEAN, transforms.CIFAR_STD, "bicubic"),
    ("vit384px", "imagenet", (0.5,) * 3, (0.5,) * 3, "bicubic"),
    ("vit384px", "cifar", (0.5,) * 3, (0.5,) * 3, "bicubic"),
])
def test_384_presets(tf_name, family, mean, std, interpolation):
    colour = np.array([200, 30, 120], np.uint8)
    image = Image.fromarray(np.broadcast_to(colour, (500, 700, 3)).copy())
    test = transforms.build_transform(family, tf_name, train=False)
    out = test(image)
    assert out.shape == (3, 384, 384) and transforms.crop_size(family, tf_name) == 384
    expected = (torch.tensor(colour / 255.0) - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(out.mean(dim=(1, 2)), expected.float(), atol=1e-5)
    resize, crop = test.transforms[:2]
    assert resize.size == 438 and crop.size == (384, 384)  # int(384 * 8 / 7), the rule of every preset
    assert resize.interpolation.value == interpolation
    train = transforms.build_transform(family, tf_name, train=True)
    assert train(image).shape == (3, 384, 384) and train.transforms[0].interpolation.value == interpolation
    fast = transforms.build_transform(family, tf_name, train=False, pipeline="fast")
    assert fast(image).shape == (3, 384, 384)
    assert torch.allclose(fast(image).mean(dim=(1, 2)), expected.float(), atol=2e-2)
    # --img_size still overrides the preset's crop
    assert transforms.build_transform(family, tf_name, train=False, img_size=32)(image).shape == (3, 32, 32)


def test_unknown_names_are_refused():
    assert EVAL_SETS["imagenet_v2"].by_index and not EVAL_SETS["imagenet_sketch"].by_index
    with pytest.raises(SystemExit):
        probe.get_args_parser().parse_args(["--eval_datasets", "imagenet_c"])


@pytest.mark.parametrize("extra", [["--exp_mode", "finetune", "--lr", "0.01"], ["--feature_cache", "CACHE"]])
def test_eval_datasets_with_finetuning_and_the_feature_cache(world, tmp_path, extra):
    """Fine-tuning scores images through the tuned encoder; with the cache, the sets' features are computed on the
    fly (not cached)."""
    extra = [str(tmp_path / "cache") if e == "CACHE" else e for e in extra]
    run_probe(world, tmp_path / "run", "--epochs", "1", "--eval_datasets", "imagenet_a", "imagenet_sketch", *extra)
    found = log_lines.parse_eval_datasets((tmp_path / "run" / "train.log").read_text())
    assert {name: found[name][3:] for name in found} == {"imagenet_a": (len(world["written"]["imagenet_a"]), 2),
                                                         "imagenet_sketch": (10, 5)}
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["imagenet_a_top1"] == pytest.approx(found["imagenet_a"][1], abs=1e-3)
    if "--feature_cache" in extra:
        assert not any("imagenet" in p.name for p in (tmp_path / "cache").rglob("*"))


def test_two_processes_score_the_sets_as_one(world, tmp_path):
    """--mode eval_only of the same saved head in one process and in two (each scoring its shard of every set, the
    sums all-reduced): the same counts, top-1, top-5 and loss."""
    dump = tmp_path / "run"
    run_probe(world, dump, "--epochs", "1")
    eval_only = ["--epochs", "1", "--mode", "eval_only", "--eval_datasets", "imagenet_r", "imagenet_v2"]
    run_probe(world, dump, *eval_only)
    one = log_lines.parse_eval_datasets((dump / "train.log").read_text())
    (dump / "train.log").write_text("")
    argv = ["main_linear_probe.py", "--arch", "resnet18", "--pretrained", world["ckpt"], "--data_path", world["data"],
            "--data_name", "imagenet1k", "--dump_path", str(dump), *TINY, *eval_only]
    done = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv],
                      env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-2000:]
    two = log_lines.parse_eval_datasets((dump / "train.log").read_text())
    assert set(one) == set(two) == {"imagenet_r", "imagenet_v2"}
    for name in one:
        assert one[name][3:] == two[name][3:] and one[name][1:3] == two[name][1:3], name
        assert one[name][0] == pytest.approx(two[name][0], abs=2e-4), name
