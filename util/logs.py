"""Logging: train.log (rank 0; other ranks train.log-{rank}), console on rank 0, metrics.jsonl, start-up banner."""
import json
import logging
import os
import sys
import time

import torch

from util.misc import git_revision


class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.time()

    def format(self, record):
        elapsed = int(record.created - self.start)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        prefix = f"{record.levelname} - {stamp} - {elapsed // 3600}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}"
        return f"{prefix} - {record.getMessage()}"


def create_logger(dump_path, rank, filename="train.log", console=True):
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
    logger.info(f"torch {torch.__version__}, device {dist_info.device}, launcher {dist_info.launcher}")
    logger.info(f"world size: {dist_info.world_size}, global batch: {global_batch}, learning rate: {lr}")


def write_json_atomic(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(record, path):
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def use_progress_bar(is_main):
    """tqdm only on an interactive terminal, so log files and slurm outputs stay clean."""
    return is_main and sys.stderr.isatty()
