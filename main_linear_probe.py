"""Linear probe (or fine-tuning) of N concatenated pretrained backbones on a transfer dataset.

Single process:  python main_linear_probe.py --tag supervisedimagenet_resnet50_sfadamw_5_step80k --data_name cifar10
torchrun:        torchrun --nproc_per_node 8 main_linear_probe.py ...
slurm:           srun python main_linear_probe.py ...   (see scripts/)
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import yaml

from datasets import build_dataset, subset_fraction
from engine import NonFiniteLoss, ShardSampler, evaluate, train_one_epoch
from models import ConcatEncoder, LinearHead
from util.checkpoint import load_file, save_atomic
from util.distributed import barrier, cleanup, init_distributed
from util.logs import append_jsonl, close_logger, create_logger, log_startup, use_progress_bar, write_json_atomic
from util.misc import StopSignal, UserError, requeue_slurm_job, run_main, set_seed

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAG_FILE = os.path.join(PROJECT_ROOT, "configs", "pretrained_checkpoints.yaml")
# Default batch per process of the reference scripts (which ran as one process).
REFERENCE_BATCH = {"cifar": 256, "other": 32}
# A resumed run must have been started with the same recipe; these arguments define it.
RECIPE_KEYS = ("arch", "pretrained", "data_name", "exp_mode", "use_bn", "headinit", "optimizer", "lr", "wd",
               "momentum", "nesterov", "wd_skip_bn", "epochs", "scheduler_type", "decay_epochs", "gamma",
               "final_lr", "seed", "tf_name", "img_size", "data_rate", "precision")


# ---------------------------------------------------------------- arguments
def get_args_parser():
    p = argparse.ArgumentParser("Time-Cat linear probe", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("backbones")
    g.add_argument("--tag", default=None, help="named set of checkpoints from --tag_file; fills --arch and "
                   "--pretrained (e.g. supervisedimagenet_resnet50_sfadamw_5_step80k)")
    g.add_argument("--tag_file", default=DEFAULT_TAG_FILE, help="YAML file of tags: {tag: {arch: [...], "
                   "pretrained: [...]}}; relative checkpoint paths are relative to the project folder")
    g.add_argument("--arch", nargs="+", default=None, help="one torchvision ResNet name per backbone "
                   "(reference: resnet50)")
    g.add_argument("--pretrained", nargs="+", default=None, help="one checkpoint per backbone, same order "
                   "as --arch; features are concatenated in this order")
    g.add_argument("--exp_mode", default="lineareval", choices=["lineareval", "finetune"],
                   help="lineareval: frozen backbones (the reference); finetune: the whole network trains")

    g = p.add_argument_group("head and optimisation (defaults = the reference protocol)")
    g.add_argument("--use_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm1d before the Linear layer (reference: on)")
    g.add_argument("--headinit", default="normal", choices=["normal", "none", "cat_weights"],
                   help="normal: N(0, 0.01^2) weights, zero bias (reference); none: PyTorch default; "
                   "cat_weights: the backbones' own classifiers, averaged")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "sfadamw"],
                   help="reference: sgd; sfadamw is schedule-free AdamW")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate, not scaled with the batch "
                   "(reference: 0.01)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (reference: 0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum (reference: on)")
    g.add_argument("--wd", type=float, default=5e-4, help="weight decay of the Linear layer; the reference "
                   "sweeps CIFAR {1e-2,5e-2,1e-4,5e-4,1e-3,5e-3}, ImageNet {1e-4,5e-4}, iNat18 {1e-6,1e-5,1e-4}")
    g.add_argument("--wd_skip_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="no weight decay on the head BatchNorm (reference: on)")
    g.add_argument("--epochs", type=int, default=28, help="training epochs (reference: 28)")
    g.add_argument("--scheduler_type", default=None, choices=["step", "cosine", "constant"],
                   help="learning-rate schedule per epoch; default step (reference), constant for sfadamw")
    g.add_argument("--decay_epochs", type=int, nargs="+", default=[8, 16, 24],
                   help="step schedule: epochs where the lr is multiplied by --gamma (reference: 8 16 24)")
    g.add_argument("--gamma", type=float, default=0.1, help="step schedule factor (reference: 0.1)")
    g.add_argument("--final_lr", type=float, default=0.0, help="cosine schedule: lr at the last epoch")
    g.add_argument("--seed", type=int, default=31, help="random seed (reference: 31)")

    g = p.add_argument_group("data")
    g.add_argument("--data_name", default="cifar10", help="cifar10, cifar100, cifar10_{p}perc, "
                   "cifar100_{p}perc, inaturalist18 or imagenet1k")
    g.add_argument("--data_path", default=os.path.join(PROJECT_ROOT, "data"),
                   help="root of the README data layout (cifar/, imagenet/, inaturalist18/)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR with torchvision when it is missing (reference: on)")
    g.add_argument("--tf_name", default="eval", choices=["eval", "224px", "32px"],
                   help="transform preset: eval/224px = the reference's 224-px transforms, 32px = CIFAR native")
    g.add_argument("--img_size", type=int, default=None, help="crop size overriding the preset (test resize "
                   "= 8/7 of it), to run any dataset at CPU scale (reference: 224)")
    g.add_argument("--data_rate", type=float, default=1.0, help="fraction of the training set kept (seeded)")
    g.add_argument("--batch_size", type=int, default=None, help="batch per process; default 256 for CIFAR, "
                   "32 for ImageNet and iNat18 (the reference's, which ran as one process)")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per process")

    g = p.add_argument_group("run")
    g.add_argument("--dump_path", default=os.path.join(PROJECT_ROOT, "results", "probe"),
                   help="folder of train.log, metrics.jsonl, args.json and the checkpoints")
    g.add_argument("--mode", default="train", choices=["train", "eval_only"],
                   help="eval_only: evaluate the best saved head of --dump_path")
    g.add_argument("--start_over", action="store_true", help="ignore the checkpoint in --dump_path and start "
                   "from epoch 0 (the default resumes)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="backbone forward precision; the head always trains in fp32 (reference: fp32)")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm for the head BN across processes "
                   "(the reference's iNat18 runs)")
    g.add_argument("--debug", action="store_true", help="force a single process, as the reference scripts did")
    g.add_argument("--print_freq", type=int, default=50, help="iterations between log lines")
    return p


def resolve_backbones(args):
    """Fill args.arch / args.pretrained from --tag, and check they pair up."""
    if args.tag:
        if args.arch or args.pretrained:
            raise UserError("give either --tag or --arch/--pretrained, not both")
        if not os.path.isfile(args.tag_file):
            raise UserError(f"tag file {args.tag_file} not found")
        with open(args.tag_file) as f:
            tags = yaml.safe_load(f) or {}
        if args.tag not in tags:
            raise UserError(f"unknown --tag '{args.tag}': {args.tag_file} defines {', '.join(sorted(tags))}")
        entry = tags[args.tag]
        args.arch = list(entry["arch"])
        args.pretrained = [p if os.path.isabs(p) else os.path.join(PROJECT_ROOT, p) for p in entry["pretrained"]]
    if not args.arch or not args.pretrained:
        raise UserError("name the backbones: --tag NAME, or --arch A [A ...] with --pretrained P [P ...]")
    if len(args.arch) == 1 and len(args.pretrained) > 1:
        args.arch = args.arch * len(args.pretrained)  # one arch for all checkpoints
    if len(args.arch) != len(args.pretrained):
        raise UserError(f"--arch has {len(args.arch)} entries but --pretrained has {len(args.pretrained)}: "
                        f"give one arch per checkpoint (or a single arch for all)")
    missing = [p for p in args.pretrained if not os.path.isfile(p)]
    if missing:  # fail before any data is read or downloaded
        raise UserError(f"checkpoint not found: {missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        ("; `python tools/download.py` fetches the released ones" if args.tag else ""))


def check_args(args):
    resolve_backbones(args)
    for name in ("epochs", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    if args.img_size is not None and args.img_size < 8:
        raise UserError("--img_size must be at least 8")
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.wd < 0 or not math.isfinite(args.wd):
        raise UserError("--lr must be positive and --wd non-negative")
    if args.batch_size is None:
        args.batch_size = REFERENCE_BATCH["cifar" if args.data_name.startswith("cifar") else "other"]
    if args.scheduler_type is None:
        args.scheduler_type = "constant" if args.optimizer == "sfadamw" else "step"


# ---------------------------------------------------------------- optimisation
def param_groups(head, encoder, args):
    """Weight decay on the Linear layer (and the backbones when fine-tuning); none on the head BN
    with --wd_skip_bn, as the reference."""
    linear = head.linear.parameters()
    groups = [{"params": list(linear), "weight_decay": args.wd}]
    bn_params = list(head.bn.parameters())
    if bn_params:
        groups.append({"params": bn_params, "weight_decay": 0.0 if args.wd_skip_bn else args.wd})
    if args.exp_mode == "finetune":
        groups.append({"params": list(encoder.parameters()), "weight_decay": args.wd})
    return groups


def build_optimizer(groups, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr)
    import schedulefree
    return schedulefree.AdamWScheduleFree(groups, lr=args.lr)


def lr_at_epoch(epoch, args):
    """The schedule is a pure function of the epoch, so a resumed run needs nothing but the epoch."""
    if args.scheduler_type == "step":
        return args.lr * args.gamma ** sum(epoch >= e for e in args.decay_epochs)
    if args.scheduler_type == "cosine":
        return args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return args.lr


class Classifier(nn.Module):
    """Encoder followed by head, for evaluation (and as the trained module when fine-tuning)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images):
        return self.head(self.encoder(images).float())


