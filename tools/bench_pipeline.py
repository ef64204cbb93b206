"""tools/benchmark.py's data-pipeline sections (imported by it; run them through it):

    python tools/benchmark.py data     # JPEG decode + transforms per core, per decoder; DataLoader workers 1 -> 2
    python tools/benchmark.py e2e      # JPEG -> pretraining step and JPEG -> feature extraction vs synthetic batches
    python tools/benchmark.py cost --train_rate R --forward_rate F   # Figure 2's cost from measured rates
    python tools/benchmark.py cost --from_e2e FILE   # the same from each e2e row recorded in FILE

The JPEGs are generated (datasets.synthetic.make_jpeg_folder: photo-like content, ImageNet-like sizes and
quality 90) in a temporary folder that is removed at the end; their size distribution is printed with the rates.
"""
import datetime
import os
import shutil
import tempfile
import time

from util.cli import UserError

# ---------------------------------------------------------------- Figure 2's cost from measured rates
# Pretraining: 5 runs of 450k steps at global batch 1024; the cat2/cat4/cat5 budgets (200k/100k/80k) are milestones
# of the same runs (tools/plan_timecat.py), so the runs are all the training. Each run also validates every 5,000
# steps: 50 refresh batches of 128 and the 50,000 validation images, forwards only.
PRETRAIN_RUNS, PRETRAIN_STEPS, GLOBAL_BATCH, EVAL_EVERY = 5, 450_000, 1024, 5000
EVAL_FORWARDS = 50 * 128 + 50_000
# Probes (docs/benchmarks.md "Cost of reproducing Figure 2"): ResNet50 forward-images of the whole grid per layout
PROBE_FORWARD_IMAGES = {"per_wd": 2_136e6, "one_pass": 857e6, "one_pass + feature_cache": 30.6e6}


