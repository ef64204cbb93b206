"""Run folder: train.log (rank 0; other ranks train.log-{rank}), console on rank 0, metrics.jsonl, start-up banner,
and the lock that keeps a second run out."""
import contextlib
import json
import logging
import os
import socket
import sys
import time

import torch

from util import layout, log_lines
from util.cli import UserError
from util.distributed import broadcast_object
from util.misc import git_revision, lock_file


class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.time()

    def format(self, record):
        # the original's formatter (util/log_lines owns it): prefix, indented continuation lines, empty line for an
        # empty message; so old readers of train.log keep working
        return log_lines.format_record(record.levelname, record.created, record.created - self.start,
                                       record.getMessage())


def create_logger(dump_path, rank, filename=layout.PROBE_LOG, console=True):
    """A logger writing to dump_path/filename (train.log; train.log-{rank} on other ranks) and, on rank 0
    with console=True, to stdout."""
    logger = logging.getLogger(f"timecat.{os.path.abspath(os.path.join(dump_path, filename))}.{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    formatter = _ElapsedFormatter()
    filename = filename if rank == 0 else f"{filename}-{rank}"
    file_handler = logging.FileHandler(os.path.join(dump_path, filename), mode="a")
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)
    if rank == 0 and console:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    return logger


def close_logger(logger):
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def log_startup(logger, args, dist_info, global_batch, lr):
    logger.info(f"git revision: {git_revision()}")
    logger.info("arguments:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
    logger.info(f"torch {torch.__version__}, device {dist_info.device}, launcher {dist_info.launcher}, "
                f"pid {os.getpid()} on {socket.gethostname()}")
    logger.info(f"world size: {dist_info.world_size}, global batch: {global_batch}, learning rate: {lr}")


@contextlib.contextmanager
def writing(path):
    """A failed write of a small output file (disk full, I/O error) is a one-line error naming the file."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def temporary_path(path):
    """Where a file is written before its atomic rename (claim_run_folder removes those a crash left)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.{os.getpid()}")


def write_json_atomic(obj, path):
    tmp = temporary_path(path)
    with writing(path):
        try:
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def append_jsonl(record, path):
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path, keep):
    """Keep the records for which keep(record) holds: a resumed run drops those after its checkpoint (written
    before a crash that lost the checkpoint), which it writes again, and a line cut short by a crash."""
    if not os.path.exists(path):
        return
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    kept = [r for r in records if keep(r)]
    tmp = temporary_path(path)
    with writing(path):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def claim_run_folder(path, dist_info, folders=()):
    """Lock <path>/.lock for this run's life (rank 0), so a second run on the same folder is refused instead of
    mixing its logs and checkpoints with ours; the lock goes with its process, so a killed run never blocks its
    rerun. The holder also removes the temporary files of writes a crash cut short (in path and `folders`).
    Returns the open lock file (None on other ranks, or where the file system has no locks)."""
    lock, error = None, None
    if dist_info.is_main:
        lock = open(os.path.join(path, ".lock"), "a+")
        locked = lock_file(lock)
        if not locked:
            lock.seek(0)
            owner = lock.read().strip()
            lock.close()
            lock = None
            if locked is False:
                error = (f"{path} is in use by another run ({owner or 'owner unknown'}); wait for it to end or "
                         f"stop it, or give this run another --dump_path")
        if lock is not None:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
            for folder in (path, *folders):
                for name in os.listdir(folder):
                    if name.startswith(".") and ".tmp." in name:
                        os.remove(os.path.join(folder, name))
    error = broadcast_object(error)
    if error:
        raise UserError(error)
    return lock


def use_progress_bar(is_main):
    """tqdm only on an interactive terminal, so log files and slurm outputs stay clean."""
    return is_main and sys.stderr.isatty()
