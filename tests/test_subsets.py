"""--subsets: heads on sub-concatenations in the probe's pass, equal to separate probes; --knn next to them."""
import csv
import json
import os

import pytest
import torch

import main_linear_probe as probe
from helpers import make_checkpoint, make_cifar
from util.cli import UserError

TINY = ["--img_size", "32", "--workers", "0", "--batch_size", "32", "--print_freq", "5", "--precision", "fp32",
        "--epochs", "2", "--decay_epochs", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("subsets")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=150, n_test=40)
    ckpts = [str(base / f"seed{i}.pth") for i in range(3)]
    for seed, path in enumerate(ckpts):
        make_checkpoint(path, "resnet18", "raw", seed=seed)
    return {"base": base, "data": data, "ckpts": ckpts, "cache": str(base / "cache")}


def run_probe(world, dump, ckpts, *extra):
    args = probe.get_args_parser().parse_args(["--arch", "resnet18", "--pretrained", *ckpts, "--data_path",
                                               world["data"], "--dump_path", str(dump), "--feature_cache",
                                               world["cache"], *TINY, *extra])
    probe.main(args)


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def head_state(folder):
    return torch.load(os.path.join(folder, "best.pth.tar"), weights_only=False)["head"]


def test_a_subset_head_equals_a_separate_probe_of_its_backbones(world, tmp_path):
    ckpts = world["ckpts"]
    run_probe(world, tmp_path / "all", ckpts, "--subsets", "all", "--wd", "1e-4", "1e-3", "--knn", "5")
    # the full set's heads keep their folders; every smaller subset gets sub{i}-{j}/wd{wd}_lr{lr}/
    subs = sorted(d for d in os.listdir(tmp_path / "all") if d.startswith("sub"))
    assert subs == ["sub0", "sub0-1", "sub0-2", "sub1", "sub1-2", "sub2"]
    assert sorted(os.listdir(tmp_path / "all" / "sub0-2")) == ["wd1e-3_lr0.01", "wd1e-4_lr0.01"]
    head = tmp_path / "all" / "sub0-2" / "wd1e-3_lr0.01"
    with open(head / "args.json") as f:
        assert json.load(f)["pretrained"] == [ckpts[0], ckpts[2]]
    log = open(head / "train.log").read()
    assert "Top-1 test accuracy" in log and "kNN Acc@1" in log

    run_probe(world, tmp_path / "alone", [ckpts[0], ckpts[2]], "--wd", "1e-3", "--knn", "5")
    alone = tmp_path / "alone"
    # same initial draws, data order and updates: the same head, bit for bit, and the same numbers every epoch
    for key, value in head_state(alone).items():
        assert torch.equal(value, head_state(head)[key]), key
    assert metrics(head) == [dict(m, seconds=s["seconds"]) for m, s in zip(metrics(alone), metrics(head))]
    assert metrics(head)[0]["knn_k"] == 5 and "knn_top1" in metrics(tmp_path / "all" / "wd1e-4_lr0.01")[0]


def test_fused_heads_equal_separate_heads_up_to_rounding(world, tmp_path):
    """--head_impl fused computes every head in a fixed number of operations: the same heads, saved in the same
    form (a fused head loads into a separate probe), to fp32 rounding."""
    for impl in ("separate", "fused"):
        run_probe(world, tmp_path / impl, world["ckpts"], "--subsets", "all", "--wd", "1e-4", "1e-3",
                  "--head_impl", impl)
    heads = [torch.load(tmp_path / impl / "checkpoint.pth.tar", weights_only=False)["heads"]
             for impl in ("separate", "fused")]
    assert sorted(heads[0]) == sorted(heads[1]) and len({key.split(".")[0] for key in heads[0]}) == 2 * 7
    for key, value in heads[0].items():
        assert torch.allclose(value.float(), heads[1][key].float(), rtol=1e-4, atol=1e-5), key
    for head in ("wd1e-4_lr0.01", "sub0-2/wd1e-3_lr0.01", "sub1/wd1e-4_lr0.01"):
        separate, fused = metrics(tmp_path / "separate" / head), metrics(tmp_path / "fused" / head)
        for a, b in zip(separate, fused):
            assert abs(a["test_top1"] - b["test_top1"]) <= 100 / 40 + 1e-9  # a near-tie may flip one of 40 images
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_prefix_heads_give_summarize_the_catn_curve(world, tmp_path, capsys):
    from tools import summarize
    root = tmp_path / "results"
    for group in range(2):  # two seed groups, one probe each
        ckpts = world["ckpts"][group:group + 2]
        run_probe(world, root / f"group{group}", ckpts, "--subsets", "prefix", "--wd", "5e-4")
    assert sorted(os.listdir(root / "group0")) == sorted(
        ["args.json", "checkpoint.pth.tar", "sweep.log", "wd5e-4_lr0.01", "sub0", ".lock"])
    capsys.readouterr()
    summarize.main(summarize.get_args_parser().parse_args(["--root", str(root)]))
    out = capsys.readouterr().out
    assert "Cat-n curve" in out
    with open(root / "summary_catn.csv") as f:
        rows = {int(r["n_backbones"]): r for r in csv.DictReader(f) if r["selected"] == "1"}
    assert sorted(rows) == [1, 2] and rows[1]["n_subsets"] == "2" and rows[2]["n_subsets"] == "2"
    finals = [max(m["test_top1"] for m in metrics(root / f"group{g}" / "sub0" / "wd5e-4_lr0.01")) for g in range(2)]
    assert float(rows[1]["top1_mean"]) == pytest.approx(sum(finals) / 2, abs=0.06)


