"""Download the released Time-Cat checkpoints and place them in the README layout.

    python tools/download.py                       # fetch, verify, extract, place, report the tags
    python tools/download.py --sha256 HEX --keep_archive
    python tools/download.py --archive ckpt.tar.gz # use an archive you downloaded yourself

The archive is streamed to <dest>/<name>.part (resumed with HTTP Range after a cut or a rerun), renamed when
complete, extracted into a temporary folder inside <dest> (refusing absolute paths, '..', links and device
files), and only then moved into <dest>/resnet50_sfadamw/checkpoints_step{full,200,100,80}/checkpoint_run{i}.pth.tar.
A second run with every checkpoint in place downloads nothing.
"""
import argparse
import errno
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib

# requests, yaml and tqdm are imported inside the functions that use them,
# so that --help answers without loading them
from arguments.common import add_checkpoint_root_arg
from util import layout
from util.cli import ArgumentParser, UserError, run_main
from util.misc import sha256sum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_URL = ("https://dl.fbaipublicfiles.com/richreps-timecat/"
               "ckpt_resnet50_sfadamw_imagenet1k_supervised.tar.gz")
TAG_FILE = os.path.join(REPO, layout.TAG_FILE)
ARCH_DIR = layout.run_dir_name("resnet50", layout.SFADAMW_ALGOPERF)
UNRECOGNIZED_DIR = "unrecognized_from_archive"
# Optional top folders of the archive: the release's own name, the original script's rename, the README's.
TOP_FOLDERS = {"ckpt_resnet50_sfadamw_imagenet1k_supervised", "resnet50_sfadamw_imagenet1k_supervised", ARCH_DIR}
# The release: step folder -> number of runs (run0 .. run{n-1}).
RELEASE = {"full": 5, "200": 2, "100": 4, "80": 5}
CHUNK = 1 << 20


def show(path):
    """A path as the user would type it: relative to the working folder when inside it."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# ---- expected checkpoints and tags
def readme_path(step, run):
    return f"{ARCH_DIR}/{layout.folder_of_label(step)}/{layout.run_file_name(run)}"


def in_readme_layout(rel):
    """Whether a path relative to the pretraining root is one this tool writes: the README's
    resnet50_sfadamw/checkpoints_step{full,200,...}/checkpoint_run{i}.pth.tar (not the archive's checkpoints_200k)."""
    parsed = layout.parse_checkpoint_path(rel)
    if parsed is None or parsed[0] != ARCH_DIR or not (parsed[1] == layout.FULL or parsed[1].isdigit()):
        return False
    return rel == readme_path(parsed[1], parsed[2])


def builtin_tags():
    """The release's tags: tag -> checkpoint paths relative to <dest>."""
    tags = {f"supervisedimagenet_resnet50_sfadamw_run{i}": [readme_path("full", i)] for i in range(RELEASE["full"])}
    for step in ("200", "100", "80"):
        n = RELEASE[step]
        tags[f"supervisedimagenet_resnet50_sfadamw_{n}_step{step}k"] = [readme_path(step, i) for i in range(n)]
    return tags


def release_tags(tag_file=TAG_FILE):
    """Tags whose every checkpoint is one this archive provides, as paths relative to <dest>.

    Read from the project's tag file when it exists (so the report names the tags --tag accepts), else built in.
    """
    import yaml
    if not os.path.isfile(tag_file):
        return builtin_tags()
    try:
        with open(tag_file) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"warning: cannot read {show(tag_file)} ({exc}); using the release's tag list", file=sys.stderr)
        return builtin_tags()
    default_root = os.path.join(REPO, layout.CHECKPOINT_ROOT)
    tags = {}
    for tag, entry in (config.items() if isinstance(config, dict) else []):
        paths = entry.get("pretrained") if isinstance(entry, dict) else None
        if not paths or not all(isinstance(p, str) for p in paths):
            continue
        rels = [os.path.relpath(os.path.join(REPO, p), default_root).replace(os.sep, "/") for p in paths]
        if all(in_readme_layout(r) for r in rels):
            tags[tag] = rels
    return tags or builtin_tags()


