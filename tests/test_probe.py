"""End-to-end behaviour of main_linear_probe.py on tiny generated data in the real on-disk formats."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import main_linear_probe as probe
import probe_setup
from arguments.linear_probe import DEFAULT_TAG_FILE, resolve_batch
from helpers import (
    ROOT,
    check_probe_args,
    expect_user_error,
    make_checkpoint,
    make_cifar,
    make_imagenet,
    make_inat,
    run_script,
)
from models import ConcatEncoder, LinearHead
from models import heads as probe_heads
from util.cli import run_main

TINY = ["--img_size", "32", "--workers", "0", "--batch_size", "32", "--print_freq", "2", "--lr", "0.1"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny datasets of every kind and two resnet18 checkpoints (AlgoPerf format and DDP state_dict)."""
    base = tmp_path_factory.mktemp("world")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=200, n_test=61)
    make_cifar(data, "cifar100", n_train=200, n_test=100)
    make_imagenet(data, num_classes=4, n_train=8, n_val=3)
    make_inat(data)
    ckpt_a, ckpt_b = str(base / "ckpt" / "checkpoint_80000"), str(base / "ckpt" / "run1.pth.tar")
    state_a = make_checkpoint(ckpt_a, "resnet18", "algoperf", seed=1)
    make_checkpoint(ckpt_b, "resnet18", "state_dict", seed=2)
    return {"base": base, "data": data, "ckpts": [ckpt_a, ckpt_b], "state_a": state_a}


def run_probe(world, dump, *extra, ckpts=None):
    argv = ["--arch", "resnet18", "--pretrained", *(ckpts or world["ckpts"]), "--data_path", world["data"],
            "--dump_path", str(dump), *TINY, *extra]
    args = probe.get_args_parser().parse_args(argv)
    probe.main(args)
    return args


def read_metrics(dump):
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_accuracy(dump):
    with open(os.path.join(dump, "train.log")) as f:
        lines = [line for line in f if "Top-1 test accuracy:" in line]
    return float(lines[-1].split("Top-1 test accuracy:")[1])


# ---------------------------------------------------------------- end to end on each dataset
@pytest.mark.parametrize("data_name,extra,chance", [
    ("cifar10", ["--epochs", "3", "--decay_epochs", "2"], 10),
    ("cifar100", ["--epochs", "2", "--tf_name", "32px"], 1),
    ("imagenet1k", ["--epochs", "3", "--batch_size", "8"], 25),
    ("inaturalist18", ["--epochs", "3", "--batch_size", "8"], 25),
])
def test_probe_end_to_end(world, tmp_path, data_name, extra, chance):
    run_probe(world, tmp_path, "--data_name", data_name, *extra)
    metrics = read_metrics(tmp_path)
    epochs = int(extra[extra.index("--epochs") + 1])
    assert [m["epoch"] for m in metrics] == list(range(epochs))
    best = max(m["test_top1"] for m in metrics)
    assert best > 2 * chance, f"the probe did not learn on {data_name}: {metrics}"
    assert final_accuracy(tmp_path) == round(best, 1)
    log = open(tmp_path / "train.log").read()
    assert "Epoch[0] - Iter: [0/" in log and "Best Acc@1 so far" in log and "git revision:" in log
    assert "world size: 1, global batch:" in log
    saved = json.load(open(tmp_path / "args.json"))
    assert saved["data_name"] == data_name and saved["arch"] == ["resnet18", "resnet18"]
    assert os.path.isfile(tmp_path / "best.pth.tar") and os.path.isfile(tmp_path / "checkpoint.pth.tar")


def test_step_schedule_and_defaults_follow_the_reference(world, tmp_path):
    (tmp_path / "x.pth").write_bytes(b"not empty")
    args = probe.get_args_parser().parse_args(["--arch", "resnet50", "--pretrained", str(tmp_path / "x.pth")])
    check_probe_args(args)
    resolve_batch(args, 1)
    assert (args.lr_values, args.wd_values, args.momentum, args.nesterov, args.epochs, args.decay_epochs,
            args.seed) == ([0.01], [5e-4], 0.9, True, 28, [8, 16, 24], 31)
    assert args.use_bn and args.wd_skip_bn and args.headinit == "normal" and args.batch_size == 256
    lrs = [probe_heads.lr_at_epoch(e, 0.01, args) for e in (0, 7, 8, 15, 16, 24, 27)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-5, 1e-5])
    run_probe(world, tmp_path / "run", "--epochs", "3", "--decay_epochs", "1", "2")
    assert [m["lr"] for m in read_metrics(tmp_path / "run")] == pytest.approx([0.1, 0.01, 0.001])