def figure2_cost(train_rate, forward_rate, layout="per_wd", extraction_rate=None):
    """GPU-hours of Figure 2 from scratch on one GPU: (pretraining h, probes h, total h).
    train_rate: images/s of a pretraining step fed from JPEGs; forward_rate: images/s of the frozen forward (from
    JPEGs); extraction_rate: images/s of the feature-cache extraction (the cached layout's forwards)."""
    pretrain_images = PRETRAIN_RUNS * PRETRAIN_STEPS * GLOBAL_BATCH
    eval_images = PRETRAIN_RUNS * (PRETRAIN_STEPS // EVAL_EVERY) * EVAL_FORWARDS
    pretrain_h = (pretrain_images / train_rate + eval_images / forward_rate) / 3600
    rate = extraction_rate if layout.endswith("feature_cache") and extraction_rate else forward_rate
    probe_h = PROBE_FORWARD_IMAGES[layout] / rate / 3600
    return pretrain_h, probe_h, pretrain_h + probe_h


def cost_lines(rates, device_name):
    """The printed table: the default (fp32 step, reference probe layout) and each measured option."""
    lines = [f"Figure 2 from scratch on one {device_name} (hours; pretraining = {PRETRAIN_RUNS} x "
             f"{PRETRAIN_STEPS:,} steps x {GLOBAL_BATCH} images + validations; probes = forward-images of the grid):",
             "  formula: h = (runs*steps*batch / train_rate + eval_images / forward_rate + probe_forward_images / "
             "forward_or_extraction_rate) / 3600"]
    for name, (train_rate, forward_rate, layout, extraction) in rates.items():
        pre, probe, total = figure2_cost(train_rate, forward_rate, layout, extraction)
        lines.append(f"  {name}: train {train_rate:,.0f} img/s, forward {forward_rate:,.0f} img/s, probes {layout}: "
                     f"pretraining {pre:,.0f} h + probes {probe:,.1f} h = {total:,.0f} h")
    return lines


def e2e_rates(path):
    """The rates of each row of the e2e section of a benchmarks file (what `benchmark.py e2e --record` writes):
    a list of (row label, step from JPEGs img/s, extraction from JPEGs img/s)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UserError(f"--from_e2e: cannot read {path}: {exc}") from None
    columns = [c.strip() for c in E2E_HEADER.strip("|").split("|")]
    section, out = None, []
    for line in lines:
        if line.startswith("## "):
            section = line[3:].strip()
        elif section == "e2e" and line.startswith("| 20"):
            cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
            label = f"{cells['machine']}, {cells['model']}, batch {cells['batch']}, {cells['setting']}"
            out.append((label, float(cells["step JPEG img/s"]), float(cells["extraction JPEG img/s"])))
    if not out:
        raise UserError(f"--from_e2e: {path} has no row under '## e2e' (run `tools/benchmark.py e2e --record "
                        f"{path}` first)")
    return out


def bench_cost(args):
    if args.from_e2e:  # each measured row: the reference probes on its forward rate, and the cached layout
        for label, step, extraction in e2e_rates(args.from_e2e):
            rates = {"reference probes (per_wd)": (step, extraction, "per_wd", None),
                     "cached one-pass probes": (step, extraction, "one_pass + feature_cache", extraction)}
            print("\n".join(cost_lines(rates, label)))
        return
    if args.train_rate is None or args.forward_rate is None:
        raise UserError("cost: give --train_rate and --forward_rate, or --from_e2e FILE")
    rates = {"given rates": (args.train_rate, args.forward_rate, args.layout, args.extraction_rate)}
    print("\n".join(cost_lines(rates, args.device_name)))


# ---------------------------------------------------------------- the JPEG set
def generate_jpegs(root, n_images, processes=1):
    """make_jpeg_folder in `processes` parallel chunks (each its own seed); the list of files."""
    from concurrent.futures import ProcessPoolExecutor

    from datasets.synthetic import make_jpeg_folder
    chunks = max(1, min(processes, n_images // 50))
    sizes = [n_images // chunks + (i < n_images % chunks) for i in range(chunks)]
    if chunks == 1:
        return make_jpeg_folder(root, n_images)
    with ProcessPoolExecutor(chunks) as pool:
        list(pool.map(make_jpeg_folder, [os.path.join(root, f"part{i}") for i in range(chunks)], sizes,
                      [10] * chunks, range(chunks)))
    for split in ("train", "val"):  # one ImageFolder tree: part*/split/cK/ -> split/cK/
        for part in range(chunks):
            src = os.path.join(root, f"part{part}", split)
            for cls in os.listdir(src):
                os.makedirs(os.path.join(root, split, cls), exist_ok=True)
                for name in os.listdir(os.path.join(src, cls)):
                    os.rename(os.path.join(src, cls, name), os.path.join(root, split, cls, f"p{part}_{name}"))
    for part in range(chunks):
        shutil.rmtree(os.path.join(root, f"part{part}"))
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def describe_jpegs(paths):
    import numpy as np
    from PIL import Image
    sizes = np.array([Image.open(p).size for p in paths])
    kb = np.array([os.path.getsize(p) for p in paths]) / 1e3
    q = lambda a: f"p10 {np.percentile(a, 10):.0f} / median {np.median(a):.0f} / p90 {np.percentile(a, 90):.0f}"
    return (f"{len(paths)} JPEGs (quality 90, 4:2:0): width mean {sizes[:, 0].mean():.0f} ({q(sizes[:, 0])}), "
            f"height mean {sizes[:, 1].mean():.0f} ({q(sizes[:, 1])}) px; file size mean {kb.mean():.1f} KB "
            f"({q(kb)} KB); ImageNet: ~110 KB, ~400x350 px on average")


# ---------------------------------------------------------------- data: per-core rates of each path
def decode_paths(crop):
    """name -> (loader of a file, pipeline of datasets.transforms, reference-equal by construction)."""
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg, read_file

    from datasets.images import image_loader_for, load_rgb

    def pil_draft(size):
        def load(path):  # reduce-on-decode: the largest DCT scaling that keeps both sides >= size
            with open(path, "rb") as f:
                img = Image.open(f)
                img.draft("RGB", (size, size))
                return img.convert("RGB")
        return load

    def torchvision_array(path):
        return decode_jpeg(read_file(path)).permute(1, 2, 0).contiguous().numpy()

    def torchvision_tensor(path):
        return decode_jpeg(read_file(path))

    def turbo_scaled(path, factor=2):  # libjpeg-turbo's DCT scaling: decode at 1/factor of each side
        import simplejpeg
        with open(path, "rb") as f:
            data = f.read()
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // factor),
                                      min_width=-(-width // factor))

    torch.set_num_threads(1)
    turbo = image_loader_for("turbo") if has_simplejpeg() else None  # --decoder turbo's loader: uint8 arrays
    paths = {
        "pil (reference)": (load_rgb, "reference", True),
        "turbo (--decoder turbo)": (turbo, "turbo", True),
        "torchvision.io.decode_jpeg cpu + turbo transforms": (torchvision_array, "turbo", True),
        "pil draft (reduce on decode)": (pil_draft(crop), "reference", False),
        "turbo + uint8 transforms (--fast_transforms)": (turbo, "fast", False),
        "torchvision.io.decode_jpeg cpu + uint8 transforms": (torchvision_tensor, "fast", False),
        "turbo at 1/2 scale (DCT scaling) + uint8 transforms": (turbo_scaled, "fast", False),
    }
    # without simplejpeg, the rows that need it (named "turbo ...") are left out; the others keep their order
    return {name: entry for name, entry in paths.items() if turbo is not None or not name.startswith("turbo")}


def reference_equal_floor(crop):
    """simplejpeg's decode then PIL's crop + resize of RandomResizedCrop's box, nothing else: the work that any
    path bit-identical to the reference does (None without simplejpeg)."""
    if not has_simplejpeg():
        return None
    import torch
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    from datasets.images import image_loader_for
    load = image_loader_for("turbo")

    def floor(path):
        pixels = load(path)
        top, left, height, width = T.RandomResizedCrop.get_params(torch.from_numpy(pixels).permute(2, 0, 1),
                                                                  (0.08, 1.0), (3 / 4, 4 / 3))
        return F.resize(Image.fromarray(pixels[top:top + height, left:left + width]), [crop, crop],
                        T.InterpolationMode.BILINEAR, antialias=True)
    return floor


def has_simplejpeg():
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        print("simplejpeg is not installed (`uv sync --extra fastjpeg`): the --decoder turbo and --fast_transforms "
              "rows are skipped")
        return False
    return True


def per_core_rates(paths, fns, rounds=3):
    """Images per CPU-second of each fn over the files, in this process with one thread: images / the CPU time
    of its calls (time.process_time), so that other jobs sharing the cores do not count as this path's time (the
    rate of one core given to it alone). The functions take turns on every file, in an order that rotates from
    file to file, so that a load that changes during the run weighs on all of them alike; the best of `rounds`
    passes."""
    names = list(fns)
    best = dict.fromkeys(names, 0.0)
    for name in names:
        fns[name](paths[0])
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for i, p in enumerate(paths):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.process_time()
                fns[name](p)
                spent[name] += time.process_time() - start
        for name in names:
            best[name] = max(best[name], len(paths) / spent[name])
    return best


def transformed(paths, load, transform, seed=0):
    import torch
    out = []
    for i, p in enumerate(paths):
        torch.manual_seed(seed + i)  # each image its own draw, as SeededSamples does
        out.append(transform(load(p)))
    return torch.stack(out)


def loader_rate(root, pipeline, decoder, workers, batch_size, crop):
    """Images/s of a DataLoader over the train split with the train transform, once its workers are up: passes
    over the files (persistent workers) until 8 batches per worker are timed, so that many workers on few files
    are still measured at their steady rate."""
    from datasets import WithTransform, build_dataset, image_loader
    from datasets.transforms import build_transform
    dataset, _ = build_dataset("imagefolder", root, "train", decoder=decoder)
    data = WithTransform(dataset, build_transform("imagenet", "eval", True, crop, pipeline))
    loader = image_loader(data, batch_size=batch_size, shuffle=False, num_workers=workers, prefetch_factor=4,
                          persistent_workers=True)
    next(iter(loader))  # the workers start
    target = max(8 * workers, len(loader) - 1)
    start, count, batches = time.perf_counter(), 0, 0
    while batches < target:
        for images, _ in loader:
            count, batches = count + len(images), batches + 1
            if batches == target:
                break
    rate = count / (time.perf_counter() - start)
    del loader
    return rate


DATA_INTRO = [
    "Images per CPU-second (one process, one thread: images / its CPU time, so other jobs on a shared machine do",
    "not count; the paths take turns on every file, so a changing load weighs on all alike) of JPEG decoding alone",
    "and of decoding + the",
    "reference transforms (train: RandomResizedCrop 224 + flip + ToTensor + Normalize; test: Resize 256 + CenterCrop",
    "224), for each decoder, on generated ImageNet-like JPEGs (sizes and file sizes in the reading below); *max diff*",
    "is the largest absolute difference of the transformed tensor from the reference path's (same seeds);",
    "*x* = rate / the reference's rate in the same run. Workers: a DataLoader (batch 32) over the same files,",
    "wall time once its workers are up (since 2026-12-03 noon: 8 batches per worker, passes repeated as needed).",
]
DATA_HEADER = ("| date | machine | path | decode img/s | x | decode + train img/s | x | decode + test img/s | x "
               "| max diff train / test | DataLoader 1 -> 2 workers img/s |")


def bench_data(args):
    import torch

    from datasets.transforms import build_transform
    from tools.bench_common import machine_description, record

    work = tempfile.mkdtemp(prefix="timecat-data-")
    try:
        n = args.images or (60 if args.quick else 400)
        crop = args.img_size or 224
        paths = generate_jpegs(work, n, processes=len(os.sched_getaffinity(0)))
        jpegs = describe_jpegs(paths)
        load = os.getloadavg()[0]
        print(f"{machine_description()}; torch {torch.__version__}; {jpegs}; load average {load:.1f}")
        results, reference, fns = {}, {}, {}
        paths_by_name = decode_paths(crop)  # once: it checks for simplejpeg (and says when it is missing)
        for name, (loader, pipeline, _) in paths_by_name.items():
            train_tf = build_transform("imagenet", "eval", True, crop, pipeline)
            test_tf = build_transform("imagenet", "eval", False, crop, pipeline)
            fns[name, "decode"] = loader
            fns[name, "train"] = lambda p, load=loader, tf=train_tf: tf(load(p))
            fns[name, "test"] = lambda p, load=loader, tf=test_tf: tf(load(p))
        floor = reference_equal_floor(crop)
        if floor:  # not a row: what a reference-equal path cannot avoid (libjpeg-turbo's decode, PIL's resampling)
            fns["floor", "train"] = floor
        rates = per_core_rates(paths, fns, rounds=2 if args.quick else 3)
        for name, (loader, pipeline, _) in paths_by_name.items():
            train_tf = build_transform("imagenet", "eval", True, crop, pipeline)
            test_tf = build_transform("imagenet", "eval", False, crop, pipeline)
            row = {part: rates[name, part] for part in ("decode", "train", "test")}
            sample = paths[:args.compare]
            outputs = (transformed(sample, loader, train_tf), transformed(sample, loader, test_tf))
            if not reference:
                reference = dict(train=outputs[0], test=outputs[1])
            row["diff"] = tuple(float((out - reference[k]).abs().max()) for out, k in zip(outputs, ("train", "test")))
            results[name] = row
            print(f"{name}: decode {row['decode']:.0f} img/s, + train transform {row['train']:.0f}, + test transform "
                  f"{row['test']:.0f}; max abs diff from the reference: train {row['diff'][0]:.3g}, test "
                  f"{row['diff'][1]:.3g}")
        scaling = {}
        for name, pipeline, decoder in (("pil (reference)", "reference", "pil"), ("turbo (--decoder turbo)",
                                        "turbo", "turbo"), ("turbo + uint8 transforms (--fast_transforms)", "fast",
                                                            "turbo")):
            if name not in results:
                continue
            scaling[name] = [loader_rate(work, pipeline, decoder, w, 32, crop) for w in args.workers]
            counts = " -> ".join(f"{w} worker(s) {r:.0f} img/s" for w, r in zip(args.workers, scaling[name]))
            print(f"{name}: DataLoader {counts}")
        base = results["pil (reference)"]
        for name, row in results.items():
            print(f"  {name}: train x{row['train'] / base['train']:.2f}, test x{row['test'] / base['test']:.2f} "
                  f"the reference per core; its decoding alone x{row['decode'] / base['train']:.2f} (the ceiling of "
                  f"any path that decodes this way, were its transforms free)")
        if floor:
            print(f"reference-equal floor: simplejpeg's decode + PIL's crop and resize alone (no tensor conversion) "
                  f"run at x{rates['floor', 'train'] / base['train']:.2f} the reference's decode + train transform: "
                  f"the ceiling of any path that keeps the reference's pixels with Pillow's resampling")
        top1 = probe_effect(work, crop, args) if args.probe else {}
        if not args.no_record:
            date = datetime.date.today().isoformat()
            for name, row in results.items():
                workers = " -> ".join(f"{r:.0f}" for r in scaling.get(name, [])) or "–"
                record(args.results, "data", DATA_INTRO + [f"Files: {jpegs}."], DATA_HEADER,
                       f"| {date} | {machine_description()}, load {load:.1f} | {name}"
                       f"{f' (probe top-1 {top1[name]:.1f})' if name in top1 else ''} | {row['decode']:.0f} | "
                       f"{row['decode'] / base['decode']:.2f} | {row['train']:.0f} | "
                       f"{row['train'] / base['train']:.2f} | {row['test']:.0f} | {row['test'] / base['test']:.2f} | "
                       f"{row['diff'][0]:.3g} / {row['diff'][1]:.3g} | {workers} |")
            print(f"recorded in {args.results}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def probe_effect(root, crop, args):
    """Final top-1 of the same small per-epoch probe (a random ResNet18, the generated imagefolder data) read
    through each pipeline: reference, --decoder turbo, --fast_transforms."""
    from datasets.synthetic import make_checkpoint
    from tools.bench_common import timed_probe
    ckpt = os.path.join(root, "backbone.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=0)
    size = 64 if args.quick else 96
    common = ["--arch", "resnet18", "--pretrained", ckpt, "--data_name", "imagefolder", "--data_path", root,
              "--img_size", str(size), "--batch_size", "32", "--workers", "1", "--epochs", "2" if args.quick else "4",
              "--lr", "0.05", "--print_freq", "1000", "--precision", "fp32"]
    out = {}
    for name, extra in (("pil (reference)", []), ("turbo (--decoder turbo)", ["--decoder", "turbo"]),
                        ("turbo + uint8 transforms (--fast_transforms)", ["--decoder", "turbo", "--fast_transforms"])):
        if extra and not has_simplejpeg():
            break
        seconds, top1 = timed_probe(common + extra + ["--dump_path", os.path.join(root, "probe", str(len(out)))])
        if top1 is None:
            raise UserError(f"the probe through {name} did not finish (stopped by a signal?)")
        out[name] = top1
        print(f"probe ({size} px, resnet18, random weights) through {name}: top-1 {top1:.1f} ({seconds:.1f} s)")
    return out


# ---------------------------------------------------------------- e2e: JPEG -> step and JPEG -> features
E2E_INTRO = [
    "Images per second of a pretraining step (main_pretrain.py's train_step: forward, loss, backward, schedule-free",
    "AdamW) and of the frozen forward of a feature-cache extraction, each fed two ways in one run on one machine:",
    "synthetic batches already in (pinned) memory, and generated ImageNet-like JPEGs through the real loader",
    "(DataLoader workers, the train / test transform). *JPEG / synthetic* is the share of the step rate the data",
    "pipeline lets through (target >= 90%).",
]
E2E_HEADER = ("| date | machine | torch | model | batch | setting | workers | step synthetic img/s | step JPEG img/s "
              "| JPEG / synthetic | forward synthetic img/s | extraction JPEG img/s | JPEG / synthetic |")


def bench_e2e(args):
    import argparse

    import torch

    import engine_pretrain
    from arguments import pretrain as pretrain_args
    from datasets import WithTransform, build_dataset, image_loader
    from datasets.transforms import build_transform, pipeline_of
    from engine import autocast, compile_module
    from models import build_backbone
    from tools.bench_common import images_per_second, machine_description, record
    from util.cpu_runtime import default_workers

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    size = args.img_size or 224
    batch = args.batch_size or (256 if on_gpu else 8)
    steps = args.steps or (20 if on_gpu else 2)
    warmup = (3 if args.compile else 1) * (5 if on_gpu else 1)
    workers = args.workers or default_workers()
    n_images = args.images or max(2 * batch, (batch * (steps + warmup + 4)) // 2 if on_gpu else 3 * batch)
    work = args.jpeg_dir or tempfile.mkdtemp(prefix="timecat-e2e-")
    try:
        start = time.perf_counter()
        if args.jpeg_dir and os.path.isdir(os.path.join(work, "train")):  # generated by an earlier call
            paths = sorted(os.path.join(d, f) for d, _, files in os.walk(work) for f in files)
        else:
            paths = generate_jpegs(work, n_images, processes=len(os.sched_getaffinity(0)))
        print(f"{describe_jpegs(paths)} (ready in {time.perf_counter() - start:.0f} s)")
        load = os.getloadavg()[0]
        pipeline = pipeline_of(args.decoder, args.fast_transforms)
        setting = (f"{args.precision}{' TF32' if on_gpu and args.tf32 and args.precision == 'fp32' else ''}, "
                   f"channels_last, {pipeline} pipeline" + (", compile" if args.compile else ""))
        print(f"{machine_description()}; torch {torch.__version__}; {args.arch} {size}px, batch {batch}, {setting}; "
              f"{workers} workers; {warmup} warm-up + {steps} timed steps; load average {load:.1f}")

        # the pretraining step: synthetic batch, then the JPEG loader (the same model and optimizer code)
        recipe = pretrain_args.get_args_parser().parse_args(["--arch", args.arch, "--global_batch", str(batch)])
        pretrain_args.check_args(recipe)
        recipe.accum_steps, recipe.precision = 1, args.precision
        recipe.sf_foreach = args.sf_foreach
        torch.manual_seed(0)
        model = build_backbone(args.arch, 1000).to(device).to(memory_format=torch.channels_last)
        optimizer = engine_pretrain.build_optimizer(model, recipe)
        train_model = compile_module(model, device) if args.compile else model
        model.train()
        optimizer.train()
        images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
        pinned = (images.pin_memory(), labels.pin_memory()) if on_gpu else (images, labels)

        class Synthetic:
            def __next__(self):
                return pinned

        def step_with(batches, train_model=train_model, optimizer=optimizer):
            return lambda: engine_pretrain.train_step(train_model, optimizer, batches, recipe, device, False)

        step_synthetic = images_per_second(step_with(Synthetic()), warmup, steps, batch, device)
        print(f"pretraining step, synthetic batches: {step_synthetic:.1f} img/s")
        train, _ = build_dataset("imagefolder", work, "train", download=False, decoder=args.decoder)
        seeded = engine_pretrain.SeededSamples(WithTransform(train, build_transform("imagenet", "eval", True, size,
                                                                                    pipeline)))
        sampler = engine_pretrain.TrainBatches(len(seeded), 0, batch, batch, 1, 0)
        loader = image_loader(seeded, batch_sampler=sampler, num_workers=workers, pin_memory=on_gpu,
                              prefetch_factor=4, persistent_workers=True)
        batches = iter(loader)
        step_jpeg = images_per_second(step_with(batches), warmup, steps, batch, device)
        del batches, loader
        print(f"pretraining step, JPEGs through {workers} workers: {step_jpeg:.1f} img/s "
              f"({100 * step_jpeg / step_synthetic:.0f}% of synthetic)")

        # the frozen forward of a feature extraction: synthetic, then JPEGs with the test transform
        del model, train_model, optimizer
        torch.manual_seed(0)
        encoder = build_backbone(args.arch).to(device).to(memory_format=torch.channels_last).eval()
        forward_model = compile_module(encoder, device) if args.compile else encoder
        fixed = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

        def forward(images):
            with torch.inference_mode(), autocast(device, args.precision):
                return forward_model(images)

        forward_synthetic = images_per_second(lambda: forward(fixed), warmup, steps, batch, device)
        print(f"frozen forward, synthetic batches: {forward_synthetic:.1f} img/s")
        # the training split with the test transform, as the cache's plain training features are computed
        plain = WithTransform(train, build_transform("imagenet", "eval", False, size, pipeline))
        loader = image_loader(plain, batch_size=batch, num_workers=workers, pin_memory=on_gpu, prefetch_factor=4,
                              drop_last=True, persistent_workers=True)
        extraction_jpeg = extraction_rate(loader, forward, device, warmup, steps, batch)
        print(f"feature extraction from JPEGs through {workers} workers: {extraction_jpeg:.1f} img/s "
              f"({100 * extraction_jpeg / forward_synthetic:.0f}% of synthetic)")
        name = machine_description()
        print("\n".join(cost_lines({"measured here": (step_jpeg, extraction_jpeg, "per_wd", None),
                                    "measured here, cached probes": (step_jpeg, extraction_jpeg,
                                                                     "one_pass + feature_cache", extraction_jpeg)},
                                   name)))
        if not args.no_record:
            record(args.results, "e2e", E2E_INTRO, E2E_HEADER,
                   f"| {datetime.date.today().isoformat()} | {name}, load {load:.1f} | {torch.__version__} | "
                   f"{args.arch} {size}px | {batch} | {setting} | {workers} | {step_synthetic:.1f} | {step_jpeg:.1f} | "
                   f"{100 * step_jpeg / step_synthetic:.0f}% | {forward_synthetic:.1f} | {extraction_jpeg:.1f} | "
                   f"{100 * extraction_jpeg / forward_synthetic:.0f}% |")
            print(f"recorded in {args.results}")
        return argparse.Namespace(step_synthetic=step_synthetic, step_jpeg=step_jpeg,
                                  forward_synthetic=forward_synthetic, extraction_jpeg=extraction_jpeg)
    finally:
        if not args.jpeg_dir:  # a given folder is kept for the next call
            shutil.rmtree(work, ignore_errors=True)


def extraction_rate(loader, forward, device, warmup, steps, batch):
    """Images/s of reading batches from the loader, moving them to the device and forwarding them (features
    back on the host, as feature_cache.py stores them), passes over the loader repeated until `steps` batches."""
    from engine import to_device
    from tools.bench_common import images_per_second

    def endless():
        while True:
            yield from loader

    batches = endless()

    def step():
        images, labels = next(batches)
        images, _ = to_device(images, labels, device)
        forward(images).float().cpu()

    return images_per_second(step, warmup, steps, batch, device)


# ---------------------------------------------------------------- decode on the GPU (nvJPEG through torchvision)
GPU_DECODE_INTRO = [
    "Images per second of torchvision.io.decode_jpeg on a device in batches (nvJPEG on a GPU; a list of files per",
    "call), alone and followed by the train transform on the device (RandomResizedCrop 224 + flip per image, then",
    "one batched float conversion and Normalize), against the CPU reference path per core in the same run.",
]
GPU_DECODE_HEADER = ("| date | machine | torch | device | batch | decode img/s | decode + train transform img/s "
                     "| CPU reference per core img/s |")


def bench_gpu_decode(args):
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from datasets.images import load_rgb
    from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
    from tools.bench_common import machine_description, record, synchronize

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    work = tempfile.mkdtemp(prefix="timecat-gpudecode-")
    try:
        n = args.images or (64 if args.quick else 2048)
        paths = generate_jpegs(work, n, processes=len(os.sched_getaffinity(0)))
        print(describe_jpegs(paths))
        data = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in paths]
        batch = min(args.batch_size, n)
        crop = v2.RandomResizedCrop(224, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

        def decode(chunk):
            return decode_jpeg(chunk, device=device)

        def decode_transform(chunk):
            images = [crop(img) for img in decode(chunk)]
            images = [img.flip(-1) if torch.rand(1) < 0.5 else img for img in images]
            return (torch.stack(images).float() - mean) / std

        def rate(fn, rounds=2):
            fn(data[:batch])
            synchronize(device)
            best = 0.0
            for _ in range(rounds):
                start = time.perf_counter()
                for i in range(0, n - batch + 1, batch):
                    fn(data[i:i + batch])
                synchronize(device)
                best = max(best, (n // batch) * batch / (time.perf_counter() - start))
            return best

        decode_rate, train_rate = rate(decode), rate(decode_transform)
        reference = build_transform("imagenet", "eval", True, 224)
        sample = paths[:min(n, 200)]
        start = time.perf_counter()
        for p in sample:
            reference(load_rgb(p))
        cpu_rate = len(sample) / (time.perf_counter() - start)
        print(f"decode_jpeg on {device} (batches of {batch}): decode {decode_rate:.0f} img/s, decode + train transform "
              f"{train_rate:.0f} img/s; CPU reference path {cpu_rate:.0f} img/s per core "
              f"({train_rate / cpu_rate:.1f} cores' worth)")
        if not args.no_record:
            record(args.results, "gpu decode", GPU_DECODE_INTRO, GPU_DECODE_HEADER,
                   f"| {datetime.date.today().isoformat()} | {machine_description()} | {torch.__version__} | "
                   f"{device} | {batch} | {decode_rate:.0f} | {train_rate:.0f} | {cpu_rate:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
