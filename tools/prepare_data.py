"""Check and prepare the transfer datasets in the README layout under data/.

    python tools/prepare_data.py check [cifar10 cifar100 inaturalist18 imagenet1k]
    python tools/prepare_data.py cifar                  # torchvision download into data/cifar/
    python tools/prepare_data.py inat [--download]      # extract (and fetch) the iNaturalist 2018 archives, verify
    python tools/prepare_data.py imagenet [--val_map FILE [--synsets FILE]]   # validate; sort a flat val/
    python tools/prepare_data.py evalsets [imagenet_v2 imagenet_sketch imagenet_r imagenet_a] [--download]
                                                        # the probe's --eval_datasets: fetch, extract, verify

Layout: data/cifar/{cifar-10-batches-py,cifar-100-python}/, data/imagenet/{train,val}/<wnid>/*.JPEG,
data/inaturalist18/{train_val2018/, train2018.json, val2018.json}; --eval_datasets: the releases' folders under data/
(datasets/eval_sets.py).
Exit code: 0 when the datasets concerned are ready, 1 when not (the output says what is missing), 2 on errors.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from urllib.error import URLError

from arguments.common import add_data_path_arg
from arguments.linear_probe import EVAL_DATASETS as EVAL_NAMES
from tools.download import CorruptArchive, fetch, safe_extract, show
from util import layout
from util.cli import ArgumentParser, UserError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("cifar10", "cifar100", "inaturalist18", "imagenet1k")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
INAT_URL = "https://ml-inat-competition-datasets.s3.amazonaws.com/2018"
# archive -> what it holds; the annotations first, they are small
INAT_ARCHIVES = {"train2018.json.tar.gz": "train2018.json", "val2018.json.tar.gz": "val2018.json",
                 "train_val2018.tar.gz": "train_val2018"}
# published MD5 of the iNat 2018 archives (torchvision.datasets.INaturalist lists the image archive's; the
# annotation archives have none published): a download is checked before it is extracted
INAT_MD5 = {"train_val2018.tar.gz": "b1c6952ce38f31868cc50ea72d066cc3"}
IMAGENET_COUNTS = {"classes": 1000, "train": 1281167, "val": 50000}
IMAGENET_HOWTO = ("ImageNet needs your own download: register at https://www.image-net.org/, get "
                  "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, extract them to {root}/train/<wnid>/*.JPEG "
                  "and {root}/val/ (a flat val/ is then sorted by: python tools/prepare_data.py imagenet "
                  "--val_map FILE)")
# torchvision's ImageFolder extensions
IMG_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID_RE = re.compile(r"^n\d{8}$")


@dataclass
class Report:
    name: str
    facts: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    howto: list = field(default_factory=list)

    @property
    def ready(self):
        return not self.problems

    def print(self):
        print(f"{self.name}: {'ready' if self.ready else 'NOT READY'}")
        for prefix, lines in (("", self.facts), ("warning: ", self.warnings), ("problem: ", self.problems),
                              ("to fix: ", self.howto if self.problems else [])):
            for line in lines:
                print(f"  {prefix}{line}")


def data_flag(data_path):
    """' --data_path X' for the commands we suggest, unless X is the default."""
    same = os.path.abspath(data_path) == os.path.abspath(layout.data_root(REPO))
    return "" if same else f" --data_path {show(data_path)}"


def first(items, n=5):
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ---- CIFAR
def check_cifar(data_path, name):
    report = Report(name)
    sub, files = CIFAR_FILES[name]
    folder = os.path.join(data_path, "cifar", sub)
    missing = [f for f in files if not (os.path.isfile(os.path.join(folder, f))
                                        and os.path.getsize(os.path.join(folder, f)) > 0)]
    if missing:
        report.problems.append(f"{show(folder)}/ lacks {first(missing, 7)}")
        report.howto.append(f"python tools/prepare_data.py cifar{data_flag(data_path)}  (torchvision "
                            f"downloads {name}, about 160 MB, from {CIFAR_URL})")
    else:
        report.facts.append(f"{show(folder)}/: all {len(files)} files")
    return report


def prepare_cifar(args):
    import torchvision  # slow to import, only needed here

    root = os.path.join(args.data_path, "cifar")
    classes = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    reports = []
    for name in args.which:
        if not check_cifar(args.data_path, name).ready:
            print(f"Downloading {name} into {show(root)}/ through torchvision")
            try:
                for train in (True, False):
                    classes[name](root=root, train=train, download=True)
            except (URLError, OSError, RuntimeError) as exc:
                raise UserError(f"could not download {name} through torchvision ({exc}); check the connection, "
                                f"or put the archive from {CIFAR_URL} into {show(root)}/ and run again") from None
        reports.append(check_cifar(args.data_path, name))
    return reports


# ---- iNaturalist 2018
def verify_inat_json(path, root):
    """(facts, problems, number of missing images) for the images a COCO-style JSON lists under root."""
    try:
        with open(path) as f:
            coco = json.load(f)
        images = coco["images"]
        files = [img["file_name"] for img in images]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], [f"{show(path)} is unreadable or not COCO-style ({type(exc).__name__}: {exc}); extract it "
                    f"again: python tools/prepare_data.py inat --force"], 0
    listing = {}  # folder -> names in it: one scandir per class folder instead of one stat per image
    missing = []
    for name in files:
        folder, base = os.path.split(os.path.join(root, name))
        if folder not in listing:
            try:
                listing[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                listing[folder] = set()
        if base not in listing[folder]:
            missing.append(name)
    found = len(files) - len(missing)
    facts = [f"{os.path.basename(path)}: {len(files)} images listed, {found} found, "
             f"{len(coco.get('annotations', []))} annotations, {len(coco.get('categories', []))} categories"]
    problems = [f"{len(missing)} of {len(files)} images of {os.path.basename(path)} are missing, first: "
                f"{first(missing, 3)}"] if missing else []
    return facts, problems, len(missing)


def check_inat(data_path, archive_dir=None):
    report = Report("inaturalist18")
    folder = os.path.join(data_path, "inaturalist18")
    archive_dir = archive_dir or folder
    absent = [target for target in INAT_ARCHIVES.values() if not os.path.exists(os.path.join(folder, target))]
    for archive, target in INAT_ARCHIVES.items():
        if target not in absent:
            continue
        report.problems.append(f"missing {show(os.path.join(folder, target))}")
        if os.path.isfile(os.path.join(archive_dir, archive)):
            report.howto.append(f"{archive} is in {show(archive_dir)}/ but not extracted: "
                                f"python tools/prepare_data.py inat{data_flag(data_path)}")
        else:
            report.howto.append(f"download {INAT_URL}/{archive} into {show(archive_dir)}/ and run "
                                f"python tools/prepare_data.py inat{data_flag(data_path)} (or add --download "
                                f"to fetch it)")
    if "train_val2018" not in absent:
        n_missing = 0
        for target in ("train2018.json", "val2018.json"):
            if target not in absent:
                facts, problems, n = verify_inat_json(os.path.join(folder, target), folder)
                report.facts += facts
                report.problems += problems
                n_missing += n
        if n_missing:
            report.howto.append(f"extract train_val2018.tar.gz again: python tools/prepare_data.py inat"
                                f"{data_flag(data_path)} --force")
    return report


def _find(root, name, depth=2):
    """Path of the first entry called `name` at most `depth` folders below root, or None."""
    for dirpath, dirs, files in os.walk(root):
        if name in dirs or name in files:
            return os.path.join(dirpath, name)
        if os.path.relpath(dirpath, root).count(os.sep) + 1 >= depth:
            dirs[:] = []
    return None


def _merge(src, dst):
    """Move every file of folder src into folder dst (same file system), replacing files of the same name."""
    for dirpath, _, files in os.walk(src):
        out = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(out, exist_ok=True)
        for f in files:
            os.replace(os.path.join(dirpath, f), os.path.join(out, f))


def extract_inat_archive(archive, folder, target):
    """Extract archive into a temporary folder inside `folder`, then move `target` into place."""
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=folder)
    try:
        try:
            names = safe_extract(archive, tmp, desc=f"extracting {os.path.basename(archive)}")
        except CorruptArchive as exc:
            raise UserError(f"{exc}; delete it and download it again") from None
        found = _find(tmp, target)
        if found is None:
            raise UserError(f"{show(archive)} holds no {target} (it has: {first(names, 3)})")
        out = os.path.join(folder, target)
        if os.path.isdir(found) and os.path.isdir(out):
            _merge(found, out)
        else:
            os.replace(found, out)
        others = [n for n in os.listdir(tmp) if not found.startswith(os.path.join(tmp, n) + os.sep)]
        if others:
            print(f"  ignored in {os.path.basename(archive)}: {first(others)}")
        print(f"  {os.path.basename(archive)} -> {show(out)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_md5(path, expected):
    """Check a downloaded archive against its published MD5; a mismatch deletes it (the next run downloads it
    afresh). Without a published value, print the MD5 so it can be compared by hand."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if expected is None:
        print(f"  MD5 {actual} (no published value to check against)")
    elif actual != expected:
        os.remove(path)
        raise UserError(f"MD5 mismatch for {show(path)}: expected {expected} (published), got {actual}; the "
                        "download was deleted: run again to download it afresh")
    else:
        print(f"  MD5 verified: {actual}")


