"""Feature-richness analysis: CKA, effective rank, weight share, kNN, analyze_features on cache entries, the
subset folder naming and the cat-n curve of tools/summarize.py."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch

from analysis.features import (
    MomentAccumulator,
    analyse_chunks,
    backbone_dims,
    block_slices,
    effective_rank,
    head_weights,
    linear_cka_matrix,
    weight_share,
)
from analysis.knn import knn_accuracy, knn_log_line
from tools import analyze_features
from util.cli import UserError
from util.subsets import parse_subset_folder, subset_folder, subset_of_folder, subsets_for


def covariance(x):
    acc = MomentAccumulator(x.shape[1])
    acc.update(x)
    return acc.covariance()


def cka(x, y):
    return float(linear_cka_matrix(covariance(torch.cat([x, y], 1)), block_slices([x.shape[1], y.shape[1]]))[0, 1])


def random_features(n, d, seed, rank=None):
    """ReLU features of a random linear map of Gaussian inputs, like pooled backbone features (positive means)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, rank or d, generator=g)
    return torch.relu(inputs @ torch.randn(rank or d, d, generator=g)) if rank is None else \
        inputs @ torch.randn(rank, d, generator=g)


# ---------------------------------------------------------------- CKA, effective rank, weight share
def test_cka_of_a_backbone_with_itself_is_one_and_with_an_independent_network_near_zero():
    x = random_features(2000, 24, seed=0)
    rotation = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(1)))[0]
    assert cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-4)  # rotation, scale and shift
    independent = random_features(2000, 24, seed=2)  # another network, blind to x's inputs
    assert cka(x, independent) < 0.05
    assert 0.2 < cka(x, torch.cat([x[:, :12], independent[:, 12:]], 1)) < 0.9  # half shared: in between


def test_effective_rank_of_a_rank_k_matrix_is_at_most_k():
    for k in (1, 3, 7):
        x = random_features(500, 32, seed=k, rank=k)
        assert 0.5 < effective_rank(covariance(x)) <= k + 1e-6
    assert effective_rank(covariance(torch.randn(20000, 8))) == pytest.approx(8, rel=0.02)  # isotropic: full


def test_streamed_statistics_equal_the_one_shot_ones():
    x = random_features(1000, 20, seed=3) + 100.0  # large means: the centring must not lose precision
    dims = [8, 12]
    whole = analyse_chunks([x], dims)
    streamed = analyse_chunks((x[i:i + 64] for i in range(0, 1000, 64)), dims)
    assert torch.allclose(streamed.cka, whole.cka, atol=1e-6) and streamed.rows == 1000
    assert streamed.block_ranks == pytest.approx(whole.block_ranks, rel=1e-5)
    assert streamed.concat_rank == pytest.approx(whole.concat_rank, rel=1e-5)
    assert torch.allclose(covariance(x - 100.0), torch.from_numpy(np.cov(x.double().numpy().T)), atol=1e-6)


def test_weight_share_per_backbone_block():
    dims = backbone_dims(["resnet18", "resnet50"])
    assert dims == [512, 2048]
    weight = torch.cat([torch.full((10, 512), 3.0), torch.full((10, 2048), -1.0)], 1)
    share = weight_share(weight, dims)
    assert share.mean_abs == [3.0, 1.0] and share.share == pytest.approx([0.75, 0.25])
    state = {"heads": {"0.linear.weight": weight, "0.linear.bias": torch.zeros(10), "0.bn.weight": torch.ones(2560),
                       "1.linear.weight": weight}, "epoch": 3}
    assert set(head_weights(state, 2560)) == {"heads.0.linear.weight", "heads.1.linear.weight"}


# ---------------------------------------------------------------- kNN
def clusters(n, d, classes, seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, d, generator=torch.Generator().manual_seed(99)), dim=1)
    labels = torch.arange(n) % classes
    return (centres[labels] + spread * torch.randn(n, d, generator=g)).half(), labels


def test_knn_on_separable_features_is_perfect_and_chunking_changes_nothing():
    train, train_labels = clusters(300, 16, 6, seed=0)
    test, test_labels = clusters(90, 16, 6, seed=1)
    result = knn_accuracy((train, train_labels), (test, test_labels), k=20, chunk=32)
    assert (result.top1, result.top5, result.count) == (100.0, 100.0, 90)
    noisy_train, _ = clusters(300, 16, 6, seed=0, spread=1.0)
    noisy_test, _ = clusters(90, 16, 6, seed=1, spread=1.0)
    a = knn_accuracy((noisy_train.numpy(), train_labels), (noisy_test, test_labels), k=7, chunk=17)
    b = knn_accuracy((noisy_train, train_labels), (noisy_test, test_labels), k=7, chunk=4096)
    assert a == b and a.top1 < 100.0
    assert knn_log_line(result).startswith("kNN Acc@1 100.000 Acc@5 100.000 (k=20, T=0.07")


