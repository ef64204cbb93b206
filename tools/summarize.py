"""Summarise linear-probe runs into the Figure-2 table of the reference README.

    python tools/summarize.py                      # every run under $CAT_EXP_HOME/results
    python tools/summarize.py inat 80k             # runs whose path or labels contain every pattern
    python tools/summarize.py --root DIR --csv out.csv --plot out.png

A run is a folder with a train.log (and metrics.jsonl, args.json) anywhere below the results root. Runs are
grouped by configuration (catN: N concatenated backbones of one step budget) x target dataset; runs of the same
weight decay (and lr) are averaged (the single 450k runs run0..4 give the cat1 baseline, mean +- std), and the
weight decay with the best mean wins (ties: the smallest, util/sweeps.sweep_winner, as the probe's sweep log).
Runs without the final 'Top-1 test accuracy' line are listed as unfinished and left out of the table. Heads of
sub-concatenations (<probe>/sub{i}-{j}/..., util/subsets.py) give the cat-n curve instead (tools/catn_curve.py):
its table, <csv>_catn.csv and <plot>_catn.png.

Where the table holds Figure 2's cells (or with --paper), a second table puts the paper's value (util/paper.py)
and the difference beside yours, and flags differences larger than the seed-to-seed spread (--no-paper: off).
"""
import argparse
import csv
import json
import os
import re
import statistics
from dataclasses import dataclass, field

from tools import catn_curve
from util import layout, paper, sweeps
from util.cli import ArgumentParser, UserError, run_main
from util.log_lines import FINAL_RE, parse_selected, parse_tests, training_epochs  # the log formats' owner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# table columns: dataset -> header, in the README's order; other datasets follow under their own name
COLUMNS = {"imagenet1k": "ImageNet1k", "inaturalist18": "iNat18", "cifar100": "CIFAR100", "cifar10": "CIFAR10"}
ALIASES = {"imagenet": "imagenet1k", "in1k": "imagenet1k", "inat": "inaturalist18", "inat18": "inaturalist18",
           "inaturalist": "inaturalist18"}
STANDARD_CONFIGS = [(1, "full"), (2, "200"), (4, "100"), (5, "80")]
FULL_STEPS_K = 450  # checkpoints_stepfull: the 450k-step runs
TAIL_BYTES = 1 << 20


@dataclass
class Run:
    path: str  # folder of the run, relative to the results root
    data: str = None
    wd: float = None
    lr: float = None
    n_models: int = None
    steps: str = None  # 'full', '80' (thousands of steps) or a non-standard checkpoint folder name
    index: int = None  # i of a single run{i}
    epochs: int = None
    finished: bool = False
    top1: float = None  # the reported test top-1
    val_top1: float = None  # validation top-1 of the selected epoch, when a held-out split chose it
    heldout: bool = False
    last_epoch: int = None
    notes: list = field(default_factory=list)

    @property
    def config(self):
        return (self.n_models, self.steps)

    def labels(self):
        return f"{self.data} {config_name(self.config)} {steps_label(self.steps)}"


# ---- names and formats
def steps_label(steps):
    if steps is None:
        return "?"
    if steps == "full":
        return f"{FULL_STEPS_K}k"
    if steps.endswith("steps") and steps[:-5].isdigit():
        return f"{steps[:-5]} steps"
    return f"{steps}k" if steps.isdigit() else steps


def total_label(config):
    n, steps = config
    if n and steps and steps.endswith("steps") and steps[:-5].isdigit():
        return f"{n * int(steps[:-5])} steps"
    k = FULL_STEPS_K if steps == "full" else int(steps) if steps and steps.isdigit() else None
    if n and k:
        return f"{n * k}k"
    return "–" if steps and n else "?"  # a named step folder (the demo's direct runs): no budget to add up


def config_name(config):
    return f"cat{config[0] if config[0] else '?'}"


def config_order(config):
    n, steps = config
    standard = STANDARD_CONFIGS.index(config) if config in STANDARD_CONFIGS else len(STANDARD_CONFIGS)
    return (standard, n or 0, str(steps))


