"""Fault injection: preemption at seeded random points, failed writes, corrupt inputs, numerical faults, two runs
on one folder, dying and missing ranks, and fuzzed command lines. Every scenario ends either in the uninterrupted
run's exact result or in a one-line error that leaves the last good state on disk (docs/reliability.md)."""
import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import main_linear_probe as probe
import main_pretrain as pretrain
import util.checkpoint
import util.logs
from helpers import ROOT, make_checkpoint, make_cifar, make_imagenet, make_inat
from util.checkpoint import load_file
from util.misc import run_main

ENV = dict(os.environ, OMP_NUM_THREADS="1")
# 200 CIFAR images, batch 32: 7 iterations per epoch (the last of 8 images is kept, as the reference), 28 in all;
# fp32 so that runs compare bit for bit
PROBE = ["--arch", "resnet18", "--img_size", "32", "--workers", "0", "--batch_size", "32", "--print_freq", "1",
         "--lr", "0.1", "--precision", "fp32", "--epochs", "4", "--decay_epochs", "2"]
PROBE_EPOCHS, PROBE_ITERS = 4, 7
# 4 classes x 8 images, global batch 8: 4 steps per epoch; evaluations (and resume states) every 10 steps
PRETRAIN = ["--arch", "resnet18", "--img_size", "32", "--global_batch", "8", "--workers", "0", "--precision",
            "fp32", "--warmup_steps", "2", "--lr", "0.01", "--bn_refresh_batches", "2", "--print_freq", "1",
            "--steps", "40", "--save_steps", "20", "--eval_every", "10"]
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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=200, n_test=61)
    make_imagenet(data, num_classes=4, n_train=8, n_val=3)
    make_inat(data)
    ckpt = str(base / "a.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=1)
    return {"base": base, "data": data, "ckpt": ckpt}


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """In-process runs install StopSignal's handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


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


@pytest.fixture(scope="module")
def probe_reference(world):
    return probe_reference_run(world, world["base"] / "probe_reference")


def pretrain_reference_run(world, out, *extra):
    run_pretrain(world, out, *extra)
    return {"ckpt": {folder: load_file(str(out / "ckpt" / folder / "checkpoint_run0.pth.tar"))
                     for folder in ("checkpoints_step20steps", "checkpoints_stepfull")},
            "metrics": metrics(out / "run" / "metrics.jsonl")}


@pytest.fixture(scope="module")
def pretrain_reference(world):
    return pretrain_reference_run(world, world["base"] / "pretrain_reference")


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


# ---------------------------------------------------------------- 1. preemption at seeded random points
def launch(script_argv, kind, signame, nth, target):
    """A script as its own process: plain, or under DRIVER for a fault during the nth write of `target`."""
    if kind == "signal":
        command = [sys.executable, *script_argv]
    else:
        command = [sys.executable, "-c", DRIVER, "SIGKILL" if kind == "kill-in-write" else signame, target,
                   str(nth), *script_argv]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def signal_at_line(proc, log, marker, count, signame, offset):
    """Send the signal once the process has logged `count` lines holding `marker` (polling the log, not timing
    the run). Returns whether it was sent before the process ended."""
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and read(log)[offset:].count(marker) >= count:
            proc.send_signal(getattr(signal, signame))
            return True
        time.sleep(0.01)
    return False


def kill_chain(rng, points, kinds, start, log, marker, lines_per_unit, done_units, total_units, units_per_write,
               target):
    """Interrupt a run at `points` seeded random moments, each time in a new process resuming the last one.
    kinds: the first faults' kinds (the rest are drawn); done_units() reads the progress (epochs or steps) of the
    last good state on disk; `marker` starts the log line of each iteration. Returns the faults that interrupted
    the run; a signal that comes after its last stop point (or as it exits) lets it finish and ends the chain."""
    sent = []
    while len(sent) < points and done_units() < total_units:
        done = done_units()
        kind = kinds[len(sent)] if len(sent) < len(kinds) else \
            rng.choice(["signal", "kill-in-write", "signal-in-write"])
        signame = rng.choice(["SIGTERM", "SIGUSR1"])
        share = points - len(sent)  # the rest of the run is shared among the faults still to come
        writes_left = (total_units - done) // units_per_write - (kind == "signal-in-write")  # the last ends the run
        nth = rng.randint(1, max(1, writes_left // share))
        offset = len(read(log)) if log.exists() else 0
        proc = start(kind, signame, nth, target)
        if kind == "signal":
            count = rng.randint(1, max(1, ((total_units - done) * lines_per_unit - 1) // share))
            assert signal_at_line(proc, log, marker, count, signame, offset)
        _, err = proc.communicate(timeout=180)
        text = read(log)[offset:]
        if "Top-1 test accuracy" in text:
            assert proc.returncode in (0, -getattr(signal, signame)), err
            break
        if kind == "kill-in-write":
            assert proc.returncode == -signal.SIGKILL, err
            sent.append(f"SIGKILL while writing {target} (its write {nth}, from {done})")
        else:
            assert proc.returncode == 0 and f"Stopped by {signame}" in text, err + text[-2000:]
            sent.append(f"{signame} after iteration line {count} (from {done})" if kind == "signal" else
                        f"{signame} while writing {target} (its write {nth}, from {done})")
    return sent


def probe_epochs_done(dump):
    path = dump / "checkpoint.pth.tar"
    return load_file(str(path))["epoch"] if path.exists() else 0


def check_probe_preemption(world, reference, dump, seed, points, kinds, epochs=PROBE_EPOCHS):
    rng = random.Random(seed)
    argv = ["main_linear_probe.py", *probe_argv(world, dump, "--epochs", str(epochs))]
    start = lambda kind, signame, nth, target: launch(argv, kind, signame, nth, target)
    sent = kill_chain(rng, points, kinds, start, dump / "train.log", "Iter: [", PROBE_ITERS,
                      lambda: probe_epochs_done(dump), epochs, 1, "checkpoint.pth.tar")
    assert os.path.exists(dump / ".lock")  # every rerun got through the lock its killed predecessor held
    if probe_epochs_done(dump) < epochs:
        run_probe(world, dump, "--epochs", str(epochs))
    assert_probe_matches(dump, reference)
    print(f"probe, seed {seed}, {len(sent)} kill points: {sent}")
    return sent


def test_probe_preempted_at_seeded_points_resumes_to_the_same_result(world, probe_reference, tmp_path):
    sent = check_probe_preemption(world, probe_reference, tmp_path / "run", seed=7, points=3,
                                  kinds=["signal", "kill-in-write", "signal-in-write"])
    assert len(sent) == 3, sent


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_probe_preempted_at_many_seeded_points(world, tmp_path, seed):
    reference = probe_reference_run(world, tmp_path / "reference", "--epochs", "12")
    sent = check_probe_preemption(world, reference, tmp_path / "run", seed=100 + seed, points=8, kinds=[],
                                  epochs=12)
    assert len(sent) >= 3, sent


def pretrain_steps_done(out):
    path = out / "run" / "resume.pth.tar"
    return load_file(str(path))["step"] if path.exists() else 0


def check_pretrain_preemption(world, reference, out, seed, points, kinds, steps=PRETRAIN_STEPS):
    rng = random.Random(seed)
    argv = ["main_pretrain.py", *pretrain_argv(world, out, "--steps", str(steps))]
    start = lambda kind, signame, nth, target: launch(argv, kind, signame, nth, target)
    sent = kill_chain(rng, points, kinds, start, out / "run" / "train.log", "Step: [", 1,
                      lambda: pretrain_steps_done(out), steps, 10, "resume.pth.tar")
    if pretrain_steps_done(out) < steps:
        run_pretrain(world, out, "--steps", str(steps))
    assert_pretrain_matches(out, reference)
    print(f"pretraining, seed {seed}, {len(sent)} kill points: {sent}")
    return sent


def test_pretraining_preempted_at_seeded_points_resumes_to_the_same_weights(world, pretrain_reference, tmp_path):
    sent = check_pretrain_preemption(world, pretrain_reference, tmp_path, seed=3, points=2,
                                     kinds=["signal", "kill-in-write"])
    assert len(sent) == 2, sent


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_pretraining_preempted_at_many_seeded_points(world, tmp_path, seed):
    reference = pretrain_reference_run(world, tmp_path / "reference", "--steps", "80")
    sent = check_pretrain_preemption(world, reference, tmp_path / "run", seed=200 + seed, points=6, kinds=[],
                                     steps=80)
    assert len(sent) >= 2, sent


def test_signal_during_a_checkpoint_write_stops_after_it(world, probe_reference, tmp_path, monkeypatch):
    """In-process: SIGTERM arrives in the middle of the second checkpoint write; the write completes, the run
    stops at the next iteration, and the resumed run ends as the uninterrupted one."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        if "checkpoint.pth.tar" in f.name:
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_probe(world, tmp_path)
    log = read(tmp_path / "train.log")
    assert "Stopped by SIGTERM during epoch 2" in log and "Top-1 test accuracy" not in log
    assert load_file(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    run_probe(world, tmp_path)
    assert_probe_matches(tmp_path, probe_reference)


# ---------------------------------------------------------------- 2. failed writes
class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, path, room):
        self.file, self.room, self.name = open(path, "wb"), room, path

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


def fail_nth_write(monkeypatch, target, nth, how):
    """Make the nth atomic write of a file named `target` fail halfway, in one of several ways."""
    seen = []

    def due(name):
        if target in os.path.basename(str(name)):
            seen.append(name)
            return len(seen) == nth
        return False

    if how == "full-disk":  # the real torch.save into a file that fills up mid-write
        real_open = open
        monkeypatch.setattr(util.checkpoint, "open", lambda path, mode="r", *a, **k:
                            FullDisk(path, 5000) if "w" in mode and due(path) else real_open(path, mode, *a, **k),
                            raising=False)
    elif how == "torch.save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if due(getattr(f, "name", "")):
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save)
    elif how == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if due(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(errno.EIO, "Input/output error")
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    elif how == "replace":
        real_replace = os.replace

        def replace(src, dst):
            if due(dst):
                raise OSError(errno.EIO, "Input/output error")
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    else:
        raise ValueError(how)
    return seen


CAUSES = {"full-disk": "No space left on device", "torch.save": "No space left on device",
          "fsync": "Input/output error", "replace": "Input/output error"}


@pytest.mark.parametrize("how", ["full-disk", "torch.save", "fsync", "replace"])
def test_failed_checkpoint_write_keeps_the_previous_one(world, probe_reference, tmp_path, monkeypatch, capsys, how):
    fail_nth_write(monkeypatch, "checkpoint.pth.tar", 2, how)
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, tmp_path), capsys)
    assert err == f"error: cannot write {tmp_path / 'checkpoint.pth.tar'}: {CAUSES[how]}; its previous version, " \
                  f"if any, is unchanged"
    assert load_file(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 1  # the previous one, intact
    assert not leftovers(tmp_path) and "Top-1 test accuracy" not in read(tmp_path / "train.log")
    monkeypatch.undo()
    run_probe(world, tmp_path)  # once there is room again: resumed, nothing lost
    assert_probe_matches(tmp_path, probe_reference)


def test_failed_metrics_and_cache_writes_are_one_line_errors(world, tmp_path, monkeypatch, capsys):
    real_open = open
    monkeypatch.setattr(util.logs, "open", lambda path, mode="r", *a, **k:
                        FullDisk(path, 0) if path.endswith("metrics.jsonl") else real_open(path, mode, *a, **k),
                        raising=False)
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, tmp_path / "m", "--epochs", "1"), capsys)
    assert err == f"error: cannot write {tmp_path / 'm' / 'metrics.jsonl'}: No space left on device"
    monkeypatch.undo()

    cache = tmp_path / "cache"
    fail_nth_write(monkeypatch, "manifest.json", 1, "replace")
    err = user_error(probe.main, probe.get_args_parser(),
                     probe_argv(world, tmp_path / "c", "--epochs", "1", "--feature_cache", str(cache)), capsys)
    assert "manifest.json: Input/output error" in err
    assert not any("manifest" in name for _, _, files in os.walk(cache) for name in files)
    monkeypatch.undo()
    run_probe(world, tmp_path / "c", "--epochs", "1", "--feature_cache", str(cache))
    log = read(tmp_path / "c" / "train.log")
    assert "[no complete manifest]" in log and "Top-1 test accuracy" in log


