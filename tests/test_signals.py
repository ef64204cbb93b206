"""Slurm signals every process of a job, DataLoader workers included: the main process must stop cleanly."""
import os
import signal
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOOP = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    import torch
    from util.signals import StopSafeDataLoader, StopSignal

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 10_000
        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.tensor([i])

    mode = sys.argv[1]
    loader = StopSafeDataLoader(Slow(), batch_size=2, num_workers=2)
    with StopSignal() as stop:
        batches = iter(loader)
        for i, batch in enumerate(batches):
            if stop():  # polled after fetching a batch, as the training loops do
                print(f"stopped by {stop.received} at batch {i}", flush=True)
                break
            if i == 3:
                # as slurm does: from outside, to the whole process group, workers included
                subprocess.run(["kill", "-TERM", "--", f"-{os.getpgid(0)}"], start_new_session=True, check=True)
                time.sleep(1)  # let a worker that would die of it die before the next fetch
    if mode == "leak":  # an iterator still alive at exit: multiprocessing ends its workers with SIGTERM
        sys.exit(0)
    del batches
    print("clean exit", flush=True)
""")


def run_in_own_group(mode):
    return subprocess.run([sys.executable, "-c", LOOP, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, start_new_session=True, env=dict(os.environ, PYTHONPATH=ROOT))


def test_sigterm_to_the_process_group_stops_the_main_loop_not_the_workers():
    out = run_in_own_group("clean")
    assert out.returncode == 0, out.stderr
    assert "killed by signal" not in out.stderr
    assert "stopped by SIGTERM at batch" in out.stdout and "clean exit" in out.stdout, out.stdout + out.stderr


def test_workers_still_alive_at_exit_do_not_block_it():
    out = run_in_own_group("leak")  # subprocess.run's timeout fails the test if the exit hangs
    assert out.returncode == 0, out.stderr
    assert "stopped by SIGTERM" in out.stdout


def test_stop_signal_restores_the_previous_handlers():
    from util.signals import StopSignal
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop() and stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before