def test_percent_subset_follows_the_reference_order_on_a_small_set(world):
    """A generated 200-image CIFAR keeps the reference order's indices below 200, in that order (the documented
    rule for a training set that is not 50,000 images), the same for CIFAR10 and CIFAR100."""
    from datasets import build_dataset
    from datasets.cifar import reference_order
    full, _ = build_dataset("cifar10", world["data"], "train")
    part, _ = build_dataset("cifar10_50perc", world["data"], "train")
    other, _ = build_dataset("cifar100_50perc", world["data"], "train")
    expected = [i for i in reference_order() if i < len(full)][:len(full) // 2]
    assert part.indices == expected == other.indices


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["raw", "state_dict", "model", "algoperf", "model0", "backbone"])
def test_every_checkpoint_format_loads_the_same_weights(tmp_path, fmt):
    from models import ConcatEncoder
    path = str(tmp_path / ("checkpoint_100" if fmt == "algoperf" else f"{fmt}.pth"))
    state = make_checkpoint(path, "resnet18", fmt, seed=5)
    loaded = ConcatEncoder(["resnet18"], [path]).backbones[0].state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_frozen_backbones_stay_bit_identical(world, tmp_path, monkeypatch):
    encoders = []

    class RecordingEncoder(ConcatEncoder):
        def __init__(self, *a):
            super().__init__(*a)
            encoders.append(self)

    monkeypatch.setattr(probe_setup, "ConcatEncoder", RecordingEncoder)  # the model builder's encoder
    run_probe(world, tmp_path, "--epochs", "2")
    after = encoders[0].backbones[0].state_dict()
    reference = world["state_a"]
    assert all(torch.equal(after[k].cpu(), reference[k]) for k in after), "a frozen weight or BN statistic changed"
    assert not encoders[0].training


def test_finetune_mode_trains_the_backbones(world, tmp_path):
    run_probe(world, tmp_path, "--epochs", "1", "--exp_mode", "finetune", "--lr", "0.01")
    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=False)
    tuned = {k.split("backbones.0.", 1)[1]: v for k, v in state["encoder"].items() if k.startswith("backbones.0.")}
    assert any(not torch.equal(tuned[k].cpu(), world["state_a"][k]) for k in tuned if "conv" in k)


def test_cat_weights_head_init_averages_the_backbones_classifiers(world, tmp_path):
    from models import ConcatEncoder
    paths = [str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]
    states = [make_checkpoint(p, "resnet18", "raw", seed=s, num_classes=10) for s, p in enumerate(paths)]
    encoder = ConcatEncoder(["resnet18", "resnet18"], paths)
    head = LinearHead(encoder.out_dim, 10)
    head.init_weights("cat_weights", encoder.classifiers)
    assert torch.allclose(head.linear.weight[:, :512], states[0]["fc.weight"] / 2)
    assert torch.allclose(head.linear.bias, (states[0]["fc.bias"] + states[1]["fc.bias"]) / 2)