def tag_status(dest, tags):
    """(complete tags, {incomplete tag: missing paths relative to dest})."""
    complete, incomplete = [], {}
    for tag, rels in tags.items():
        missing = [r for r in rels if not os.path.isfile(os.path.join(dest, r))]
        if missing:
            incomplete[tag] = missing
        else:
            complete.append(tag)
    return complete, incomplete


def report_tags(dest, tags):
    complete, incomplete = tag_status(dest, tags)
    print(f"Tags complete ({len(complete)}/{len(tags)}):" + ("" if complete else " none"))
    for tag in complete:
        print(f"  {tag}")
    for tag, missing in incomplete.items():
        print(f"  incomplete: {tag} (missing {', '.join(missing)})")
    return complete, incomplete


# ---- download (streamed, resumable, retried)
class Retryable(Exception):
    """A transient failure: the next attempt resumes from the .part file."""


def _content_range(resp):
    """(start, total) from a Content-Range header like 'bytes 100-199/1000' or 'bytes */1000'."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _fetch_once(url, part, timeout, desc):
    """One HTTP attempt appending to `part`: returns once the file is complete, else raises."""
    import requests
    from tqdm import tqdm
    have = os.path.getsize(part) if os.path.exists(part) else 0
    # identity: the .tar.gz must arrive byte for byte, never decoded by requests
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = requests.get(url, stream=True, timeout=timeout, headers=headers)
    except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL) as exc:
        raise UserError(f"invalid URL {url!r}: {exc}") from None
    except requests.RequestException as exc:
        raise Retryable(f"cannot reach {url}: {type(exc).__name__}") from None
    with resp:
        code = resp.status_code
        if code == 416 and have:  # nothing left to send: complete already, or the server has another file
            _, total = _content_range(resp)
            if total == have:
                return
            os.remove(part)
            raise Retryable(f"server cannot resume at byte {have} (file size {total}); starting over")
        if code in (408, 429) or code >= 500:
            raise Retryable(f"HTTP {code} {resp.reason}")
        if code >= 400:
            raise UserError(f"HTTP {code} {resp.reason} for {url} (check --url)")
        if code == 206:
            start, total = _content_range(resp)
            if start != have:
                os.remove(part)
                raise Retryable(f"server resumed at byte {start} instead of {have}; starting over")
            mode = "ab"
        else:  # 200: the server ignored the Range header, start from zero
            have, mode = 0, "wb"
            total = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length", "").isdigit() else None
        if total is not None:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(part))).free
            if free < total - have:
                raise UserError(f"not enough disk space for {show(part)}: {human(total - have)} still to download, "
                                f"{human(free)} free; free some space and run again")
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=None)
        # a cut connection then ends the stream with the bytes received so far, instead of an error that
        # discards the last buffered read; the size check below turns it into a retry that resumes
        resp.raw.enforce_content_length = False
        try:
            with open(part, mode) as f:
                for chunk in resp.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except requests.RequestException as exc:
            raise Retryable(f"connection lost after {os.path.getsize(part)} bytes ({type(exc).__name__})") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"disk full while writing {show(part)} ({os.path.getsize(part)} bytes kept); "
                                f"free some space and run the same command again to resume") from None
            raise UserError(f"cannot write {show(part)}: {exc}") from None
        finally:
            bar.close()
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise Retryable(f"connection closed early ({size} of {total} bytes)")
    if total is not None and size > total:
        os.remove(part)
        raise Retryable(f"received {size} bytes, more than the announced {total}; starting over")


def fetch(url, path, retries=5, backoff=2.0, timeout=60.0, desc=None):
    """Download url to path through path + '.part', resuming with HTTP Range and retrying with back-off.

    The retry count restarts whenever an attempt made progress, so a flaky link still finishes.
    On failure the .part file stays for the next run to resume.
    """
    part = path + ".part"
    failures = 0
    while True:
        before = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            _fetch_once(url, part, timeout, desc or os.path.basename(path))
            break
        except Retryable as exc:
            now = os.path.getsize(part) if os.path.exists(part) else 0
            failures = 1 if now > before else failures + 1
            if failures > retries:
                kept = f"; the {now} bytes received are kept in {show(part)}: run again to resume" if now else ""
                raise UserError(f"download of {url} failed ({exc}) after {retries} retries{kept}") from None
            wait = min(backoff * 2 ** (failures - 1), 60.0)
            print(f"warning: {exc}; retry {failures}/{retries} in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
        except KeyboardInterrupt:
            raise UserError(f"interrupted; the partial download is kept in {show(part)}: run again to resume") \
                from None
    os.replace(part, path)


# ---- safe extraction
class CorruptArchive(UserError):
    pass


class _ProgressReader:
    """A file object that advances a tqdm bar by the compressed bytes read."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