def test_failed_resume_state_write_in_pretraining(world, pretrain_reference, tmp_path, monkeypatch, capsys):
    fail_nth_write(monkeypatch, "resume.pth.tar", 2, "full-disk")
    err = user_error(pretrain.main, pretrain.get_args_parser(), pretrain_argv(world, tmp_path), capsys)
    assert err.startswith(f"error: cannot write {tmp_path / 'run' / 'resume.pth.tar'}: No space left on device")
    assert load_file(str(tmp_path / "run" / "resume.pth.tar"))["step"] == 10
    monkeypatch.undo()
    run_pretrain(world, tmp_path)
    assert_pretrain_matches(tmp_path, pretrain_reference)


# ---------------------------------------------------------------- 3. corrupt inputs
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


# ---------------------------------------------------------------- 4. numerical faults
def test_diverging_probe_stops_without_a_final_accuracy(world, probe_reference, tmp_path, monkeypatch, capsys):
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, tmp_path / "lr", "--lr", "1e30"), capsys)
    assert "the training loss is [nan] at epoch 0" in err or "the training loss is [inf] at epoch 0" in err, err
    assert err.endswith("no checkpoint was written. Lower --lr?")
    assert "Top-1 test accuracy" not in read(tmp_path / "lr" / "train.log")

    # NaN at epoch 2, iteration 3: the checkpoint of epoch 2 stays, and a rerun finishes as if nothing happened
    real_ce, calls = torch.nn.functional.cross_entropy, []

    def cross_entropy(logits, labels, *args, **kwargs):
        loss = real_ce(logits, labels, *args, **kwargs)
        if "reduction" not in kwargs:  # training calls only
            calls.append(1)
            if len(calls) == 2 * PROBE_ITERS + 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    dump = tmp_path / "nan"
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, dump), capsys)
    assert err == f"error: the training loss is [nan] at epoch 2, iteration 3; the last good state is in " \
                  f"{dump / 'checkpoint.pth.tar'}. Lower --lr?"
    state = load_file(str(dump / "checkpoint.pth.tar"))
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["heads"].values())
    assert "Top-1 test accuracy" not in read(dump / "train.log") and len(metrics(dump / "metrics.jsonl")) == 2
    monkeypatch.undo()
    run_probe(world, dump)
    assert_probe_matches(dump, probe_reference)