# ---------------------------------------------------------------- resume, eval_only, tags
@pytest.mark.slow  # the default suite covers it: tests/faults/test_preemption.py (signals at seeded points)
def test_interrupted_run_resumes_to_the_same_result(world, tmp_path):
    common = ["--arch", "resnet18", "--pretrained", *world["ckpts"], "--data_path", world["data"], *TINY,
              "--epochs", "4", "--decay_epochs", "2", "--print_freq", "1"]
    straight = tmp_path / "straight"
    run_probe(world, straight, "--epochs", "4", "--decay_epochs", "2", "--print_freq", "1")

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "main_linear_probe.py", *common, "--dump_path", str(interrupted)],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    log = (interrupted / "train.log").read_text()
    assert "Stopped by SIGTERM" in log and "Top-1 test accuracy" not in log

    run_probe(world, interrupted, "--epochs", "4", "--decay_epochs", "2", "--print_freq", "1")
    assert "Resumed from" in (interrupted / "train.log").read_text()
    a = torch.load(straight / "checkpoint.pth.tar", weights_only=False)["heads"]
    b = torch.load(interrupted / "checkpoint.pth.tar", weights_only=False)["heads"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert final_accuracy(straight) == final_accuracy(interrupted)


def test_rerun_with_another_recipe_is_refused(world, tmp_path, capsys):
    run_probe(world, tmp_path, "--epochs", "1")
    args = probe.get_args_parser().parse_args(["--arch", "resnet18", "--pretrained", *world["ckpts"],
                                               "--data_path", world["data"], "--dump_path", str(tmp_path),
                                               *TINY, "--epochs", "1", "--wd", "0.01"])
    with pytest.raises(SystemExit):
        run_main(probe.main, args)
    assert "--wd" in capsys.readouterr().err


def test_eval_only_reproduces_the_best_accuracy(world, tmp_path):
    run_probe(world, tmp_path, "--epochs", "2")
    best = max(m["test_top1"] for m in read_metrics(tmp_path))
    run_probe(world, tmp_path, "--epochs", "2", "--mode", "eval_only", "--eval_checkpoint", "best")
    last = open(tmp_path / "train.log").read().strip().splitlines()[-1]
    assert f"Acc@1 {best:.3f}" in last


def test_a_head_that_never_scores_still_writes_best_and_eval_only_reads_it(world, tmp_path):
    """Every test image is of a class no training image has: the head stays at 0% and must still leave a best.pth.tar
    (the reference starts its best accuracy below 0), so --mode eval_only reproduces the 0."""
    import pickle
    data = tmp_path / "data"
    folder = make_cifar(str(data), "cifar10", n_train=100, n_test=20)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f)
        batch["labels"] = [9] * len(batch["labels"]) if name == "test_batch" else [y % 9 for y in batch["labels"]]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    dump = tmp_path / "run"
    run_probe(dict(world, data=str(data)), dump, "--epochs", "2")
    assert [m["test_top1"] for m in read_metrics(dump)] == [0.0, 0.0]
    assert os.path.isfile(dump / "best.pth.tar")
    run_probe(dict(world, data=str(data)), dump, "--epochs", "2", "--mode", "eval_only", "--eval_checkpoint", "best")
    assert "Acc@1 0.000" in open(dump / "train.log").read().strip().splitlines()[-1]


def test_tag_fills_backbones_from_the_tag_file(world, tmp_path):
    tag_file = tmp_path / "tags.yaml"
    tag_file.write_text(yaml.safe_dump({"mine": {"arch": ["resnet18"] * 2, "pretrained": world["ckpts"]}}))
    args = probe.get_args_parser().parse_args(["--tag", "mine", "--tag_file", str(tag_file),
                                               "--data_path", world["data"], "--dump_path", str(tmp_path / "run"),
                                               *TINY, "--epochs", "1"])
    probe.main(args)
    assert args.pretrained == world["ckpts"] and final_accuracy(tmp_path / "run") > 20


def test_shipped_tags_point_to_the_readme_layout():
    with open(DEFAULT_TAG_FILE) as f:
        tags = yaml.safe_load(f)
    sizes = {"supervisedimagenet_resnet50_sfadamw_2_step200k": ("checkpoints_step200", 2),
             "supervisedimagenet_resnet50_sfadamw_4_step100k": ("checkpoints_step100", 4),
             "supervisedimagenet_resnet50_sfadamw_5_step80k": ("checkpoints_step80", 5),
             **{f"supervisedimagenet_resnet50_sfadamw_run{i}": ("checkpoints_stepfull", 1) for i in range(5)}}
    assert set(tags) == set(sizes)
    for tag, (folder, n) in sizes.items():
        assert tags[tag]["arch"] == ["resnet50"] * n
        runs = range(n) if n > 1 else [int(tag[-1])]
        assert tags[tag]["pretrained"] == [f"checkpoints/supervised_pretrain/resnet50_sfadamw/{folder}/"
                                           f"checkpoint_run{i}.pth.tar" for i in runs]


