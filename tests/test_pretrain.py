"""main_pretrain.py and tools/plan_timecat.py on tiny generated ImageNet folders (resnet18, 32 px, CPU)."""
import copy
import functools
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

import engine_pretrain
import helpers
import main_pretrain as pretrain
from arguments import pretrain as pretrain_flags
from helpers import ROOT, make_imagenet, run_script
from models import build_backbone
from models.init import algoperf_init
from tools import plan_timecat
from util.cli import UserError
from util.sfadamw import AlgoPerfAdamWScheduleFree

# 4 classes x 8 training images, global batch 8: 4 steps per epoch. fp32 so runs compare bit for bit.
TINY = ["--arch", "resnet18", "--img_size", "32", "--global_batch", "8", "--workers", "0", "--precision", "fp32",
        "--warmup_steps", "2", "--lr", "0.01", "--bn_refresh_batches", "2", "--print_freq", "1",
        "--cuda_deterministic"]  # on a GPU machine the bit-for-bit comparisons below need it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pretrain_data"))
    make_imagenet(root, num_classes=4, n_train=8, n_val=3)
    return root




def argv(data, out, name, *extra):
    return [*TINY, "--data_path", data, "--output_dir", str(out / "ckpt"), "--dump_path", str(out / name), *extra]


def run(data, out, name, *extra):
    args = pretrain.get_args_parser().parse_args(argv(data, out, name, *extra))
    pretrain.main(args)
    return args


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, keys=None):
    keys = keys or a.keys()
    different = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def read_metrics(dump):
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- end to end
def test_two_runs_of_a_plan_then_probe_their_concatenation(data, tmp_path, capsys):
    plan_args = plan_timecat.get_args_parser().parse_args([
        "--total_steps", "6", "--n", "2", "--baseline_steps", "6", "--arch", "resnet18", "--tag_prefix", "toy",
        "--output_dir", str(tmp_path / "ckpt"), "--tags_out", str(tmp_path / "tags.yaml"),
        "--sbatch_out", str(tmp_path / "plan.sbatch"), "--gpus_per_task", "2"])
    plan_timecat.main(plan_args)
    printed = capsys.readouterr().out
    assert "total training steps: 9 (trained separately: 12)" in printed
    script = (tmp_path / "plan.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "STEPS=(6 3)" in script and 'SAVE_STEPS=("3" "3")' in script

    run(data, tmp_path, "run0", "--run", "0", "--steps", "6", "--save_steps", "3", "--eval_every", "2")
    run(data, tmp_path, "run1", "--run", "1", "--steps", "3", "--save_steps", "3")
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["checkpoints_step3steps", "checkpoints_stepfull"]
    assert sorted(os.listdir(tmp_path / "ckpt" / "checkpoints_step3steps")) == \
        ["checkpoint_run0.pth.tar", "checkpoint_run1.pth.tar"]
    saved = load(tmp_path / "ckpt" / "checkpoints_step3steps" / "checkpoint_run1.pth.tar")
    assert (saved["step"], saved["seed"], saved["arch"]) == (3, 550, "resnet18")
    assert set(saved) >= {"state_dict", "args", "val_top1"} and "layer1.0.bn1.running_var" in saved["state_dict"]
    metrics = read_metrics(tmp_path / "run0")
    assert [m["step"] for m in metrics] == [2, 3, 4, 6]
    assert set(metrics[0]) == {"step", "epoch", "train_loss", "test_loss", "test_top1", "test_top5", "lr",
                               "seconds", "img_per_s"}
    log = (tmp_path / "run0" / "train.log").read_text()
    for fragment in ("Epoch[1] - Step: [6/6] Loss", "img/s", "Test: Loss", "Best Acc@1 so far",
                     "Test: Acc@5", "Top-1 test accuracy:", "global batch 8 = 8 per process x 1 process(es)"):
        assert fragment in log, fragment

    import main_linear_probe as probe
    tags = yaml.safe_load((tmp_path / "tags.yaml").read_text())
    assert set(tags) == {"toy_run0", "toy_2_step3steps"}
    dump = tmp_path / "probe"
    probe.main(probe.get_args_parser().parse_args([
        "--tag", "toy_2_step3steps", "--tag_file", str(tmp_path / "tags.yaml"), "--data_name", "imagenet1k",
        "--data_path", data, "--img_size", "32", "--epochs", "1", "--workers", "0", "--batch_size", "8",
        "--dump_path", str(dump)]))
    assert "Top-1 test accuracy:" in (dump / "train.log").read_text()


def test_milestone_equals_the_final_weights_of_a_shorter_run(data, tmp_path):
    """What the budget plan relies on: the k-step milestone of a longer run is the k-step run."""
    run(data, tmp_path / "long", "run0", "--steps", "7", "--save_steps", "5", "--eval_every", "3")
    run(data, tmp_path / "short", "run0", "--steps", "5", "--save_steps")
    milestone = load(tmp_path / "long" / "ckpt" / "checkpoints_step5steps" / "checkpoint_run0.pth.tar")
    final = load(tmp_path / "short" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")
    assert_same_tensors(milestone["state_dict"], final["state_dict"])
    assert milestone["val_top1"] == final["val_top1"]


# ---------------------------------------------------------------- schedule-free BatchNorm
def test_bn_refresh_recomputes_the_statistics_at_x(data, tmp_path):
    common = ["--steps", "8", "--save_steps", "--lr", "0.05", "--eval_every", "0"]
    run(data, tmp_path / "stale", "run0", *common, "--bn_refresh_batches", "0")
    args = run(data, tmp_path / "fresh", "run0", *common, "--bn_refresh_batches", "3")
    stale = load(tmp_path / "stale" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    fresh = load(tmp_path / "fresh" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    stat_keys = [k for k in fresh if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in fresh if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert_same_tensors(stale, fresh, weights)  # refreshing never changes what the run trains
    assert all(not torch.allclose(stale[k], fresh[k]) for k in stat_keys)
    # AlgoPerf's second entry: a momentum update at x every K steps, still without touching the weights
    run(data, tmp_path / "every", "run0", *common, "--bn_refresh_batches", "0", "--bn_refresh_every", "2")
    every = load(tmp_path / "every" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    assert_same_tensors(stale, every, weights)
    assert all(not torch.allclose(stale[k], every[k]) for k in stat_keys)
    stale_eval = read_metrics(tmp_path / "stale" / "run0")[-1]
    fresh_eval = read_metrics(tmp_path / "fresh" / "run0")[-1]
    assert stale_eval["test_loss"] != fresh_eval["test_loss"]

    # the saved statistics are those of the saved weights x on the refresh batches of step 8
    from datasets.images import build_image_folder
    from datasets.transforms import build_transform
    from models import build_backbone
    model = build_backbone("resnet18", 4)
    model.load_state_dict(fresh)
    train_set = build_image_folder(os.path.join(data, "imagenet", "train"), "ImageNet1k", "",
                                   build_transform("imagenet", "eval", True, 32))
    sampler = engine_pretrain.RefreshBatches(len(train_set), args.seed, 8, 3, 0, 1)
    sampler.step = 8
    loader = torch.utils.data.DataLoader(engine_pretrain.SeededSamples(train_set), batch_sampler=sampler)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the device the run refreshed on
    engine_pretrain.refresh_bn(model.to(device), loader, device, "fp32", 1)
    recomputed = model.state_dict()
    for k in stat_keys:
        torch.testing.assert_close(recomputed[k].cpu(), fresh[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sfadamw", "sgd"])
def test_evaluation_sees_x_and_training_resumes_at_y_in_train_mode(optimizer):
    args = pretrain.get_args_parser().parse_args(["--optimizer", optimizer, "--warmup_steps", "0", "--lr", "0.1"])
    pretrain_flags.check_args(args)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = engine_pretrain.build_optimizer(model, args)
    model.train()
    if optimizer == "sfadamw":
        opt.train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(torch.randn(8, 3)), torch.randint(0, 2, (8,))).backward()
        opt.step()
        opt.zero_grad()
    y = [p.detach().clone() for p in model.parameters()]
    with engine_pretrain.at_average(model, opt, args.optimizer in engine_pretrain.SCHEDULE_FREE):
        model.eval()
        inside = [p.detach().clone() for p in model.parameters()]
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(y, model.parameters()))  # bit-exact y, not a lerp back
    moved = any(not torch.equal(a, b) for a, b in zip(y, inside))
    assert moved == (optimizer == "sfadamw")  # x differs from y for schedule-free only
    if optimizer == "sfadamw":
        assert all(group["train_mode"] for group in opt.param_groups)


# ---------------------------------------------------------------- preemption
def test_sigterm_to_the_process_group_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    """As slurm preempts: SIGTERM to every process of the job at once, DataLoader workers included."""
    common = ["--steps", "20", "--save_steps", "10", "--eval_every", "5"]
    run(data, tmp_path / "straight", "run0", *common)

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "main_pretrain.py", *argv(data, out, "run0", *common, "--workers", "2")],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "run0" / "train.log"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and \
            not (log.exists() and "Step: [3/20]" in log.read_text()):
        time.sleep(0.01)  # polling the log, not timing the run
    os.killpg(proc.pid, signal.SIGTERM)  # the run and its loader workers, as slurm signals a job step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    text = log.read_text()
    assert "Stopped by SIGTERM at step" in text and "Top-1 test accuracy" not in text
    stopped_at = int(text.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= stopped_at < 20

    run(data, out, "run0", *common)
    assert f"Resumed from step {stopped_at}" in log.read_text()
    for folder in ("checkpoints_step10steps", "checkpoints_stepfull"):
        a = load(tmp_path / "straight" / "ckpt" / folder / "checkpoint_run0.pth.tar")
        b = load(out / "ckpt" / folder / "checkpoint_run0.pth.tar")
        assert_same_tensors(a["state_dict"], b["state_dict"])
        assert a["val_top1"] == b["val_top1"]
    assert read_metrics(tmp_path / "straight" / "run0")[-1]["test_loss"] == read_metrics(out / "run0")[-1]["test_loss"]


def test_max_time_stop_then_resume_with_data_workers_gives_the_same_weights(data, tmp_path):
    """Augmentations are seeded per sample: neither the stop nor the number of loader processes matters."""
    run(data, tmp_path / "straight", "run0", "--steps", "4", "--save_steps")
    run(data, tmp_path, "run0", "--steps", "4", "--save_steps", "--max_time", "0.001")
    log = (tmp_path / "run0" / "train.log").read_text()
    assert "Stopped by --max_time 0.001 at step 1" in log and "Top-1 test accuracy" not in log
    run(data, tmp_path, "run0", "--steps", "4", "--save_steps", "--workers", "2")
    log = (tmp_path / "run0" / "train.log").read_text()
    assert "Resumed from step 1" in log and "Top-1 test accuracy" in log
    a = load(tmp_path / "straight" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")
    b = load(tmp_path / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")
    assert_same_tensors(a["state_dict"], b["state_dict"])


def test_resume_refuses_a_changed_micro_batch_or_precision(data, tmp_path):
    """The BatchNorm batch and the numerics are part of the recipe a resumed run must keep."""
    common = ["--steps", "3", "--save_steps", "--eval_every", "0", "--batch_size", "4"]  # 4 x 2 accumulation
    run(data, tmp_path, "run0", *common, "--max_time", "0.001")  # stops after step 1 with a resume state
    for flag, value in (("--batch_size", "8"), ("--precision", "bf16")):
        with pytest.raises(UserError, match=f"written by a run with {flag} .* \\(now {value}\\)"):
            run(data, tmp_path, "run0", *common, flag, value)
    run(data, tmp_path, "run0", *common, "--data_path", os.path.join(data, "imagenet"))  # the ImageNet folder itself
    log = (tmp_path / "run0" / "train.log").read_text()
    assert "Resumed from step 1" in log and "--data_path is the ImageNet folder itself" in log


def test_sgd_recipe_trains_with_its_step_schedule(data, tmp_path):
    run(data, tmp_path, "run0", "--optimizer", "sgd", "--lr", "0.1", "--warmup_steps", "0", "--steps", "6",
        "--save_steps", "--decay_epochs", "1", "--eval_every", "0")
    log = (tmp_path / "run0" / "train.log").read_text()
    assert "sgd lr 0.1 wd 0.0001 momentum 0.9 step schedule" in log
    assert "Step: [4/6] Loss" in log and "LR 0.1 " in log and "Step: [5/6]" in log and "LR 0.01 " in log
    assert os.path.exists(tmp_path / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")


# ---------------------------------------------------------------- distributed
def test_two_process_gloo_run_trains_the_same_weights_as_one_process(data, tmp_path):
    common = ["--global_batch", "16", "--steps", "4", "--save_steps", "--eval_every", "0", "--device", "cpu"]
    result = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "main_pretrain.py", *argv(data, tmp_path / "ddp", "run0", *common)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "ddp" / "run0" / "train.log").read_text()
    assert "world size: 2" in log and "global batch 16 = 8 per process x 2 process(es) x 1" in log
    assert "over 12 images" in log  # every validation image counted once over the two processes

    run(data, tmp_path / "single", "run0", *common, "--batch_size", "8")  # 1 process x 2 accumulation steps
    assert "global batch 16 = 8 per process x 1 process(es) x 2" in \
        (tmp_path / "single" / "run0" / "train.log").read_text()
    a = load(tmp_path / "ddp" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    b = load(tmp_path / "single" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    for k in a:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # refresh batches differ
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- units
def test_each_global_batch_is_the_same_images_whatever_the_process_count():
    def global_batches(world, accum, batch, start=0, steps=6):
        samplers = [iter(engine_pretrain.TrainBatches(50, 7, 12, batch, accum, r).starting_at(start))
                    for r in range(world)]
        return [sorted(x for r in range(world) for _ in range(accum) for x in next(samplers[r]))
                for _ in range(steps)]

    reference = global_batches(1, 1, 12)
    assert global_batches(2, 1, 6) == reference == global_batches(3, 2, 2)
    assert global_batches(2, 3, 2, start=4, steps=2) == reference[4:6]  # resuming mid-epoch
    epoch0 = [i for batch in reference[:4] for i, _ in batch]
    assert len(set(epoch0)) == 48  # 4 steps per epoch, each image at most once, 2-image tail dropped
    assert reference[4] != reference[0]  # epoch 1 is another order


def test_recipe_defaults_and_batch_resolution():
    args = pretrain.get_args_parser().parse_args([])
    pretrain_flags.check_args(args)
    assert (args.arch, args.global_batch, args.lr, args.wd, tuple(args.betas), args.warmup_steps,
            args.label_smoothing, args.weight_lr_power, args.seed, args.steps, args.save_steps) == \
        ("resnet50", 1024, 0.0025, 0.08121616522670176, (0.9, 0.9955159689799007), 2799, 0.2, 2.0, 2,
         450000, [80000, 100000, 200000])
    assert args.output_dir.endswith(os.path.join("checkpoints", "supervised_pretrain", "resnet50_sfadamw"))
    assert (args.precision, args.init, args.optimizer, args.sf_moment_dtype) == \
        ("fp32", "algoperf", "sfadamw_algoperf", "bfloat16")
    # the same global batch and BatchNorm batch (AlgoPerf: 128 per device) at 1, 2, 4 and 8 processes
    for world, accum in ((1, 8), (2, 4), (4, 2), (8, 1)):
        args.batch_size = args.accum_steps = None
        pretrain_flags.resolve_batch(args, world)
        assert (args.batch_size, args.accum_steps) == (128, accum)
        assert args.batch_size * world * args.accum_steps == 1024
    assert [pretrain_flags.default_seed(i) for i in range(6)] == [2, 550, 23, 477, 8529, 10005]

    sgd = pretrain.get_args_parser().parse_args(["--optimizer", "sgd", "--global_batch", "256"])
    pretrain_flags.check_args(sgd)
    assert (sgd.lr, sgd.wd, sgd.label_smoothing, sgd.warmup_steps) == (0.1, 1e-4, 0.0, 0)
    assert [engine_pretrain.lr_at_step(s, sgd, 100) for s in (0, 2999, 3000, 6000)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_shipped_sbatch_script_is_the_default_plan():
    args = plan_timecat.get_args_parser().parse_args([])
    configs, runs = plan_timecat.make_plan(args)
    assert {i: max(s) for i, s in runs.items()} == {0: 450000, 1: 200000, 2: 100000, 3: 100000, 4: 80000}
    expected = plan_timecat.sbatch_script(args, runs, "python tools/plan_timecat.py")
    with open(os.path.join(ROOT, "scripts", "pretrain_timecat.sbatch")) as f:
        assert f.read() == expected
    with open(os.path.join(ROOT, "configs", "pretrained_checkpoints.yaml")) as f:  # catN tags = the released ones
        released = yaml.safe_load(f)
    for _, tag, steps, members in configs[1:]:
        assert [p for p in released[tag]["pretrained"]] == \
            [plan_timecat.checkpoint_path(args, i, steps, runs) for i in members]


# ---------------------------------------------------------------- bad input
expect_user_error = functools.partial(helpers.expect_user_error, script=pretrain)  # one `error:` line, exit 2


def test_bad_inputs_are_one_line_errors(data, tmp_path, capsys):
    expect_user_error(argv(str(tmp_path / "nowhere"), tmp_path, "a", "--steps", "2", "--save_steps"), capsys,
                      "nowhere/imagenet/train not found", "Expected layout: <data_path>/imagenet/{train,val}")
    expect_user_error(argv(data, tmp_path, "b", "--steps", "100", "--save_steps", "50", "200"), capsys,
                      "--save_steps 200 is beyond --steps 100")
    expect_user_error(argv(data, tmp_path, "c", "--batch_size", "3"), capsys, "--global_batch 8 must equal")

    empty = tmp_path / "empty"
    shutil.copytree(os.path.join(data, "imagenet"), empty / "imagenet")
    for f in os.listdir(empty / "imagenet" / "train" / "n00000002"):
        os.remove(empty / "imagenet" / "train" / "n00000002" / f)
    expect_user_error(argv(str(empty), tmp_path, "d", "--steps", "2", "--save_steps"), capsys,
                      "no usable class folders", "n00000002")

    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(data, "imagenet"), broken / "imagenet")
    (broken / "imagenet" / "train" / "n00000001" / "img_1_3.JPEG").write_bytes(b"not a jpeg")
    expect_user_error(argv(str(broken), tmp_path, "e", "--steps", "4", "--save_steps"), capsys,
                      "cannot read image", "img_1_3.JPEG")

    run(data, tmp_path, "f", "--steps", "1", "--save_steps")
    expect_user_error(argv(data, tmp_path, "f", "--steps", "2", "--save_steps", "--arch", "resnet34"), capsys,
                      "--arch resnet18 (now resnet34)", "--start_over")
    expect_user_error(argv(data, tmp_path, "f", "--steps", "2", "--save_steps", "--lr", "0.02"), capsys,
                      "--lr 0.01 (now 0.02)")
    run(data, tmp_path, "f", "--steps", "1", "--save_steps", "--lr", "0.02", "--start_over")


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    result = run_script(["main_pretrain.py", "--arch", "resnet18", "--steps", "10", "--save_steps", "20",
                         "--dump_path", str(tmp_path / "d")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --save_steps 20 is beyond --steps 10 (milestones must be in 1..steps)"
    result = run_script(["tools/plan_timecat.py", "--total_steps", "10", "--n", "3", "--print_only"])
    assert result.returncode == 2 and result.stderr.strip() == "error: --total_steps 10 is not divisible by N=3"


def test_benchmark_rows_go_under_their_own_section(tmp_path):
    from tools import benchmark
    path = str(tmp_path / "benchmarks.md")
    benchmark.record(path, "train", ["intro"], "| a | b |", "| 1 | 2 |")
    benchmark.record(path, "probe", ["other"], "| c |", "| 9 |")
    benchmark.record(path, "train", ["intro"], "| a | b |", "| 3 | 4 |")
    lines = open(path).read().splitlines()
    assert lines.count("## train") == 1 and lines.index("| 3 | 4 |") == lines.index("| 1 | 2 |") + 1
    assert lines.index("| 3 | 4 |") < lines.index("## probe") < lines.index("| 9 |")
    assert lines[lines.index("| a | b |") + 1] == "|---|---|"


# ---------------------------------------------------------------- the AlgoPerf recipe
def test_initial_weights_follow_algoperf_statistics():
    torch.manual_seed(0)
    model = algoperf_init(build_backbone("resnet50", 1000))
    big = model.layer4[0].conv2.weight  # 512 x 512 x 3 x 3: fan_in 4608
    target = (1 / (512 * 9)) ** 0.5
    assert abs(big.std().item() / target - 1) < 0.01  # the divisor makes the truncated draw's std sqrt(1/fan_in)
    assert big.abs().max().item() <= 2 * target / 0.87962566103423978  # truncated at two (pre-truncation) stds
    assert abs(big.mean().item()) < 0.01 * target
    stem = model.conv1.weight  # fan_in 3 x 7 x 7
    assert abs(stem.std().item() / (1 / 147) ** 0.5 - 1) < 0.05
    assert abs(model.fc.weight.std().item() / 0.01 - 1) < 0.01 and not model.fc.bias.any()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert not m.bias.any(), name
            assert torch.all(m.weight == (0.0 if name.endswith("bn3") else 1.0)), name
    basic = algoperf_init(build_backbone("resnet18", 10))
    assert not basic.layer1[0].bn2.weight.any() and torch.all(basic.layer1[0].bn1.weight == 1)
    assert torch.all(basic.layer2[0].downsample[1].weight == 1)  # not the last BN of a residual branch


def transcribed_algoperf_steps(model, batches, lr, betas, eps, wd, warmup, r, power):
    """AlgoPerf's schedule-free AdamW update (as util/sfadamw.py's docstring states it), written out directly on
    (x, z, v); returns x after every step."""
    names = [n for n, _ in model.named_parameters()]
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    z = {n: t.clone() for n, t in x.items()}
    v = {n: torch.zeros_like(t) for n, t in x.items()}
    lr_max, weight_sum, xs = 0.0, 0.0, []
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for k, (inputs, labels) in enumerate(batches):
        lr_k = max(lr * min(1.0, (k + 1) / warmup), eps)
        lr_max = max(lr_max, lr_k)
        weight = (k + 1) ** r * lr_max ** power
        weight_sum += weight
        c = weight / weight_sum
        step = lr_k * (1 - betas[1] ** (k + 1)) ** 0.5
        y = {n: (x[n] + (1 - betas[0]) * (z[n] - x[n])).requires_grad_() for n in names}
        logits = torch.func.functional_call(model, {**y, **buffers}, (inputs,))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), [y[n] for n in names])
        for n, g in zip(names, grads):
            v[n] = betas[1] * v[n] + (1 - betas[1]) * g * g
            z[n] = z[n] - step * g / (v[n].sqrt() + eps) - step * wd * x[n]
            x[n] = (1 - c) * x[n] + c * z[n]
        xs.append({n: t.clone() for n, t in x.items()})
    return xs


def test_sfadamw_is_algoperf_update_step_by_step():
    """Our optimizer against the equations (decay at x, warmup, (k+1)^r lr_max^2 weights, bias-corrected step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    hyper = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.3, warmup=3, r=0.75, power=2.0)
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(6)]
    expected = transcribed_algoperf_steps(model, batches, **hyper)
    opt = AlgoPerfAdamWScheduleFree(model.parameters(), lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                    weight_decay=hyper["wd"], warmup_steps=hyper["warmup"], r=hyper["r"],
                                    weight_lr_power=hyper["power"], moment_dtype="float32")
    for (inputs, labels), x in zip(batches, expected):
        opt.train()  # parameters at y: the gradient is taken there
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        opt.step()
        opt.zero_grad()
        opt.eval()  # parameters at x
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), x[n], rtol=1e-6, atol=1e-7)
    moved = sum((p.detach() - q).abs().sum() for p, q in zip(model.parameters(), expected[0].values()))
    assert moved > 1e-3  # the steps do move the weights: the comparison is not trivially true

    # the package's optimizer decays at y: not the same trajectory (why util/sfadamw.py exists)
    import schedulefree
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    package = schedulefree.AdamWScheduleFree(other.parameters(), lr=hyper["lr"], betas=hyper["betas"],
                                             weight_decay=hyper["wd"], warmup_steps=hyper["warmup"], r=0.75)
    package.train()
    for inputs, labels in batches:
        torch.nn.functional.cross_entropy(other(inputs), labels).backward()
        package.step()
        package.zero_grad()
    package.eval()
    assert not torch.allclose(other[0].weight, expected[-1]["0.weight"], rtol=1e-4, atol=1e-6)


def test_sfadamw_keeps_the_second_moment_in_bfloat16_by_default():
    model = torch.nn.Linear(4, 2)
    opt = AlgoPerfAdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert {s["exp_avg_sq"].dtype for s in opt.state.values()} == {torch.bfloat16}
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.eval()
        opt.step()


def test_sfadamw_state_round_trip_continues_bit_for_bit():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(4)]

    def train(model, opt, part):
        opt.train()
        for inputs, labels in part:
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            opt.step()
            opt.zero_grad()

    model = torch.nn.Linear(3, 2)
    resumed = torch.nn.Linear(3, 2)
    opt = AlgoPerfAdamWScheduleFree(model.parameters(), lr=0.1, warmup_steps=2, weight_decay=0.1)
    train(model, opt, batches[:2])
    resumed.load_state_dict(model.state_dict())
    other = AlgoPerfAdamWScheduleFree(resumed.parameters(), lr=0.1, warmup_steps=2, weight_decay=0.1)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from disk: no shared tensors
    train(model, opt, batches[2:])
    train(resumed, other, batches[2:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert {s["exp_avg_sq"].dtype for s in other.state.values()} == {torch.bfloat16}


def test_an_algoperf_checkpoint_is_a_starting_point(data, tmp_path):
    """--init_from reads AlgoPerf's format (model_params of a DDP-wrapped, compiled model; downsample.conv/bn)."""
    run(data, tmp_path / "source", "run0", "--steps", "2", "--save_steps", "--eval_every", "0")
    ours = load(tmp_path / "source" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    algoperf = {"_orig_mod.module." + k.replace("downsample.0.", "downsample.conv.").replace("downsample.1.",
                                                                                          "downsample.bn."): v
                for k, v in ours.items()}
    path = tmp_path / "checkpoint_2"  # AlgoPerf names files checkpoint_{step}, no extension
    torch.save({"model_params": algoperf, "optimizer_state": {}, "global_step": 2, "preemption_count": 0}, path)
    run(data, tmp_path / "tuned", "run0", "--steps", "1", "--save_steps", "--eval_every", "0", "--lr", "1e-12",
        "--wd", "0", "--init_from", str(path))
    assert f"initialised from {path} (classifier loaded)" in (tmp_path / "tuned" / "run0" / "train.log").read_text()
    tuned = load(tmp_path / "tuned" / "ckpt" / "checkpoints_stepfull" / "checkpoint_run0.pth.tar")["state_dict"]
    for k, v in ours.items():  # a 1e-8 step away from the source weights (lr floor eps), not the initialisation
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-6)