def test_weights_that_turn_nan_in_an_epochs_last_step_are_not_saved(world, tmp_path, monkeypatch, capsys):
    real_build = probe.build_optimizer

    def build_optimizer(groups, args):
        optimizer, steps = real_build(groups, args), []
        real_step = optimizer.step

        def step(*a, **k):
            out = real_step(*a, **k)
            steps.append(1)
            if len(steps) == 2 * PROBE_ITERS:  # the last step of epoch 1: its loss was finite
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("inf"))
            return out
        optimizer.step = step
        return optimizer

    monkeypatch.setattr(probe, "build_optimizer", build_optimizer)
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, tmp_path), capsys)
    assert "the test loss is nan after epoch 1" in err and "the last good state is in" in err
    assert load_file(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 1


@pytest.mark.parametrize("print_freq", ["1", "100"])
def test_diverging_pretraining_keeps_the_last_good_resume_state(world, tmp_path, monkeypatch, capsys, print_freq):
    """With --print_freq 100 no log line checks the loss before the evaluation at step 20: the evaluation itself
    refuses to save NaN weights."""
    real_ce, calls = torch.nn.functional.cross_entropy, []

    def cross_entropy(logits, labels, *args, **kwargs):
        loss = real_ce(logits, labels, *args, **kwargs)
        if "label_smoothing" in kwargs:
            calls.append(1)
            if len(calls) >= 13:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    err = user_error(pretrain.main, pretrain.get_args_parser(),
                     pretrain_argv(world, tmp_path, "--print_freq", print_freq), capsys)
    assert ("the training loss is nan at step 13" if print_freq == "1" else
            "the mean training loss since the last evaluation is nan at step 20") in err
    state = load_file(str(tmp_path / "run" / "resume.pth.tar"))
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not os.path.exists(tmp_path / "ckpt" / "checkpoints_step20steps")
    assert "Top-1 test accuracy" not in read(tmp_path / "run" / "train.log")


# ---------------------------------------------------------------- 5. two runs, one folder
def test_second_probe_on_a_busy_folder_is_refused(world, probe_reference, tmp_path, capsys):
    dump = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "main_linear_probe.py", *probe_argv(world, dump)], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline and \
            not ((dump / "train.log").exists() and "Iter: [" in read(dump / "train.log")):
        time.sleep(0.01)
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, dump), capsys)
    assert err == f"error: {dump} is in use by another run (pid {first.pid} on {socket.gethostname()}); wait for " \
                  f"it to end or stop it, or give this run another --dump_path"
    _, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    assert read(dump / "train.log").count("git revision") == 1  # the refused run wrote nothing
    assert_probe_matches(dump, probe_reference)