# ---------------------------------------------------------------- distributed
def test_two_process_gloo_run_counts_every_test_image_once(world, tmp_path):
    dump = tmp_path / "ddp"
    result = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "main_linear_probe.py", "--arch", "resnet18", "--pretrained", *world["ckpts"],
                         "--data_path", world["data"], "--dump_path", str(dump), *TINY, "--batch_size", "16",
                         "--epochs", "2", "--device", "cpu", "--extra_log_lines"])  # gloo on a GPU machine too
    assert result.returncode == 0, result.stderr[-3000:]
    log = (dump / "train.log").read_text()
    assert "world size: 2, global batch: 32" in log and "launcher torchrun" in log
    assert "over 61 images" in log  # 61 is odd: a padding sampler would have counted 62
    assert os.path.isfile(dump / "train.log-1")
    best = max(m["test_top1"] for m in read_metrics(dump))
    if torch.cuda.is_available():  # evaluate where the heads were trained; a process: --device cpu hides the GPUs
        again = run_script(["main_linear_probe.py", "--arch", "resnet18", "--pretrained", *world["ckpts"],
                            "--data_path", world["data"], "--dump_path", str(dump), *TINY, "--batch_size", "16",
                            "--epochs", "2", "--mode", "eval_only", "--eval_checkpoint", "best", "--device", "cpu"])
        assert again.returncode == 0, again.stderr[-3000:]
    else:
        run_probe(world, dump, "--batch_size", "16", "--epochs", "2", "--mode", "eval_only", "--eval_checkpoint",
                  "best", "--debug")
    assert f"Acc@1 {best:.3f}" in (dump / "train.log").read_text().strip().splitlines()[-1]


