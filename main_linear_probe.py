"""Linear probe (or fine-tuning) of N concatenated pretrained backbones on a transfer dataset.

Single process:  python main_linear_probe.py --tag supervisedimagenet_resnet50_sfadamw_5_step80k --data_name cifar10
torchrun:        torchrun --nproc_per_node 8 main_linear_probe.py ...
slurm:           srun python main_linear_probe.py ...   (see scripts/)
A sweep in one pass: --wd 1e-4 5e-4 1e-3 trains one head per value on the same backbone features.
"""

from arguments.common import apply_device_choice, device_request
from arguments.linear_probe import SCHEDULE_FREE, check_args, get_args_parser, recipe_check, resolve_batch
from util.cpu_runtime import configure_cpu_runtime

CPU_RUNTIME = None  # util.cpu_runtime's choice of OpenMP settings, logged by main(); set when run as a script
if __name__ == "__main__":  # before the heavy imports: --help and a mistyped flag answer without loading torch,
    ARGS = get_args_parser().parse_args()
    apply_device_choice(ARGS)  # CUDA and OpenMP read their environment once, when torch loads
    CPU_RUNTIME = configure_cpu_runtime()

# ruff: noqa: E402  (the imports below come after the parse above on purpose)
import math
import os
import time

from analysis.diagnostics import log_diagnostics
from analysis.knn import knn_per_head
from engine import (
    LoopLog,
    epoch_record,
    evaluate,
    feature_batches,
    log_head_epoch,
    resolve_precision,
    train_one_epoch,
    unreadable_note,
)
from models.heads import build_optimizer, head_records, heads_state, load_heads_state, lr_at_epoch, param_groups
from probe_setup import build_probe_data, build_probe_model, build_sources, evaluate_eval_sets
from timecat import resolve_backbones
from util import layout, log_lines, sweeps
from util.checkpoint import save_atomic
from util.cli import UserError, run_main
from util.distributed import all_reduce_sum, any_process, barrier
from util.logs import log_startup, truncate_jsonl, use_progress_bar
from util.misc import set_seed
from util.run import configure_cuda_numerics, open_run, restart_from_checkpoint, start_processes


def main(args):
    """Check the flags, start the processes, open the run folder (util/run.py), then probe()."""
    resolve_backbones(args)  # --tag or --arch/--pretrained (and --data_name) first, then every other flag
    check_args(args)
    apply_device_choice(args)  # --device cpu when main() is called directly (as a script: before torch loaded)
    dist_info = start_processes(args, device_request(args))
    resolve_batch(args, dist_info.world_size)
    args.precision = resolve_precision(args.precision, dist_info.device)
    heads = head_records(args)  # one record per head: its lr, wd, backbones, folder, log, bests
    sweep = len(heads) > 1  # a single head writes to --dump_path itself, several to <dump_path>/<name>/
    with open_run(args, dist_info, "epoch", layout.SWEEP_LOG if sweep else layout.PROBE_LOG,
                  [h.folder for h in heads], CPU_RUNTIME) as run:
        for head in heads:
            head.logger = run.open_log(head.folder) if sweep else run.logger
        probe(args, run, heads)


