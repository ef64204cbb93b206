"""Which backbones a probe or `timecat.load_encoder` concatenates: a tag of the tag file (configs/), or archs and
checkpoint paths, checked before anything heavy runs (the owner of tag resolution)."""
import os

import yaml

from models.backbones import arch_family
from util import layout
from util.cli import UserError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TAG_FILE = os.path.join(PROJECT_ROOT, layout.TAG_FILE)


def read_tag(tag, tag_file=DEFAULT_TAG_FILE, checkpoint_root=None):
    """(archs, checkpoint paths) of a tag; `checkpoints/...` paths resolve under the checkpoint root (default:
    $TIMECAT_CHECKPOINTS, else the clone's checkpoints/), other relative paths under the project folder."""
    checkpoint_root = checkpoint_root or layout.checkpoint_root(PROJECT_ROOT)
    if not os.path.isfile(tag_file):
        raise UserError(f"tag file {tag_file} not found")
    try:
        with open(tag_file) as f:
            tags = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the tag file {tag_file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(tags, dict) or tag not in tags:
        raise UserError(f"unknown --tag '{tag}': {tag_file} defines "
                        f"{', '.join(sorted(map(str, tags))) if isinstance(tags, dict) else 'no tags'}")
    try:
        archs = [str(a) for a in tags[tag]["arch"]]
        paths = [layout.resolve_tag_path(p, PROJECT_ROOT, checkpoint_root) for p in map(str, tags[tag]["pretrained"])]
    except (KeyError, TypeError):
        raise UserError(f"tag '{tag}' of {tag_file} needs an arch list and a pretrained list") from None
    return archs, paths


def pair_backbones(archs, paths, tagged=False):
    """One arch per checkpoint (a single arch serves all), every arch known, every checkpoint a non-empty file."""
    if not archs or not paths:
        raise UserError("name the backbones: --tag NAME, or --arch A [A ...] with --pretrained P [P ...]")
    archs = list(archs) * len(paths) if len(archs) == 1 else list(archs)
    if len(archs) != len(paths):
        raise UserError(f"--arch has {len(archs)} entries but --pretrained has {len(paths)}: "
                        f"give one arch per checkpoint (or a single arch for all)")
    for arch in archs:
        arch_family(arch)  # the one-line error of an unknown name
    empty = [p for p in paths if os.path.isfile(p) and os.path.getsize(p) == 0]
    if empty:
        raise UserError(f"checkpoint {empty[0]} is empty (0 bytes): a download or copy was cut short; fetch it "
                        f"again")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # fail before any data is read or downloaded
        raise UserError(f"checkpoint not found: {missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        ("; `python tools/download.py` fetches the released ones" if tagged else ""))
    return archs