def prepare_inat(args):
    folder = os.path.join(args.data_path, "inaturalist18")
    archive_dir = args.archive_dir or folder
    os.makedirs(folder, exist_ok=True)
    for archive, target in INAT_ARCHIVES.items():
        if os.path.exists(os.path.join(folder, target)) and not args.force:
            print(f"{target}: already extracted")
            continue
        path = os.path.join(archive_dir, archive)
        if not os.path.isfile(path):
            if not args.download:
                continue  # the check below says what to download
            os.makedirs(archive_dir, exist_ok=True)
            print(f"Downloading {args.base_url}/{archive} to {show(path)}")
            fetch(f"{args.base_url}/{archive}", path, args.retries, args.backoff, args.timeout)
            verify_md5(path, INAT_MD5.get(archive))
        print(f"Extracting {show(path)}")
        extract_inat_archive(path, folder, target)
    return [check_inat(args.data_path, archive_dir)]


# ---- ImageNet
def scan_split(folder):
    """{class folder: image count}, loose image files, .tar files of a train/ or val/ folder."""
    classes, loose, tars = {}, [], []
    for entry in os.scandir(folder):
        if entry.is_dir():
            with os.scandir(entry.path) as it:
                classes[entry.name] = sum(1 for e in it if e.name.lower().endswith(IMG_EXT))
        elif entry.name.lower().endswith(IMG_EXT):
            loose.append(entry.name)
        elif entry.name.endswith(".tar"):
            tars.append(entry.name)
    return classes, sorted(loose), sorted(tars)


