"""What a probe builds before its first epoch, from its checked flags: the data (splits and the seeded order they
are read in), the model (frozen encoder, heads, what trains) and a batch source per split (features on the fly, the
feature cache, or images when fine-tuning). main_linear_probe.probe() calls the three builders in order."""
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import BatchSampler

from datasets import (
    WithTransform,
    build_dataset,
    dataset_targets,
    family_of,
    image_loader,
    image_loader_for,
    imagenet_root,
    reference_sampler_seed,
    stratified_subset,
    subset_fraction,
)
from datasets.eval_sets import build_eval_set, restrict_logits
from datasets.transforms import build_transform, crop_size, pipeline_of
from engine import CachedBatches, Classifier, LoaderBatches, compile_module, evaluate, shard
from feature_cache import Backbone, FeatureCache, assemble, cache_inputs
from models import ConcatEncoder
from models.heads import build_heads
from timecat import backbones_recipe
from util import log_lines
from util.cli import UserError
from util.distributed import barrier
from util.logs import use_progress_bar


# ---------------------------------------------------------------- data
class PositionSampler(torch.utils.data.Sampler):
    """DistributedSampler over the training positions (seeded shuffle, set_epoch), yielding the positions."""

    def __init__(self, positions, dist_info, seed):
        self.positions = positions
        self.inner = torch.utils.data.DistributedSampler(positions, num_replicas=dist_info.world_size,
                                                         rank=dist_info.rank, shuffle=True, seed=seed)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return (self.positions[i] for i in self.inner)

    def __len__(self):
        return len(self.inner)


class ProbeData(NamedTuple):
    """The probe's data: training images augmented and with the test transform, the test set, the seeded positions
    of the training set used for training and for held-out validation (--data_rate, --val_split), and the order
    they are read in: the training sampler (reseeded every epoch), the generator of the loader's workers and of the
    cached views' draws, and whether a last batch of one sample is dropped."""
    train_aug: object
    train_plain: object
    test_set: object
    train_positions: list
    val_positions: list
    num_classes: int
    train_sampler: PositionSampler
    val_sampler: range  # engine.shard: this process's share, each sample once over the processes
    test_sampler: range
    generator: torch.Generator
    drop_last: bool
    eval_sets: tuple = ()  # --eval_datasets: datasets.eval_sets.EvalSet, images with the test transform


def build_probe_data(args, dist_info, logger):
    """The splits, their samplers, and the check that BatchNorm sees 2 samples or more per batch."""
    family, world = family_of(args.data_name), dist_info.world_size
    if dist_info.is_main:  # one process downloads, the others wait
        train_base, num_classes = build_dataset(args.data_name, args.data_path, "train", args.download,
                                                args.decoder)
    barrier()
    if not dist_info.is_main:
        train_base, num_classes = build_dataset(args.data_name, args.data_path, "train", False, args.decoder)
    test_base, _ = build_dataset(args.data_name, args.data_path, "test", False, args.decoder)
    kept = subset_fraction(len(train_base), args.data_rate, args.seed)
    train_base = torch.utils.data.Subset(train_base, kept)
    recipe = backbones_recipe(args.data_name, args.arch, args.allow_mixed_transforms)
    pipeline = pipeline_of(args.decoder, args.fast_transforms)

    def transformed(dataset, train):
        return WithTransform(dataset, build_transform(family, args.tf_name, train, args.img_size, pipeline, recipe))

    train_aug, train_plain, test_set = transformed(train_base, True), transformed(train_base, False), \
        transformed(test_base, False)
    val_positions = []
    if args.val_split:
        val_positions = stratified_subset(dataset_targets(train_base), args.val_split, args.seed)
    held_out = set(val_positions)
    train_positions = [i for i in range(len(train_base)) if i not in held_out]
    logger.info(f"data: {args.data_name}, {len(train_positions)} train / {len(val_positions)} validation / "
                f"{len(test_set)} test images, {num_classes} classes")
    train_sampler = PositionSampler(train_positions, dist_info, reference_sampler_seed(args.seed))
    drop_last = drop_single_sample_batch(len(train_sampler), args, world, logger)
    per_batch = min(args.batch_size, len(train_sampler)) * (world if args.sync_bn else 1)
    if (args.use_bn or args.exp_mode == "finetune") and per_batch < 2:
        raise UserError(f"BatchNorm needs 2 samples or more per training batch; this run has {per_batch} "
                        f"(--batch_size {args.batch_size}, {len(train_sampler)} training images per process): "
                        f"raise them, or train the head with --no-use_bn")
    return ProbeData(train_aug, train_plain, test_set, train_positions, val_positions, num_classes, train_sampler,
                     shard(len(val_positions), dist_info.rank, world),
                     shard(len(test_set), dist_info.rank, world), torch.Generator(), drop_last,
                     build_eval_sets(args, train_base, test_set.transform))