def format_wd(wd):
    if wd is None:
        return "?"
    if wd == 0:
        return "0"
    mantissa, exponent = f"{wd:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def as_float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def dataset_name(name):
    return ALIASES.get(name, name) if name else None


# ---- reading one run
def read_text(path, tail=None):
    with open(path, "rb") as f:
        if tail:
            f.seek(max(0, os.path.getsize(path) - tail))
        return f.read().decode("utf-8", errors="replace")


def read_metrics(path, run):
    """The evaluations of metrics.jsonl; a half-written last line (a run still writing) is skipped with a note."""
    records, bad = [], 0
    for line in read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append(record if isinstance(record, dict) else {})
        except ValueError:
            bad += 1
    if bad:
        run.notes.append(f"{layout.METRICS}: {bad} unreadable line(s) skipped")
    return [r for r in records if isinstance(r.get("test_top1"), (int, float))]


def read_log(run_dir, run, have_metrics):
    """Finished flag, final accuracy, held-out selection and last epoch from train.log."""
    path = os.path.join(run_dir, layout.PROBE_LOG)
    if not os.path.isfile(path):
        run.notes.append(f"no {layout.PROBE_LOG}")
        return None, []
    # the end of the log says whether the run finished; the whole log is read only for its Test: lines
    text = read_text(path, tail=TAIL_BYTES if have_metrics else None)
    finals = list(FINAL_RE.finditer(text))
    # the last TRAINING epoch: the original's logs end with `Epoch[0]` validation lines, which are not training
    epochs = training_epochs(text)
    if epochs:
        run.last_epoch = epochs[-1][0]
    final = None
    # a finished run that was started over appends to the same train.log: training after the final line
    if finals and not (epochs and epochs[-1][1] > finals[-1].start()):
        run.finished = True
        final = float(finals[-1].group(1))
        selected = parse_selected(text)
        if selected:
            run.heldout, (run.val_top1, run.top1) = True, selected
    tests = [top1 for _, top1, _ in parse_tests(text)]
    return final, tests


def read_args(run_dir, root, run):
    """args.json of the run, or of its parent (several heads of one run live in subfolders)."""
    for folder in (run_dir, os.path.dirname(run_dir)):
        path = os.path.join(folder, layout.ARGS_JSON)
        if os.path.isfile(path) and os.path.abspath(folder).startswith(os.path.abspath(root)):
            try:
                args = json.loads(read_text(path))
                return args if isinstance(args, dict) else {}
            except ValueError:
                run.notes.append(f"{os.path.relpath(path, root)} is unreadable")
                return {}
    return {}