def member_problem(member):
    """Why a tar member may not be extracted, or None when it is a plain file or folder inside the destination."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "climbs out of the destination with '..'"
    if member.issym() or member.islnk():
        return f"is a link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    return None


def safe_extract(archive, into, desc="extracting"):
    """Extract a (compressed) tar archive into `into`, in one streamed pass, refusing unsafe members.

    Returns the archive's file names. Raises UserError for an unsafe member or a full disk and CorruptArchive
    for an unreadable archive; the caller removes `into` on failure.
    """
    from tqdm import tqdm
    names = []
    bar = tqdm(total=os.path.getsize(archive), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=None)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar:
            for member in tar:
                problem = member_problem(member)
                if problem:
                    raise UserError(f"refusing to extract {show(archive)}: member {member.name!r} {problem} "
                                    f"(unsafe archive); nothing was placed")
                # filter='data' is a second line of defence (and drops odd permission bits)
                tar.extract(member, into, filter="data")
                if member.isfile():
                    names.append(member.name)
    except tarfile.FilterError as exc:
        raise UserError(f"refusing to extract {show(archive)}: {exc} (unsafe archive); nothing was placed") from None
    except (tarfile.ReadError, tarfile.CompressionError, tarfile.StreamError, EOFError, zlib.error) as exc:
        raise CorruptArchive(f"{show(archive)} is corrupt or not a tar archive ({exc or type(exc).__name__})") \
            from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while extracting {show(archive)} into {show(into)}; free some space "
                            f"and run again") from None
        if exc.errno is None:  # gzip.BadGzipFile and friends
            raise CorruptArchive(f"{show(archive)} is corrupt or not a tar archive ({exc})") from None
        raise UserError(f"cannot extract {show(archive)}: {exc}") from None
    finally:
        bar.close()
    return names


# ---- layout normalisation
def normalise(rel):
    """The README path (relative to <dest>) of an archive file, or None when it is not a known checkpoint."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if len(parts) < 2:
        return None
    *tops, folder, filename = parts
    step, run = layout.parse_step_folder(folder), layout.parse_run_file(filename)
    if len(tops) > 2 or any(t not in TOP_FOLDERS for t in tops) or step is None or run is None:
        return None
    return readme_path(step, run)


