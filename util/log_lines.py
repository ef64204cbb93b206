"""The log-line formats and their parsers, the probe's and pretraining's: the one owner of what train.log lines
look like.

The writers (engine.py, engine_pretrain.py, main_linear_probe.py, util/logs.py) format with the functions below; the
readers (tools/summarize.py, tools/benchmark.py, the tests; tools/acc1.sh greps patterns that match both styles)
parse with the regexes below. The formats are byte-compatible with the original linear-probe code (tab-separated
fields, the same number formats; tests/test_protocol.py and tests/test_fidelity.py pin them against the original's
lines), so old result folders and old scripts keep working; the parsers also accept this project's earlier
space-separated lines. Depends on nothing of ours.
"""
import datetime
import re
import time

FINAL_HEADER = "Training of the supervised linear classifier on frozen features completed."

# parsers: fields separated by a tab (the original, and ours now) or a space (our lines before issue 10)
_SEP = r"[\t ]+"
ITERATION_RE = re.compile(r"Epoch\[(\d+)\] - Iter: \[(\d+)/(\d+)\]" + _SEP + r"Time (\S+) \((\S+)\)" + _SEP
                          + r"Data (\S+) \((\S+)\)" + _SEP + r"Loss (\S+) \((\S+)\)" + _SEP + r"Prec (\S+) \((\S+)\)"
                          + _SEP + r"LR (\S+)")
EPOCH_RE = re.compile(r"Epoch\[(\d+)\]")
# the original's validation lines: always `Epoch[0]`, Time then Loss (no Data field); not training epochs
EVAL_ITERATION_RE = re.compile(r"Epoch\[0\] - Iter: \[\d+/\d+\]" + _SEP + r"Time \S+ \(\S+\)" + _SEP + r"Loss ")
BANNER_RE = re.compile(r"============ Starting epoch (\d+) \.\.\. ============")
TEST_RE = re.compile(r"Test:" + _SEP + r"Loss (\S+)" + _SEP + r"Acc@1 ([\d.]+)" + _SEP
                     + r"Best Acc@1 so far ([\d.]+)")
FINAL_RE = re.compile(r"Top-1 test accuracy:\s*([\d.]+)")
# `--custom_eval_func` diagnostics: "feature_importance: 0.0123,0.0456"
SELECTED_RE = re.compile(r"Selected on validation:(.*)")
DIAGNOSTIC_RE = re.compile(r"(feature_importance|cat_validate_network): ([-\d.,naif]+)")
# --eval_datasets: "Eval imagenet_r:\tLoss 1.2345\tAcc@1 12.345\tAcc@5 34.567\tImages 30000\tClasses 200"
EVAL_DATASET_RE = re.compile(r"Eval (\w+):" + _SEP + r"Loss (\S+)" + _SEP + r"Acc@1 ([\d.]+)" + _SEP
                             + r"Acc@5 ([\d.]+)" + _SEP + r"Images (\d+)" + _SEP + r"Classes (\d+)")


def iteration_line(epoch, i, n, averages, lr):
    """The training line written every --print_freq iterations (the original's: every 50). averages: the last
    value and running average of "time", "data" (seconds), "loss" and "prec" (top-1, %), each a (value, average)
    pair."""
    (time_val, time_avg), (data_val, data_avg) = averages["time"], averages["data"]
    (loss_val, loss_avg), (prec_val, prec_avg) = averages["loss"], averages["prec"]
    return (f"Epoch[{epoch}] - Iter: [{i}/{n}]\tTime {time_val:.3f} ({time_avg:.3f})\t"
            f"Data {data_val:.3f} ({data_avg:.3f})\tLoss {loss_val:.4f} ({loss_avg:.4f})\t"
            f"Prec {prec_val:.4f} ({prec_avg:.4f})\tLR {lr}")


def epoch_banner(epoch):
    """The original's line at the start of each training epoch."""
    return f"============ Starting epoch {epoch} ... ============"


def eval_iteration_line(i, n, averages):
    """The original's line every 50 evaluation batches: always `Epoch[0]`, no Data and no LR field, a trailing tab.
    averages: (value, running average) of "time", "loss" and "prec", as iteration_line's."""
    (time_val, time_avg), (loss_val, loss_avg), (prec_val, prec_avg) = (averages[k] for k in ("time", "loss", "prec"))
    return (f"Epoch[0] - Iter: [{i}/{n}]\tTime {time_val:.3f} ({time_avg:.3f})\tLoss {loss_val:.4f} ({loss_avg:.4f})\t"
            f"Prec {prec_val:.4f} ({prec_avg:.4f})\t")


def pretrain_step_line(epoch, step, loss, lr, rates):
    """Pretraining's line every --print_freq steps; step: (steps done, --steps); rates: (images per second over
    the steps since the last line, data-loading seconds per step). Its `Epoch[N]` is what training_epochs reads."""
    (done, steps), (images_per_second, data_seconds) = step, rates
    return (f"Epoch[{epoch}] - Step: [{done}/{steps}] Loss {loss:.4f} LR {lr:.6g} img/s {images_per_second:.1f} "
            f"data {data_seconds:.3f}s/step")


def eval_only_line(loss, top1):
    """The original's one line of `--mode eval_only` (a trailing tab, no best)."""
    return f"Test:\tLoss {loss:.4f}\tAcc@1 {top1:.3f}\t"


def test_line(loss, top1, best):
    """The line after each evaluation; `best` is the best test top-1 so far."""
    return f"Test:\tLoss {loss:.4f}\tAcc@1 {top1:.3f}\tBest Acc@1 so far {best:.2f}"


