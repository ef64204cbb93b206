"""Speed measurements of the project's hot loops, each against a plain baseline on the same machine in the same
run; every run appends a dated row to its section of docs/benchmarks.md.

    python tools/benchmark.py train            # pretraining step: optimised path vs plain fp32 eager (ResNet50, 224 px)
    python tools/benchmark.py train --quick    # smaller batch, fewer steps (about a minute on 2 CPU cores)
    python tools/benchmark.py train --compile  # also torch.compile the optimised path
    python tools/benchmark.py backbone         # frozen-backbone forward: optimised vs fp32 eager, share of matmul peak
    python tools/benchmark.py probe            # complete probes: per-epoch vs cached; K-value sweep: K runs vs one
    python tools/benchmark.py catn_cache       # cat-n curve of 5 backbones (31 probes): per-backbone cache vs per cat
    python tools/benchmark.py data             # JPEG decode + transforms per core for each decoder; workers 1 -> 2
    python tools/benchmark.py e2e              # JPEG -> pretraining step and JPEG -> extraction vs synthetic batches
    python tools/benchmark.py gpu_decode       # torchvision.io.decode_jpeg on the GPU in batches (nvJPEG)
    python tools/benchmark.py cost --train_rate R --forward_rate F   # Figure 2's GPU-hours from measured rates
    python tools/benchmark.py cost --from_e2e FILE   # the same for every e2e row recorded in FILE

Sections are subcommands; each writes under its own `## <section>` heading of results/benchmarks.md (ignored by
git), or of the file given with --record (`--record docs/benchmarks.md` adds the row to the published table).
CPU runs use util/cpu_runtime's OpenMP settings (passive waiting, threads = cores) unless OMP_* are set; every
row records them.
"""
import argparse
import datetime
import os
import time

from util.cpu_runtime import configure_cpu_runtime

CPU_RUNTIME = configure_cpu_runtime()  # before torch: OpenMP reads its settings when torch loads it

# torch and engine are imported inside the functions that use them,
# so that --help answers without loading them
from arguments import pretrain as pretrain_args  # noqa: E402  (after configure_cpu_runtime, on purpose)
from tools.bench_common import images_per_second, machine_description, record, synchronize, timed_probe  # noqa: E402, F401
from util import layout  # noqa: E402
from util.cli import ArgumentParser, UserError, run_main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "results", "benchmarks.md")  # a tool never modifies tracked files by default


# ---------------------------------------------------------------- train
TRAIN_SECTION = "train precision"
TRAIN_INTRO = [
    "Images per second of main_pretrain.py's `train_step` (forward, label-smoothed cross-entropy, backward,",
    "AlgoPerf schedule-free AdamW step; channels_last) on synthetic batches, so data loading is not measured:",
    "*fp32* is the default, the reference numerics (TF32 matmuls on GPUs); *bf16* is `--precision bf16`",
    "(autocast), an explicit option. Both in the same run, one after the other, on the same machine.",
    "Published anchor: NVIDIA's ResNet50 AMP training, 2,470 img/s on one A100 (16,621 on eight).",
]
TRAIN_HEADER = "| date | machine | torch | model | batch | fp32 img/s (default) | bf16 img/s | bf16 setting | ratio |"


def rates(step_fns, batch_size, warmup, steps, device):
    """Images/s of each step function, one after the other, each after its own warm-up. (Alternating single
    steps looks fairer under a varying load, but on CPU it makes both variants 2-3x slower: their
    allocations and oneDNN primitives keep evicting each other.)"""
    return {name: images_per_second(step, warmup, steps, batch_size, device) for name, step in step_fns.items()}