def identify(run, args):
    """Dataset, weight decay, lr and configuration: args.json first, the folder names for what it lacks."""
    run.data = dataset_name(args.get("data_name"))
    if run.data == "imagefolder" and isinstance(args.get("data_path"), str):  # a folder dataset: named by its folder
        run.data = os.path.basename(os.path.normpath(args["data_path"]))
    run.epochs = args.get("epochs") if isinstance(args.get("epochs"), int) else None
    for key in ("wd", "lr"):
        if isinstance(args.get(key), (int, float)) and not isinstance(args.get(key), bool):
            setattr(run, key, float(args[key]))
    archs, pretrained, tag = args.get("arch"), args.get("pretrained"), args.get("tag") or ""
    if isinstance(archs, list) and archs:
        run.n_models = len(archs)
    if isinstance(pretrained, list) and pretrained and all(isinstance(p, str) for p in pretrained):
        run.n_models = run.n_models or len(pretrained)
        folders = []
        for p in pretrained:
            parent = os.path.basename(os.path.dirname(p.replace("\\", "/")))
            folders.append(layout.parse_step_folder(parent) or parent)  # 'full', '80' (thousands), '60steps'
        run.steps = "+".join(dict.fromkeys(folders))
        index = layout.run_index_in(pretrained[0]) if len(pretrained) == 1 else None
        if index is not None:
            run.index = index
    m = re.search(r"_(\d+)_step(\d+)k$", tag)
    if m:
        run.n_models, run.steps = run.n_models or int(m.group(1)), run.steps or m.group(2)
    m = re.search(r"_run(\d+)$", tag)
    if m:
        run.n_models, run.steps = run.n_models or 1, run.steps or "full"
        run.index = int(m.group(1)) if run.index is None else run.index

    # ---- the reference folder names: {data}_{wd}/resnet50_sfadamw_cat{N}_step{K}k, .../run{i}, wd{wd}_lr{lr}
    for part in reversed(run.path.replace("\\", "/").split("/")):
        m = re.search(r"cat(\d+)_step(\d+)k", part)
        if m and run.n_models is None:
            run.n_models, run.steps = int(m.group(1)), run.steps or m.group(2)
        m = re.fullmatch(r"run(\d+)", part)
        if m and run.index is None:
            run.index = int(m.group(1))
        m = re.fullmatch(r"wd([^_]+)_lr([^_]+)", part)
        if m:
            run.wd = as_float(m.group(1)) if run.wd is None else run.wd
            run.lr = as_float(m.group(2)) if run.lr is None else run.lr
            continue
        head, _, tail = part.rpartition("_")
        if re.match(r"(cifar|imagenet|inat|in1k)", head) and as_float(tail) is not None:
            run.data = run.data or dataset_name(head)
            run.wd = as_float(tail) if run.wd is None else run.wd
    if run.index is not None and run.n_models is None:  # lineareval_seer/{data}_{wd}/resnet50_sfadamw/run{i}
        run.n_models, run.steps = 1, run.steps or "full"


def read_run(run_dir, root):
    run = Run(os.path.relpath(run_dir, root))
    identify(run, read_args(run_dir, root, run))
    metrics_path = os.path.join(run_dir, layout.METRICS)
    metrics = read_metrics(metrics_path, run) if os.path.isfile(metrics_path) else []
    final, tests = read_log(run_dir, run, bool(metrics))
    if metrics and run.last_epoch is None:  # train.log names the epoch in progress, metrics.jsonl the last done
        run.last_epoch = max((r["epoch"] for r in metrics if isinstance(r.get("epoch"), int)), default=None)
    if run.top1 is None:  # best test top-1 over epochs: metrics.jsonl is the most precise, then Test: lines
        candidates = [r["test_top1"] for r in metrics] or tests or ([final] if final is not None else [])
        run.top1 = max(candidates) if candidates else None
    return run


def find_runs(root):
    runs = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if layout.PROBE_LOG in files or layout.METRICS in files:
            runs.append(read_run(dirpath, root))
    return runs


# ---- selection
def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def select(runs):
    """{(config, data): cell} where a cell holds every (wd, lr) of the sweep and the winner."""
    groups = {}
    for run in runs:
        groups.setdefault((run.config, run.data), {}).setdefault((run.wd, run.lr), []).append(run)
    cells = {}
    for key, sweep in groups.items():
        points = []
        for (wd, lr), members in sweep.items():
            mean, std = mean_std([r.top1 for r in members])
            vals = [r.val_top1 for r in members]
            # held-out rule: choose on validation accuracy when every run recorded it
            score = statistics.fmean(vals) if all(v is not None for v in vals) else mean
            points.append({"wd": wd, "lr": lr, "mean": mean, "std": std, "runs": members, "score": score,
                           "heldout": all(r.heldout for r in members)})
        points.sort(key=lambda p: (p["wd"] is None, p["wd"] or 0, p["lr"] or 0))
        best = sweeps.sweep_winner(points, lambda p: (p["score"], p["wd"], p["lr"]))  # ties: the smallest wd
        cells[key] = {"points": points, "best": best, "many_lr": len({p["lr"] for p in points}) > 1}
    return cells