def check_imagenet(data_path):
    report = Report("imagenet1k")
    folder = os.path.join(data_path, "imagenet")
    if not os.path.isdir(folder):
        report.problems.append(f"missing {show(folder)}/")
        report.howto.append(IMAGENET_HOWTO.format(root=show(folder)))
        return report
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(folder, split)
        if not os.path.isdir(path):
            report.problems.append(f"missing {show(path)}/")
            continue
        classes, loose, tars = scan_split(path)
        splits[split] = classes
        n_images = sum(classes.values())
        report.facts.append(f"{split}: {len(classes)} class folders, {n_images:,} images"
                            + (f", {len(loose):,} images outside class folders" if loose else ""))
        if loose and split == "val":
            report.problems.append(f"{show(path)}/ is flat: {len(loose):,} images not sorted into class folders")
            report.howto.append(f"sort them with the ground truth: python tools/prepare_data.py imagenet"
                                f"{data_flag(data_path)} --val_map LOC_val_solution.csv (or "
                                f"ILSVRC2012_validation_ground_truth.txt --synsets FILE; see imagenet --help)")
        elif loose:
            report.problems.append(f"{show(path)}/ has {len(loose):,} images outside class folders "
                                   f"(first: {first(loose, 3)})")
        if tars and split == "train":
            report.problems.append(f"{show(path)}/ holds {len(tars)} per-class .tar archives still to extract")
            report.howto.append(f"cd {show(path)} && for f in *.tar; do mkdir -p \"${{f%.tar}}\" && "
                                f"tar -xf \"$f\" -C \"${{f%.tar}}\" && rm \"$f\"; done")
        if not classes and not loose and not tars:
            report.problems.append(f"{show(path)}/ is empty")
        empty = sorted(c for c, n in classes.items() if n == 0)
        if empty:
            report.problems.append(f"{split}: {len(empty)} class folders without images: {first(empty, 3)}")
        if classes and (len(classes) != IMAGENET_COUNTS["classes"] or n_images != IMAGENET_COUNTS[split]):
            report.warnings.append(f"{split}: ImageNet-1k has {IMAGENET_COUNTS['classes']} classes and "
                                   f"{IMAGENET_COUNTS[split]:,} images (an incomplete extraction?)")
    if report.problems and not report.howto:
        report.howto.append(IMAGENET_HOWTO.format(root=show(folder)))
    if splits.get("train") and splits.get("val"):
        only_train = sorted(set(splits["train"]) - set(splits["val"]))
        only_val = sorted(set(splits["val"]) - set(splits["train"]))
        if only_val:
            report.problems.append(f"val has {len(only_val)} classes that train lacks: {first(only_val, 3)}")
        if only_train:
            report.problems.append(f"train has {len(only_train)} classes that val lacks: {first(only_train, 3)}")
    return report