def test_a_held_lock_refuses_pretraining_until_released(world, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    holder = hold_lock(tmp_path / "run" / ".lock")
    argv = pretrain_argv(world, tmp_path, "--steps", "2", "--save_steps")
    err = user_error(pretrain.main, pretrain.get_args_parser(), argv, capsys)
    assert "is in use by another run (pid 1 on elsewhere)" in err
    assert not os.path.exists(tmp_path / "run" / "train.log")
    holder.communicate("", timeout=30)  # the holder ends: its lock goes with it
    pretrain.main(pretrain.get_args_parser().parse_args(argv))
    assert "Top-1 test accuracy" in read(tmp_path / "run" / "train.log")


def hold_lock(path):
    """Another process holding the POSIX lock on `path` until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); f.write('pid 1 on elsewhere'); f.flush(); "
                               "print('held', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_waits_for_another_computing_the_same_cache_entry(world, tmp_path):
    from feature_cache import entry_key
    argv = probe_argv(world, tmp_path / "run", "--epochs", "1", "--feature_cache", str(tmp_path / "cache"))
    args = probe.get_args_parser().parse_args(argv)
    probe.check_args(args)
    digest = hashlib.sha256(json.dumps(entry_key(args, "train", -1, 200), sort_keys=True).encode())
    entry = tmp_path / "cache" / digest.hexdigest()[:20]
    entry.mkdir(parents=True)
    holder = hold_lock(entry / ".lock")

    def release_when_waiting():  # polls the log: the run must say it waits before the other run lets go
        log = tmp_path / "run" / "train.log"
        deadline = time.time() + 120
        while not (log.exists() and "waiting for it" in read(log)) and time.time() < deadline:
            time.sleep(0.01)
        holder.communicate("", timeout=30)

    releaser = threading.Thread(target=release_when_waiting)
    releaser.start()
    probe.main(probe.get_args_parser().parse_args(argv))
    releaser.join()
    log = read(tmp_path / "run" / "train.log")
    assert log.index("another run is computing train in") < log.index("feature cache: computing train")
    assert "Top-1 test accuracy" in log


# ---------------------------------------------------------------- 6. distributed faults
def test_a_dying_rank_ends_the_other_within_a_bounded_time(world, tmp_path):
    dump = tmp_path / "ddp"
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "main_linear_probe.py", *probe_argv(world, dump, "--epochs", "100", "--batch_size", "16")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log1 = dump / "train.log-1"
    while proc.poll() is None and time.time() - start < 120 and \
            not (log1.exists() and "Epoch[1] - Iter: [" in read(log1)):
        time.sleep(0.05)
    pids = {}
    for name in ("train.log", "train.log-1"):
        pids[name] = int(read(dump / name).split(" pid ")[1].split()[0])
    os.kill(pids["train.log-1"], signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=150)
    elapsed = time.time() - killed
    assert proc.returncode != 0 and elapsed < 120, (proc.returncode, elapsed)
    with pytest.raises(ProcessLookupError):
        os.kill(pids["train.log"], 0)  # rank 0 is gone too, not hanging
    assert "Top-1 test accuracy" not in read(dump / "train.log")
    assert load_file(str(dump / "checkpoint.pth.tar"))["epoch"] >= 1  # the last good state is intact
    print(f"rank 1 killed: torchrun ended {elapsed:.1f} s later")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_that_cannot_reach_the_rendezvous_times_out(world, tmp_path, monkeypatch, capsys, rank):
    """rank 1: no master at the address; rank 0: the master whose peer never comes."""
    port = free_port()
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    start = time.time()
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, tmp_path, "--dist_timeout", "0.05"),
                     capsys)
    assert time.time() - start < 60
    assert err.startswith(f"error: rank {rank} of 2 could not join the process group at 127.0.0.1:{port} within "
                          f"0.05 min (--dist_timeout)") and "Did every process start" in err
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------- 7. fuzzed command lines
# flag: (valid values, invalid values); None is a flag without value, a value with spaces is several values
BAD_NUMBERS = ["-1", "nan", "inf", "-inf", "x", ""]
PROBE_FLAGS = {
    "--arch": (["resnet18"], ["resnet7", "resnet18 resnet18 resnet18", "vgg16"]),
    "--pretrained": (["{ckpt}", "{ckpt} {ckpt}"], ["{missing}", "{garbage}"]),
    "--tag": ([], ["nope", "supervisedimagenet_resnet50_sfadamw_run0"]),
    "--tag_file": ([], ["{missing}", "{garbage}"]),
    "--exp_mode": (["lineareval", "finetune"], ["other"]),
    "--use_bn": ([None], []), "--no-use_bn": ([None], []), "--nesterov": ([None], []),
    "--no-nesterov": ([None], []), "--wd_skip_bn": ([None], []), "--no-wd_skip_bn": ([None], []),
    "--headinit": (["normal", "none", "cat_weights"], ["zeros"]),
    "--optimizer": (["sgd", "adam", "sfadamw"], ["lbfgs"]),
    "--lr": (["0.1", "1e-3", "0.1 0.01", "1e30"], BAD_NUMBERS + ["0", "0.1 0.1"]),
    "--wd": (["0", "1e-4", "1e-4 1e-3"], BAD_NUMBERS + ["1e-4 1e-4"]),
    "--momentum": (["0", "0.5", "0.9"], BAD_NUMBERS), "--gamma": (["0.1", "0.5"], BAD_NUMBERS),
    "--final_lr": (["0", "1e-4"], BAD_NUMBERS),
    "--epochs": (["1", "2"], ["0", "-2", "x"]),
    "--scheduler_type": (["step", "cosine", "constant"], ["linear"]),
    "--decay_epochs": (["1", "1 2", "0"], ["x"]),
    "--seed": (["0", "7"], ["-1", "x", "4611686018427387904"]),
    "--data_name": (["cifar10", "cifar100", "cifar10_10perc", "imagenet1k", "inaturalist18"],
                    ["cifar10_0perc", "cifar10_101perc", "imagefolder", "mnist"]),
    "--data_path": (["{data}"], ["{missing}"]),
    "--tf_name": (["eval", "224px", "32px"], ["64px"]),
    "--img_size": (["8", "16"], ["7", "0", "-3", "x"]),
    "--data_rate": (["1", "0.5", "0.05"], BAD_NUMBERS + ["0", "2"]),
    "--val_split": (["0", "0.1", "0.5"], BAD_NUMBERS + ["1"]),
    "--batch_size": (["1", "2", "8", "64"], ["0", "-4", "x"]),
    "--workers": (["0", "1"], ["-1", "x"]),
    "--feature_cache": (["{cache}"], []), "--cache_views": (["0", "1", "2"], ["-1", "x"]),
    "--precision": (["auto", "fp32", "bf16"], ["fp16"]),
    "--mode": (["train", "eval_only"], ["test"]),
    "--start_over": ([None], []), "--sync_bn": ([None], []), "--debug": ([None], []),
    "--skip_bad_images": ([None], []),
    "--dist_timeout": (["1", "0.5"], ["0", "-1", "nan", "x"]),
    "--print_freq": (["1", "3"], ["0", "x"]),
    "--bogus": ([], [None, "1"]),
}
PRETRAIN_FLAGS = {
    "--arch": (["resnet18"], ["resnet7", "vgg16"]),
    "--data_path": (["{data}"], ["{missing}"]),
    "--img_size": (["8", "16"], ["7", "0", "x"]),
    "--workers": (["0", "1"], ["-1", "x"]),
    "--global_batch": (["2", "4", "8"], ["3", "0", "-8", "x", "64"]),
    "--batch_size": (["1", "2", "4"], ["3", "0", "x"]),
    "--accum_steps": (["1", "2"], ["3", "0", "x"]),
    "--steps": (["1", "2", "3"], ["0", "-1", "x"]),
    "--save_steps": ([None, "1", "2"], ["5", "0", "x"]),
    "--eval_every": (["0", "1", "2"], ["-1", "x"]),
    "--optimizer": (["sfadamw", "sgd"], ["adam"]),
    "--lr": (["0.01", "1e30"], BAD_NUMBERS + ["0"]), "--wd": (["0", "0.1"], BAD_NUMBERS),
    "--eps": (["1e-8", "0"], BAD_NUMBERS), "--sf_r": (["0", "0.75"], BAD_NUMBERS),
    "--weight_lr_power": (["0", "2"], BAD_NUMBERS),
    "--betas": (["0.9 0.999", "0 0"], ["0.9", "1 1", "-0.1 0.5", "x y"]),
    "--warmup_steps": (["0", "1", "5"], ["-1", "x"]),
    "--label_smoothing": (["0", "0.2"], BAD_NUMBERS + ["1"]),
    "--momentum": (["0", "0.9"], BAD_NUMBERS), "--gamma": (["0.1"], BAD_NUMBERS),
    "--schedule": (["step", "cosine"], ["linear"]),
    "--decay_epochs": ([None, "1", "0"], ["x"]),
    "--bn_refresh_batches": (["0", "1", "3"], ["-1", "x"]),
    "--bn_refresh_every": (["0", "1", "2"], ["-1", "x"]),
    "--run": (["0", "5"], ["-1", "x"]),
    "--seed": (["0", "7"], ["-1", "x"]),
    "--precision": (["auto", "fp32", "bf16"], ["fp16"]),
    "--max_time": (["1:00", "1-00:00:00", "0.001"], ["0", "-5", "x", "::"]),
    "--print_freq": (["1", "5"], ["0", "x"]),
    "--dist_timeout": (["1"], ["0", "nan", "x"]),
    "--start_over": ([None], []), "--debug": ([None], []), "--skip_bad_images": ([None], []),
    "--bogus": ([], [None]),
}


@st.composite
def command_lines(draw, flags):
    """Up to 6 random flags; in about half of the examples only valid values (to reach deep into a run), else
    any value, valid or not."""
    valid_only = draw(st.booleans())
    names = [f for f, (valid, invalid) in sorted(flags.items()) if valid or not valid_only]
    options = []
    for flag in draw(st.lists(st.sampled_from(names), max_size=6)):
        valid, invalid = flags[flag]
        options.append((flag, draw(st.sampled_from(valid if valid_only else valid + invalid))))
    return options


def fuzz_once(main, parser, argv):
    """A fuzzed run ends normally, or in one 'error: ...' line (its last) and a non-zero exit, never in a
    traceback. Returns which."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_main(main, parser.parse_args(argv))
        except SystemExit as exc:
            text = err.getvalue().strip()
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            assert exc.code not in (0, None) and len(errors) == 1 and text.endswith(errors[0]), (argv, text)
            assert "Traceback" not in text, (argv, text)
            return "error"
    return "ran"


def expand(options, names):
    """argv of (flag, value) pairs."""
    argv = []
    for flag, value in options:
        argv.append(flag)
        if value is not None:
            argv.extend(value.format(**names).split(" "))
    return argv


RUN_IDS = itertools.count()  # a fresh folder per example (hypothesis seeds `random` itself)


@pytest.fixture(scope="module")
def fuzz_world(world):
    base = world["base"] / "fuzz"
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=20, n_test=10)
    make_cifar(data, "cifar100", n_train=100, n_test=10)
    make_imagenet(data, num_classes=2, n_train=4, n_val=2, size=16)
    make_inat(data, category_ids=(1, 2), n_train=2, n_val=1, size=16)
    garbage = base / "garbage.pth"
    garbage.write_bytes(b"\x80\x04garbage")
    return {"base": base, "ckpt": world["ckpt"], "data": data, "missing": str(base / "missing"),
            "garbage": str(garbage), "cache": str(base / "cache")}