def set_eval_mode(classifier, optimizer, args):
    classifier.eval()
    if args.optimizer == "sfadamw":
        optimizer.eval()  # schedule-free: evaluate at the averaged weights


def set_train_mode(trained, optimizer, args):
    trained.train()  # the head, or encoder + head when fine-tuning; a frozen encoder stays in eval mode
    if args.optimizer == "sfadamw":
        optimizer.train()


# ---------------------------------------------------------------- state on disk
def run_state(head, encoder, optimizer, epoch, best_acc, args):
    state = {"head": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best_acc": best_acc,
             "args": vars(args)}
    if args.exp_mode == "finetune":
        state["encoder"] = encoder.state_dict()
    return state


def check_same_recipe(saved_args, args, path):
    changed = [k for k in RECIPE_KEYS if saved_args.get(k) != getattr(args, k)]
    if changed:
        k = changed[0]
        raise UserError(f"{path} was written by a run with --{k} {saved_args.get(k)} (now {getattr(args, k)}); "
                        f"use another --dump_path, or --start_over to overwrite it")


# ---------------------------------------------------------------- main
def main(args):
    check_args(args)
    dist_info = init_distributed(debug=args.debug)
    os.makedirs(args.dump_path, exist_ok=True)
    logger = create_logger(args.dump_path, dist_info.rank)
    try:
        probe(args, dist_info, logger)
    finally:
        close_logger(logger)
        cleanup()