def read_synsets(path):
    """wnids in file order, from lines like 'n01440764' or 'n01440764 tench, Tinca tinca'."""
    wnids = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            token = line.split()[0] if line.split() else ""
            if WNID_RE.match(token):
                wnids.append(token)
            elif token:
                raise UserError(f"{path}:{lineno}: expected a WordNet id like n01440764, got {token!r}")
    return wnids


def read_val_map(path, synsets_path=None):
    """{image stem: wnid} from a ground-truth file of one of the forms listed in --help."""
    try:
        with open(path) as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise UserError(f"cannot read --val_map {path}: {exc}") from None
    synsets = read_synsets(synsets_path) if synsets_path else None
    indexed, named = {}, {}
    if lines and all(line.isdigit() for _, line in lines):  # devkit: line i is ILSVRC2012_val_{i:08d}
        indexed = {f"ILSVRC2012_val_{i:08d}": int(line) for i, (_, line) in enumerate(lines, 1)}
    else:
        for n, line in lines:
            tokens = re.split(r"[,\s]+", line)
            key = os.path.splitext(os.path.basename(tokens[0]))[0]
            wnid = next((t for t in tokens[1:] if WNID_RE.match(t)), None)
            if wnid:
                named[key] = wnid
            elif len(tokens) > 1 and tokens[1].isdigit():
                indexed[key] = int(tokens[1])
            elif n != lines[0][0]:  # the first line may be a header
                raise UserError(f"{path}:{n}: expected 'image class' (a wnid or a class index), got {line!r}")
    if indexed:
        if synsets is None:
            raise UserError(f"{path} gives class indices: pass --synsets with the wnid of each index, one per line")
        base = 0 if min(indexed.values()) == 0 else 1  # caffe's val.txt counts from 0, the devkit from 1
        for key, idx in indexed.items():
            if not 0 <= idx - base < len(synsets):
                raise UserError(f"{path}: class index {idx} of {key} is outside the {len(synsets)} synsets of "
                                f"{synsets_path}")
            named[key] = synsets[idx - base]
    if not named:
        raise UserError(f"{path} holds no image-to-class line")
    return named


def sort_val(val_dir, mapping, dry_run=False):
    """Move the loose images of val_dir into <wnid>/ folders; all or nothing when some image has no class."""
    _, loose, _ = scan_split(val_dir)
    plan = {name: mapping.get(os.path.splitext(name)[0]) for name in loose}
    unknown = [name for name, wnid in plan.items() if wnid is None]
    if unknown:
        raise UserError(f"the ground truth has no class for {len(unknown)} of {len(loose)} images of "
                        f"{show(val_dir)} (first: {first(unknown, 3)}); nothing was moved")
    n_classes = len(set(plan.values()))
    if dry_run:
        print(f"Would move {len(plan):,} images of {show(val_dir)}/ into {n_classes} class folders, e.g. "
              + first(f"{name} -> {wnid}/" for name, wnid in sorted(plan.items())))
        return
    for name, wnid in plan.items():
        os.makedirs(os.path.join(val_dir, wnid), exist_ok=True)
        os.replace(os.path.join(val_dir, name), os.path.join(val_dir, wnid, name))
    print(f"Moved {len(plan):,} images of {show(val_dir)}/ into {n_classes} class folders")


def prepare_imagenet(args):
    val_dir = os.path.join(args.data_path, "imagenet", "val")
    if args.val_map:
        if not os.path.isdir(val_dir):
            raise UserError(f"{show(val_dir)}/ does not exist: extract ILSVRC2012_img_val.tar there first")
        sort_val(val_dir, read_val_map(args.val_map, args.synsets), args.dry_run)
    elif args.synsets:
        raise UserError("--synsets goes with --val_map")
    return [check_imagenet(args.data_path)]