def test_subset_user_errors(world, tmp_path):
    with pytest.raises(UserError, match="needs|reads the cached features"):
        probe.main(probe.get_args_parser().parse_args(["--arch", "resnet18", "--pretrained", *world["ckpts"],
                                                       "--dump_path", str(tmp_path / "x"), "--knn", "5"]))
    with pytest.raises(UserError, match="at most 63"):
        probe.main(probe.get_args_parser().parse_args(["--arch", "resnet18", "--pretrained", *world["ckpts"] * 3,
                                                       "--dump_path", str(tmp_path / "y"), "--subsets", "all"]))


def test_two_processes_train_the_subset_heads_of_one(world, tmp_path):
    """The same global batch of 32 (16 + 16 with torchrun), fp32, cached features: the same subset heads; the two
    processes compute them fused (their BatchNorm statistics over both processes' samples), the one separately."""
    from helpers import run_script
    ckpts, common = world["ckpts"][:2], ["--subsets", "each", "--knn", "3"]
    run_probe(world, tmp_path / "one", ckpts, *common)
    argv = ["main_linear_probe.py", "--arch", "resnet18", "--pretrained", *ckpts, "--data_path", world["data"],
            "--dump_path", str(tmp_path / "two"), "--feature_cache", world["cache"], *TINY, *common,
            "--batch_size", "16", "--head_impl", "fused"]
    two = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv],
                     env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert two.returncode == 0, two.stderr[-2000:]
    heads = [torch.load(tmp_path / run / "checkpoint.pth.tar", weights_only=False)["heads"] for run in ("one", "two")]
    assert sorted(heads[0]) == sorted(heads[1]) and any(key.startswith("2.") for key in heads[0])  # 1 full + 2 subsets
    for key in heads[0]:
        assert torch.allclose(heads[0][key].float(), heads[1][key].float(), rtol=1e-3, atol=1e-5), key
    for run in ("one", "two"):
        log = (tmp_path / run / "sub1" / "wd5e-4_lr0.01" / "train.log").read_text()
        assert log.count("kNN Acc@1") == 2 and log.count("Top-1 test accuracy") == 1


@pytest.mark.parametrize("use_bn", [True, False])
def test_fused_evaluation_uses_each_heads_own_running_statistics(use_bn):
    """Saved heads need not share statistics (heads loaded from different runs): evaluated fused, each head gives
    its own BatchNorm1d + Linear's logits."""
    from models.heads import LinearHead, MultiHead
    torch.manual_seed(0)
    heads = [LinearHead(12, 4, use_bn), LinearHead(8, 4, use_bn, columns=[0, 1, 2, 3, 8, 9, 10, 11]),
             LinearHead(4, 4, use_bn, columns=[4, 5, 6, 7])]
    for head in heads:
        for tensor in head.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    separate, fused = MultiHead(heads).eval(), MultiHead(heads, fused=True).eval()
    features = torch.randn(6, 12) * 2 + 1
    with torch.no_grad():
        for a, b in zip(separate(features), fused(features)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