def probe(args, dist_info, logger):
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    show_bar = use_progress_bar(dist_info.is_main)
    log_startup(logger, args, dist_info, args.batch_size * world, args.lr)
    set_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- data
    train_set, num_classes = build_dataset(args.data_name, args.data_path, "train", args.tf_name, args.img_size,
                                           args.download and dist_info.is_main)
    if not dist_info.is_main:
        barrier()
    test_set, _ = build_dataset(args.data_name, args.data_path, "test", args.tf_name, args.img_size, False)
    if dist_info.is_main:
        barrier()
    train_set = subset_fraction(train_set, args.data_rate, args.seed)
    logger.info(f"data: {args.data_name}, {len(train_set)} train / {len(test_set)} test images, "
                f"{num_classes} classes")
    train_sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                        seed=args.seed, drop_last=False)
    loader_generator = torch.Generator()
    loader_kwargs = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    # drop_last keeps the head BN away from a last batch of one sample
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=train_sampler,
                                               drop_last=len(train_sampler) > args.batch_size,
                                               generator=loader_generator, **loader_kwargs)
    test_loader = torch.utils.data.DataLoader(test_set, args.batch_size,
                                              sampler=ShardSampler(len(test_set), rank, world), **loader_kwargs)

    # ---- model
    encoder = ConcatEncoder(args.arch, args.pretrained).to(device).to(memory_format=torch.channels_last)
    if args.exp_mode == "lineareval":
        encoder.freeze()
    head = LinearHead(encoder.out_dim, num_classes, args.use_bn)
    head.init_weights(args.headinit, encoder.classifiers)
    if args.sync_bn and dist_info.distributed:
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    head.to(device)
    logger.info(f"encoder: {len(args.arch)} backbone(s) {args.arch}, {encoder.out_dim}-d features; "
                f"head: {'BatchNorm1d + ' if args.use_bn else ''}Linear({encoder.out_dim}, {num_classes})")
    classifier = Classifier(encoder, head)
    finetune = args.exp_mode == "finetune"
    trained = classifier if finetune else head
    if dist_info.distributed:  # only what trains is wrapped: the frozen encoder needs no gradient sync
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    optimizer = build_optimizer(param_groups(head, encoder, args), args)

    # ---- resume or evaluate a saved head
    checkpoint_path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    best_path = os.path.join(args.dump_path, "best.pth.tar")
    start_epoch, best_acc = 0, 0.0
    if args.mode == "eval_only":
        state = load_file(best_path, "saved head")
        check_same_recipe(state["args"], args, best_path)
        head.load_state_dict(state["head"])
        if "encoder" in state:
            encoder.load_state_dict(state["encoder"])
        set_eval_mode(classifier, optimizer, args)
        stats = evaluate(classifier, test_loader, device, args.precision, len(test_set), show_bar)
        logger.info(f"Test: Loss {stats['loss']:.4f} Acc@1 {stats['top1']:.3f} Acc@5 {stats['top5']:.3f} "
                    f"(head of epoch {state['epoch'] - 1} from {best_path})")
        return
    if os.path.exists(checkpoint_path) and not args.start_over:
        state = load_file(checkpoint_path, "run checkpoint")
        check_same_recipe(state["args"], args, checkpoint_path)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        if "encoder" in state:
            encoder.load_state_dict(state["encoder"])
        start_epoch, best_acc = state["epoch"], state["best_acc"]
        logger.info(f"Resumed from {checkpoint_path} at epoch {start_epoch} (best Acc@1 so far {best_acc:.2f})")
    elif dist_info.is_main:
        for stale in (checkpoint_path, best_path, os.path.join(args.dump_path, "metrics.jsonl")):
            if os.path.exists(stale):
                os.remove(stale)
    if dist_info.is_main:
        write_json_atomic(vars(args), os.path.join(args.dump_path, "args.json"))

    # ---- train
    stop = StopSignal()
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        lr = lr_at_epoch(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # per-epoch seeds: an epoch's shuffling and augmentations do not depend on where the run resumed
        train_sampler.set_epoch(epoch)
        set_seed(args.seed + 1000 * epoch + rank)
        loader_generator.manual_seed(args.seed + 1000 * epoch + rank)
        set_train_mode(trained, optimizer, args)
        try:
            train_loss, train_top1, completed = train_one_epoch(trained, None if finetune else encoder,
                                                                train_loader, optimizer, epoch, args, device,
                                                                logger, stop, show_bar)
        except NonFiniteLoss as exc:
            raise UserError(f"{exc}; the last good state is in {checkpoint_path}. Lower --lr?") from None
        if not completed:
            logger.info(f"Stopped by {stop.received} during epoch {epoch}; a rerun resumes from epoch "
                        f"{epoch} ({checkpoint_path})")
            if dist_info.is_main:
                requeue_slurm_job(logger)
            return
        set_eval_mode(classifier, optimizer, args)
        stats = evaluate(classifier, test_loader, device, args.precision, len(test_set), show_bar)
        is_best = stats["top1"] > best_acc
        best_acc = max(best_acc, stats["top1"])
        logger.info(f"Test: Loss {stats['loss']:.4f} Acc@1 {stats['top1']:.3f} Best Acc@1 so far {best_acc:.2f}")
        logger.info(f"Test: Acc@5 {stats['top5']:.3f} over {len(test_set)} images")
        if dist_info.is_main:
            state = run_state(head, encoder, optimizer, epoch + 1, best_acc, args)
            if is_best:
                save_atomic(state, best_path)
            save_atomic(state, checkpoint_path)
            append_jsonl({"epoch": epoch, "train_loss": train_loss, "train_top1": train_top1,
                          "test_loss": stats["loss"], "test_top1": stats["top1"], "test_top5": stats["top5"],
                          "lr": lr, "seconds": round(time.time() - start, 3)},
                         os.path.join(args.dump_path, "metrics.jsonl"))
        barrier()
    logger.info(f"Top-1 test accuracy: {best_acc:.1f}")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
