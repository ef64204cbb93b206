"""The fault suite's driver: tiny worlds' command lines, in-process runs, a wrapper of torch.save that
signals or dies mid-write, readers of what a run left and comparisons with the uninterrupted run."""
import json
import os

import pytest
import torch

import main_linear_probe as probe
import main_pretrain as pretrain
from util.checkpoint import load_file
from util.cli import run_main

ENV = dict(os.environ, OMP_NUM_THREADS="1")
# 200 CIFAR images, batch 32: 7 iterations per epoch (the last of 8 images is kept, as the reference), 28 in all;
# fp32 so that runs compare bit for bit
PROBE = ["--arch", "resnet18", "--img_size", "32", "--workers", "0", "--batch_size", "32", "--print_freq", "1",
         "--lr", "0.1", "--precision", "fp32", "--epochs", "4", "--decay_epochs", "2",
         "--cuda_deterministic"]  # bit-for-bit resumption on a GPU machine too
PROBE_EPOCHS, PROBE_ITERS = 4, 7
# 4 classes x 8 images, global batch 8: 4 steps per epoch; evaluations (and resume states) every 10 steps
PRETRAIN = ["--arch", "resnet18", "--img_size", "32", "--global_batch", "8", "--workers", "0", "--precision",
            "fp32", "--warmup_steps", "2", "--lr", "0.01", "--bn_refresh_batches", "2", "--print_freq", "1",
            "--steps", "40", "--save_steps", "20", "--eval_every", "10",
            "--cuda_deterministic"]  # bit-for-bit resumption on a GPU machine too
PRETRAIN_STEPS = 40

# Runs a script with torch.save wrapped: during the nth save of a file whose name holds TARGET it either sends
# itself a signal (the handler runs mid-write, as a preemption notice would), or writes half of the file and dies
# by SIGKILL (a node lost during a checkpoint write).
DRIVER = r"""
import io, os, runpy, signal, sys, torch
action, target, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_save, seen = torch.save, [0]
def save(obj, f, *args, **kwargs):
    if target in getattr(f, "name", str(f)):
        seen[0] += 1
        if seen[0] == nth and action == "SIGKILL":
            data = io.BytesIO()
            real_save(obj, data, *args, **kwargs)
            f.write(data.getvalue()[:len(data.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if seen[0] == nth:
            os.kill(os.getpid(), getattr(signal, action))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""




def probe_argv(world, dump, *extra):
    return ["--pretrained", world["ckpt"], "--data_path", world["data"], "--dump_path", str(dump), *PROBE, *extra]


def pretrain_argv(world, out, *extra):
    return ["--data_path", world["data"], "--output_dir", str(out / "ckpt"), "--dump_path", str(out / "run"),
            *PRETRAIN, *extra]


def run_probe(world, dump, *extra):
    probe.main(probe.get_args_parser().parse_args(probe_argv(world, dump, *extra)))


def run_pretrain(world, out, *extra):
    pretrain.main(pretrain.get_args_parser().parse_args(pretrain_argv(world, out, *extra)))


def user_error(main, parser, argv, capsys):
    """Run a script in-process expecting a user error: returns its one line."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, parser.parse_args(argv))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def read(path):
    with open(path) as f:
        return f.read()


def metrics(path, drop=("seconds", "img_per_s")):
    """metrics.jsonl without its timings."""
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def leftovers(folder):
    """Temporary files of atomic writes left behind."""
    return [name for _, _, files in os.walk(folder) for name in files if ".tmp." in name]


def probe_reference_run(world, dump, *extra):
    run_probe(world, dump, *extra)
    return {"heads": load_file(str(dump / "checkpoint.pth.tar"))["heads"],
            "best": load_file(str(dump / "best.pth.tar"))["head"],
            "metrics": metrics(dump / "metrics.jsonl"), "log": read(dump / "train.log")}


def pretrain_reference_run(world, out, *extra):
    run_pretrain(world, out, *extra)
    return {"ckpt": {folder: load_file(str(out / "ckpt" / folder / "checkpoint_run0.pth.tar"))
                     for folder in ("checkpoints_step20steps", "checkpoints_stepfull")},
            "metrics": metrics(out / "run" / "metrics.jsonl")}


def final_line(log):
    lines = [line for line in log.splitlines() if "Top-1 test accuracy:" in line]
    assert len(lines) == 1, lines
    return lines[0].split(" - ")[-1]


def assert_probe_matches(dump, reference):
    """Bit-identical heads, the same best head, metrics and final accuracy as the uninterrupted run."""
    heads = load_file(str(dump / "checkpoint.pth.tar"))["heads"]
    assert all(torch.equal(heads[k], reference["heads"][k]) for k in reference["heads"])
    best = load_file(str(dump / "best.pth.tar"))["head"]
    assert all(torch.equal(best[k], reference["best"][k]) for k in reference["best"])
    assert metrics(dump / "metrics.jsonl") == reference["metrics"]
    assert final_line(read(dump / "train.log")) == final_line(reference["log"])
    assert not leftovers(dump)


def assert_pretrain_matches(out, reference):
    for folder, expected in reference["ckpt"].items():
        saved = load_file(str(out / "ckpt" / folder / "checkpoint_run0.pth.tar"))
        assert all(torch.equal(saved["state_dict"][k], v) for k, v in expected["state_dict"].items()), folder
        assert saved["val_top1"] == expected["val_top1"]
    assert metrics(out / "run" / "metrics.jsonl") == reference["metrics"]
    assert not leftovers(out)