# ---- output
def markdown(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def point_text(point, many_lr):
    return format_wd(point["wd"]) + (f" lr {point['lr']:g}" if many_lr and point["lr"] is not None else "")


def cell_text(cell, what):
    if cell is None:
        return "–"
    best = cell["best"]
    if what == "wd":
        return point_text(best, cell["many_lr"])
    text = f"{best['mean']:.1f}" + (f" ± {best['std']:.1f}" if best["std"] is not None else "")
    return text + ("†" if best["heldout"] else "")


def write_csv(path, cells):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "n_models", "steps_per_model", "total_steps", "dataset", "wd", "lr",
                         "top1_mean", "top1_std", "n_runs", "selected", "selection", "runs"])
        for (config, data), cell in sorted(cells.items(), key=lambda kv: (config_order(kv[0][0]), kv[0][1])):
            for p in cell["points"]:
                writer.writerow([config_name(config), config[0], steps_label(config[1]), total_label(config), data,
                                 "" if p["wd"] is None else p["wd"], "" if p["lr"] is None else p["lr"],
                                 f"{p['mean']:.3f}", "" if p["std"] is None else f"{p['std']:.3f}",
                                 len(p["runs"]), int(p is cell["best"]), "held-out" if p["heldout"] else "test",
                                 ";".join(r.path for r in p["runs"])])


