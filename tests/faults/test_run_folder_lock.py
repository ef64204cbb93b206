"""Fault injection, two runs, one folder (driver: tests/faults/driver.py; docs/reliability.md)."""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import main_linear_probe as probe
import main_pretrain as pretrain
from driver import ENV, assert_probe_matches, pretrain_argv, probe_argv, read, user_error
from helpers import ROOT, check_probe_args


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
    from feature_cache import cache_inputs, entry_folder, entry_key
    argv = probe_argv(world, tmp_path / "run", "--epochs", "1", "--feature_cache", str(tmp_path / "cache"))
    args = probe.get_args_parser().parse_args(argv)
    check_probe_args(args)
    # the first backbone's training entry
    key = entry_key(cache_inputs(args), args.arch[0], args.pretrained[0], "train", -1, 200)
    entry = Path(entry_folder(str(tmp_path / "cache"), key))
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
