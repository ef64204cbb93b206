"""The reference's linear-probe sweeps, defined once: weight-decay grids, configurations, batches, result folders,
and the rule that selects a sweep's winner.

Read by tools/submit.py and scripts/lineareval.sbatch (through `tools/submit.py task`); the winner rule by
main_linear_probe.py and tools/summarize.py. Facts from the original
release's six linear-probing sbatch scripts (facebookresearch/richreps-timecat,
scripts/supervised_transfer/imagenet/to_*/linear_probing/).
Depends on nothing of ours (a util module).
"""
from dataclasses import dataclass

# Weight-decay grids of the original sweeps, per --data_name (as the original scripts spelled them)
WD_GRIDS = {
    "cifar10": ("1e-2", "5e-2", "1e-4", "5e-4", "1e-3", "5e-3"),
    "cifar100": ("1e-2", "5e-2", "1e-4", "5e-4", "1e-3", "5e-3"),
    "inaturalist18": ("1e-6", "1e-5", "1e-4"),
    "imagenet1k": ("1e-4", "5e-4"),
}
# Per-process batch of the original (single-process) jobs = the global batch to keep
GLOBAL_BATCH = {"cifar10": 256, "cifar100": 256, "inaturalist18": 32, "imagenet1k": 32}
# Flags the original added per dataset (iNat: SyncBatchNorm on the head)
EXTRA_FLAGS = {"inaturalist18": ("--sync_bn",)}
# The sweeps a user submits: SWEEP name -> datasets
SWEEPS = {"cifar": ("cifar10", "cifar100"), "inat18": ("inaturalist18",), "imagenet": ("imagenet1k",)}
# Figure 2's configurations: the three catN tags and the five single 450k runs (cat1)
CONFIGS = ("cat2_step200k", "cat4_step100k", "cat5_step80k", "run0", "run1", "run2", "run3", "run4")
TAG_PREFIX = "supervisedimagenet_resnet50_sfadamw"
RESULTS = "results/supervised/imagenet/transfer"
# per_wd: the reference's one task per (dataset, wd, config), its folders;
# one_pass: one task per (dataset, config) training the whole wd grid on one backbone pass, each head bit-identical
# to the per_wd task of its wd (tests/test_fast_probe.py) for 2.5x fewer forwards (docs/benchmarks.md): the default
LAYOUTS = ("per_wd", "one_pass")
DEFAULT_LAYOUT = "one_pass"
# slurm time limit per task in hours, the original's six sbatch scripts (their #SBATCH
# --time lines): CIFAR 5 h (catN) / 6 h (single runs), ImageNet 12 h, iNat18 5 h (catN) / 12 h (single runs).
# A task that reaches it is requeued (USR1) and resumes, so a short limit costs a restart, not the run.
HOURS = {("cifar10", "cat"): 5, ("cifar10", "single"): 6, ("cifar100", "cat"): 5, ("cifar100", "single"): 6,
         ("imagenet1k", "cat"): 12, ("imagenet1k", "single"): 12,
         ("inaturalist18", "cat"): 5, ("inaturalist18", "single"): 12}


def reference_batch(data_name):
    """The global batch of the reference's probe on data_name (the probe's default --batch_size, split over the
    processes): its sweep's (GLOBAL_BATCH); the CIFAR subsets take CIFAR's, any other dataset ImageNet's."""
    family = "cifar10" if data_name.startswith("cifar") else "imagenet1k"
    return GLOBAL_BATCH.get(data_name, GLOBAL_BATCH[family])


@dataclass(frozen=True)
class ProbeTask:
    """One slurm array task of a sweep."""
    data: str
    config: str
    wds: tuple
    tag: str
    dump_path: str
    batch: int  # global batch; the script divides it by the process count
    extra: tuple


def task_hours(task):
    """The original's time limit (hours) of a task's dataset and kind (catN or a single run)."""
    return HOURS[(task.data, "single" if task.config.startswith("run") else "cat")]


def tag_of(config):
    """Original tag names: ..._run{i} for single runs, ..._{N}_step{k}k for catN."""
    return f"{TAG_PREFIX}_{config}" if config.startswith("run") else f"{TAG_PREFIX}_{config[len('cat'):]}"


def result_folder(data, wd, config):
    """The original sweep's folder of one (dataset, weight decay, config); wd=None: the one-pass sweep folder,
    whose heads go to wd{wd}_lr{lr}/ below it."""
    cell = data if wd is None else f"{data}_{wd}"
    if config.startswith("run"):
        # the original put CIFAR's single runs under lineareval_seer, ImageNet's and iNat's under lineareval
        family = "lineareval_seer" if data.startswith("cifar") else "lineareval"
        return f"{RESULTS}/{family}/{cell}/resnet50_sfadamw/{config}"
    return f"{RESULTS}/lineareval/{cell}/resnet50_sfadamw_{config}"


def grid_of(data, wds=None):
    """The weight-decay grid of a dataset, narrowed to `wds` (values as numbers: 1e-4 == 0.0001) when given."""
    if not wds:
        return WD_GRIDS[data]
    wanted = {float(w) for w in wds}
    return tuple(w for w in WD_GRIDS[data] if float(w) in wanted)


def sweep_winner(points, key):
    """The selected point of a sweep, the one rule of the probe's sweep log (main_linear_probe.py report) and of
    tools/summarize.py: the highest score (best test top-1, the reference's rule, which took the max over its grid;
    validation top-1 under the held-out rule). Ties (a flat sweep) go to the smallest weight decay, then the
    smallest lr, a point without a value last: the pick depends neither on the command line's order of --wd/--lr
    nor on the order result folders are found in. key(point) -> (score, wd, lr); wd and lr numbers or None."""
    def order(point):
        score, wd, lr = key(point)
        return -score, wd is None, wd or 0.0, lr is None, lr or 0.0
    return min(points, key=order)


def sweep_tasks(sweep, layout=DEFAULT_LAYOUT, only_wds=None):
    """Every array task of a sweep, in array-index order (config fastest, then wd, then dataset). An index always
    names the same task; `only_wds` narrows the heads of one_pass tasks (a task of a dataset whose grid holds none
    of them has no wds: nothing to run) and leaves per_wd tasks as they are (select them by their wd)."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose from {', '.join(SWEEPS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    tasks = []
    for data in SWEEPS[sweep]:
        cells = [(wd,) for wd in WD_GRIDS[data]] if layout == "per_wd" else [grid_of(data, only_wds)]
        for wds in cells:
            for config in CONFIGS:
                folder = result_folder(data, wds[0] if layout == "per_wd" else None, config)
                tasks.append(ProbeTask(data, config, wds, tag_of(config), folder, GLOBAL_BATCH[data],
                                       EXTRA_FLAGS.get(data, ())))
    return tasks