def write_plot(path, cells, datasets):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.2), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        points = sorted((config, cell["best"]) for (config, d), cell in cells.items()
                        if d == data and config[0] is not None)
        xs = [config[0] for config, _ in points]
        budget = [p for p in points if total_label(p[0]) not in ("–", "?")]  # one line through equal budgets
        other = [p for p in points if p not in budget]  # e.g. the demo's direct runs: markers only
        for group, style in ((budget, "-"), (other, "none")):
            if group:
                ax.errorbar([c[0] for c, _ in group], [b["mean"] for _, b in group],
                            yerr=[b["std"] or 0 for _, b in group], marker="o", capsize=3, linestyle=style)
        for (config, best), x in zip(points, xs):
            ax.annotate(steps_label(config[1]), (x, best["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.set_title(COLUMNS.get(data, data))
        ax.set_xlabel("concatenated backbones")
        ax.set_xticks(sorted(set(xs)))
    axes[0][0].set_ylabel("linear-probe top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---- the paper's numbers beside yours
def seed_std(cells, data):
    """(std, where it comes from) of one run's top-1 on `data`: your cat1 seeds where two or more finished, else
    util/paper.py's assumed default (the paper gives no error bars)."""
    cell = cells.get(((1, "full"), data))
    runs = cell["best"]["runs"] if cell else []
    if len(runs) >= 2:
        return statistics.stdev(r.top1 for r in runs), f"measured, std of your {len(runs)} cat1 seeds"
    return paper.DEFAULT_SEED_STD, "assumed default (fewer than 2 cat1 seeds here; the paper gives no error bars)"


def print_paper_table(cells):
    """Figure 2's cells: yours, the paper's and the difference; '!' where it exceeds FLAG_SIGMAS seed stds."""
    datasets = list(COLUMNS)
    spreads = {d: seed_std(cells, d) for d in datasets}
    rows, flagged = [], 0
    for config in STANDARD_CONFIGS:
        row = [config_name(config), steps_label(config[1])]
        for d in datasets:
            ours, theirs = cells.get((config, d)), paper.paper_value(config, d)
            if ours is None:
                row.append(f"– / {theirs:.1f}")
                continue
            diff = ours["best"]["mean"] - theirs
            flag = abs(diff) > paper.FLAG_SIGMAS * spreads[d][0]
            flagged += flag
            row.append(f"{ours['best']['mean']:.1f} / {theirs:.1f} ({diff:+.1f}){' !' if flag else ''}")
        rows.append(row)
    print(f"\nYours / the paper's ({paper.SOURCE}) and (yours - paper's); '!' = the difference exceeds "
          f"{paper.FLAG_SIGMAS:g} seed-to-seed standard deviations of one run:\n")
    print(markdown(["Method", "steps per backbone"] + [COLUMNS[d] for d in datasets], rows))
    print("\nSeed-to-seed standard deviation of one run, per dataset:")
    for d, (std, source) in spreads.items():
        print(f"  {COLUMNS[d]} {std:.2f}: {source}")
    print(f"{flagged} cell(s) flagged." if flagged else "No cell differs from the paper by more than the spread.")


def print_curve(curve):
    header, rows = catn_curve.curve_table(curve, catn_curve.curve_datasets(curve, COLUMNS), steps_label, COLUMNS)
    print("\nCat-n curve from subset heads: top-1 (%) against the number of concatenated backbones, mean ± std "
          "over the subsets of each size (n subsets), at the weight decay with the best mean:\n")
    print(markdown(header, rows))


def default_output(root, patterns, ext):
    suffix = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in patterns)
    return os.path.join(root, f"summary_{suffix}.{ext}" if suffix else f"summary.{ext}")


def get_args_parser():
    p = ArgumentParser("tools/summarize.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", nargs="*", help="keep runs whose path, dataset or configuration (e.g. cat5, 80k) "
                   "contains every pattern (case-insensitive)")
    p.add_argument("--root", default=None, help="results root (default: $CAT_EXP_HOME/results, CAT_EXP_HOME "
                   "defaulting to the project folder)")
    p.add_argument("--csv", default=None, help="CSV of every sweep point, the selected ones marked (default: "
                   "<root>/summary.csv, or summary_<patterns>.csv when filtered)")
    p.add_argument("--plot", default=None, help="PNG of top-1 against the number of concatenated models, per "
                   "dataset; needs matplotlib, the 'plot' extra (default: <root>/summary.png when installed)")
    p.add_argument("--no_save", "--no-save", action="store_true", help="print only, write no CSV or plot")
    p.add_argument("--paper", action=argparse.BooleanOptionalAction, default=None, help="the paper's Figure 2 "
                   "value and the difference beside every cell, flagging differences beyond the seed-to-seed "
                   "spread (default: on when the table holds a Figure 2 cell)")
    return p


def main(args):
    root = args.root or os.path.join(os.environ.get("CAT_EXP_HOME") or REPO, "results")
    if not os.path.isdir(root):
        raise UserError(f"results root {root} does not exist (set CAT_EXP_HOME or pass --root)")
    runs = find_runs(root)
    if not runs:
        print(f"No runs under {root}: no train.log or metrics.jsonl below it.")
        return
    patterns = [p.lower() for p in args.patterns]
    kept = [r for r in runs if all(p in f"{r.path} {r.labels()}".lower() for p in patterns)]
    print(f"Found {len(runs)} runs under {root}" + (f", {len(kept)} matching {' '.join(args.patterns)}"
                                                      if patterns else ""))
    if not kept:
        print("No run matches every pattern.")
        return
    finished = [r for r in kept if r.finished and r.top1 is not None]
    unknown = [r for r in finished if r.data is None or r.n_models is None]
    usable = [r for r in finished if r not in unknown]
    unfinished = [r for r in kept if not r.finished]
    curve = catn_curve.build_curve(usable, select)
    usable = [r for r in usable if not catn_curve.is_subset_head(r)]  # subset heads: in the cat-n curve only

    # ---- the table
    if usable:
        cells = select(usable)
        n_heldout = sum(r.heldout for r in usable)
        print()
        if n_heldout < len(usable):
            print("Selection: best epoch and best weight decay on the test split, as the reference (each run: its "
                  "best test top-1 over epochs; each cell: the weight decay with the best mean top-1).")
        if n_heldout:
            print("Cells marked † use the held-out rule: the epoch was chosen on the validation split (and the "
                  "weight decay on validation top-1 where it was recorded); their test top-1 is reported.")
        found = {r.data for r in usable}
        # the paper's four columns always (empty ones show what is missing), unless only other datasets were run
        datasets = ([d for d in COLUMNS] if found & set(COLUMNS) else []) + sorted(found - set(COLUMNS))
        configs = sorted({r.config for r in usable}, key=config_order)
        header = ["Method", "steps per backbone", "total"] + [COLUMNS.get(d, d) for d in datasets]
        rows = {what: [[config_name(c), steps_label(c[1]), total_label(c)]
                       + [cell_text(cells.get((c, d)), what) for d in datasets] for c in configs]
                for what in ("top1", "wd")}
        print("\nLinear-probe top-1 (%), mean ± std over runs where there are several:\n")
        print(markdown(header, rows["top1"]))
        print("\nWinning weight decay:\n")
        print(markdown(header, rows["wd"]))
        print("\nSweeps (top-1 per weight decay, n runs; * = selected):")
        for (config, data), cell in sorted(cells.items(),
                                           key=lambda kv: (config_order(kv[0][0]), datasets.index(kv[0][1]))):
            points = " | ".join(f"{point_text(p, cell['many_lr'])}: {p['mean']:.2f} (n={len(p['runs'])})"
                                + ("*" if p is cell["best"] else "") for p in cell["points"])
            wds = [p["wd"] for p in cell["points"] if p["wd"] is not None]
            flat = len(cell["points"]) > 1 and len({p["score"] for p in cell["points"]}) == 1
            edge = (len(set(wds)) > 2 and cell["best"]["wd"] in (min(wds), max(wds)))
            note = ("  (a flat sweep: every point ties, the smallest weight decay is taken)" if flat
                    else "  (best at the edge of the sweep)" if edge else "")
            print(f"  {config_name(config)} {steps_label(config[1])} {COLUMNS.get(data, data)}: {points}{note}")
    else:
        print("\nNo finished run yet: nothing to tabulate.")
    figure2 = usable and any(paper.paper_value(config, data) is not None for config, data in cells)
    if args.paper or (args.paper is None and figure2):
        print_paper_table(cells if usable else {})

    if curve:
        print_curve(curve)

    # ---- what stayed out of the table
    if unfinished:
        print(f"\nUnfinished runs (no 'Top-1 test accuracy' line yet), left out of the table ({len(unfinished)}):")
        for r in unfinished:
            epoch = "no epoch logged" if r.last_epoch is None else f"epoch {r.last_epoch}" + (
                f"/{r.epochs}" if r.epochs else "")
            best = "" if r.top1 is None else f", best test top-1 so far {r.top1:.2f}"
            print(f"  {r.path}: {epoch}{best}")
    if unknown:
        print("\nFinished runs left out, dataset or configuration unknown (no args.json, unusual folder names):")
        for r in unknown:
            print(f"  {r.path}: dataset {r.data or '?'}, {config_name(r.config)}")
    notes = [(r.path, n) for r in kept for n in r.notes]
    if notes:
        print("\nNotes:")
        for path, note in notes:
            print(f"  {path}: {note}")

    # ---- files
    if args.no_save or not usable:
        return
    csv_path = args.csv or default_output(root, args.patterns, "csv")
    write_csv(csv_path, cells)
    print(f"\nWrote {csv_path}")
    if curve:
        catn_curve.write_curve_csv(catn_curve.curve_path(csv_path), curve, steps_label)
        print(f"Wrote {catn_curve.curve_path(csv_path)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if args.plot:
            print("note: no plot: --plot needs matplotlib (install the 'plot' extra: uv sync --extra plot, "
                  "or pip install matplotlib)")
        return
    plot_path = args.plot or default_output(root, args.patterns, "png")
    write_plot(plot_path, cells, [d for d in datasets if any(k[1] == d for k in cells)])
    print(f"Wrote {plot_path}")
    if curve:
        catn_curve.write_curve_plot(catn_curve.curve_path(plot_path), curve,
                                    catn_curve.curve_datasets(curve, COLUMNS), steps_label, COLUMNS)
        print(f"Wrote {catn_curve.curve_path(plot_path)}")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
