"""Fault injection, distributed faults (driver: tests/faults/driver.py; docs/reliability.md)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import main_linear_probe as probe
from driver import ENV, probe_argv, read, user_error
from helpers import ROOT
from util.checkpoint import load_file


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