def pretrain_test_line(loss, top1, best):
    """Pretraining's line after each evaluation (spaces where the probe's test_line has tabs; TEST_RE reads both)."""
    return f"Test: Loss {loss:.4f} Acc@1 {top1:.3f} Best Acc@1 so far {best:.2f}"


def final_line(top1):
    """The reported number of a finished run (FINAL_RE, tools/acc1.sh and top1acc_final.sh read it)."""
    return f"Top-1 test accuracy: {top1:.1f}"


def final_message(top1):
    """The probe's closing message of a finished run: two lines, the second the reported number."""
    return f"{FINAL_HEADER}\n{final_line(top1)}"


def selected_line(epoch, val_top1, test_top1, head=None):
    """The epoch validation selects (--val_split; in a sweep's log: the head and its epoch), with its validation
    and test top-1; tools/summarize.py reads it (parse_selected)."""
    where = f"{head} " if head else ""
    return f"Selected on validation: {where}epoch {epoch} val Acc@1 {val_top1:.2f} test Acc@1 {test_top1:.2f}"


def eval_dataset_line(name, loss, top1, top5, images, classes):
    """A head's result on an evaluation-only set (--eval_datasets): its name, loss, top-1 and top-5 (%) over the
    images scored, and the classes the prediction chose among (200 for ImageNet-R/-A, the head's otherwise). Not a
    `Test:` line: the acc1 scripts and TEST_RE keep reading the probe's own test set."""
    return (f"Eval {name}:\tLoss {loss:.4f}\tAcc@1 {top1:.3f}\tAcc@5 {top5:.3f}\tImages {images}\t"
            f"Classes {classes}")


def sweep_epoch_line(epoch, head, top1, best, val_top1=None):
    """A sweep's line per head and epoch in its sweep.log: the head's test top-1, its best so far and (--val_split)
    its validation top-1. Not a `Test:` line: each head's own train.log holds those."""
    return (f"epoch {epoch} {head}: test Acc@1 {top1:.3f} (best {best:.2f})"
            + (f", val Acc@1 {val_top1:.3f}" if val_top1 is not None else ""))


def sweep_eval_dataset_line(name, results):
    """A sweep's line per evaluation-only set (--eval_datasets) in its sweep.log: each head's top-1 on it;
    results: [(head name, top-1 %)]. Not an `Eval <name>:` line (EVAL_DATASET_RE): each head's train.log holds
    those, which parse_eval_datasets reads."""
    return f"eval set {name}: " + ", ".join(f"{head} Acc@1 {top1:.3f}" for head, top1 in results)


def parse_eval_datasets(text):
    """{name: (loss, top1, top5, images, classes)} of the last `Eval` line of each evaluation-only set in a log."""
    return {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)), int(m.group(5)), int(m.group(6)))
            for m in EVAL_DATASET_RE.finditer(text)}


def diagnostic_line(name, values):
    """A `--custom_eval_func` line: the name, then the values with 4 decimals, comma-separated."""
    return f"{name}: " + ",".join(f"{v:.4f}" for v in values)


def prefix(levelname, created, elapsed_seconds):
    """The original logger's prefix, `LEVEL - %x %X - h:mm:ss - `: the elapsed time rounded to the second and
    written as a timedelta ("1 day, 2:03:04" past 24 hours)."""
    stamp = time.strftime("%x %X", time.localtime(created))
    return f"{levelname} - {stamp} - {datetime.timedelta(seconds=round(elapsed_seconds))} - "


def format_record(levelname, created, elapsed_seconds, message):
    """A log record as the original's formatter writes it: the prefix, then the message with every continuation
    line indented to the message's column; an empty message is an empty line."""
    if not message:
        return ""
    head = prefix(levelname, created, elapsed_seconds)
    return head + message.replace("\n", "\n" + " " * len(head))


def parse_tests(text):
    """(loss, top1, best so far) of every Test line of a log, in order."""
    return [(float(m.group(1)), float(m.group(2)), float(m.group(3))) for m in TEST_RE.finditer(text)]


def parse_final(text):
    """The last reported `Top-1 test accuracy` of a log, or None when the run has not finished."""
    found = FINAL_RE.findall(text)
    return float(found[-1]) if found else None


def parse_last_epoch(text):
    """The last `Epoch[N]` a log mentions, or None."""
    found = EPOCH_RE.findall(text)
    return int(found[-1]) if found else None


def training_epochs(text):
    """The epoch of every training line of a log (each `Epoch[N]` and banner), with its position, in order:
    [(epoch, offset)]; the original's validation lines (EVAL_ITERATION_RE) are not training lines."""
    evaluation = {m.start() for m in EVAL_ITERATION_RE.finditer(text)}
    found = [(int(m.group(1)), m.start()) for m in EPOCH_RE.finditer(text) if m.start() not in evaluation]
    return sorted(found + [(int(m.group(1)), m.start()) for m in BANNER_RE.finditer(text)], key=lambda e: e[1])


def parse_selected(text):
    """(val top-1 or None, test top-1) of the last `Selected on validation` line of a log, or None."""
    found = SELECTED_RE.findall(text)
    if not found:
        return None
    test = re.search(r"test Acc@1\s+([\d.]+)", found[-1])
    val = re.search(r"val\w* Acc@1\s+([\d.]+)", found[-1])
    if not test:
        return None
    return (float(val.group(1)) if val else None), float(test.group(1))
