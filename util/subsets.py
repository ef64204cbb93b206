"""Sub-concatenations of a probe's backbones: which subsets a run trains, and the folder naming of their heads.

The one owner of the convention, imported by the probe (which writes the folders) and tools/summarize.py (which
reads them). A subset is a strictly increasing tuple of 0-based positions in the probe's --pretrained order; its
heads live in <dump_path>/sub{i}-{j}-.../ (e.g. sub0-2-3), one wd{wd}_lr{lr}/ folder per sweep point below it.
"""
import itertools
import os
import re

from util.cli import UserError

SUBSET_MODES = ("none", "each", "prefix", "all")
MAX_SUBSETS = 63  # 'all' on 6 backbones; beyond, heads would outnumber what one pass trains cheaply
_FOLDER = re.compile(r"^sub(\d+(?:-\d+)*)$")


def subsets_for(mode, n):
    """The subsets a probe of n backbones trains besides the full concatenation's heads (which 'prefix' and
    'all' also list as their last member; a caller that trains the full set anyway may drop it)."""
    if mode == "none":
        return []
    if mode == "each":
        return [(i,) for i in range(n)]
    if mode == "prefix":
        return [tuple(range(k)) for k in range(1, n + 1)]
    if mode == "all":
        if 2 ** n - 1 > MAX_SUBSETS:
            raise UserError(f"--subsets all on {n} backbones means {2 ** n - 1} subsets (at most {MAX_SUBSETS}): "
                            f"use --subsets prefix or each, or probe fewer backbones")
        return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    raise UserError(f"unknown --subsets '{mode}': choose one of {', '.join(SUBSET_MODES)}")


def subset_folder(indices):
    """(0, 2, 3) -> 'sub0-2-3'."""
    return "sub" + "-".join(str(i) for i in indices)


def parse_subset_folder(name):
    """'sub0-2-3' -> (0, 2, 3); None for any other folder name (also unsorted or repeated positions)."""
    match = _FOLDER.match(name)
    if not match:
        return None
    indices = tuple(int(i) for i in match.group(1).split("-"))
    return indices if all(a < b for a, b in zip(indices, indices[1:])) else None


def subset_of_folder(path):
    """(probe folder, subset) of a head folder below a sub{indices} folder, e.g.
    'results/x/sub0-2/wd0.001_lr0.01' -> ('results/x', (0, 2)); None when no component names a subset.
    The innermost sub{...} component counts (a probe may itself sit below a folder that happens to match)."""
    parts = os.path.normpath(path).replace("\\", "/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        indices = parse_subset_folder(parts[i])
        if indices is not None:
            return "/".join(parts[:i]) or ".", indices
    return None
