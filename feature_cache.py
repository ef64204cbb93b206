"""Feature cache: each frozen backbone's pooled features, computed once, stored as fp16 .npy files on disk; a
concatenation (the --pretrained order) is assembled from its backbones' entries when it is loaded, so probing K
concatenations of B distinct backbones extracts B times, not K.

One entry per (backbone, split, view) lives in <cache_dir>/<hash of its key>/ with features.npy (N x D_b fp16),
labels.npy (-1 for an image skipped as unreadable) and manifest.json. The key holds everything that determines
the features: the backbone's architecture and checkpoint content (SHA-256), the data (dataset, folder, split,
--data_rate subset), the transform, the precision and, for augmented views, the seed and chunking. The manifest
is written last, after every file is complete and checksummed, so a half-written entry is never used; until then,
partial.json and chunks.<rank>.json record the chunks written, and a rerun (after a stop signal or a crash)
resumes at the next chunk. An entry whose files do not match their manifest is rebuilt. A lock per entry keeps
two runs from writing the same one. The backbones missing for one split are extracted in one pass over its images
(each batch decoded once, then run through each missing backbone). Beside the entries, cat-<hash>.json records
each concatenation loaded (its entries in order, for tools/analyze_features.py).

The per-concatenation entries written before (key version 1) are never read: they are other folders, and can
be deleted (`python tools/analyze_features.py CACHE_DIR --stale` lists them).
"""
import hashlib
import json
import os
import zlib
from typing import NamedTuple

import numpy as np
import torch

from datasets import SkipUnreadable, collate_readable
from engine import autocast, shard, to_device
from util.cli import UserError
from util.distributed import any_process, barrier, broadcast_object
from util.logs import write_json_atomic
from util.misc import lock_file, set_seed, sha256sum
from util.progress import Progress
from util.signals import StopSafeDataLoader

FORMAT_VERSION = 2  # 1: one entry per concatenation (before issue 22); 2: one entry per backbone
LOCK = ".lock"  # in each entry's folder, held by the run checking or computing the entry


class CacheInputs(NamedTuple):
    """What, besides the backbone, determines cached features: the data read, its transform, the precision and
    the extraction's batching (cache_inputs builds it from the probe's flags)."""
    data_name: str
    data_path: str
    data_rate: float
    subset: object  # training_subset_key: which training images, in which order (None: all, dataset order)
    transform: dict  # tf_name, img_size and, where not the reference's, the recipe and fast_transforms
    precision: str
    seed: int
    batch_size: int
    workers: int
    skip_bad_images: bool


class Backbone(NamedTuple):
    """One member of a concatenation: its architecture and checkpoint (the entry's identity), the frozen module
    whose forward gives its pooled feature, and that feature's width."""
    arch: str
    checkpoint: str
    net: object
    dim: int


def cache_inputs(args, recipe=None):
    """The CacheInputs of a probe's checked flags; recipe: the backbones' input recipe (timecat.backbones_recipe;
    None: the reference's transform)."""
    transform = {"tf_name": args.tf_name, "img_size": args.img_size,
                 **({"recipe": list(recipe)} if recipe is not None else {}),
                 **({"fast_transforms": True} if getattr(args, "fast_transforms", False) else {})}  # other pixels
    return CacheInputs(args.data_name, os.path.abspath(args.data_path), args.data_rate, training_subset_key(args),
                       transform, args.precision, args.seed, args.batch_size, args.workers,
                       bool(args.skip_bad_images))


_HASHES = {}  # (path, size, mtime) -> SHA-256: a checkpoint is read once per process


def checkpoint_identity(path):
    """What makes a checkpoint the same one: its content (SHA-256) and size; a copy elsewhere is the same, a
    file retrained in place is not."""
    stat = os.stat(path)
    seen = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if seen not in _HASHES:
        _HASHES[seen] = sha256sum(path)
    return {"sha256": _HASHES[seen], "size": stat.st_size}