def bench_train(args):
    import torch

    import engine_pretrain
    from models import build_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    on_gpu = device.type == "cuda"
    size = args.img_size or 224
    batch = args.batch_size or (256 if on_gpu else 16 if args.quick else 32)
    steps = args.steps or ((20 if args.quick else 50) if on_gpu else (3 if args.quick else 5))
    warmup = (3 if args.compile else 1) * (5 if on_gpu else 1)  # compilation and cudnn autotuning settle first
    load = os.getloadavg()[0]
    recipe = pretrain_args.get_args_parser().parse_args(["--arch", args.arch])
    pretrain_args.check_args(recipe)
    recipe.accum_steps = 1
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))
    print(f"{machine_description()}; torch {torch.__version__}; {args.arch} {size}px, batch {batch}, "
          f"{warmup} warm-up + {steps} timed steps each; load average {load:.1f}")
    pinned = (images.pin_memory(), labels.pin_memory()) if device.type == "cuda" else (images, labels)

    class Batches:
        def __next__(self):
            return pinned

    def pretrain_step(precision):
        """main_pretrain.py's step at one precision, on its own freshly initialised model and optimizer."""
        torch.manual_seed(0)
        model = build_backbone(args.arch, 1000).to(device).to(memory_format=torch.channels_last)
        optimizer = engine_pretrain.build_optimizer(model, recipe)
        train_model = torch.compile(model) if args.compile else model
        model.train()
        optimizer.train()
        step_recipe = argparse.Namespace(**{**vars(recipe), "precision": precision})
        return lambda: engine_pretrain.train_step(train_model, optimizer, Batches(), step_recipe, device, False)

    setting = "bf16 autocast, channels_last" + (", compile" if args.compile else "")
    measured = rates({"fp32": pretrain_step("fp32"), "bf16": pretrain_step("bf16")}, batch, warmup, steps, device)
    fp32, bf16 = measured["fp32"], measured["bf16"]
    print(f"fp32 (default): {fp32:.1f} img/s")
    print(f"bf16 ({setting}): {bf16:.1f} img/s")
    ratio = bf16 / fp32
    print(f"ratio: {ratio:.2f}x (load average now {os.getloadavg()[0]:.1f}, including this benchmark's threads)")
    if not args.no_record:
        date = datetime.date.today().isoformat()
        record(args.results, TRAIN_SECTION, TRAIN_INTRO, TRAIN_HEADER,
               f"| {date} | {machine_description()}, load {load:.1f} | {torch.__version__} | {args.arch} {size}px"
               f"{' (quick)' if args.quick else ''} | {batch} | {fp32:.1f} | {bf16:.1f} | {setting} | {ratio:.2f}x |")
        print(f"recorded in {args.results}")


# ---------------------------------------------------------------- backbone, probe, sweep
BACKBONE_INTRO = [
    "Frozen-backbone forward images/s (the cost that dominates a probe), on synthetic batches. *plain* is an fp32",
    "eager NCHW forward under no_grad; *optimised* is the probe's path: inference_mode, channels_last and",
    "`--precision auto` (bf16 on GPUs and bf16-capable CPUs). *% of peak* = img/s x GFLOP per image / the matmul",
    "peak measured in the same run (fp32 peak for plain, bf16 peak for bf16), the physical limit of the machine.",
    "Published anchor: ResNet50 inference 3,382 img/s with AMP on a V100 (1,261 fp32), NVIDIA.",
]
BACKBONE_HEADER = ("| date | machine | torch | model | batch | matmul peak fp32 / bf16 GFLOP/s | plain img/s (% peak) "
                   "| optimised img/s (% peak) | setting | ratio |")
PROBE_INTRO = [
    "Wall time of complete probes on generated CIFAR-format data, same epochs, same data, in one run:",
    "*per-epoch* is the reference protocol (backbones recomputed every epoch, fp32); *cached* is",
    "`--feature_cache` with `--precision auto` (backbones run once; the heads train on stored features).",
    "*sweep*: a K-value weight-decay sweep as K separate per-epoch runs against one run with K heads.",
    "Accuracies are the final `Top-1 test accuracy` of each way.",
]
SUBSETS_INTRO = [
    "Wall time of a complete probe of 5 backbones on cached features: one head on the concatenation against",
    "`--subsets all` (31 heads: every non-empty subset, the full one included) in the same pass, computed",
    "`--head_impl separate` (the default: each head its own BatchNorm1d + Linear, bit-identical to a separate",
    "probe) and `--head_impl fused` (one fixed sequence of operations for all heads, equal to fp32 rounding); the",
    "same data, epochs and cache, in one run. Top-1 is the full concatenation's head (equal by construction, to",
    "rounding when fused). Target: the 31 heads cost at most 3x the one head. *ratio* = 31-head s / one-head s.",
]
SUBSETS_HEADER = ("| date | machine | setup | one head s (top-1) | 31 heads separate s (top-1) | ratio "
                  "| 31 heads fused s (top-1) | ratio |")