def probe(args, run, heads):
    """The probe from its first log line to its report: set up, then train, evaluate, log and save every epoch."""
    dist_info, logger, stop = run.dist_info, run.logger, run.stop
    device, sweep, show_bar = dist_info.device, len(heads) > 1, use_progress_bar(dist_info.is_main)
    loggers = run.logs  # each log once: the run's, then a sweep's heads'
    checkpoint = os.path.join(args.dump_path, layout.PROBE_CHECKPOINT)
    log = LoopLog(tuple(head.logger for head in heads), args.print_freq, args.extra_log_lines, show_bar)
    for head in heads:  # the start-up lines in every head's log (a single head's log is the run's)
        log_startup(head.logger, args, dist_info, args.global_batch, args.lr if sweep else args.lr[0])
    if sweep:
        logger.info(f"sweep of {len(heads)} heads on one backbone pass: {', '.join(h.name for h in heads)}")
    if args.ignored:
        logger.info("ignored (flags of the original with no effect here): "
                    + ", ".join(f"--{name} {getattr(args, name)}" for name in args.ignored))
    set_seed(args.seed)
    configure_cuda_numerics(device, args.cuda_deterministic)

    data = build_probe_data(args, dist_info, logger)
    model = build_probe_model(args, dist_info, heads, data.num_classes, logger)
    optimizer = build_optimizer(param_groups(model.heads, model.encoder, heads, args), args)
    try:
        sources = build_sources(args, dist_info, data, model, logger, stop)
    except InterruptedError as exc:  # a stop signal during the feature cache's extraction
        return run.report_stopped(f"during the {exc}", "the extraction at its next chunk")
    if args.knn and dist_info.is_main:  # only rank 0 logs; the features are fixed, so once per run
        (train_features, train_labels), test = sources.cached
        knn_per_head(args.knn, heads, model.dims, ((train_features, train_labels, data.train_positions), test),
                     device, logger)  # each head's .knn
    if args.mode == "eval_only":  # the saved heads on the test set, then on the --eval_datasets sets
        records = evaluate_saved_heads(args, model, optimizer, heads, sources, log)
        return evaluate_eval_sets(data, model, heads, args, run, records)
    start_epoch = resume_or_start(args, run, model, optimizer, heads)
    # the processes agree on a stop at every iteration, so they all stop at the same one (slurm signals them at
    # different moments)
    stop_agreed = lambda: any_process(stop(), device)
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        for lg in loggers:
            lg.info(log_lines.epoch_banner(epoch))
        skipped_before = sources.train.skipped
        for group in optimizer.param_groups:  # the schedule is a function of the epoch: a resume needs nothing else
            group["lr"] = lr_at_epoch(epoch, group["base_lr"], args)
        # per-epoch seeds: an epoch's shuffling and augmentations do not depend on where the run resumed
        data.train_sampler.set_epoch(epoch)
        set_seed(args.seed + 1000 * epoch + dist_info.rank)
        data.generator.manual_seed(args.seed + 1000 * epoch + dist_info.rank)
        model.trained.train()  # the heads, or encoder + heads when fine-tuning; a frozen encoder stays in eval mode
        if args.optimizer == SCHEDULE_FREE:
            optimizer.train()
        try:
            # a sweep's heads share the console: no bar while training
            train, completed = train_one_epoch(model.trained, sources.train, optimizer, epoch,
                                               log._replace(bar=show_bar and not sweep), stop_agreed)
        except FloatingPointError as exc:  # a NaN or Inf loss, before it reached the weights
            raise UserError(f"{exc}; {last_good_state(epoch, checkpoint)}. Lower --lr?") from None
        if not completed:
            return run.report_stopped(f"during epoch {epoch}", f"from epoch {epoch} ({checkpoint})")

        set_eval_mode(model, optimizer, args.optimizer == SCHEDULE_FREE)
        test = evaluate(model.eval_model, sources.test, args.precision, sources.test_count, len(heads), log)
        val = [None] * len(heads)
        if sources.val_count:  # the held-out split (--val_split): no iteration lines, the original has no such split
            val = evaluate(model.eval_model, sources.val, args.precision, sources.val_count, len(heads))
        diverged = [h for h, stats in enumerate(test) if not math.isfinite(stats["loss"])]
        if diverged:  # weights that went non-finite in the epoch's last step are never saved as a good state
            raise UserError(f"the test loss is {test[diverged[0]]['loss']} after epoch {epoch}"
                            + (f" (head {heads[diverged[0]].name})" if sweep else "")
                            + f"; {last_good_state(epoch, checkpoint)}. Lower --lr?")
        train_skipped = None
        if args.skip_bad_images:  # the epoch's unreadable training images over every process
            train_skipped = int(all_reduce_sum([sources.train.skipped - skipped_before], device)[0])
            for lg in loggers:
                lg.info(f"Skipped {train_skipped} unreadable training images in epoch {epoch} (--skip_bad_images)")
        records = []
        for h, head in enumerate(heads):  # each head's lines in the original's order, then its metrics record
            head.update(epoch, test[h], val[h])  # its bests, validation's selection, whether test top-1 improved
            log_diagnostics(args.custom_eval_func, head, model.dims,
                            feature_batches(sources.test, model.encoder, args.precision))
            log_head_epoch(head, test[h], val[h], sources.test_count, sources.val_count,
                           args.extra_log_lines or args.skip_bad_images)
            if sweep:
                logger.info(log_lines.sweep_epoch_line(epoch, head.name, test[h]["top1"], head.best_test,
                                                       val[h]["top1"] if val[h] is not None else None))
            records.append(epoch_record(epoch, train[h], test[h], val[h], head.knn,
                                        {"lr": lr_at_epoch(epoch, head.lr, args),
                                         "seconds": round(time.time() - start, 3), "train_skipped": train_skipped}))
        if epoch == args.epochs - 1:
            evaluate_eval_sets(data, model, heads, args, run, records)
        if dist_info.is_main:  # rank 0 writes; the others wait at the barrier
            save_epoch(args, model, optimizer, heads, records, run)
        barrier()
    report(heads, logger, sources.val_count > 0)


