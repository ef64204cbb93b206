"""Why does concatenation help? Look at the cached features of a concatenated encoder.

    python tools/analyze_features.py CACHE_DIR                       # the test-split entry of a --feature_cache
    python tools/analyze_features.py CACHE_DIR/<entry> --head RUN/best.pth.tar --knn 20

For the backbones of one feature-cache entry (main_linear_probe.py --feature_cache) it reports:
- linear CKA between every pair of backbones (table and heat map PNG): 1 = the same features up to a rotation and
  scale, near 0 = unrelated features;
- the effective rank (participation ratio of the covariance eigenvalues, (sum l)^2 / sum l^2) of each
  backbone's features and of the concatenation: how many directions the features really use;
- with --head, the per-backbone weight share of a trained probe head (mean |W| over each backbone's columns,
  the reference's feature_importance, and the same normalised);
- with --knn K, the k-nearest-neighbour accuracy (cosine similarity, DINO's exp(sim/T) votes) of the test
  entry against the training entry of the same configuration in the same cache.

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
    return key, np.load(os.path.join(directory, "features.npy"), mmap_mode="r"), \
        np.load(os.path.join(directory, "labels.npy"))


def entries_in(root):
    """{entry folder: key} of every complete entry directly below a cache root."""
    found = {}
    for name in sorted(os.listdir(root)):
        entry = read_entry(os.path.join(root, name)) if os.path.isdir(os.path.join(root, name)) else None
        if entry is not None:
            found[os.path.join(root, name)] = entry[0]
    return found


def describe(key):
    return f"{key.get('data_name')} {key.get('split')} view {key.get('view')}, {len(key.get('arch', []))} x " \
           f"{'/'.join(sorted(set(key.get('arch', []))))}"


def choose_entry(path, split):
    """The entry folder to analyse: `path` itself, or the one plain entry of `split` below a cache root."""
    if read_entry(path) is not None:
        return path
    if not os.path.isdir(path):
        raise UserError(f"{path} is neither a feature-cache entry nor a cache folder")
    plain = {d: k for d, k in entries_in(path).items() if k.get("split") == split and k.get("view") == -1}
    if len(plain) == 1:
        return next(iter(plain))
    if not plain:
        raise UserError(f"no complete {split} entry in {path}: run main_linear_probe.py with --feature_cache {path}")
    listing = "; ".join(f"{os.path.basename(d)} ({describe(k)})" for d, k in plain.items())
    raise UserError(f"{len(plain)} {split} entries in {path} ({listing}): pass the entry folder itself")


def sibling_entry(directory, key, split):
    """The plain entry of `split` with the same backbones, data and transform, in the same cache."""
    same = lambda other: all(other.get(f) == key.get(f) for f in set(key) | set(other) if f not in SPLIT_KEYS)
    for other_dir, other in entries_in(os.path.dirname(os.path.abspath(directory))).items():
        if other.get("split") == split and other.get("view") == -1 and same(other):
            return other_dir
    raise UserError(f"--knn needs the {split} entry of the same configuration in "
                    f"{os.path.dirname(os.path.abspath(directory))}: run the probe with --feature_cache there first")


def entry_dims(directory, key):
    """Per-backbone widths: the manifest's 'dims' where a cache writer records them, else from the archs."""
    from analysis.features import backbone_dims
    with open(os.path.join(directory, "manifest.json")) as f:
        dims = json.load(f).get("dims")
    return dims if isinstance(dims, list) and len(dims) == len(key["arch"]) else backbone_dims(key["arch"])


# ---------------------------------------------------------------- reports
def backbone_names(key):
    names = [os.path.basename(c["path"]) if isinstance(c, dict) else str(c) for c in key.get("checkpoints", [])]
    return [f"{i}: {arch} {name}".strip() for i, (arch, name) in
            enumerate(zip(key["arch"], names + [""] * (len(key["arch"]) - len(names))))]


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
    p.add_argument("features", help="a feature-cache entry folder (with manifest.json), or a --feature_cache "
                   "folder holding one plain entry of --split")
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
    (_, train_f, train_l), (_, test_f, test_l) = read_entry(train_dir), read_entry(test_dir)
    result = knn_accuracy((train_f, torch.from_numpy(train_l)), (test_f, torch.from_numpy(test_l)), k=args.knn,
                          temperature=args.temperature, chunk=args.chunk, device=device)
    print("\n" + knn_log_line(result))
    return result


def main(args):
    from analysis.features import analyse_chunks, row_chunks
    from util.logs import write_json_atomic, writing
    if args.chunk < 1 or args.knn < 0 or args.temperature <= 0:
        raise UserError("--chunk must be 1 or more, --knn 0 or more, --temperature above 0")
    device = resolve_device(args.device)
    entry = choose_entry(args.features, args.split)
    key, features, labels = read_entry(entry)
    dims, names = entry_dims(entry, key), backbone_names(key)
    if features.shape[1] != sum(dims):
        raise UserError(f"{entry}: {features.shape[1]}-d features, but {key['arch']} give {sum(dims)}")
    print(f"{entry}: {describe(key)}, {features.shape[0]} rows x {features.shape[1]} dims {dims}")
    spectrum = analyse_chunks(row_chunks(features, args.chunk, labels >= 0), dims, device)
    print_spectrum(spectrum, names)
    shares = {f"{path}:{name}": share for path in args.head for name, share in head_report(path, dims, names).items()}
    knn = knn_report(entry, key, features, labels, args, device) if args.knn else None

    out = args.out or os.path.join(REPO, "results", "analysis", os.path.basename(os.path.normpath(entry)))
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