def test_slurm_environment_is_read(monkeypatch):
    from util.distributed import first_slurm_host, launch_environment
    slurm = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert launch_environment(slurm) == ("slurm", 3, 8, 1)
    assert launch_environment({**slurm, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == ("torchrun", 0, 2, 0)
    assert launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == ("single", 0, 1, 0)  # sbatch shell
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is parsed by hand
    assert first_slurm_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"


# ---------------------------------------------------------------- acc1 scripts
def test_acc1_scripts_report_final_and_running_accuracy(world, tmp_path):
    home = tmp_path / "home"
    finished = home / "results/supervised/imagenet/transfer/lineareval/cifar10_0.0005/resnet50_sfadamw_cat2"
    running = home / "results/supervised/imagenet/transfer/lineareval/cifar100_0.0005/resnet50_sfadamw_cat2"
    run_probe(world, finished, "--epochs", "2")
    running.mkdir(parents=True)
    lines = open(finished / "train.log").read().splitlines()
    (running / "train.log").write_text("\n".join(line for line in lines if "Top-1 test accuracy" not in line) + "\n")
    env = {"CAT_EXP_HOME": str(home)}
    # --table: one line per run (the original's three-line output is tests/test_fidelity.py's)
    final = subprocess.run(["bash", os.path.join(ROOT, "top1acc_final.sh"), "--table", "cifar10_", "cat2"], env=env,
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    out = final.stdout.strip().splitlines()
    assert len(out) == 1 and "cifar10_0.0005" in out[0] and "Epoch[1]" in out[0]
    assert out[0].endswith(f"{final_accuracy(finished):.1f}")
    sofar = subprocess.run(["bash", os.path.join(ROOT, "top1acc_sofar.sh"), "cat2"], env=dict(env, ACC1_TABLE="1"),
                           capture_output=True, text=True)
    rows = sofar.stdout.strip().splitlines()
    assert len(rows) == 2 and all("Epoch[1]" in r for r in rows)
    best = max(m["test_top1"] for m in read_metrics(finished))
    assert all(r.endswith(f"{best:.2f}") for r in rows)
    none = subprocess.run(["bash", os.path.join(ROOT, "top1acc_final.sh"), "--table", "inat"], env=env,
                          capture_output=True, text=True)
    assert none.returncode == 0 and none.stdout == ""  # as the original: no match, nothing printed
    empty = subprocess.run(["bash", os.path.join(ROOT, "top1acc_final.sh")], env={"CAT_EXP_HOME": str(tmp_path)},
                           capture_output=True, text=True)
    assert empty.returncode != 0 and "no probe results" in empty.stderr


# ---------------------------------------------------------------- bad input


def test_bad_backbone_arguments(world, tmp_path, capsys):
    base = ["--data_path", world["data"], "--dump_path", str(tmp_path / "d"), *TINY]
    expect_user_error(["--arch", "resnet7", "--pretrained", world["ckpts"][0], *base], capsys, "unknown arch")
    expect_user_error(["--arch", "resnet18", "resnet18", "resnet18", "--pretrained", *world["ckpts"], *base],
                      capsys, "--arch has 3", "--pretrained has 2")
    expect_user_error(["--tag", "nope", *base], capsys, "unknown --tag 'nope'")
    expect_user_error(["--arch", "resnet18", "--pretrained", str(tmp_path / "missing.pth"), *base], capsys,
                      "not found", "missing.pth")
    expect_user_error(["--arch", "resnet50", "--pretrained", world["ckpts"][0], *base], capsys,
                      "does not match resnet50", "checkpoint_80000")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(world["ckpts"][1], "rb").read()[:5000])
    expect_user_error(["--arch", "resnet18", "--pretrained", str(truncated), *base], capsys, "truncated.pth")
    extra = tmp_path / "extra.pth"
    state = torch.load(world["ckpts"][1], weights_only=True)
    state["state_dict"]["module.projector.weight"] = torch.zeros(3)
    torch.save(state, extra)
    expect_user_error(["--arch", "resnet18", "--pretrained", str(extra), *base], capsys, "unexpected",
                      "projector.weight")
    assert not os.path.exists(tmp_path / "d" / "checkpoint.pth.tar")


def test_bad_data_arguments(world, tmp_path, capsys):
    base = ["--arch", "resnet18", "--pretrained", world["ckpts"][0], "--dump_path", str(tmp_path / "d"), *TINY]
    empty = str(tmp_path / "empty")
    expect_user_error([*base, "--data_path", world["data"], "--data_name", "mnist"], capsys, "unknown --data_name")
    expect_user_error([*base, "--data_path", world["data"], "--data_name", "imagenet1k", "--tf_name", "32px"],
                      capsys, "32px")
    expect_user_error([*base, "--data_path", empty, "--data_name", "imagenet1k"], capsys,
                      "imagenet", "train", "Expected layout")
    expect_user_error([*base, "--data_path", empty, "--data_name", "inaturalist18"], capsys, "inaturalist18")
    expect_user_error([*base, "--data_path", empty, "--data_name", "cifar10", "--no-download"], capsys,
                      "cifar10 not found", "--download")


def test_bad_files_in_the_data_are_named(world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(world["data"], "inaturalist18"), data / "inaturalist18")
    os.remove(data / "inaturalist18" / "val2018.json")
    base = ["--arch", "resnet18", "--pretrained", world["ckpts"][0], "--dump_path", str(tmp_path / "d"), *TINY,
            "--data_path", str(data)]
    expect_user_error([*base, "--data_name", "inaturalist18"], capsys, "val2018.json not found")

    shutil.copytree(os.path.join(world["data"], "imagenet"), data / "imagenet")
    bad = data / "imagenet" / "train" / "n00000001" / "img_1_0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    expect_user_error([*base, "--data_name", "imagenet1k", "--batch_size", "8", "--epochs", "1"], capsys,
                      "cannot read image", "img_1_0.JPEG")
    expect_user_error([*base, "--data_name", "imagenet1k", "--batch_size", "8", "--epochs", "1", "--workers",
                       "1"], capsys, "cannot read image", "img_1_0.JPEG")

    make_cifar(str(data), "cifar10", n_train=50, n_test=10)
    (data / "cifar" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    expect_user_error([*base, "--data_name", "cifar10"], capsys, "data_batch_3", "not a valid CIFAR batch")


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    result = run_script(["main_linear_probe.py", "--arch", "resnet18", "--pretrained", str(tmp_path / "none.pth"),
                         "--data_path", str(tmp_path), "--dump_path", str(tmp_path / "d"), "--no-download"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'none.pth'}"]