def set_eval_mode(model, optimizer, schedule_free):
    model.eval_model.eval()
    if schedule_free:
        optimizer.eval()  # schedule-free: evaluate at the averaged weights (the package's x)


def save_epoch(args, model, optimizer, heads, records, run):
    """Rank 0, atomically: best.pth.tar of each improved head, each head's metrics record (run.add_record:
    metrics.jsonl, --tensorboard events, --wandb), then checkpoint.pth.tar (every head, the optimizer, the bests:
    what a resume reads)."""
    next_epoch = records[0]["epoch"] + 1
    encoder_state = model.encoder.state_dict() if model.finetune else None
    for head, record in zip(heads, records):
        if head.improved:
            head_state = {"head": head.module.state_dict(), "epoch": next_epoch, "best_acc": head.best_test,
                          "args": vars(args)}
            if model.finetune:
                head_state["encoder"] = encoder_state
            save_atomic(head_state, os.path.join(head.folder, layout.BEST_HEAD))
        run.add_record(record, head.folder)  # metrics.jsonl, and the board (--tensorboard, --wandb)
    state = {"heads": model.heads.state_dict(), "optimizer": optimizer.state_dict(),
             **heads_state(heads, next_epoch), "args": vars(args)}
    if model.finetune:
        state["encoder"] = encoder_state
    save_atomic(state, os.path.join(args.dump_path, layout.PROBE_CHECKPOINT))
    if next_epoch % args.save_freq == 0:  # the reference's checkpoint_epoch{k}.pth.tar
        save_atomic(state, os.path.join(args.dump_path, layout.probe_epoch_checkpoint(next_epoch)))


def resume_or_start(args, run, model, optimizer, heads):
    """Resume from checkpoint.pth.tar (same recipe only), or clear a previous run's files; then args.json (the
    run's and each head's). Returns the epoch to start at."""
    checkpoint = os.path.join(args.dump_path, layout.PROBE_CHECKPOINT)
    metrics = [os.path.join(head.folder, layout.METRICS) for head in heads]
    stale = [os.path.join(h.folder, layout.BEST_HEAD) for h in heads] + metrics
    state = run.resume_or_start(checkpoint, recipe_check(args), stale, heads=model.heads,
                                optimizer=optimizer, encoder=model.encoder)
    start_epoch = 0
    if state is not None:
        start_epoch = load_heads_state(heads, state)
        for head in heads:
            head.logger.info(f"Resumed from {checkpoint} at epoch {start_epoch}")
        if run.dist_info.is_main:  # records of epochs the checkpoint does not hold (a crash before it was saved)
            for path in metrics:
                truncate_jsonl(path, lambda r: r["epoch"] < start_epoch)
    run.write_args(vars(args))
    for head in heads:
        run.write_args(head_args(args, head), head.folder)
    return start_epoch


