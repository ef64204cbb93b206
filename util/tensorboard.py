"""Optional TensorBoard events (--tensorboard) beside a run's train.log: every numeric field of each
metrics.jsonl record becomes a scalar ('train_loss' -> 'train/loss', 'lr' -> 'lr'), at the record's epoch or step.
metrics.jsonl stays the record of a run; the events are a view of it. tensorboard is an optional dependency
(pyproject extra `tensorboard`), imported only when the flag is given. Depends on nothing of ours but util.cli."""
import os

from util.cli import UserError

SPLITS = ("train", "test", "val")


def require_tensorboard():
    """One-line error, before any work starts, when --tensorboard is given without the package."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed: run "
                        "`uv sync --extra tensorboard` (setup.sh installs it), or drop --tensorboard") from None


def scalar_name(key):
    split, _, rest = key.partition("_")
    return f"{split}/{rest}" if split in SPLITS and rest else key


class MetricsBoard:
    """TensorBoard writers, one per run folder, opened on the first record; a no-op when disabled (the flag is
    off, or this is not the main process). Use as a context manager so the events are flushed at the end.
    wandb_run: a util.wandb_log.WandbRun (--wandb, main process) that gets the same records, or None."""

    def __init__(self, enabled, step_key, wandb_run=None):
        self.enabled, self.step_key, self.writers, self.wandb_run = bool(enabled), step_key, {}, wandb_run

    def add(self, record, folder):
        if self.wandb_run is not None:
            self.wandb_run.add(record, folder)
        if not self.enabled:
            return
        if folder not in self.writers:
            from torch.utils.tensorboard import SummaryWriter  # here: only runs with --tensorboard need it
            self.writers[folder] = SummaryWriter(log_dir=folder)  # events.out.tfevents.* beside train.log
        writer, step = self.writers[folder], int(record[self.step_key])
        for key, value in record.items():
            if key != self.step_key and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(scalar_name(key), value, step)
        writer.flush()  # a preempted run keeps the events of every finished epoch

    def close(self):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
        if self.wandb_run is not None:
            self.wandb_run.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def events_in(folder):
    """The TensorBoard event files of a run folder (for tests and tools)."""
    return sorted(name for name in os.listdir(folder) if name.startswith("events.out.tfevents"))