def test_knn_leaves_out_unreadable_images():
    train, train_labels = clusters(60, 8, 3, seed=0)
    test, test_labels = clusters(30, 8, 3, seed=1)
    wrong = train_labels.clone()
    wrong[:30] = -1  # unreadable training images: they must not vote
    test_labels = test_labels.clone()
    test_labels[:5] = -1
    result = knn_accuracy((train, wrong), (test, test_labels), k=5)
    assert (result.top1, result.count) == (100.0, 25)


# ---------------------------------------------------------------- subset folders and the cat-n curve
def test_subset_enumeration_and_folder_naming():
    assert subsets_for("none", 5) == [] and subsets_for("each", 3) == [(0,), (1,), (2,)]
    assert subsets_for("prefix", 3) == [(0,), (0, 1), (0, 1, 2)]
    assert len(subsets_for("all", 5)) == 31 and len(subsets_for("all", 6)) == 63
    with pytest.raises(UserError, match="at most 63"):
        subsets_for("all", 7)
    assert subset_folder((0, 2, 3)) == "sub0-2-3" and parse_subset_folder("sub0-2-3") == (0, 2, 3)
    assert parse_subset_folder("sub2-1") is None and parse_subset_folder("subway") is None
    assert subset_of_folder("results/sub1/x/sub0-2/wd0.001_lr0.01") == ("results/sub1/x", (0, 2))
    assert subset_of_folder("sub3") == (".", (3,)) and subset_of_folder("results/x/wd0.001_lr0.01") is None


PREFIX = "INFO - 2025-06-01 12:00:00 - 0:00:01 - "


