"""Fault injection, numerical faults (driver: tests/faults/driver.py; docs/reliability.md)."""
import os

import pytest
import torch

import engine
import main_linear_probe as probe
import main_pretrain as pretrain
from driver import PROBE_ITERS, assert_probe_matches, metrics, pretrain_argv, probe_argv, read, run_probe, user_error
from util.checkpoint import load_file


def test_diverging_probe_stops_without_a_final_accuracy(world, probe_reference, tmp_path, monkeypatch, capsys):
    err = user_error(probe.main, probe.get_args_parser(), probe_argv(world, tmp_path / "lr", "--lr", "1e30"), capsys)
    assert "the training loss is [nan] at epoch 0" in err or "the training loss is [inf] at epoch 0" in err, err
    assert err.endswith("no checkpoint was written. Lower --lr?")
    assert "Top-1 test accuracy" not in read(tmp_path / "lr" / "train.log")

    # NaN at epoch 2, iteration 3: the checkpoint of epoch 2 stays, and a rerun finishes as if nothing happened
    real_losses, calls = engine.mean_losses, []

    def mean_losses(stacked, labels):  # the training loss of every head, once per step
        losses = real_losses(stacked, labels)
        calls.append(1)
        return losses * float("nan") if len(calls) == 2 * PROBE_ITERS + 4 else losses

    monkeypatch.setattr(engine, "mean_losses", mean_losses)
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
    steps = []

    class InfAfterLastStep(torch.optim.SGD):  # what models.heads.build_optimizer builds for the default --optimizer
        def step(self, *a, **k):
            out = super().step(*a, **k)
            steps.append(1)
            if len(steps) == 2 * PROBE_ITERS:  # the last step of epoch 1: its loss was finite
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))
            return out

    monkeypatch.setattr(torch.optim, "SGD", InfAfterLastStep)
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
