"""Fault injection, preemption at seeded random points (driver: tests/faults/driver.py; docs/reliability.md)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from driver import (
    DRIVER,
    ENV,
    PRETRAIN_STEPS,
    PROBE_EPOCHS,
    PROBE_ITERS,
    assert_pretrain_matches,
    assert_probe_matches,
    pretrain_argv,
    pretrain_reference_run,
    probe_argv,
    probe_reference_run,
    read,
    run_pretrain,
    run_probe,
)
from helpers import ROOT
from util.checkpoint import load_file


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