# ---- the evaluation-only ImageNet test sets of --eval_datasets
def check_eval_set(data_path, name):
    """The release's folder read as the probe reads it (datasets.eval_sets), its image and class counts."""
    from datasets.eval_sets import EVAL_SETS, IMAGENET_WNIDS, build_eval_set, release_wnids  # imports torch: only here
    spec, report = EVAL_SETS[name], Report(name)
    folder = os.path.join(data_path, spec.folder)
    if not os.path.isdir(folder):
        report.problems.append(f"{show(folder)}/ not found")
        report.howto.append(f"python tools/prepare_data.py evalsets {name} --download{data_flag(data_path)} "
                            f"(or download {spec.url} and extract it into {show(data_path)})")
        return report
    try:
        eval_set = build_eval_set(name, data_path, data_path, IMAGENET_WNIDS)
    except UserError as exc:
        report.problems.append(str(exc))
        return report
    images, classes = len(eval_set.dataset), len(set(eval_set.dataset.targets))
    release_classes = len(release_wnids(spec))
    report.facts.append(f"{images} images in {classes} class folders")
    if (images, classes) != (spec.images, release_classes):
        report.warnings.append(f"the release has {spec.images} images in {release_classes} classes (a partial copy "
                               f"is scored on what it holds)")
    return report


def extract_zip_archive(archive, folder, target):
    """A zip release (ImageNet-Sketch): refuse unsafe member names, extract into a temporary folder inside `folder`,
    then move `target` into place."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
                    raise UserError(f"refusing to extract {show(archive)}: member {name!r} leaves the folder "
                                    f"(unsafe archive); nothing was placed")
            tmp = tempfile.mkdtemp(prefix=".extract-", dir=folder)
            try:
                zf.extractall(tmp)
                found = _find(tmp, target, depth=3)
                if found is None:
                    raise UserError(f"{show(archive)} holds no {target}/ (it has: {first(zf.namelist(), 3)})")
                os.replace(found, os.path.join(folder, target))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{show(archive)} is corrupt or not a zip archive ({exc}); delete it and download it "
                        f"again") from None
    print(f"  {os.path.basename(archive)} -> {show(os.path.join(folder, target))}")


def prepare_evalsets(args):
    from datasets.eval_sets import EVAL_SETS  # imports torch: only here
    unknown = [name for name in args.names if name not in EVAL_NAMES]
    if unknown:
        raise UserError(f"unknown evaluation set {unknown[0]!r}: choose among {', '.join(EVAL_NAMES)}")
    os.makedirs(args.data_path, exist_ok=True)
    archive_dir = args.archive_dir or args.data_path
    for name in args.names or EVAL_NAMES:
        spec = EVAL_SETS[name]
        if os.path.isdir(os.path.join(args.data_path, spec.folder)) and not args.force:
            print(f"{spec.folder}: already extracted")
            continue
        archive = spec.url.rsplit("/", 1)[-1]
        path = os.path.join(archive_dir, archive)
        if not os.path.isfile(path):
            if not args.download:
                continue  # the check below says what to download
            os.makedirs(archive_dir, exist_ok=True)
            url = f"{args.base_url}/{archive}" if args.base_url else spec.url
            print(f"Downloading {url} to {show(path)}")
            fetch(url, path, args.retries, args.backoff, args.timeout)
        print(f"Extracting {show(path)}")
        if os.path.isdir(os.path.join(args.data_path, spec.folder)):  # --force: the archive's copy replaces it
            shutil.rmtree(os.path.join(args.data_path, spec.folder))
        if archive.endswith(".zip"):
            extract_zip_archive(path, args.data_path, spec.folder)
        else:
            extract_inat_archive(path, args.data_path, spec.folder)
    return [check_eval_set(args.data_path, name) for name in args.names or EVAL_NAMES]


# ---- main
def check(args):
    unknown = [name for name in args.datasets if name not in DATASETS + EVAL_NAMES]
    if unknown:
        raise UserError(f"unknown dataset {unknown[0]!r}: choose among {', '.join(DATASETS + EVAL_NAMES)}")
    reports = []
    for name in args.datasets or DATASETS:
        if name in EVAL_NAMES:
            reports.append(check_eval_set(args.data_path, name))
        elif name.startswith("cifar"):
            reports.append(check_cifar(args.data_path, name))
        elif name == "inaturalist18":
            reports.append(check_inat(args.data_path))
        else:
            reports.append(check_imagenet(args.data_path))
    return reports


def add_fetch_args(c):
    """--force and the download options of the subcommands that fetch and extract archives (inat, evalsets); a
    function, not a parent parser, so that they keep their place in each subcommand's --help."""
    c.add_argument("--force", action="store_true", help="extract again even what is already there")
    c.add_argument("--retries", type=int, default=5, help="download retries without progress")
    c.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, then doubled")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")


