"""Why does concatenation help? Look at the cached features of a concatenated encoder.

    python tools/analyze_features.py CACHE_DIR                       # the test-split concatenation of a --feature_cache
    python tools/analyze_features.py CACHE_DIR/cat-<hash>.json --head RUN/best.pth.tar --knn 20

For the backbones of one concatenation in a feature cache (main_linear_probe.py --feature_cache: one entry per
backbone, and a cat-<hash>.json record of each concatenation a probe loaded, its entries in order; an entry folder
of the per-concatenation cache of before issue 22 is read too) it reports:
- linear CKA between every pair of backbones (table and heat map PNG): 1 = the same features up to a rotation and
  scale, near 0 = unrelated features;
- the effective rank (participation ratio of the covariance eigenvalues, (sum l)^2 / sum l^2) of each
  backbone's features and of the concatenation: how many directions the features really use;
- with --head, the per-backbone weight share of a trained probe head (mean |W| over each backbone's columns,
  the reference's feature_importance, and the same normalised);
- with --knn K, the k-nearest-neighbour accuracy (cosine similarity, DINO's exp(sim/T) votes) of the test
  entry against the training entry of the same configuration in the same cache.
--stale lists the entry folders of the per-concatenation cache of before (never read by the probe: delete them).

Rows are streamed in --chunk row blocks from the memory-mapped fp16 files: memory is bounded by the D x D
statistics, 12 D^2 bytes (1.26 GB for cat5 ResNet50s, D = 10,240), plus one chunk of rows (4 x chunk x D bytes);
the compute is 2 N D^2 flop (N rows), about 2 TFLOP for CIFAR's test set at cat5: seconds on a GPU, a minute or
two on a 2-core CPU. kNN keeps the normalised test features (4 x N_test x D bytes) and one chunk x chunk block.

Computing features from checkpoints and a dataset is the probe's job (it owns the data pipeline and the cache
key): run main_linear_probe.py --feature_cache DIR once (--epochs 1 is enough), then point this tool at DIR.
"""
import argparse
import json
import os

# numpy, torch and the analysis modules are imported inside the functions that use them,
# so that --help answers without loading them
from util.cli import ArgumentParser, UserError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what may differ between the training and test entries of one configuration
SPLIT_KEYS = ("split", "view", "length", "data_rate", "seed", "subset")  # subset: training entries only


# ---------------------------------------------------------------- cache entries
def read_entry(directory):
    """(key, features memory map, labels) of a complete entry, or None when the folder is no entry."""
    import numpy as np
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
        key = manifest["key"]
        for name, meta in manifest["files"].items():
            if os.path.getsize(os.path.join(directory, name)) != meta["size"]:
                raise UserError(f"{os.path.join(directory, name)} is truncated: rerun the probe to rebuild it")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # copy-on-write, as FeatureCache.load's: the file is never modified, and torch.from_numpy takes the map as it is
    return key, np.load(os.path.join(directory, "features.npy"), mmap_mode="c"), \
        np.load(os.path.join(directory, "labels.npy"))


def read_concatenation(path):
    """(key, features, labels) of a cat-<hash>.json record whose entries are all complete, or None. The key: the
    record's (archs, checkpoints, dims, split, view) and its first entry's data fields."""
    import torch

    from feature_cache import Concatenation  # the probe's lazy N x sum(D_b) view: row blocks, never the whole maps
    try:
        with open(path) as f:
            record = json.load(f)
        root = os.path.dirname(os.path.abspath(path))
        entries = [read_entry(os.path.join(root, name)) for name in record["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not entries or any(e is None for e in entries):
        return None
    first = entries[0][0]
    key = {**{f: first.get(f) for f in ("data_name", "data_path", "data_rate", "length", "seed", "subset",
                                        "tf_name", "img_size", "precision")},
           **{f: record[f] for f in ("version", "split", "view", "arch", "checkpoints", "dims")}}
    return key, Concatenation([torch.from_numpy(e[1]) for e in entries]), entries[0][2]


def read_any(path):
    """A concatenation record, or an entry folder (one backbone; or a whole concatenation of before)."""
    return read_concatenation(path) if path.endswith(".json") else read_entry(path)


def entries_in(root):
    """{path: key} of every concatenation record, and of every complete entry of before issue 22 (one per
    concatenation), directly below a cache root."""
    found = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        key = None
        if name.startswith("cat-") and name.endswith(".json"):
            entry = read_concatenation(path)
            key = None if entry is None else entry[0]
        elif os.path.isdir(path):
            key = version1_key(path)
        if key is not None:
            found[path] = key
    return found


def version1_key(directory):
    """The key of a complete entry folder of before issue 22 (key version 1: one per concatenation), or None."""
    entry = read_entry(directory)
    return entry[0] if entry is not None and entry[0].get("version") == 1 else None


def stale_entries(root):
    """The entry folders of the per-concatenation cache of before issue 22 (key version 1) below a cache root."""
    return [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))
            and version1_key(os.path.join(root, d)) is not None]


