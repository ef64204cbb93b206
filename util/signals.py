"""Preemption as slurm does it: SIGTERM / SIGUSR1 to every process of the job, DataLoader workers included.

Both stop a run at a clean point with a resumable state; only SIGUSR1 asks for a requeue. SIGUSR1 is the warning the
job scripts ask for (`#SBATCH --signal=USR1@300`: time limit or preemption coming), so the job requeues itself and
resumes. A plain SIGTERM is `scancel` (or the end of a grace time, where slurm requeues a preempted job by itself):
the job saves and ends, CANCELLED, and a resubmission resumes.

The main process turns the signal into a flag its loop polls (StopSignal); the processes of a distributed run agree
on the stop through a collective (util.distributed.any_process), so they all stop at the same iteration; DataLoader
workers ignore the signals and leave the stop to the main process, which shuts them down itself. Without that, a
worker killed by the signal makes the main process raise "DataLoader worker (pid ...) is killed by signal".
"""
import os
import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1


class StopSignal:
    """SIGTERM (scancel) / SIGUSR1 (slurm's time-limit and preemption warning) become a flag the loops poll, so a
    run stops at a clean point and a rerun resumes from its last checkpoint; `requeue` is true once SIGUSR1 came.
    A context manager: leaving it restores the handlers that were there before (a test or a notebook keeps its
    own)."""

    def __init__(self):
        self.received = None  # the name of the last stop signal received
        self.requeue = False  # SIGUSR1 came: the job should requeue itself
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self.requeue = self.requeue or signum == REQUEUE_SIGNAL
        outer = self._previous.get(signum)
        if isinstance(getattr(outer, "__self__", None), StopSignal):  # nested: the enclosing one hears it too
            outer(signum, frame)

    def __call__(self):
        return self.received is not None


def _ignore_stop_signals_from_others(parent):
    """In a worker: wait for the (blocked) stop signals and drop them, except a SIGTERM from the main process, which
    is how multiprocessing ends a worker that is still alive when the main process exits."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


class _IgnoreStopSignalsThen:
    """worker_init_fn: leave the stop signals to the main process, then run the caller's own init. A class, not a
    closure, so it pickles for the spawn start method."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id):
        # The worker was started with the stop signals blocked (see StopSafeDataLoader) and keeps them blocked, so
        # none interrupts it; a thread takes them one by one, with the sender's pid, which SIG_IGN would not tell.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        threading.Thread(target=_ignore_stop_signals_from_others, args=(os.getppid(),), daemon=True,
                         name="stop-signals").start()
        if self.then is not None:
            self.then(worker_id)


class StopSafeDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes ignore SIGTERM / SIGUSR1 from anyone but the main process. The signals
    are blocked while the workers are started, so none can reach a worker before it is ready (no race), and
    unblocked right after in the main process, which then receives any signal that came meanwhile."""

    def __init__(self, *args, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=_IgnoreStopSignalsThen(worker_init_fn), **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
