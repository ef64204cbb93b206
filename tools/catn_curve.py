"""The cat-n curve of tools/summarize.py: linear-probe top-1 against the number of concatenated backbones.

A probe run with subset heads (util/subsets.py: <probe>/sub{i}-{j}/...) gives the whole curve at once: the
points are the sub-concatenations of its backbones grouped by size k, mean +- std over the subsets (and over
the probes, e.g. seed groups, of the same step budget) at the weight decay whose mean is best, as the table
chooses it for the single runs. The full concatenation's heads of the same probe are its k = N point. Separate
runs (the reference's cat1/cat2/cat4/cat5 probes) are drawn on the same axes as single points.
"""
import csv
import os
import re
from dataclasses import dataclass, field, replace

from util.subsets import subset_folder, subset_of_folder

_HEAD = re.compile(r"wd[^_/]+_lr[^_/]+")


def is_subset_head(run):
    """A head trained on a sub-concatenation (kept out of the main table: it is not its probe's catN)."""
    return subset_of_folder(run.path) is not None


def probe_folder(run):
    """The probe folder of a full-concatenation head: the run folder, or its parent for a sweep's wd*_lr* head."""
    path = os.path.normpath(run.path)
    return os.path.normpath(os.path.dirname(path)) if _HEAD.fullmatch(os.path.basename(path)) else path


@dataclass
class Curve:
    cells: dict  # {((k, steps), data): cell of summarize.select} over the subset heads, k = subset size
    separate: dict  # the same for runs outside any probe with subsets (the reference's separate catN runs)
    labels: dict = field(default_factory=dict)  # id(run) -> '<probe>/sub0-2' of each curve member

    def __bool__(self):
        return bool(self.cells)


def curve_members(runs):
    """(runs as size-k proxies, their subset labels) for every head of a probe with subsets; the rest apart."""
    located = {id(r): subset_of_folder(r.path) for r in runs}
    probes = {where[0] for where in located.values() if where}
    members, separate = {}, []
    for run in runs:
        where = located[id(run)]
        if where is None and probe_folder(run) in probes and run.n_models:
            where = (probe_folder(run), tuple(range(run.n_models)))  # the full concatenation of that probe
        if where is None:
            separate.append(run)
            continue
        key = (where, run.wd, run.lr)
        # a sub{all} folder and the full heads are the same point: count it once, the subset folder's
        if key not in members or located[id(run)] is not None:
            members[key] = (replace(run, n_models=len(where[1])), f"{where[0]}/{subset_folder(where[1])}")
    return list(members.values()), separate


def build_curve(runs, select):
    """The curve of finished, identified runs; `select` is summarize's sweep selection rule."""
    members, separate = curve_members(runs)
    proxies = [proxy for proxy, _ in members]
    return Curve(select(proxies) if proxies else {}, select(separate) if separate else {},
                 {id(proxy): label for proxy, label in members})


def curve_lines(cells):
    """{(data, steps): [(k, best point), ...] sorted by k}."""
    lines = {}
    for ((k, steps), data), cell in cells.items():
        lines.setdefault((data, steps), []).append((k, cell["best"]))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in sorted(lines.items(), key=str)}


def curve_table(curve, datasets, steps_label, columns):
    """Markdown-ready header and rows: one row per (size, step budget), one column per dataset."""
    rows = []
    for k, steps in sorted({key[0] for key in curve.cells}, key=lambda c: (str(c[1]), c[0])):
        cells = []
        for data in datasets:
            cell = curve.cells.get(((k, steps), data))
            best = cell and cell["best"]
            spread = f" ± {best['std']:.1f}" if best and best["std"] is not None else ""
            cells.append("–" if not best else f"{best['mean']:.1f}{spread} (n={len(best['runs'])})")
        rows.append([str(k), steps_label(steps)] + cells)
    return ["backbones", "steps per backbone"] + [columns.get(d, d) for d in datasets], rows


def write_curve_csv(path, curve, steps_label):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "steps_per_model", "n_backbones", "wd", "lr", "top1_mean", "top1_std",
                         "n_subsets", "selected", "subsets"])
        for (data, steps), points in curve_lines(curve.cells).items():
            for k, _ in points:
                cell = curve.cells[((k, steps), data)]
                for p in cell["points"]:
                    writer.writerow([data, steps_label(steps), k, "" if p["wd"] is None else p["wd"],
                                     "" if p["lr"] is None else p["lr"], f"{p['mean']:.3f}",
                                     "" if p["std"] is None else f"{p['std']:.3f}", len(p["runs"]),
                                     int(p is cell["best"]), ";".join(curve.labels[id(r)] for r in p["runs"])])


def spread(points):
    """Spread of the separate runs' point (std over runs), 0 when there is one."""
    return [b["std"] or 0 for _, b in points]


def each(label):
    """'32 steps' -> '32 steps each', '450k' -> '450k steps each', 'direct' (a named step folder) as it is."""
    if label.endswith("steps"):
        return f"{label} each"
    return f"{label} steps each" if label[:1].isdigit() else label


def write_curve_plot(path, curve, datasets, steps_label, columns):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(3.8 * len(datasets), 3.3), squeeze=False)
    lines, separate = curve_lines(curve.cells), curve_lines(curve.separate)
    for ax, data in zip(axes[0], datasets):
        for (d, steps), points in lines.items():
            if d == data:  # mean +- std over the subsets of each size
                ax.errorbar([k for k, _ in points], [b["mean"] for _, b in points], yerr=spread(points), marker="o",
                            capsize=3, label=f"subsets, {each(steps_label(steps))}")
        for (d, steps), points in separate.items():
            if d == data and points[0][0] is not None:
                ax.errorbar([k for k, _ in points], [b["mean"] for _, b in points], yerr=spread(points), marker="s",
                            linestyle="none", capsize=3, label=f"separate runs, {each(steps_label(steps))}")
        ax.set_title(columns.get(data, data))
        ax.set_xlabel("concatenated backbones")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("linear-probe top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def curve_path(path):
    """summary.csv -> summary_catn.csv: the curve's files sit beside the table's."""
    stem, ext = os.path.splitext(path)
    return f"{stem}_catn{ext}"


def curve_datasets(curve, columns):
    """Datasets of the curve in the table's column order, others after them by name."""
    found = {data for _, data in curve.cells}
    return [d for d in columns if d in found] + sorted(found - set(columns))