def get_args_parser():
    common = ArgumentParser(add_help=False)
    add_data_path_arg(common, REPO, "data folder, the scripts' --data_path")
    p = ArgumentParser("tools/prepare_data.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", parents=[common], help="say which datasets are ready and what the others lack",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"datasets to check, among {', '.join(DATASETS)} (default: these) and the probe's "
                   f"--eval_datasets {', '.join(EVAL_NAMES)}")
    c.set_defaults(func=check)

    c = sub.add_parser("cifar", parents=[common], help="download CIFAR10/100 through torchvision",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--which", nargs="+", default=["cifar10", "cifar100"], choices=["cifar10", "cifar100"])
    c.set_defaults(func=prepare_cifar)

    c = sub.add_parser("inat", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="extract the iNaturalist 2018 archives and verify every listed image")
    c.add_argument("--archive_dir", default=None, help="folder of train_val2018.tar.gz, train2018.json.tar.gz "
                   "and val2018.json.tar.gz (default: <data_path>/inaturalist18)")
    c.add_argument("--download", action="store_true", help="download the missing archives first (resumable; "
                   "train_val2018.tar.gz is about 120 GB)")
    c.add_argument("--base_url", default=INAT_URL, help="where --download fetches the archives")
    add_fetch_args(c)
    c.set_defaults(func=prepare_inat)

    c = sub.add_parser(
        "imagenet", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="validate data/imagenet/{train,val}; sort a flat val/ into class folders",
        description="Validate data/imagenet/{train,val}/<wnid>/ (class folders, image counts, same classes) and, "
                    "with --val_map, move the images of a flat val/ into val/<wnid>/.\n\n"
                    "--val_map forms (the image name may have an extension or a folder; a header line is skipped):\n"
                    "  image wnid          e.g. 'ILSVRC2012_val_00000001.JPEG n01751748' (space, tab or comma)\n"
                    "  Kaggle CSV          LOC_val_solution.csv: 'ILSVRC2012_val_00008726,n02119789 255 142 ...'\n"
                    "  image index         e.g. caffe's val.txt 'ILSVRC2012_val_00000001.JPEG 65'; needs --synsets\n"
                    "  one index per line  the devkit's ILSVRC2012_validation_ground_truth.txt (line i is\n"
                    "                      image i, ILSVRC2012_val_<i as 8 digits>); needs --synsets\n"
                    "Indices count from 0 when some index is 0 (caffe), else from 1 (devkit). --synsets lists one\n"
                    "wnid per line (extra words allowed) in the order of the indices: for the devkit file that is\n"
                    "the ILSVRC2012_ID order of meta.mat, NOT alphabetical; caffe's synsets.txt is alphabetical.")
    c.add_argument("--val_map", default=None, help="ground truth of the flat val/ images (forms above)")
    c.add_argument("--synsets", default=None, help="wnid of each class index, one per line")
    c.add_argument("--dry_run", action="store_true", help="say what --val_map would move, move nothing")
    c.set_defaults(func=prepare_imagenet)

    c = sub.add_parser("evalsets", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="fetch, extract and verify the probe's --eval_datasets (ImageNet-v2, -Sketch, -R, -A)")
    c.add_argument("names", nargs="*", metavar="NAME",
                   help=f"among {', '.join(EVAL_NAMES)} (default: all)")
    c.add_argument("--archive_dir", default=None, help="folder of the releases' archives (default: --data_path)")
    c.add_argument("--download", action="store_true", help="download the missing archives first (resumable; "
                   "about 1.3 GB v2, 8 GB Sketch, 2 GB R, 0.7 GB A)")
    c.add_argument("--base_url", default=None, help="fetch every archive from this folder URL instead of its "
                   "release's (a mirror)")
    add_fetch_args(c)
    c.set_defaults(func=prepare_evalsets)
    return p


def main(args):
    """Run a subcommand and print its reports; 0 when every dataset concerned is ready, else 1."""
    reports = args.func(args)
    print()
    for report in reports:
        report.print()
    return 0 if all(r.ready for r in reports) else 1


if __name__ == "__main__":
    run_main(lambda args: sys.exit(main(args)), get_args_parser().parse_args())