def archs_of(key):
    arch = key.get("arch", [])
    return [arch] if isinstance(arch, str) else arch  # a per-backbone entry's key holds one


def checkpoint_names(key):
    """The file names of the key's checkpoints (records list them as {"path": ...} or as plain paths)."""
    return [os.path.basename(c["path"] if isinstance(c, dict) else str(c)) for c in key.get("checkpoints", [])]


def describe(key):
    names = checkpoint_names(key)
    return f"{key.get('data_name')} {key.get('split')} view {key.get('view')}, {len(archs_of(key))} x " \
           f"{'/'.join(sorted(set(archs_of(key))))}{': ' + ' '.join(names) if names else ''}"


def choose_entry(path, split):
    """What to analyse: `path` itself (a concatenation record or an entry folder), or the one plain
    concatenation of `split` below a cache root."""
    if read_any(path) is not None:
        return path
    if not os.path.isdir(path):
        raise UserError(f"{path} is neither a feature-cache entry nor a cache folder")
    plain = {d: k for d, k in entries_in(path).items() if k.get("split") == split and k.get("view") == -1}
    if len(plain) == 1:
        return next(iter(plain))
    if not plain:
        raise UserError(f"no complete {split} entry in {path}: run main_linear_probe.py with --feature_cache {path}")
    listing = "; ".join(f"{os.path.basename(d)} ({describe(k)})" for d, k in plain.items())
    raise UserError(f"{len(plain)} {split} concatenations in {path} ({listing}): pass the one to analyse "
                    f"(its cat-<hash>.json record, or an entry folder)")


def sibling_entry(directory, key, split):
    """The plain concatenation (or entry) of `split` with the same backbones, data and transform, in the same
    cache."""
    same = lambda other: all(other.get(f) == key.get(f) for f in set(key) | set(other) if f not in SPLIT_KEYS)
    for other_dir, other in entries_in(os.path.dirname(os.path.abspath(directory))).items():
        if other.get("split") == split and other.get("view") == -1 and same(other):
            return other_dir
    raise UserError(f"--knn needs the {split} entry of the same configuration in "
                    f"{os.path.dirname(os.path.abspath(directory))}: run the probe with --feature_cache there first")


def entry_dims(key, width):
    """Per-backbone widths: the key's 'dims' where the cache records them, a single backbone's width, else from
    the archs."""
    from analysis.features import backbone_dims
    dims, archs = key.get("dims"), archs_of(key)
    if isinstance(key.get("arch"), str):
        return [width]
    return dims if isinstance(dims, list) and len(dims) == len(archs) else backbone_dims(archs)


# ---------------------------------------------------------------- reports
def backbone_names(key):
    archs, names = archs_of(key), checkpoint_names(key)
    return [f"{i}: {arch} {name}".strip() for i, (arch, name) in
            enumerate(zip(archs, names + [""] * (len(archs) - len(names))))]


def print_spectrum(spectrum, names):
    n = len(names)
    print(f"\nLinear CKA between backbones ({spectrum.rows} feature rows):\n")
    print("| backbone | " + " | ".join(str(i) for i in range(n)) + " |")
    print("|---" * (n + 1) + "|")
    for i, name in enumerate(names):
        print(f"| {name} | " + " | ".join(f"{float(spectrum.cka[i, j]):.3f}" for j in range(n)) + " |")
    off = [float(spectrum.cka[i, j]) for i in range(n) for j in range(n) if i != j]
    if off:
        print(f"\nmean CKA between different backbones: {sum(off) / len(off):.3f}")
    print("\nEffective rank (participation ratio of the covariance spectrum):")
    for name, rank in zip(names, spectrum.block_ranks):
        print(f"  {name}: {rank:.1f}")
    print(f"  concatenation: {spectrum.concat_rank:.1f} (sum of the backbones: {sum(spectrum.block_ranks):.1f})")


def head_report(path, dims, names):
    """{head name: WeightShare} of every Linear acting on the concatenation in a probe checkpoint."""
    from analysis.features import head_weights, weight_share
    from util.checkpoint import load_file
    weights = head_weights(load_file(path, "head checkpoint"), sum(dims))
    if not weights:
        raise UserError(f"{path} holds no Linear weight acting on {sum(dims)}-d features: is it a probe "
                        f"checkpoint (best.pth.tar, checkpoint.pth.tar) of these backbones?")
    shares = {name: weight_share(w.float(), dims) for name, w in weights.items()}
    print(f"\nWeight share of the trained head(s) in {path} (mean |W| per backbone; share):")
    for name, share in shares.items():
        cells = ", ".join(f"{n.split(':')[0]}: {m:.4f} ({s:.1%})" for n, m, s in zip(names, *share))
        print(f"  {name}: {cells}")
    return shares