def head_args(args, head):
    """args.json of one head: the run's arguments with the head's lr and wd; a subset head's lists only its
    backbones (the arguments of the separate probe it equals), so tools/summarize.py counts them."""
    out = dict(vars(args), lr=head.lr, wd=head.wd, head=head.name)
    if head.subset is not None:
        out.update(arch=[args.arch[i] for i in head.subset], pretrained=[args.pretrained[i] for i in head.subset],
                   subset=list(head.subset), tag=None)
    return out


def evaluate_saved_heads(args, model, optimizer, heads, sources, log):
    """--mode eval_only: every head on the test set, from the last epoch's checkpoint.pth.tar (the original's) or,
    with --eval_checkpoint best, from each head's best.pth.tar; the original's lines (`Found checkpoint at`, the
    validation lines, `Test:`). Returns each head's eval-only record for --eval_datasets (its epoch)."""
    check = recipe_check(args, eval_only=True)  # any process count
    if args.eval_checkpoint == "last":
        path = os.path.join(args.dump_path, layout.PROBE_CHECKPOINT)
        state = restart_from_checkpoint(path, check, heads=model.heads, encoder=model.encoder)
        found = [(path, state["epoch"] - 1)] * len(heads)
    else:
        found = []
        for head in heads:
            path = os.path.join(head.folder, layout.BEST_HEAD)
            state = restart_from_checkpoint(path, check, what="saved head", head=head.module, encoder=model.encoder)
            found.append((path, state["epoch"] - 1))
    for head, (path, _) in zip(heads, found):
        head.logger.info(f"Found checkpoint at {path}")
    set_eval_mode(model, optimizer, args.optimizer == SCHEDULE_FREE)
    test = evaluate(model.eval_model, sources.test, args.precision, sources.test_count, len(heads), log)
    for head, stats, (_, epoch) in zip(heads, test, found):
        head.logger.info(log_lines.eval_only_line(stats["loss"], stats["top1"]))
        if args.extra_log_lines or args.skip_bad_images:
            head.logger.info(f"Test: Acc@5 {stats['top5']:.3f} over {sources.test_count - stats['skipped']} "
                             f"images (head of epoch {epoch})" + unreadable_note(stats))
    return [{"epoch": epoch, "mode": "eval_only"} for _, epoch in found]


def report(heads, logger, has_val):
    """Each head's final lines; a sweep's best head on test (the reference's rule) and on validation."""
    for head in heads:
        head.logger.info(log_lines.final_message(head.best_test))
        if head.selected is not None:
            head.logger.info(log_lines.selected_line(*head.selected))
    if len(heads) == 1:
        return
    full = [head for head in heads if head.subset is None]  # a subset head is a cat-n point
    best = sweeps.sweep_winner(full, lambda head: (head.best_test, head.wd, head.lr))
    logger.info(f"Best on test (the reference's rule): {best.name} Acc@1 {best.best_test:.2f}")
    if has_val:
        # best_val: the val top-1 of each head's selected epoch
        pick = sweeps.sweep_winner(full, lambda head: (head.best_val, head.wd, head.lr))
        logger.info(log_lines.selected_line(*pick.selected, head=pick.name))


def last_good_state(epoch, checkpoint_path):
    return f"the last good state is in {checkpoint_path}" if epoch else "no checkpoint was written"


if __name__ == "__main__":
    run_main(main, ARGS)
