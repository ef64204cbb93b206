"""Preemption as slurm does it: SIGTERM / SIGUSR1 to every process of the job, DataLoader workers included.

The main process turns the signal into a flag its loop polls (StopSignal); the processes of a distributed run agree
on the stop through a collective (util.distributed.any_process), so they all stop at the same iteration; DataLoader
workers ignore the signals and leave the stop to the main process, which shuts them down itself. Without that, a
worker killed by the signal makes the main process raise "DataLoader worker (pid ...) is killed by signal".
"""
import signal

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """SIGTERM / SIGUSR1 (slurm's preemption and time-limit warnings) become a flag the loops poll, so a run stops
    at a clean point and a rerun resumes from its last checkpoint. A context manager: leaving it restores the
    handlers that were there before (a test or a notebook keeps its own)."""

    def __init__(self):
        self.received = None
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

    def __call__(self):
        return self.received is not None


class _IgnoreStopSignalsThen:
    """worker_init_fn: ignore the stop signals (the main process handles them), then run the caller's own init.
    A class, not a closure, so it pickles for the spawn start method."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # the worker was forked with the signals blocked (see StopSafeDataLoader); one sent in between is pending
        # and, now ignored, discarded
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.then is not None:
            self.then(worker_id)


class StopSafeDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes ignore SIGTERM / SIGUSR1. The signals are blocked while the workers are
    started, so none can reach a worker before it has set its handlers (no race), and unblocked right after in the
    main process, which then receives any signal that came meanwhile."""

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