def write_head(folder, top1, wd, n_models=3, steps="80", lr=0.01, data="cifar10", index=None):
    """A finished probe head as main_linear_probe.py leaves it: args.json, train.log, metrics.jsonl."""
    os.makedirs(folder, exist_ok=True)
    runs = range(n_models) if index is None else [index]
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"data_name": data, "wd": wd, "lr": lr, "arch": ["resnet50"] * n_models, "epochs": 2,
                   "pretrained": [f"checkpoints/supervised_pretrain/resnet50_sfadamw/checkpoints_step{steps}/"
                                  f"checkpoint_run{i}.pth.tar" for i in runs]}, f)
    with open(os.path.join(folder, "train.log"), "w") as f:
        f.write(f"{PREFIX}Epoch[1] - Iter: [0/10] Time 0.100 (0.100) Data 0.01 (0.01) Loss 2.3000 (2.3000) "
                f"Prec 10.000 (10.000) LR 0.0100\n{PREFIX}Test: Loss 1.0000 Acc@1 {top1:.3f} Best Acc@1 so far "
                f"{top1:.2f}\n{PREFIX}Top-1 test accuracy: {top1:.1f}\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1, "test_top1": top1, "test_top5": 99.0, "test_loss": 1.0}) + "\n")


def subset_acc(indices, wd, probe):
    """Made-up accuracies: more backbones help, backbone 2 is the best alone, wd 1e-4 wins, seeds differ."""
    return 60.0 + 5 * len(indices) + 2 * (2 in indices) + (1.0 if wd == 1e-4 else 0.0) + probe


def build_subset_results(root):
    """Two seed groups probed with subset heads (one 'prefix', one 'each'), plus separate reference runs."""
    for probe, subsets in ((0, subsets_for("prefix", 3)), (1, subsets_for("each", 3))):
        base = os.path.join(root, "catn", f"seed{probe}")
        for wd in (1e-4, 1e-3):
            head = f"wd{wd}_lr0.01"
            # the full concatenation; the sub0-1-2 heads of 'prefix' repeat it with their own numbers
            write_head(os.path.join(base, head), subset_acc((0, 1, 2), wd, probe) + 0.5, wd)
            for indices in subsets:
                write_head(os.path.join(base, subset_folder(indices), head), subset_acc(indices, wd, probe), wd)
    transfer = os.path.join(root, "supervised", "imagenet", "transfer")
    for i in range(2):
        write_head(os.path.join(transfer, "lineareval_seer", "cifar10_0.0001", "resnet50_sfadamw", f"run{i}"),
                   70.0 + i, 1e-4, n_models=1, steps="full", index=i)
    write_head(os.path.join(transfer, "lineareval", "cifar10_0.0001", "resnet50_sfadamw_cat5_step80k"), 78.0, 1e-4,
               n_models=5)


def test_catn_curve_groups_subset_heads_by_size(tmp_path, capsys):
    from tools import summarize
    build_subset_results(tmp_path)
    summarize.main(summarize.get_args_parser().parse_args(["--root", str(tmp_path)]))
    out = capsys.readouterr().out
    table = out[out.index("Linear-probe top-1"):out.index("Winning weight decay")]
    # the table keeps the separate runs and the probes' full heads (cat3, mean of the two seed groups) only
    assert "| cat1 " in table and "| cat5 " in table
    assert f"| {(subset_acc((0, 1, 2), 1e-4, 0) + subset_acc((0, 1, 2), 1e-4, 1)) / 2 + 0.5:.1f} ± 0.7" in table
    curve = out[out.index("Cat-n curve"):]
    singles = [subset_acc((0,), 1e-4, 0)] + [subset_acc((i,), 1e-4, 1) for i in range(3)]
    mean, std = np.mean(singles), np.std(singles, ddof=1)
    assert f"| 1 | 80k | {mean:.1f} ± {std:.1f} (n=4) |" in re.sub(r" +", " ", curve)
    with open(tmp_path / "summary_catn.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["selected"] == "1"]
    by_k = {int(r["n_backbones"]): r for r in rows}
    assert sorted(by_k) == [1, 2, 3] and all(r["wd"] == "0.0001" for r in rows)
    assert by_k[1]["n_subsets"] == "4" and by_k[2]["n_subsets"] == "1"
    # k = 3: seed0's sub0-1-2 heads (not also its full heads: the same subset) and seed1's full heads
    assert sorted(by_k[3]["subsets"].split(";")) == ["catn/seed0/sub0-1-2", "catn/seed1/sub0-1-2"]
    three = [subset_acc((0, 1, 2), 1e-4, 0), subset_acc((0, 1, 2), 1e-4, 1) + 0.5]
    assert float(by_k[3]["top1_mean"]) == pytest.approx(np.mean(three), abs=1e-3)
    assert (tmp_path / "summary_catn.png").stat().st_size > 0 and (tmp_path / "summary.png").exists()


def test_no_curve_without_subset_heads(tmp_path, capsys):
    from tools import summarize
    write_head(tmp_path / "probe", 80.0, 1e-4)
    summarize.main(summarize.get_args_parser().parse_args(["--root", str(tmp_path)]))
    assert "Cat-n curve" not in capsys.readouterr().out and not (tmp_path / "summary_catn.csv").exists()


# ---------------------------------------------------------------- tools/analyze_features.py
def write_entry(directory, features, labels, split, archs):
    """A feature-cache entry in feature_cache.py's format: fp16 features.npy, labels.npy, manifest.json."""
    os.makedirs(directory)
    np.save(os.path.join(directory, "features.npy"), np.asarray(features, dtype=np.float16))
    np.save(os.path.join(directory, "labels.npy"), np.asarray(labels, dtype=np.int64))
    files = {name: {"size": os.path.getsize(os.path.join(directory, name)), "crc32": 0}
             for name in ("features.npy", "labels.npy")}
    key = {"version": 1, "arch": archs, "checkpoints": [{"path": f"/c/run{i}.pth", "size": 1, "mtime_ns": 1}
                                                        for i in range(len(archs))],
           "data_name": "cifar10", "data_path": "/d", "data_rate": 1.0, "split": split, "view": -1, "tf_name": "224px",
           "img_size": None, "precision": "fp32", "length": len(labels), "seed": None}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"key": key, "files": files}, f)


def run_tool(*argv):
    analyze_features.main(analyze_features.get_args_parser().parse_args([str(a) for a in argv]))


