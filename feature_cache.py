"""Feature cache: the frozen encoder's outputs, computed once, stored as fp16 .npy files on disk.

One entry per (split, view) lives in <cache_dir>/<hash of its key>/ with features.npy (N x D fp16), labels.npy
(-1 for an image skipped as unreadable) and manifest.json. The manifest is written last, after every file is
complete and checksummed, so a half-written entry is never used; until then, partial.json and chunks.<rank>.json
record the chunks written, and a rerun (after a stop signal or a crash) resumes at the next chunk. An entry whose
files do not match their manifest is rebuilt. A lock per entry keeps two runs from writing the same one.
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
from util.distributed import any_process, barrier, broadcast_object
from util.logs import write_json_atomic
from util.misc import lock_file, set_seed
from util.progress import Progress
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
            # an augmented view's draws depend on the extraction chunks (seeded one by one, for resumption)
            **({"chunk_images": chunk_batches() * args.batch_size} if view >= 0 else {}),
            # an entry that skipped unreadable images serves only runs that skip them; absent when off, so the
            # entries written before the flag existed stay valid
            **({"skip_bad_images": True} if args.skip_bad_images else {}),
            **({"fast_transforms": True} if getattr(args, "fast_transforms", False) else {}),  # other pixels
            **({"subset": training_subset_key(args)} if split == "train" and training_subset_key(args) else {})}


def training_subset_key(args):
    """Which images the training entry holds, in which order (None: all, in the dataset's order). A training
    subset (--data_rate < 1 or a _{p}perc name) is the reference's rule of issue 10, and --data_rate's depends on
    the seed: runs with other subsets never share features. A full CIFAR set is read through the original's fixed
    order since issue 19 ('order'), so its entries never match those written in the raw order before; the
    _{p}perc entries, always in that order, keep their key."""
    cifar_full = args.data_name in ("cifar10", "cifar100")
    if not (args.data_rate < 1 or "perc" in args.data_name or cifar_full):
        return None
    return {"rule": "reference", "seed": args.seed if args.data_rate < 1 else None,
            **({"order": "cifar_subset_order"} if cifar_full else {})}


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


def chunk_batches():
    """Batches per extraction chunk (--feature_cache): the unit written, recorded and resumed; a stop loses at most
    the chunk in progress. $TIMECAT_CACHE_CHUNK changes it (tests use small chunks)."""
    return max(1, int(os.environ.get("TIMECAT_CACHE_CHUNK", 200)))


class ExtractionStopped(Exception):
    """A stop signal came during the feature extraction; the chunks written so far are kept for the rerun."""

    def __init__(self, what, done, total):
        super().__init__(f"{what}: {done} of {total} chunks written")


def _start_or_resume(directory, key, n, dim, world):
    """(resumed, error) on the first process: keep the files of an unfinished extraction of the same key and
    process count (its chunks are resumed), else clear the entry and allocate its files."""
    partial_path = os.path.join(directory, "partial.json")
    features_path, labels_path = os.path.join(directory, "features.npy"), os.path.join(directory, "labels.npy")
    try:
        with open(partial_path) as f:
            partial = json.load(f)
        if partial == {"key": key, "world": world} and \
                np.load(features_path, mmap_mode="r").shape == (n, dim) and \
                np.load(labels_path, mmap_mode="r").shape == (n,):
            return True, None
    except (OSError, ValueError):
        pass
    _clear(directory)
    try:
        _allocate(features_path, (n, dim), np.float16)
        _allocate(labels_path, (n,), np.int64)
    except OSError as exc:
        _clear(directory)
        return False, (f"cannot write the feature cache in {os.path.dirname(directory)} "
                       f"({n * dim * 2 / 1e9:.2f} GB needed): {exc.strerror or exc}")
    write_json_atomic({"key": key, "world": world}, partial_path)
    return False, None


@torch.no_grad()
def _extract(encoder, dataset, directory, key, args, dist_info, view, logger, show_bar, should_stop):
    """Each process computes its shard in chunks of chunk_batches() batches: a chunk is written, flushed and
    recorded (chunks.<rank>.json) before the next; a rerun skips the recorded chunks. Each chunk has its own loader
    and seeds (seed, view, rank, chunk), so a resumed extraction writes what an uninterrupted one would. A stop
    signal ends the chunk in progress unrecorded; ExtractionStopped is raised on every process."""
    from tqdm import tqdm
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    n, dim = len(dataset), encoder.out_dim
    resumed, error = _start_or_resume(directory, key, n, dim, world) if dist_info.is_main else (None, None)
    resumed, error = broadcast_object((resumed, error))
    if error:
        raise UserError(error)
    progress_path = os.path.join(directory, f"chunks.{rank}.json")
    done = 0
    if resumed and os.path.exists(progress_path):
        with open(progress_path) as f:
            done = json.load(f)["chunks"]
    order = np.asarray(ShardSampler(n, rank, world).indices, dtype=np.int64)
    per_chunk = chunk_batches() * args.batch_size
    chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
    if resumed:
        logger.info(f"feature cache: resuming at chunk {done} of {len(chunks)} ({directory})")
    features = np.load(os.path.join(directory, "features.npy"), mmap_mode="r+")
    labels = np.load(os.path.join(directory, "labels.npy"), mmap_mode="r+")
    desc = f"caching {os.path.basename(directory)[:8]}"
    batches = sum(-(-len(c) // args.batch_size) for c in chunks)
    progress = Progress(desc, batches, bar=show_bar, start=sum(-(-len(c) // args.batch_size) for c in chunks[:done]))
    bar = tqdm(total=batches, initial=progress.start, desc=desc, leave=False, disable=not show_bar)
    stopped = False
    for c in range(done, len(chunks)):
        seed = args.seed + 7919 * (view + 1) + 104729 * c + rank
        set_seed(seed)  # augmented views are reproducible, chunk by chunk
        loader = StopSafeDataLoader(SkipUnreadable(dataset) if args.skip_bad_images else dataset,
                                    args.batch_size, sampler=chunks[c].tolist(), num_workers=args.workers,
                                    pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                                    collate_fn=collate_readable, prefetch_factor=4 if args.workers else None)
        start = 0
        for images, targets, kept in loader:
            if should_stop is not None and should_stop():
                stopped = True
                break
            rows = chunks[c][start:start + len(kept)]
            start += len(kept)
            labels[rows[~kept.numpy()]] = -1  # unreadable (--skip_bad_images): the batch sources drop label -1
            if images is not None:
                images, _ = to_device(images, targets, device)
                with torch.inference_mode(), autocast(device, args.precision):
                    out = encoder(images)
                features[rows[kept.numpy()]] = out.float().cpu().numpy().astype(np.float16)
                labels[rows[kept.numpy()]] = targets.numpy()
            progress.update()
            bar.update(1)
        del loader  # its workers end here, before a stop returns
        if stopped:
            break
        features.flush()  # the chunk is on disk before it is recorded
        labels.flush()
        write_json_atomic({"chunks": c + 1}, progress_path)
        done = c + 1
    bar.close()
    del features, labels
    barrier()
    if any_process(stopped, device):  # every process stops here, whichever got the signal
        raise ExtractionStopped(f"feature extraction {desc}", done, len(chunks))


def load_or_build(encoder, dataset, cache_dir, args, dist_info, split, view, logger, show_bar, should_stop=None):
    """(features N x D fp16 tensor, labels N int64 tensor) of `dataset` through the frozen encoder,
    from the cache when a valid entry exists, else computed now (in chunks, resumed after a stop) and stored.
    should_stop: the stop-signal flag (util.signals.StopSignal); ExtractionStopped when it ends the extraction."""
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
            _extract(encoder, dataset, directory, key, args, dist_info, view, logger, show_bar, should_stop)
            if dist_info.is_main:
                for name in os.listdir(directory):  # the chunk records of the finished extraction
                    if name == "partial.json" or name.startswith("chunks."):
                        os.remove(os.path.join(directory, name))
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
