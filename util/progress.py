"""Progress lines for logs that are not a terminal (slurm's job logs), where tqdm does not draw: every long stage
(feature extraction, training epochs, evaluation, pretraining) prints one line every PROGRESS_SECONDS with its
progress, rate and ETA. The one owner of that line's format:
    progress: eval 120/400 batches (30.0%), 3.10 batches/s, ETA 0:01:30
$TIMECAT_PROGRESS_SECONDS sets the period (default 60; 0: a line at every update, for tests)."""
import datetime
import os
import sys
import time

from tqdm import tqdm


def progress_seconds():
    try:
        return max(0.0, float(os.environ.get("TIMECAT_PROGRESS_SECONDS", 60)))
    except ValueError:
        return 60.0


def progress_line(what, done, total, unit, rate):
    """The one format: what, done/total unit (share), rate unit/s, ETA."""
    eta = datetime.timedelta(seconds=round((total - done) / rate)) if rate > 0 and total else "?"
    share = f" ({100 * done / total:.1f}%)" if total else ""
    return f"progress: {what} {done}/{total or '?'} {unit}{share}, {rate:.2f} {unit}/s, ETA {eta}"


def first_process():
    """Rank 0 of a distributed run, or a single process: the one that writes progress lines."""
    import torch.distributed as dist  # here: util/progress.py is imported by light paths too

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Progress:
    """Counts the units of one stage and writes a progress line every PROGRESS_SECONDS (to `write`, else stderr).
    Off where a tqdm bar draws (`bar`: a terminal) and on the processes other than the first. `start`:
    the units done before a resume (counted in the progress, not in the rate)."""

    def __init__(self, what, total, unit="batches", bar=False, write=None, start=0):
        self.what, self.total, self.unit, self.done, self.start = what, total, unit, start, start
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.enabled, self.every = not bar and first_process(), progress_seconds()
        self.started = self.last = time.monotonic()

    def update(self, n=1):
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = (self.done - self.start) / max(now - self.started, 1e-9)
            self.write(progress_line(self.what, self.done, self.total, self.unit, rate))


def track(iterable, what, total=None, bar=False):
    """The items of a loop's long stage (an epoch, an evaluation), counted in batches: a tqdm bar on a terminal
    (bar), else a progress line every PROGRESS_SECONDS (the first process only)."""
    progress = Progress(what, total, bar=bar)
    for item in tqdm(iterable, total=total, desc=what, leave=False, disable=not bar):
        yield item
        progress.update()
