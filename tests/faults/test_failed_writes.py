"""Fault injection, failed writes (driver: tests/faults/driver.py; docs/reliability.md)."""
import errno
import io
import os

import pytest
import torch

import main_linear_probe as probe
import main_pretrain as pretrain
import util.checkpoint
import util.logs
from driver import (
    assert_pretrain_matches,
    assert_probe_matches,
    leftovers,
    pretrain_argv,
    probe_argv,
    read,
    run_pretrain,
    run_probe,
    user_error,
)
from util.checkpoint import load_file


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