def test_analyze_features_streams_a_cache_entry(tmp_path, capsys):
    """Two resnet18 blocks of 512 columns: the second is a rotated copy of the first (CKA 1); kNN and the
    weight share of a head checkpoint in the probe's formats."""
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(512, 512)))[0]
    blocks = lambda x: np.concatenate([x, x @ rotation], 1)  # noqa: E731
    centres = rng.normal(size=(4, 512))
    train_labels, test_labels = np.arange(200) % 4, np.arange(40) % 4
    train = blocks(centres[train_labels] + 0.1 * rng.normal(size=(200, 512)))
    test = blocks(centres[test_labels] + 0.1 * rng.normal(size=(40, 512)))
    test_labels[0] = -1  # an unreadable image: left out
    write_entry(tmp_path / "cache" / "aaa", train, train_labels, "train", ["resnet18"] * 2)
    write_entry(tmp_path / "cache" / "bbb", test, test_labels, "test", ["resnet18"] * 2)
    weight = torch.cat([torch.full((4, 512), 0.3), torch.full((4, 512), 0.1)], 1)
    torch.save({"head": {"bn.weight": torch.ones(1024), "linear.weight": weight, "linear.bias": torch.zeros(4)},
                "epoch": 2}, tmp_path / "best.pth.tar")
    run_tool(tmp_path / "cache", "--chunk", "7", "--knn", "5", "--head", tmp_path / "best.pth.tar",
             "--out", tmp_path / "out", "--device", "cpu")
    out = capsys.readouterr().out
    assert "kNN Acc@1 100.000" in out and "39 test images" in out
    with open(tmp_path / "out" / "analysis.json") as f:
        report = json.load(f)
    assert report["rows"] == 39 and report["dims"] == [512, 512]
    assert np.allclose(report["cka"], 1.0, atol=2e-3)  # fp16 storage: equal up to rounding
    assert report["effective_rank"][0] == pytest.approx(report["effective_rank"][1], rel=1e-2)
    assert report["effective_rank_concat"] == pytest.approx(report["effective_rank"][0], rel=1e-2)  # no new direction
    share = report["weight_share"][f"{tmp_path / 'best.pth.tar'}:head.linear.weight"]["share"]
    assert share == pytest.approx([0.75, 0.25], abs=1e-6)
    assert (tmp_path / "out" / "cka.png").stat().st_size > 0
    run_tool(tmp_path / "cache", "--stale")  # entries of the per-concatenation cache of before issue 22
    assert capsys.readouterr().out.split() == [str(tmp_path / "cache" / "aaa"), str(tmp_path / "cache" / "bbb")]


def test_analyze_features_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither a feature-cache entry nor a cache folder"):
        run_tool(tmp_path / "missing")
    write_entry(tmp_path / "cache" / "t", np.zeros((4, 1024)), [0, 1, 0, 1], "test", ["resnet18"] * 2)
    with pytest.raises(UserError, match="--knn needs the train entry"):
        run_tool(tmp_path / "cache", "--knn", "3", "--out", tmp_path / "o", "--device", "cpu")
    with pytest.raises(UserError, match="no Linear weight acting on 1024-d"):
        torch.save({"state_dict": {"fc.weight": torch.zeros(3, 2048)}}, tmp_path / "other.pth")
        run_tool(tmp_path / "cache", "--head", tmp_path / "other.pth", "--out", tmp_path / "o", "--device", "cpu")


def test_analyze_features_on_a_real_probe_cache(tmp_path, capsys):
    """The feature cache and head checkpoints that main_linear_probe.py writes, read back by the tool."""
    import main_linear_probe as probe
    from helpers import make_checkpoint, make_cifar
    make_cifar(str(tmp_path / "data"), "cifar10", n_train=100, n_test=30)
    ckpts = [str(tmp_path / f"{i}.pth") for i in range(2)]
    for seed, path in enumerate(ckpts):
        make_checkpoint(path, "resnet18", "raw", seed=seed)
    probe.main(probe.get_args_parser().parse_args([
        "--arch", "resnet18", "--pretrained", *ckpts, "--data_path", str(tmp_path / "data"), "--epochs", "1",
        "--dump_path", str(tmp_path / "run"), "--img_size", "32", "--workers", "0", "--batch_size", "32",
        "--precision", "fp32", "--feature_cache", str(tmp_path / "cache"), "--wd", "1e-4", "1e-3"]))
    capsys.readouterr()
    run_tool(tmp_path / "cache", "--knn", "20", "--out", tmp_path / "out", "--device", "cpu",
             "--head", tmp_path / "run" / "checkpoint.pth.tar", tmp_path / "run" / "wd1e-4_lr0.01" / "best.pth.tar")
    assert "kNN Acc@1" in capsys.readouterr().out
    run_tool(tmp_path / "cache", "--stale")
    assert capsys.readouterr().out.startswith("no per-concatenation entries")
    with open(tmp_path / "out" / "analysis.json") as f:
        report = json.load(f)
    assert report["rows"] == 30 and report["dims"] == [512, 512] and report["knn"]["count"] == 30
    assert np.allclose(np.diag(report["cka"]), 1.0) and 0 <= report["cka"][0][1] <= 1
    shares = report["weight_share"]
    assert len(shares) == 3  # the sweep checkpoint's two heads and one best head
    assert all(sum(s["share"]) == pytest.approx(1.0) for s in shares.values())