def extract_and_place(archive, dest):
    """Extract into a temporary folder inside dest, map onto the README layout, then move files into place.

    Returns ([(archive name, placed path)], [archive names kept under UNRECOGNIZED_DIR]).
    """
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=dest)
    try:
        names = safe_extract(archive, tmp)
        plan, unrecognized = {}, []
        for name in sorted(names):
            target = normalise(name)
            if target is None:
                unrecognized.append(name)
            elif target in plan:
                raise UserError(f"{show(archive)} holds two files for {target}: {plan[target]} and {name}; "
                                f"nothing was placed")
            else:
                plan[target] = name
        if not plan:
            sample = ", ".join(names[:5]) or "no files"
            raise UserError(f"{show(archive)} holds no checkpoint in a known layout (expected "
                            f"[top folder/]checkpoints_{{full,200k,100k,80k}}/checkpoint_run<i>.pth); it has: "
                            f"{sample}; nothing was placed")
        # tmp is inside dest, so each os.replace is an atomic rename: a file is either absent or complete
        placed = []
        for target, name in sorted(plan.items()):
            final = os.path.join(dest, target)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(os.path.join(tmp, name), final)
            placed.append((name, final))
        for name in unrecognized:
            final = os.path.join(dest, UNRECOGNIZED_DIR, name)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(os.path.join(tmp, name), final)
        return placed, unrecognized
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- main
def get_args_parser():
    p = ArgumentParser(
        "tools/download.py",
        description="Download the released Time-Cat checkpoints into the README layout "
                    "<dest>/resnet50_sfadamw/checkpoints_step{full,200,100,80}/checkpoint_run{i}.pth.tar.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL, help="archive to download")
    add_checkpoint_root_arg(p, REPO, "the folder holding supervised_pretrain/, which the probe's tags read")
    p.add_argument("--dest", default=None, help="checkpoint folder; default: <checkpoint_root>/supervised_pretrain "
                   "(the tags read it there)")
    p.add_argument("--archive", default=None, help="use this local .tar.gz instead of downloading "
                   "(it is never deleted)")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive; a mismatch deletes the "
                   "downloaded archive and stops")
    p.add_argument("--keep_archive", "--keep-archive", action="store_true",
                   help="keep the downloaded archive in <dest> "
                   "instead of removing it after a verified extraction")
    p.add_argument("--force", action="store_true", help="download and place again even when every "
                   "checkpoint is already in place")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed request without progress")
    p.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubled at "
                   "each further retry (at most 60)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server "
                   "(connection, and between bytes)")
    return p


def main(args):
    dest = args.dest or layout.pretrain_root(args.checkpoint_root)
    tags = release_tags()
    expected = sorted({rel for rels in tags.values() for rel in rels})
    if not args.force and all(os.path.isfile(os.path.join(dest, rel)) for rel in expected):
        print(f"All {len(expected)} checkpoints are already in place under {show(dest)}; nothing to download.")
        report_tags(dest, tags)
        return
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {show(dest)}: {exc}") from None

    # ---- get the archive
    if args.archive:
        archive, ours = args.archive, False
        if not os.path.isfile(archive):
            raise UserError(f"--archive {archive}: no such file")
    else:
        name = os.path.basename(args.url.split("?")[0].rstrip("/")) or "checkpoints.tar.gz"
        archive, ours = os.path.join(dest, name), True
        if os.path.isfile(archive):
            print(f"Using the archive already downloaded: {show(archive)}")
        else:
            print(f"Downloading {args.url}\n  to {show(archive)}")
            fetch(args.url, archive, args.retries, args.backoff, args.timeout)
    if args.sha256:
        actual = sha256sum(archive)
        if actual.lower() != args.sha256.strip().lower():
            if ours:
                os.remove(archive)
            removed = " (the downloaded archive was deleted; run again to download it afresh)" if ours else ""
            raise UserError(f"SHA-256 mismatch for {show(archive)}: expected {args.sha256}, got {actual}{removed}")
        print(f"SHA-256 verified: {actual}")
    else:  # print it, so a lab can pin what it fetched: --sha256 HEX on the next machine
        print(f"SHA-256 of {show(archive)}: {sha256sum(archive)} (pin it with --sha256)")

    # ---- extract, place, clean up
    try:
        placed, unrecognized = extract_and_place(archive, dest)
    except CorruptArchive as exc:
        if ours:
            os.remove(archive)
            raise CorruptArchive(f"{exc}; it was deleted: run again to download it afresh") from None
        raise
    print(f"Placed {len(placed)} checkpoints under {show(os.path.join(dest, ARCH_DIR))}:")
    for name, final in placed:
        print(f"  {name} -> {os.path.relpath(final, os.path.join(dest, ARCH_DIR))}")
    if unrecognized:
        print(f"Not a checkpoint of the README layout, kept under {show(os.path.join(dest, UNRECOGNIZED_DIR))}:")
        for name in unrecognized:
            print(f"  {name}")
    if ours and not args.keep_archive:
        os.remove(archive)
        print(f"Removed {show(archive)} (use --keep_archive to keep it)")
    _, incomplete = report_tags(dest, tags)
    if incomplete:
        print("warning: the archive did not provide every checkpoint of the release", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