def drop_single_sample_batch(per_process, args, world, logger):
    """The reference keeps the last incomplete batch; only a trailing batch of one sample meeting a BatchNorm that
    sees it alone (training-mode BatchNorm cannot normalise a single sample) is dropped, and the log says so."""
    has_bn = args.use_bn or args.exp_mode == "finetune"
    alone = world == 1 or not args.sync_bn
    single = per_process > args.batch_size and per_process % args.batch_size == 1
    if has_bn and alone and single:
        logger.info(f"the last training batch of each epoch holds 1 sample per process and is dropped "
                    f"(BatchNorm cannot train on a single sample); {per_process - 1} of {per_process} are used")
        return True
    return False


# ---------------------------------------------------------------- model
class ProbeModel(NamedTuple):
    encoder: nn.Module  # the concatenated backbones (frozen unless fine-tuning)
    heads: nn.Module  # models.MultiHead: one LinearHead per models.heads.Head, in the run's head order
    trained: nn.Module  # what the optimizer trains: the heads, or encoder + heads (DDP-wrapped with processes)
    eval_model: nn.Module  # what evaluation runs on its batch source's inputs
    finetune: bool
    dims: list  # each backbone's feature width: its block of the concatenated features


def build_probe_model(args, dist_info, heads, num_classes, logger):
    """The encoder and a module for each head (models.heads.Head); only what trains is wrapped in DDP."""
    device = dist_info.device
    crop = crop_size(family_of(args.data_name), args.tf_name, args.img_size,
                     backbones_recipe(args.data_name, args.arch, args.allow_mixed_transforms))
    encoder = ConcatEncoder(args.arch, args.pretrained, crop).to(device).to(memory_format=torch.channels_last)
    finetune = args.exp_mode == "finetune"
    if not finetune:
        encoder.freeze()
        if args.compile:  # the frozen forward only: a fine-tuned encoder's checkpoint keeps its plain keys
            encoder = compile_module(encoder, device)
    dims = [net.out_dim for net in encoder.backbones]
    multihead = build_heads(dims, num_classes, heads, encoder.classifiers, args, dist_info.world_size)
    if args.sync_bn and dist_info.distributed and finetune:  # the backbones' BNs too, as the reference's --sync_bn
        if device.type != "cuda":
            raise UserError("fine-tuning with synchronised BatchNorm across processes needs GPUs (torch's "
                            "SyncBatchNorm); pass --sync_bn False, or run one process")
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    multihead.to(device)
    for head, module in zip(heads, multihead):  # each record holds its LinearHead, inside the MultiHead
        head.module = module
    logger.info(f"encoder: {len(args.arch)} backbone(s) {args.arch}, {encoder.out_dim}-d features, "
                f"{args.precision}; head: {'BatchNorm1d + ' if args.use_bn else ''}Linear({encoder.out_dim}, "
                f"{num_classes}) x {len(heads)}")
    classifier = Classifier(encoder, multihead, args.precision)
    trained = classifier if finetune else multihead
    if dist_info.distributed:  # only what trains is wrapped: the frozen encoder needs no gradient sync
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    return ProbeModel(encoder, multihead, trained, classifier if finetune else multihead, finetune, dims)


# ---------------------------------------------------------------- batch sources
class Sources(NamedTuple):
    """engine.BatchSource of each split (re-iterable, counting what they skip), the split sizes evaluation checks
    its counts against, and with --feature_cache the cached features kNN reads ((train features, labels), (test
    features, labels); else None)."""
    train: object
    test: object
    val: object
    test_count: int
    val_count: int
    cached: tuple


def build_sources(args, dist_info, data, model, logger, stop):
    """Features on the fly (the reference), from the cache, or images when fine-tuning."""
    device = dist_info.device
    if not args.feature_cache:
        every_epoch = dict(persistent_workers=args.workers > 0)  # no worker start-up every epoch
        sources = (image_source(data.train_aug, data.train_sampler, args, model, device,
                                drop_last=data.drop_last, generator=data.generator, **every_epoch),
                   image_source(data.test_set, data.test_sampler, args, model, device, **every_epoch),
                   image_source(torch.utils.data.Subset(data.train_plain, data.val_positions), data.val_sampler,
                                args, model, device, **every_epoch))
        return Sources(*sources, len(data.test_set), len(data.val_positions), None)

    # one entry per backbone, computed once by feature_cache, then reused by every later run and concatenation
    inputs = cache_inputs(args, backbones_recipe(args.data_name, args.arch, args.allow_mixed_transforms))
    cache = FeatureCache(args.feature_cache, inputs, dist_info, logger, use_progress_bar(dist_info.is_main), stop)
    # under --compile each backbone is compiled on its own (the compiled encoder forwards .backbones to its module)
    backbones = [Backbone(arch, path, compile_module(net, device) if args.compile else net, dim)
                 for arch, path, net, dim in zip(args.arch, args.pretrained, model.encoder.backbones, model.dims)]
    plain_parts, plain_labels = cache.load(backbones, data.train_plain, "train", -1)
    test_parts, test_labels = cache.load(backbones, data.test_set, "test", -1)
    views = [plain_parts]
    if args.cache_views:
        views = [cache.load(backbones, data.train_aug, "train", k)[0] for k in range(args.cache_views)]
    views, plain_features, test_features = place_features(views, plain_parts, test_parts, device, logger)
    val_rows = torch.tensor(data.val_positions, dtype=torch.long)
    in_batches = lambda sampler, drop_last=False: BatchSampler(sampler, args.batch_size, drop_last)
    train = CachedBatches(views, plain_labels, in_batches(data.train_sampler, data.drop_last), device, data.generator)
    test = CachedBatches([test_features], test_labels, in_batches(data.test_sampler), device)
    val = CachedBatches([plain_features[val_rows]], plain_labels[val_rows], in_batches(data.val_sampler), device)
    return Sources(train, test, val, len(data.test_set), len(data.val_positions),
                   ((plain_features, plain_labels), (test_features, test_labels)))