def write_heatmap(path, cka, names):
    """Heat map of the CKA matrix; False when matplotlib is missing."""
    from util.logs import writing
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 0.8 + 0.6 * n))
    image = ax.imshow(cka.numpy(), vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(cka[i, j]):.2f}", ha="center", va="center", fontsize=8,
                    color="black" if cka[i, j] > 0.6 else "white")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("backbone")
    ax.set_ylabel("backbone")
    ax.set_title("linear CKA")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main
def get_args_parser():
    p = ArgumentParser("tools/analyze_features.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features", help="a concatenation record (cat-<hash>.json) or entry folder of a feature cache, "
                   "or a --feature_cache folder holding one plain concatenation of --split")
    p.add_argument("--stale", action="store_true", help="list the entry folders of the per-concatenation cache of "
                   "before issue 22 in the FEATURES cache folder (never read by the probe; delete them) and exit")
    p.add_argument("--split", default="test", choices=["test", "train"], help="split analysed when FEATURES is "
                   "a cache folder (default: test, as the probe's reported numbers)")
    p.add_argument("--head", nargs="+", default=[], help="probe checkpoint(s) (best.pth.tar or "
                   "checkpoint.pth.tar) whose Linear weights give the per-backbone weight share")
    p.add_argument("--knn", type=int, default=0, metavar="K", help="also the K-nearest-neighbour accuracy of the "
                   "test entry against the training entry (recommended and DINO's: 20; default: off)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN votes weigh exp(similarity / T) "
                   "(recommended and DINO's: 0.07; the reference protocol has no kNN)")
    p.add_argument("--chunk", type=int, default=4096, help="feature rows read at a time (default: "
                   "4096; memory 4 x chunk x D bytes per block, larger is faster until it no longer fits)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="folder of cka.png and analysis.json (default: "
                   "results/analysis/<entry folder name>)")
    return p


def resolve_device(name):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def knn_report(entry, key, features, labels, args, device):
    import torch

    from analysis.knn import knn_accuracy, knn_log_line
    train_dir = entry if key.get("split") == "train" else sibling_entry(entry, key, "train")
    test_dir = entry if key.get("split") == "test" else sibling_entry(entry, key, "test")
    (_, train_f, train_l), (_, test_f, test_l) = read_any(train_dir), read_any(test_dir)
    result = knn_accuracy((train_f, torch.from_numpy(train_l)), (test_f, torch.from_numpy(test_l)), k=args.knn,
                          temperature=args.temperature, chunk=args.chunk, device=device)
    print("\n" + knn_log_line(result))
    return result


def main(args):
    from analysis.features import analyse_chunks, row_chunks
    from util.logs import write_json_atomic, writing
    if args.chunk < 1 or args.knn < 0 or args.temperature <= 0:
        raise UserError("--chunk must be 1 or more, --knn 0 or more, --temperature above 0")
    if args.stale:
        if not os.path.isdir(args.features):
            raise UserError(f"--stale: {args.features} is not a cache folder")
        stale = stale_entries(args.features)
        print("\n".join(os.path.join(args.features, d) for d in stale) if stale else
              f"no per-concatenation entries of before issue 22 in {args.features}")
        return
    device = resolve_device(args.device)
    entry = choose_entry(args.features, args.split)
    key, features, labels = read_any(entry)
    dims, names = entry_dims(key, features.shape[1]), backbone_names(key)
    if features.shape[1] != sum(dims):
        raise UserError(f"{entry}: {features.shape[1]}-d features, but {archs_of(key)} give {sum(dims)}")
    print(f"{entry}: {describe(key)}, {features.shape[0]} rows x {features.shape[1]} dims {dims}")
    spectrum = analyse_chunks(row_chunks(features, args.chunk, labels >= 0), dims, device)
    print_spectrum(spectrum, names)
    shares = {f"{path}:{name}": share for path in args.head for name, share in head_report(path, dims, names).items()}
    knn = knn_report(entry, key, features, labels, args, device) if args.knn else None

    out = args.out or os.path.join(REPO, "results", "analysis",
                                   os.path.basename(os.path.normpath(entry)).removesuffix(".json"))
    with writing(out):
        os.makedirs(out, exist_ok=True)
    write_json_atomic({"entry": os.path.abspath(entry), "key": key, "backbones": names, "dims": dims,
                       "rows": spectrum.rows, "cka": spectrum.cka.tolist(), "effective_rank": spectrum.block_ranks,
                       "effective_rank_concat": spectrum.concat_rank,
                       "weight_share": {h: s._asdict() for h, s in shares.items()},
                       "knn": None if knn is None else knn._asdict()}, os.path.join(out, "analysis.json"))
    print(f"\nWrote {os.path.join(out, 'analysis.json')}")
    if write_heatmap(os.path.join(out, "cka.png"), spectrum.cka, names):
        print(f"Wrote {os.path.join(out, 'cka.png')}")
    else:
        print("note: no heat map: it needs matplotlib (the 'plot' extra: uv sync --extra plot)")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