def fuzz_settings(examples):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= 100,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def check_probe_command_line(fuzz_world, options):
    dump = os.path.join(fuzz_world["base"], f"probe{next(RUN_IDS)}")
    # tiny defaults first, so the fuzzed flags override them; no download ever (no network)
    argv = ["--arch", "resnet18", "--pretrained", fuzz_world["ckpt"], "--data_path", fuzz_world["data"],
            "--img_size", "8", "--batch_size", "4", "--workers", "0", "--epochs", "1", "--precision", "fp32",
            "--dump_path", dump, *expand(options, fuzz_world), "--no-download"]
    if "--tag" in argv:  # --tag refuses --arch/--pretrained: keep the fuzzed ones only
        argv = argv[4:]
    try:
        event(fuzz_once(probe.main, probe.get_args_parser(), argv))
    finally:
        shutil.rmtree(dump, ignore_errors=True)  # checkpoints add up over hundreds of examples


def check_pretrain_command_line(fuzz_world, options):
    out = os.path.join(fuzz_world["base"], f"pretrain{next(RUN_IDS)}")
    argv = ["--arch", "resnet18", "--data_path", fuzz_world["data"], "--img_size", "8", "--global_batch", "4",
            "--workers", "0", "--steps", "2", "--save_steps", "--eval_every", "0", "--precision", "fp32",
            "--bn_refresh_batches", "1", "--warmup_steps", "1", "--output_dir", os.path.join(out, "ckpt"),
            "--dump_path", os.path.join(out, "run"), *expand(options, fuzz_world)]
    try:
        event(fuzz_once(pretrain.main, pretrain.get_args_parser(), argv))
    finally:
        shutil.rmtree(out, ignore_errors=True)


@fuzz_settings(60)
@given(options=command_lines(PROBE_FLAGS))
def test_fuzzed_probe_command_lines_never_end_in_a_traceback(fuzz_world, options):
    check_probe_command_line(fuzz_world, options)


@fuzz_settings(40)
@given(options=command_lines(PRETRAIN_FLAGS))
def test_fuzzed_pretraining_command_lines_never_end_in_a_traceback(fuzz_world, options):
    check_pretrain_command_line(fuzz_world, options)


@pytest.mark.slow
@fuzz_settings(600)
@given(options=command_lines(PROBE_FLAGS))
def test_fuzzed_probe_command_lines_many(fuzz_world, options):
    check_probe_command_line(fuzz_world, options)


@pytest.mark.slow
@fuzz_settings(400)
@given(options=command_lines(PRETRAIN_FLAGS))
def test_fuzzed_pretraining_command_lines_many(fuzz_world, options):
    check_pretrain_command_line(fuzz_world, options)