def image_source(dataset, sampler, args, model, device, **loader_options):
    """A BatchSource over a dataset's images: the frozen encoder's features on the fly, or the images themselves
    when fine-tuning (the encoder then runs inside the trained model)."""
    loader = image_loader(dataset, args.skip_bad_images, batch_size=args.batch_size, sampler=sampler,
                          num_workers=args.workers, pin_memory=device.type == "cuda", **loader_options)
    return LoaderBatches(loader, device, None if model.finetune else model.encoder, args.precision)


def place_features(views, plain, test, device, logger):
    """The concatenations of the cached per-backbone features (lists of parts): one tensor on the GPU when they
    fit in half its free memory; else read from the memory-mapped entries as batches need their rows."""
    unique = {id(parts): parts for parts in views + [plain, test]}
    target = None
    if device.type == "cuda":
        needed = sum(p.numel() * p.element_size() for parts in unique.values() for p in parts)
        if needed <= 0.5 * torch.cuda.mem_get_info(device)[0]:
            target = device
        else:
            logger.info(f"feature cache: {needed / 1e9:.1f} GB stay in host memory (too large for the GPU)")
    placed = {key: assemble(parts, target) for key, parts in unique.items()}
    return [placed[id(v)] for v in views], placed[id(plain)], placed[id(test)]


# ---------------------------------------------------------------- evaluation-only sets (--eval_datasets)
def build_eval_sets(args, train_base, test_transform):
    """The --eval_datasets sets of an ImageNet1k probe (datasets.eval_sets.EvalSet), labelled with the probe's
    classes, their images read with its test transform: checked with the data, so a missing or malformed folder
    stops the run before it builds a model or trains."""
    if not args.eval_datasets:
        return []
    head_wnids = base_dataset(train_base).classes  # ImageFolder's sorted wnids: head output k is head_wnids[k]
    loader = image_loader_for(args.decoder)
    imagenet_folder = imagenet_root(args.data_path).folder
    out = []
    for name in args.eval_datasets:
        eval_set = build_eval_set(name, args.data_path, imagenet_folder, head_wnids, loader)
        out.append(eval_set._replace(dataset=WithTransform(eval_set.dataset, test_transform)))
    return out


def base_dataset(dataset):
    """The dataset under WithTransform / Subset views (the ImageFolder whose .classes name the head's outputs)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def evaluate_eval_sets(data, model, heads, args, run, records):
    """Every head, in evaluation mode, on every --eval_datasets set, once (their features are not cached): one
    `Eval` line per set in each head's log (and in a sweep's log one line per set with every head's top-1), and
    the fields {name}_loss, {name}_top1, {name}_top5 added to each head's record: the last epoch's metrics record
    (the probe saves it), or in --mode eval_only a record of its own, saved here as an epoch's (run.add_record:
    metrics.jsonl and the board). run: the util.run.Run. No sets: nothing to do."""
    if not data.eval_sets:
        return
    dist_info = run.dist_info
    for eval_set in data.eval_sets:
        source = image_source(eval_set.dataset, shard(len(eval_set.dataset), dist_info.rank, dist_info.world_size),
                              args, model, dist_info.device)
        # ImageNet-R/-A: the prediction is the best of their 200 classes (labels are positions in the mask)
        scored = model.eval_model if eval_set.mask is None else restrict_logits(model.eval_model, eval_set.mask)
        count = len(eval_set.dataset)
        stats = evaluate(scored, source, args.precision, count, num_heads=len(heads))
        classes = len(eval_set.mask) if eval_set.mask is not None else data.num_classes
        for head, record, s in zip(heads, records, stats):
            head.logger.info(log_lines.eval_dataset_line(eval_set.name, s["loss"], s["top1"], s["top5"],
                                                         count - s["skipped"], classes))
            record.update({f"{eval_set.name}_loss": s["loss"], f"{eval_set.name}_top1": s["top1"],
                           f"{eval_set.name}_top5": s["top5"]})
        if len(heads) > 1:  # a sweep: its own log gets the set's summary
            run.logger.info(log_lines.sweep_eval_dataset_line(eval_set.name, [(head.name, s["top1"])
                                                                              for head, s in zip(heads, stats)]))
    if args.mode == "eval_only":
        for head, record in zip(heads, records):
            run.add_record(record, head.folder)