PROBE_HEADER = ("| date | machine | setup | per-epoch s (top-1) | cached s (top-1) | speed-up | K | K runs s "
                "| one K-head run s | speed-up |")


def matmul_peak(device, dtype, size=2048, repeats=20):
    import torch
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def gflop_per_image(arch, size):
    """Forward GFLOP (2 x multiply-adds) per image, counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_backbone
    model = build_backbone(arch).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def bench_backbone(args):
    import torch

    from engine import autocast, resolve_precision
    from models import build_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    on_gpu = device.type == "cuda"
    size = args.img_size or (128 if args.quick else 224)
    batch = args.batch_size or (256 if on_gpu else 16 if args.quick else 32)
    steps = args.steps or ((20 if args.quick else 50) if on_gpu else (2 if args.quick else 5))
    precision = resolve_precision("auto", device)
    load = os.getloadavg()[0]
    # --quick: a smaller product (bf16 matmuls without bf16 instructions run at a few GFLOP/s on a CPU)
    peak_shape = dict(size=512, repeats=5) if args.quick and not on_gpu else {}
    peak32 = matmul_peak(device, torch.float32, **peak_shape)
    peak16 = matmul_peak(device, torch.bfloat16, **peak_shape)
    gflop = gflop_per_image(args.arch, size)
    print(f"{machine_description()}; torch {torch.__version__}; {args.arch} {size}px ({gflop:.2f} GFLOP/image), "
          f"batch {batch}; matmul peak fp32 {peak32:.0f} / bf16 {peak16:.0f} GFLOP/s; load {load:.1f}")
    torch.manual_seed(0)
    plain_model = build_backbone(args.arch).to(device).eval()
    fast_model = build_backbone(args.arch).to(device).to(memory_format=torch.channels_last).eval()
    if args.compile:
        fast_model = torch.compile(fast_model)
    images = torch.randn(batch, 3, size, size, device=device)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    def plain_step():
        with torch.no_grad():
            plain_model(images)

    def fast_step():
        with torch.inference_mode(), autocast(device, precision):
            fast_model(images_cl)

    warmup = (3 if args.compile else 1) * (5 if on_gpu else 1)
    measured = rates({"plain": plain_step, "fast": fast_step}, batch, warmup, steps, device)
    plain, fast = measured["plain"], measured["fast"]
    share_plain = 100 * plain * gflop / peak32
    share_fast = 100 * fast * gflop / (peak16 if precision == "bf16" else peak32)
    setting = f"{precision}, channels_last, inference_mode" + (", compile" if args.compile else "")
    print(f"plain fp32 eager: {plain:.1f} img/s ({share_plain:.0f}% of the fp32 matmul peak)")
    print(f"optimised ({setting}): {fast:.1f} img/s ({share_fast:.0f}% of the {precision} matmul peak)")
    print(f"ratio: {fast / plain:.2f}x")
    if not args.no_record:
        record(args.results, "backbone", BACKBONE_INTRO, BACKBONE_HEADER,
               f"| {datetime.date.today().isoformat()} | {machine_description()}, load {load:.1f} | "
               f"{torch.__version__} | {args.arch} {size}px{' (quick)' if args.quick else ''} | {batch} | "
               f"{peak32:.0f} / {peak16:.0f} | {plain:.1f} ({share_plain:.0f}%) | {fast:.1f} ({share_fast:.0f}%) | "
               f"{setting} | {fast / plain:.2f}x |")
        print(f"recorded in {args.results}")


def bench_probe(args):
    import shutil
    import tempfile

    from datasets.synthetic import make_checkpoint, make_cifar

    work = tempfile.mkdtemp(prefix="timecat-bench-")
    n_train, n_test, size = (200, 100, 32) if args.quick else (1000, 500, 64)
    arch = args.arch
    data = os.path.join(work, "data")
    make_cifar(data, "cifar10", n_train=n_train, n_test=n_test, noise=120)
    ckpts = [os.path.join(work, f"backbone{i}.pth") for i in range(2)]
    for seed, path in enumerate(ckpts):
        make_checkpoint(path, arch, "raw", seed=seed)
    common = ["--arch", arch, "--pretrained", *ckpts, "--data_path", data, "--img_size", str(size),
              "--batch_size", "64", "--workers", str(args.workers), "--print_freq", "1000", "--lr", "0.05"]
    if not args.subsets_only:
        bench_cache_and_sweep(args, work, common, arch, size, n_train, n_test)
    bench_subset_heads(args, work, common[common.index("--data_path"):], arch, size, n_train, n_test)
    shutil.rmtree(work, ignore_errors=True)


def bench_cache_and_sweep(args, work, common, arch, size, n_train, n_test):
    """Per-epoch against cached probe, and a K-value sweep as K runs against one K-head run."""
    import torch
    epochs = args.epochs or (2 if args.quick else 28)
    sweep_epochs = 1 if args.quick else 3
    k = args.k or (2 if args.quick else 6)
    # one short untimed run first: the first probe in a process also pays for oneDNN kernel creation
    timed_probe(common + ["--epochs", "1", "--data_rate", "0.1", "--dump_path", os.path.join(work, "warmup")])
    load = os.getloadavg()[0]
    setup = (f"cat2 {arch} {size}px, {n_train} train / {n_test} test, {epochs} epochs"
             f"{' (quick)' if args.quick else ''}")
    print(f"{machine_description()}; torch {torch.__version__}; {setup}; load {load:.1f}")
    reference, ref_acc = timed_probe(common + ["--epochs", str(epochs), "--precision", "fp32",
                                               "--dump_path", os.path.join(work, "per_epoch")])
    print(f"per-epoch (reference): {reference:.1f} s, top-1 {ref_acc:.1f}")
    cached, cached_acc = timed_probe(common + ["--epochs", str(epochs), "--feature_cache",
                                               os.path.join(work, "cache"), "--dump_path",
                                               os.path.join(work, "cached")])
    print(f"cached: {cached:.1f} s, top-1 {cached_acc:.1f} -> {reference / cached:.1f}x")
    wds = ["1e-5", "1e-4", "5e-4", "1e-3", "5e-3", "1e-2", "5e-2", "1e-1"][:k]
    sweep_common = common + ["--epochs", str(sweep_epochs), "--precision", "fp32"]
    separate = sum(timed_probe(sweep_common + ["--wd", wd, "--dump_path", os.path.join(work, f"wd{wd}")])[0]
                   for wd in wds)
    together = timed_probe(sweep_common + ["--wd", *wds, "--dump_path", os.path.join(work, "sweep")],
                           log_name=layout.SWEEP_LOG)[0]
    print(f"sweep of K={k} ({sweep_epochs} epochs each): {k} runs {separate:.1f} s, one {k}-head run "
          f"{together:.1f} s -> {separate / together:.1f}x (target {0.8 * k:.1f}x)")
    if not args.no_record:
        record(args.results, "probe", PROBE_INTRO, PROBE_HEADER,
               f"| {datetime.date.today().isoformat()} | {machine_description()}, load {load:.1f} | {setup} | "
               f"{reference:.1f} ({ref_acc:.1f}) | {cached:.1f} ({cached_acc:.1f}) | {reference / cached:.1f}x | {k} | "
               f"{separate:.1f} | {together:.1f} | {separate / together:.1f}x |")
        print(f"recorded in {args.results}")


def bench_subset_heads(args, work, data_args, arch, size, n_train, n_test):
    """--subsets all on 5 cached backbones (31 heads: 30 sub-concatenations and the full one) against one head,
    the same epochs and cached features; the backbones run once, before either timing."""
    from datasets.synthetic import make_checkpoint
    ckpts = [os.path.join(work, f"subsets{i}.pth") for i in range(5)]
    for seed, path in enumerate(ckpts):
        make_checkpoint(path, arch, "raw", seed=seed)
    epochs = 2 if args.quick else 10
    common = ["--arch", arch, "--pretrained", *ckpts, *data_args, "--feature_cache", os.path.join(work, "cache5"),
              "--precision", "fp32", "--epochs", str(epochs)]
    timed_probe(common + ["--epochs", "1", "--dump_path", os.path.join(work, "cache5_fill")])  # fills the cache
    load = os.getloadavg()[0]
    one, one_acc = timed_probe(common + ["--dump_path", os.path.join(work, "one_head")])
    head_log = os.path.join("wd5e-4_lr0.05", layout.PROBE_LOG)  # the sweep's first head's log
    many = {impl: timed_probe(common + ["--subsets", "all", "--head_impl", impl, "--dump_path",
                                        os.path.join(work, f"all_heads_{impl}")], log_name=head_log)
            for impl in ("separate", "fused")}
    setup = (f"cat5 {arch} {size}px cached, {n_train} train / {n_test} test, {epochs} epochs"
             f"{' (quick)' if args.quick else ''}")
    cells = []
    for impl, (seconds, acc) in many.items():
        print(f"--subsets all, 31 heads {impl}: {seconds:.1f} s against one head {one:.1f} s -> {seconds / one:.2f}x "
              f"(target <= 3x)")
        cells.append(f"{seconds:.1f} ({acc:.1f}) | {seconds / one:.2f}x")
    if not args.no_record:
        record(args.results, "probe subsets", SUBSETS_INTRO, SUBSETS_HEADER,
               f"| {datetime.date.today().isoformat()} | {machine_description()}, load {load:.1f} | {setup} | "
               f"{one:.1f} ({one_acc:.1f}) | {' | '.join(cells)} |")


CATN_CACHE_INTRO = [
    "The cat-n curve of 5 backbones as 31 separate cached probes (every non-empty subset, cat1 first, 1 epoch each)",
    "on generated CIFAR-format data, two ways in one run: *per backbone*, the feature cache of issue 22 (one",
    "folder shared by the 31 probes: each backbone extracted once per split, any concatenation assembled from the",
    "entries); *per concatenation*, each probe with a cache folder of its own, as the per-concatenation cache of",
    "before did (each concatenation extracted for itself). *extractions*: backbone entries computed (from the",
    "`feature cache: extracting` log lines, train and test); *passes*: passes over a split's images.",
]
CATN_CACHE_HEADER = ("| date | machine | setup | per backbone: extractions, passes, s "
                     "| per concatenation: extractions, passes, s | speed-up |")


def bench_catn_cache(args):
    """31 cached probes (the cat-n curve's subsets of 5 backbones) on one shared per-backbone cache against one
    cache per concatenation; extractions counted from the runs' logs."""
    import itertools
    import shutil
    import tempfile

    import torch

    from datasets.synthetic import make_checkpoint, make_cifar
    work = tempfile.mkdtemp(prefix="timecat-bench-")
    n_train, n_test, size = (200, 100, 32) if args.quick else (1000, 500, 64)
    data = os.path.join(work, "data")
    make_cifar(data, "cifar10", n_train=n_train, n_test=n_test, noise=120)
    ckpts = [os.path.join(work, f"backbone{i}.pth") for i in range(5)]
    for seed, path in enumerate(ckpts):
        make_checkpoint(path, args.arch, "raw", seed=seed)
    subsets = [c for k in range(1, 6) for c in itertools.combinations(range(5), k)]
    common = ["--arch", args.arch, "--data_path", data, "--img_size", str(size), "--batch_size", "64", "--workers",
              str(args.workers), "--print_freq", "1000", "--epochs", "1", "--precision", "fp32"]
    # one short untimed run first: the first probe in a process also pays for oneDNN kernel creation
    timed_probe(common + ["--pretrained", ckpts[0], "--data_rate", "0.1", "--dump_path", os.path.join(work, "w")])
    load = os.getloadavg()[0]
    setup = (f"31 probes of 5 {args.arch} {size}px, {n_train} train / {n_test} test, 1 epoch"
             f"{' (quick)' if args.quick else ''}")
    print(f"{machine_description()}; torch {torch.__version__}; {setup}; load {load:.1f}")
    totals = {}
    for way in ("per backbone", "per concatenation"):
        seconds = extractions = passes = 0
        for i, subset in enumerate(subsets):
            cache = os.path.join(work, "cache" if way == "per backbone" else f"cache{i}")
            dump = os.path.join(work, f"{way.split()[1]}{i}")
            seconds += timed_probe(common + ["--pretrained", *[ckpts[j] for j in subset], "--feature_cache", cache,
                                             "--dump_path", dump])[0]
            with open(os.path.join(dump, layout.PROBE_LOG)) as f:
                log = f.read()
            extractions += log.count("feature cache: extracting")
            passes += log.count("feature cache: computing")
        totals[way] = (extractions, passes, seconds)
        print(f"{way}: {extractions} backbone extractions in {passes} passes, {seconds:.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    ratio = totals["per concatenation"][2] / totals["per backbone"][2]
    print(f"-> per-backbone cache {ratio:.2f}x faster over the 31 probes")
    if not args.no_record:
        cells = " | ".join(f"{e}, {p}, {s:.1f}" for e, p, s in totals.values())
        record(args.results, "per-backbone feature cache", CATN_CACHE_INTRO, CATN_CACHE_HEADER,
               f"| {datetime.date.today().isoformat()} | {machine_description()}, load {load:.1f} | {setup} | "
               f"{cells} | {ratio:.2f}x |")
        print(f"recorded in {args.results}")


# ---------------------------------------------------------------- command line
def get_args_parser():
    common = ArgumentParser(add_help=False)  # options every section takes
    common.add_argument("--record", "--results", dest="results", default=RESULTS, help="markdown file the rows "
                        "are appended to (the published table: docs/benchmarks.md)")
    common.add_argument("--no_record", action="store_true", help="print only")
    p = ArgumentParser("tools/benchmark.py", description="Time-Cat speed benchmarks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sections = p.add_subparsers(dest="section", required=True)
    model = ArgumentParser(add_help=False)  # options of the sections that time a model on synthetic batches
    model.add_argument("--quick", action="store_true", help="smaller images or batches, 2-3 timed steps on CPU "
                       "(under a minute on 2 cores)")
    model.add_argument("--arch", default="resnet50", help="torchvision ResNet")
    model.add_argument("--img_size", type=int, default=None, help="default 224 (backbone --quick: 128)")
    model.add_argument("--batch_size", type=int, default=None, help="default: CPU 32 (quick: 16), GPU 256")
    model.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    model.add_argument("--compile", action="store_true", help="torch.compile the optimised path")
    for name, func, text in (("train", bench_train, "pretraining step: optimised path vs plain fp32 eager"),
                             ("backbone", bench_backbone, "frozen-backbone forward: optimised vs plain fp32 eager, "
                              "as a share of the measured matmul peak")):
        section = sections.add_parser(name, parents=[common, model], help=text,
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        section.set_defaults(func=func)
    probe = sections.add_parser("probe", parents=[common], help="complete probes: per-epoch vs cached, and a "
                                "K-value sweep as K runs vs one K-head run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    probe.add_argument("--quick", action="store_true", help="tiny data, 2 epochs, K=2 (seconds)")
    probe.add_argument("--arch", default="resnet18", help="backbone of the generated cat2 probe")
    probe.add_argument("--epochs", type=int, default=None, help="probe epochs (default 28, the reference)")
    probe.add_argument("--k", type=int, default=None, help="weight decays in the sweep (default 6; max 8)")
    probe.add_argument("--workers", type=int, default=0, help="data-loading processes")
    probe.add_argument("--subsets_only", action="store_true", help="only the cost of --subsets all (31 heads) "
                       "against one head, on 5 cached backbones")
    probe.set_defaults(func=bench_probe)
    catn = sections.add_parser("catn_cache", parents=[common], help="the cat-n curve of 5 backbones as 31 cached "
                               "probes: one per-backbone cache against a cache per concatenation",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    catn.add_argument("--quick", action="store_true", help="tiny data (200 / 100 images, 32 px)")
    catn.add_argument("--arch", default="resnet18", help="the 5 generated backbones' architecture")
    catn.add_argument("--workers", type=int, default=0, help="data-loading processes")
    catn.set_defaults(func=bench_catn_cache)
    add_pipeline_sections(sections, common)
    return p


def add_pipeline_sections(sections, common):
    """data, e2e and cost (tools/bench_pipeline.py)."""
    from arguments.common import DECODER_NAMES
    from tools import bench_pipeline
    data = sections.add_parser("data", parents=[common], help="JPEG decoding + transforms per core for each decoder "
                               "and transform pipeline, DataLoader workers scaling",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_argument("--quick", action="store_true", help="60 images, no probe (seconds)")
    data.add_argument("--images", type=int, default=None, help="generated JPEGs (default 400; quick 60)")
    data.add_argument("--img_size", type=int, default=None, help="crop (default 224, the reference)")
    data.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers to time")
    data.add_argument("--compare", type=int, default=16, help="images whose transformed tensors are compared with "
                      "the reference path's")
    data.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True, help="also a small probe "
                      "through each pipeline (top-1 effect)")
    data.set_defaults(func=bench_pipeline.bench_data)
    e2e = sections.add_parser("e2e", parents=[common], help="JPEG -> pretraining step and JPEG -> feature "
                              "extraction, next to the same on synthetic batches, in one run",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e2e.add_argument("--arch", default="resnet50", help="torchvision ResNet")
    e2e.add_argument("--img_size", type=int, default=None, help="default 224")
    e2e.add_argument("--batch_size", type=int, default=None, help="default: CPU 8, GPU 256")
    e2e.add_argument("--steps", type=int, default=None, help="timed steps (default: CPU 2, GPU 20)")
    e2e.add_argument("--images", type=int, default=None, help="generated JPEGs (default: enough for the steps)")
    e2e.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: as the scripts)")
    e2e.add_argument("--decoder", default="pil", choices=DECODER_NAMES, help="as the scripts' --decoder")
    e2e.add_argument("--fast_transforms", action="store_true", help="as the scripts' --fast_transforms")
    e2e.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="step and forward precision")
    e2e.add_argument("--tf32", action="store_true", help="GPU: TF32 matmuls and convolutions at fp32")
    e2e.add_argument("--compile", action="store_true", help="torch.compile the step and the forward (GPU: CUDA "
                     "graphs)")
    e2e.add_argument("--sf_foreach", action="store_true", help="the optimizer update in torch._foreach_* form")
    e2e.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    e2e.add_argument("--jpeg_dir", default=None, help="generate the JPEGs here once and keep them for later calls "
                     "(default: a temporary folder, removed)")
    e2e.set_defaults(func=bench_pipeline.bench_e2e)
    gpu = sections.add_parser("gpu_decode", parents=[common], help="torchvision.io.decode_jpeg in batches on the "
                              "GPU (nvJPEG), alone and with the train transform on the device",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gpu.add_argument("--quick", action="store_true", help="64 images")
    gpu.add_argument("--images", type=int, default=None, help="generated JPEGs (default 2048; quick 64)")
    gpu.add_argument("--batch_size", type=int, default=64, help="files per decode_jpeg call")
    gpu.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="cpu: the same code on the "
                     "CPU (a check that it runs)")
    gpu.set_defaults(func=bench_pipeline.bench_gpu_decode)
    cost = sections.add_parser("cost", help="Figure 2's cost from scratch (pretraining + probes) in GPU-hours, "
                               "from measured rates", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cost.add_argument("--train_rate", type=float, default=None, help="img/s of the pretraining step from JPEGs")
    cost.add_argument("--forward_rate", type=float, default=None, help="img/s of the frozen forward from JPEGs")
    cost.add_argument("--extraction_rate", type=float, default=None, help="img/s of the feature-cache extraction")
    cost.add_argument("--layout", default="per_wd", choices=sorted(bench_pipeline.PROBE_FORWARD_IMAGES),
                      help="the probes' layout (tools/submit.py lineareval --layout; reference: per_wd)")
    cost.add_argument("--device_name", default="GPU", help="the GPU the rates were measured on")
    cost.add_argument("--from_e2e", default=None, metavar="FILE", help="instead of the rates: each row of FILE's e2e "
                      "section (written by `benchmark.py e2e --record FILE`), with the reference and the cached "
                      "probe layouts")
    cost.set_defaults(func=bench_pipeline.bench_cost)


def main(args):
    print(CPU_RUNTIME.line)
    for name in ("img_size", "batch_size", "steps", "epochs", "k", "images", "compare"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if getattr(args, "k", None) and args.k > 8:
        raise UserError("--k: the sweep has 8 weight decays at most")
    args.func(args)


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