def entry_key(inputs, arch, checkpoint, split, view, length):
    """Everything that determines one backbone's features of one split and view."""
    train = split == "train"
    return {"version": FORMAT_VERSION, "arch": arch, "checkpoint": checkpoint_identity(checkpoint),
            "data_name": inputs.data_name, "data_path": inputs.data_path,
            "data_rate": inputs.data_rate if train else 1.0, "split": split, "view": view, **inputs.transform,
            "precision": inputs.precision, "length": length, "seed": inputs.seed if view >= 0 else None,
            # an augmented view's draws depend on the extraction chunks (seeded one by one, for resumption)
            **({"chunk_images": chunk_batches() * inputs.batch_size} if view >= 0 else {}),
            # an entry that skipped unreadable images serves only runs that skip them
            **({"skip_bad_images": True} if inputs.skip_bad_images else {}),
            **({"subset": inputs.subset} if train and inputs.subset else {})}


def _digest(obj):
    """The name of a JSON-able value's folder or record: its first 20 hex digits of SHA-256. sort_keys: a dict's
    key order never changes the name (a list's order does: the names of lists without dicts are json.dumps')."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def entry_folder(cache_dir, key):
    return os.path.join(cache_dir, _digest(key))


def training_subset_key(args):
    """Which images the training entry holds, in which order (None: all, in the dataset's order). A training
    subset (--data_rate < 1 or a _{p}perc name) is the reference's rule of issue 10, and --data_rate's depends on
    the seed: runs with other subsets never share features. A full CIFAR set is read through the original's fixed
    order since issue 19 ('order')."""
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


class _Entry:
    """One backbone's entry being extracted: its folder, key and module, and this process's open files."""

    def __init__(self, directory, key, backbone):
        self.directory, self.key, self.backbone = directory, key, backbone
        self.done, self.features, self.labels = 0, None, None


class FeatureCache:
    """The cache folder of one probe: load() gives a concatenation's per-backbone features of a split, from
    the entries that exist, extracting the missing ones. `extracted` lists the entries this object computed
    ((arch, checkpoint, split, view) each). should_stop: the stop-signal flag (util.signals.StopSignal);
    InterruptedError (the builtin: "interrupted by a signal") when it ends an extraction; the chunks written so far
    are kept for the rerun."""

    def __init__(self, directory, inputs, dist_info, logger, show_bar=False, should_stop=None):
        self.directory, self.inputs, self.dist_info = directory, inputs, dist_info
        self.logger, self.show_bar, self.should_stop = logger, show_bar, should_stop
        self.extracted = []

    def load(self, backbones, dataset, split, view):
        """([N x D_b fp16 tensor per backbone, in the given order], N int64 labels) of `dataset`; concatenated
        along dim 1 they are the concatenated encoder's features (assemble() does it)."""
        main = self.dist_info.is_main
        what = f"{split}{'' if view < 0 else f' view {view}'}"
        keys = broadcast_object([entry_key(self.inputs, b.arch, b.checkpoint, split, view, len(dataset))
                                 for b in backbones] if main else None)  # checkpoints hashed by one process
        folders = [entry_folder(self.directory, key) for key in keys]
        unique = {}  # a backbone given twice has one entry
        for folder, key, backbone in zip(folders, keys, backbones):
            unique.setdefault(folder, _Entry(folder, key, backbone))
        locks = []
        try:
            if main:  # one run at a time checks or builds an entry: runs sharing a cache (a sweep's jobs) wait
                for folder in sorted(unique):  # for the one computing it, then reuse its features; one order: no
                    os.makedirs(folder, exist_ok=True)  # deadlock between runs needing overlapping entries
                    locks.append(open(os.path.join(folder, LOCK), "a+"))
                    if lock_file(locks[-1]) is False:
                        self.logger.info(f"feature cache: another run is computing {what} in {folder}; "
                                         f"waiting for it")
                        lock_file(locks[-1], wait=True)
            status = broadcast_object({f: _valid(f, e.key) for f, e in unique.items()} if main else None)
            todo = [e for f, e in unique.items() if not status[f][0]]
            if not todo:
                self.logger.info(f"feature cache: reusing {what} of {len(unique)} backbone(s) from {self.directory}")
            else:
                self.logger.info(f"feature cache: computing {what} ({len(dataset)} images) for {len(todo)} of "
                                 f"{len(unique)} backbone(s), in one pass, into {self.directory}")
                for e in todo:
                    self.logger.info(f"feature cache: extracting {e.backbone.arch} "
                                     f"{os.path.basename(e.backbone.checkpoint)} {what} into {e.directory} "
                                     f"[{status[e.directory][1]}]")
                self._extract(todo, dataset, what, view)
                if main:
                    for e in todo:
                        _finish(e.directory, e.key)
                barrier()
                self.extracted += [(e.backbone.arch, e.backbone.checkpoint, split, view) for e in todo]
            if main:  # the concatenation's entries in order, for tools/analyze_features.py
                record = {"version": FORMAT_VERSION, "split": split, "view": view,
                          "arch": [b.arch for b in backbones], "checkpoints": [b.checkpoint for b in backbones],
                          "dims": [b.dim for b in backbones], "entries": [os.path.basename(f) for f in folders]}
                name = _digest(record["entries"] + [split, view])
                write_json_atomic(record, os.path.join(self.directory, f"cat-{name}.json"))
        finally:
            for lock in locks:
                lock.close()
        # copy-on-write maps: nothing is read into memory until used, and the files are never modified
        parts = [torch.from_numpy(np.load(os.path.join(f, "features.npy"), mmap_mode="c")) for f in folders]
        labels = [np.load(os.path.join(f, "labels.npy")) for f in unique]
        if any(not np.array_equal(labels[0], other) for other in labels[1:]):
            raise UserError(f"feature cache {self.directory}: the backbones' {what} entries disagree on the "
                            f"labels (written from other data?); delete {', '.join(sorted(unique))} and rerun")
        return parts, torch.from_numpy(labels[0])

    @torch.no_grad()
    def _extract(self, todo, dataset, what, view):
        """Each process computes its shard in chunks of chunk_batches() batches: a chunk's images are decoded
        once and run through each backbone still missing it; its rows are written, flushed and recorded
        (chunks.<rank>.json of each entry) before the next chunk; a rerun skips the recorded chunks, entry by
        entry. Each chunk has its own loader and seeds (seed, view, rank, chunk), so a resumed extraction writes
        what an uninterrupted one would. A stop signal ends the chunk in progress unrecorded; InterruptedError
        is raised on every process."""
        from tqdm import tqdm
        inputs, dist_info = self.inputs, self.dist_info
        rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
        n = len(dataset)
        started = [_start_or_resume(e.directory, e.key, n, e.backbone.dim, world) if dist_info.is_main
                   else (None, None) for e in todo]
        started = broadcast_object(started)
        for (_, error) in started:
            if error:
                raise UserError(error)
        order = np.asarray(shard(n, rank, world), dtype=np.int64)
        per_chunk = chunk_batches() * inputs.batch_size
        chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
        for e, (resumed, _) in zip(todo, started):
            progress_path = os.path.join(e.directory, f"chunks.{rank}.json")
            if resumed and os.path.exists(progress_path):
                with open(progress_path) as f:
                    e.done = json.load(f)["chunks"]
                self.logger.info(f"feature cache: resuming {e.backbone.arch} at chunk {e.done} of {len(chunks)} "
                                 f"({e.directory})")
            e.features = np.load(os.path.join(e.directory, "features.npy"), mmap_mode="r+")
            e.labels = np.load(os.path.join(e.directory, "labels.npy"), mmap_mode="r+")
        first = min(e.done for e in todo)
        desc = f"caching {what}"
        batches_of = lambda cs: sum(-(-len(c) // inputs.batch_size) for c in cs)  # noqa: E731
        progress = Progress(desc, batches_of(chunks), bar=self.show_bar, start=batches_of(chunks[:first]))
        bar = tqdm(total=batches_of(chunks), initial=progress.start, desc=desc, leave=False,
                   disable=not self.show_bar)
        stopped = False
        for c in range(first, len(chunks)):
            active = [e for e in todo if e.done <= c]
            seed = inputs.seed + 7919 * (view + 1) + 104729 * c + rank
            set_seed(seed)  # augmented views are reproducible, chunk by chunk
            loader = StopSafeDataLoader(SkipUnreadable(dataset) if inputs.skip_bad_images else dataset,
                                        inputs.batch_size, sampler=chunks[c].tolist(), num_workers=inputs.workers,
                                        pin_memory=device.type == "cuda",
                                        generator=torch.Generator().manual_seed(seed), collate_fn=collate_readable,
                                        prefetch_factor=4 if inputs.workers else None)
            start = 0
            for images, targets, kept in loader:
                if self.should_stop is not None and self.should_stop():
                    stopped = True
                    break
                rows = chunks[c][start:start + len(kept)]
                start += len(kept)
                kept = kept.numpy()
                readable, unreadable = rows[kept], rows[~kept]
                if images is not None:  # else none of the batch was readable (targets is None too)
                    images, labels = to_device(images, targets, device)[0], targets.numpy()
                for e in active:  # the decoded batch, through every backbone that misses it
                    e.labels[unreadable] = -1  # unreadable (--skip_bad_images): sources drop label -1
                    if images is not None:  # each output copied to the host before the next backbone runs: under
                        # --compile on a GPU (CUDA graphs) the next compiled forward may reuse its memory
                        with torch.inference_mode(), autocast(device, inputs.precision):
                            out = e.backbone.net(images)
                        e.features[readable] = out.float().cpu().numpy().astype(np.float16)
                        e.labels[readable] = labels
                progress.update()
                bar.update(1)
            del loader  # its workers end here, before a stop returns
            if stopped:
                break
            for e in active:
                e.features.flush()  # the chunk is on disk before it is recorded
                e.labels.flush()
                write_json_atomic({"chunks": c + 1}, os.path.join(e.directory, f"chunks.{rank}.json"))
                e.done = c + 1
        bar.close()
        done = min(e.done for e in todo)
        for e in todo:
            e.features = e.labels = None
        barrier()
        if any_process(stopped, device):  # every process stops here, whichever got the signal
            raise InterruptedError(f"feature extraction {desc}: {done} of {len(chunks)} chunks written")


def _finish(directory, key):
    """Seal a finished extraction: drop its chunk records, write the manifest with each file's checksum."""
    for name in os.listdir(directory):
        if name == "partial.json" or name.startswith("chunks."):
            os.remove(os.path.join(directory, name))
    files = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                    "crc32": _crc32(os.path.join(directory, name))} for name in ("features.npy", "labels.npy")}
    write_json_atomic({"key": key, "files": files}, os.path.join(directory, "manifest.json"))


class Concatenation:
    """Per-backbone N x D_b feature tensors read as their N x sum(D_b) concatenation, lazily: indexing rows (a
    slice, or a tensor or array of positions) gathers those rows of each part and concatenates them, the same
    bits as one concatenated array; nothing else of the memory maps is read (as the per-concatenation cache's
    one memory map was read)."""

    def __init__(self, parts):
        self.parts = parts
        self.shape = torch.Size([len(parts[0]), sum(p.shape[1] for p in parts)])
        self.dtype, self.device = parts[0].dtype, parts[0].device

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        # numpy's row gather, not torch's fp16 index (2.5x slower here): a batch's rows from 5 memory maps come
        # about as fast as from one (50,000 x 5 x 512 rows, batches of 256, one thread; measured 2026-12-03)
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        return torch.from_numpy(np.concatenate([part.numpy()[rows] for part in self.parts], axis=1))

    def materialize(self, device):
        """The whole concatenation as one tensor on `device`, built column block by column block (the peak
        memory there is the result plus one part)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        column = 0
        for part in self.parts:
            out[:, column:column + part.shape[1]].copy_(part)
            column += part.shape[1]
        return out


def assemble(parts, device=None):
    """The concatenation of per-backbone features (N x sum D_b) in the given order: one tensor on `device` when
    given (a GPU, or host memory); else one part as it is (its memory map), several as a lazy Concatenation of
    their memory maps."""
    if device is not None:
        return Concatenation(parts).materialize(device)
    return parts[0] if len(parts) == 1 else Concatenation(parts)
