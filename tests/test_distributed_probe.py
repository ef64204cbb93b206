"""Many processes give the one-process result; a stop signal reaching the processes at different moments (or the
whole process group, DataLoader workers included, as slurm sends it) stops every rank cleanly; SIGUSR1 requeues,
SIGTERM does not."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, make_checkpoint, make_cifar, run_script

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
RUN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # run_script sets OMP_NUM_THREADS itself


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_world")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=200, n_test=61, noise=120)
    ckpts = [str(base / "a.pth"), str(base / "b.pth")]
    for seed, ckpt in enumerate(ckpts):
        make_checkpoint(ckpt, "resnet18", "raw", seed=seed)
    return {"base": base, "data": data, "ckpts": ckpts}


def argv(world, dump, *extra):
    return ["main_linear_probe.py", "--arch", "resnet18", "--pretrained", *world["ckpts"], "--data_path",
            world["data"], "--dump_path", str(dump), "--img_size", "16", "--lr", "0.1", "--print_freq", "1", *extra]


def torchrun(*args):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def final_top1(dump):
    return float(re.findall(r"Top-1 test accuracy: ([\d.]+)", (dump / "train.log").read_text())[-1])


def test_two_processes_give_the_one_process_result(world, tmp_path):
    """fp32, the same global batch of 32 (the 2-process run splits it 16 + 16), the same cached features."""
    common = ["--workers", "0", "--epochs", "3", "--decay_epochs", "2", "--feature_cache", str(world["base"] / "c")]
    one = run_script(argv(world, tmp_path / "one", *common, "--batch_size", "32"), env=RUN_ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_script(torchrun(*argv(world, tmp_path / "two", *common, "--batch_size", "16")), env=RUN_ENV)
    assert two.returncode == 0, two.stderr[-2000:]
    heads = [torch.load(tmp_path / run / "checkpoint.pth.tar", weights_only=False)["heads"] for run in ("one", "two")]
    for key in ("0.bn.running_mean", "0.bn.running_var", "0.bn.weight", "0.linear.weight", "0.linear.bias"):
        assert torch.allclose(heads[0][key], heads[1][key], rtol=1e-3, atol=1e-5), key
    assert abs(final_top1(tmp_path / "one") - final_top1(tmp_path / "two")) <= 0.5
    # the logged training loss is over both processes' halves of the global batch, not rank 0's
    # (training lines: they have a Data field; the original's validation lines are each process's own batches)
    last = [re.findall(r"Data \S+ \(\S+\)\tLoss \S+ \((\S+)\)", (tmp_path / run / "train.log").read_text())[-1]
            for run in ("one", "two")]
    assert float(last[0]) == pytest.approx(float(last[1]), rel=1e-3)


def fake_scontrol(tmp_path):
    """An scontrol on the PATH that records its arguments: the requeue is observable."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'requeued'}\n")
    script.chmod(0o755)
    return dict(ENV, PATH=f"{folder}:{os.environ['PATH']}", SLURM_JOB_ID="4242")


def wait_for(path, text, proc, timeout=240):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.05)
    return False


def test_stop_signal_to_one_rank_stops_both_at_the_same_point_and_requeues(world, tmp_path):
    dump = tmp_path / "run"
    env = fake_scontrol(tmp_path)
    proc = subprocess.Popen([sys.executable, *torchrun(*argv(world, dump, "--workers", "2", "--epochs", "50",
                                                             "--batch_size", "16"))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(dump / "train.log-1", "Epoch[1] - Iter: [2/", proc)
    rank1 = int((dump / "train.log-1").read_text().split(" pid ")[1].split()[0])
    os.kill(rank1, signal.SIGUSR1)  # rank 0 is never signalled: the ranks agree through a collective
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    stops = [re.findall(r"Stopped by (\S+).* during epoch (\d+)", (dump / name).read_text())
             for name in ("train.log", "train.log-1")]
    assert stops[0] and stops[1] and stops[0][0][1] == stops[1][0][1], stops
    assert stops[1][0][0] == "SIGUSR1"
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]


def test_sigterm_to_the_process_group_with_workers_stops_cleanly(world, tmp_path):
    """As slurm: SIGTERM to the main process and its DataLoader workers at once; a clean stop, then a resume."""
    dump = tmp_path / "run"
    env = fake_scontrol(tmp_path)
    run = argv(world, dump, "--workers", "2", "--epochs", "2", "--batch_size", "16", "--debug")
    proc = subprocess.Popen([sys.executable, *run], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(dump / "train.log", "Epoch[1] - Iter: [2/", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert "Stopped by SIGTERM during epoch 1" in (dump / "train.log").read_text()
    assert not (tmp_path / "requeued").exists()  # SIGTERM is scancel: no requeue (SIGUSR1 requeues)
    again = run_script(run, env=RUN_ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (dump / "train.log").read_text()
    assert "Resumed from" in log and "Top-1 test accuracy:" in log


def test_two_processes_write_the_one_process_cache(world, tmp_path):
    """Each rank writes its shard's rows of every backbone's entry (both backbones in one pass, chunk by chunk):
    the entries of a 2-process extraction equal a 1-process one's, byte for byte (the same batch per process)."""
    common = ["--workers", "0", "--epochs", "1", "--batch_size", "16", "--precision", "fp32"]
    env = dict(RUN_ENV, TIMECAT_CACHE_CHUNK="2")
    one = run_script(argv(world, tmp_path / "one", *common, "--feature_cache", str(tmp_path / "c1")), env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_script(torchrun(*argv(world, tmp_path / "two", *common, "--feature_cache", str(tmp_path / "c2"))),
                     env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    entries = sorted(d.name for d in (tmp_path / "c1").iterdir() if d.is_dir())
    assert len(entries) == 4 and entries == sorted(d.name for d in (tmp_path / "c2").iterdir() if d.is_dir())
    for entry in entries:
        for name in ("features.npy", "labels.npy"):
            assert (tmp_path / "c1" / entry / name).read_bytes() == (tmp_path / "c2" / entry / name).read_bytes()
