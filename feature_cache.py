"""Feature cache: the frozen encoder's outputs, computed once, stored as fp16 .npy files on disk.

One entry per (split, view) lives in <cache_dir>/<hash of its key>/ with features.npy (N x D fp16), labels.npy
(-1 for an image skipped as unreadable) and manifest.json. The manifest is written last, after every file is
complete and checksummed, so a half-written entry is never used; an entry whose files do not match their manifest
is rebuilt. A lock per entry keeps two runs from writing the same one.
"""
import hashlib
import json
import os
import zlib

import numpy as np
import torch

from datasets import SkipUnreadable, collate_readable
from engine import ShardSampler, autocast, to_device
from util.cli import UserError
from util.distributed import barrier, broadcast_object
from util.logs import write_json_atomic
from util.misc import lock_file, set_seed
from util.signals import StopSafeDataLoader

FORMAT_VERSION = 1
LOCK = ".lock"  # in each entry's folder, held by the run checking or computing the entry


def checkpoint_identity(path):
    """What makes a checkpoint file the same one: its absolute path, size and modification time."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def entry_key(args, split, view, length):
    """Everything that determines the features of one split: backbones, data, transform, precision."""
    return {"version": FORMAT_VERSION, "arch": list(args.arch),
            "checkpoints": [checkpoint_identity(p) for p in args.pretrained], "data_name": args.data_name,
            "data_path": os.path.abspath(args.data_path), "data_rate": args.data_rate if split == "train" else 1.0,
            "split": split, "view": view, "tf_name": args.tf_name, "img_size": args.img_size,
            "precision": args.precision, "length": length, "seed": args.seed if view >= 0 else None,
            # an entry that skipped unreadable images serves only runs that skip them; absent when off, so the
            # entries written before the flag existed stay valid
            **({"skip_bad_images": True} if args.skip_bad_images else {}),
            **({"fast_transforms": True} if getattr(args, "fast_transforms", False) else {}),  # other pixels
            # a training subset (--data_rate < 1 or a _{p}perc name) is the reference's rule of issue 10, and
            # --data_rate's depends on the seed: runs with other subsets never share features
            **({"subset": {"rule": "reference", "seed": args.seed if args.data_rate < 1 else None}}
               if split == "train" and (args.data_rate < 1 or "perc" in args.data_name) else {})}


def _crc32(path, chunk=1 << 24):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _valid(directory, key):
    """The entry's manifest exists, matches the key, and every file has its recorded size and checksum."""
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False, "no complete manifest"
    if manifest.get("key") != key:
        return False, "manifest of another configuration"
    for name, meta in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) != meta["size"]:
            return False, f"{name} is missing or truncated"
        if _crc32(path) != meta["crc32"]:
            return False, f"{name} is corrupt (checksum mismatch)"
    return True, "ok"


def _allocate(path, shape, dtype):
    """Create an .npy file of the full size up front, so a full disk fails here, not in the middle of a write
    through a memory map (where it would kill the process with SIGBUS)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset, nbytes = array.offset, array.nbytes
    del array
    with open(path, "r+b") as f:
        if nbytes:
            os.posix_fallocate(f.fileno(), 0, offset + nbytes)


def _clear(directory):
    """Remove an entry's files, keeping its lock."""
    for name in os.listdir(directory):
        if name != LOCK:
            os.remove(os.path.join(directory, name))


@torch.no_grad()
def _extract(encoder, dataset, directory, args, dist_info, view, logger, show_bar):
    from tqdm import tqdm
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    n, dim = len(dataset), encoder.out_dim
    features_path, labels_path = os.path.join(directory, "features.npy"), os.path.join(directory, "labels.npy")
    error = None
    if dist_info.is_main:
        _clear(directory)
        try:
            _allocate(features_path, (n, dim), np.float16)
            _allocate(labels_path, (n,), np.int64)
        except OSError as exc:
            _clear(directory)
            error = (f"cannot write the feature cache in {os.path.dirname(directory)} "
                     f"({n * dim * 2 / 1e9:.2f} GB needed): {exc.strerror or exc}")
    error = broadcast_object(error)
    if error:
        raise UserError(error)
    sampler = ShardSampler(n, rank, world)
    generator = torch.Generator().manual_seed(args.seed + 7919 * (view + 1) + rank)
    set_seed(args.seed + 7919 * (view + 1) + rank)  # augmented views are reproducible
    loader = StopSafeDataLoader(SkipUnreadable(dataset) if args.skip_bad_images else dataset,
                                args.batch_size, sampler=sampler, num_workers=args.workers,
                                pin_memory=device.type == "cuda", generator=generator, collate_fn=collate_readable,
                                prefetch_factor=4 if args.workers else None)
    features = np.load(features_path, mmap_mode="r+")
    labels = np.load(labels_path, mmap_mode="r+")
    order = np.asarray(sampler.indices, dtype=np.int64)
    start = 0
    desc = f"caching {os.path.basename(directory)[:8]}"
    for images, targets, kept in tqdm(loader, desc=desc, leave=False, disable=not show_bar):
        rows = order[start:start + len(kept)]
        start += len(kept)
        labels[rows[~kept.numpy()]] = -1  # unreadable (--skip_bad_images): the batch sources drop label -1
        if images is None:
            continue
        images, _ = to_device(images, targets, device)
        with torch.inference_mode(), autocast(device, args.precision):
            out = encoder(images)
        features[rows[kept.numpy()]] = out.float().cpu().numpy().astype(np.float16)
        labels[rows[kept.numpy()]] = targets.numpy()
    features.flush()
    labels.flush()
    del features, labels
    barrier()


def load_or_build(encoder, dataset, cache_dir, args, dist_info, split, view, logger, show_bar):
    """(features N x D fp16 tensor, labels N int64 tensor) of `dataset` through the frozen encoder,
    from the cache when a valid entry exists, else computed now and stored."""
    key = entry_key(args, split, view, len(dataset))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    directory = os.path.join(cache_dir, digest)
    what = f"{split}{'' if view < 0 else f' view {view}'}"
    lock = None
    if dist_info.is_main:  # one run at a time checks or builds an entry: runs sharing a cache (a sweep's jobs)
        os.makedirs(directory, exist_ok=True)  # wait for the one computing it, then reuse its features
        lock = open(os.path.join(directory, LOCK), "a+")
        if lock_file(lock) is False:
            logger.info(f"feature cache: another run is computing {what} in {directory}; waiting for it")
            lock_file(lock, wait=True)
    try:
        status = broadcast_object(_valid(directory, key) if dist_info.is_main else None)
        if status[0]:
            logger.info(f"feature cache: reusing {what} from {directory}")
        else:
            logger.info(f"feature cache: computing {what} ({len(dataset)} images) into {directory} [{status[1]}]")
            _extract(encoder, dataset, directory, args, dist_info, view, logger, show_bar)
            if dist_info.is_main:
                files = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                                "crc32": _crc32(os.path.join(directory, name))}
                         for name in ("features.npy", "labels.npy")}
                write_json_atomic({"key": key, "files": files}, os.path.join(directory, "manifest.json"))
            barrier()
    finally:
        if lock is not None:
            lock.close()
    # copy-on-write map: nothing is read into memory until used, and the file is never modified
    features = torch.from_numpy(np.load(os.path.join(directory, "features.npy"), mmap_mode="c"))
    labels = torch.from_numpy(np.load(os.path.join(directory, "labels.npy")))
    return features, labels
