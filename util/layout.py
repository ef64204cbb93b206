"""The one owner of the checkpoint layout (README layout of the original repository):

    checkpoints/supervised_pretrain/resnet50_sfadamw/checkpoints_step{full,200,100,80}/checkpoint_run{i}.pth.tar

A milestone folder is `checkpoints_stepfull` (a run's last step), `checkpoints_step{k}` for k thousand steps, or
`checkpoints_step{n}steps` for budgets that are not a multiple of 1000 (small runs). The release archive names
them `checkpoints_full` / `checkpoints_200k`; the parser reads every form. Writers (main_pretrain.py,
tools/download.py) and readers (tools/plan_timecat.py, tools/summarize.py, tools/demo.py) all call these
functions. Depends on nothing of ours.

It also owns where the data and the checkpoints live (roots outside the clone, for clusters whose datasets and
checkpoints do not fit in a home folder): every script, tool and sbatch script takes `--data_path` and
`--checkpoint_root`, whose defaults are $TIMECAT_DATA and $TIMECAT_CHECKPOINTS when set, else the clone's `data/`
and `checkpoints/`. The checkpoint root is the folder that holds `supervised_pretrain/`; a tag's relative
checkpoint path `checkpoints/...` resolves under it (resolve_tag_path).
"""
import os
import re

CHECKPOINT_ROOT = os.path.join("checkpoints", "supervised_pretrain")  # relative to the project root
PRETRAIN_DIR = "supervised_pretrain"  # below the checkpoint root
DATA_ENV = "TIMECAT_DATA"  # default of every --data_path
CHECKPOINTS_ENV = "TIMECAT_CHECKPOINTS"  # default of every --checkpoint_root
TAG_FILE = os.path.join("configs", "pretrained_checkpoints.yaml")  # the tags (--tag, load_encoder), same root
FULL = "full"
# The probe's run folder (--dump_path). One head writes its log, metrics and best head here; a sweep's heads each
# write theirs to <dump_path>/<head name>/ and the run logs to sweep.log. Written by main_linear_probe.py, read by
# tools/summarize.py, tools/analyze_features.py and the tests.
PROBE_LOG = "train.log"  # also pretraining's log (util.logs.create_logger's default)
SWEEP_LOG = "sweep.log"
PROBE_CHECKPOINT = "checkpoint.pth.tar"  # the last epoch's state: every head, the optimizer, the bests (resume)
BEST_HEAD = "best.pth.tar"  # a head at its best test top-1 (--mode eval_only --eval_checkpoint best)
METRICS = "metrics.jsonl"  # one record per evaluation (probe: per epoch; pretraining: per evaluation step)
ARGS_JSON = "args.json"  # the run's arguments (a sweep's head: with its own lr and wd)
# checkpoints_stepfull / checkpoints_step80 / checkpoints_step60steps (ours, README) and checkpoints_full /
# checkpoints_80k (the release archive)
STEP_FOLDER_RE = re.compile(r"^checkpoints_(?:step)?(full|\d+steps|\d+)k?$")
RUN_FILE_RE = re.compile(r"^checkpoint_run(\d+)\.pth(?:\.tar)?$")


def probe_epoch_checkpoint(epoch):
    """--save_freq's copy of the run checkpoint after `epoch` epochs (the reference's name)."""
    return f"checkpoint_epoch{epoch}.pth.tar"


# The optimizer names of both scripts. Two schedule-free AdamW updates that give different trajectories
# (util/sfadamw.py says how), each named for what it is. `sfadamw`, the released checkpoints' name, is an alias of
# the first in pretraining; the original's probe spells the second `schedulefree_adamw` (its choices: sgd, adam,
# schedulefree_adamw), where `sfadamw` is this project's alias of it (arguments/{pretrain,linear_probe}.py map them).
SFADAMW_ALGOPERF = "sfadamw_algoperf"  # AlgoPerf's submission, util/sfadamw.py (the released checkpoints)
SCHEDULEFREE_ADAMW = "schedulefree_adamw"  # the `schedulefree` package's AdamWScheduleFree
# A recipe's checkpoint folder keeps the optimizer spelling it was first written with (resnet50_sfadamw).
OPTIMIZER_FOLDER_NAMES = {SFADAMW_ALGOPERF: "sfadamw", SCHEDULEFREE_ADAMW: "sfadamw_package"}


def run_dir_name(arch, optimizer):
    """The folder of one recipe's runs under CHECKPOINT_ROOT: resnet50_sfadamw (optimizer: its canonical name)."""
    return f"{arch}_{OPTIMIZER_FOLDER_NAMES.get(optimizer, optimizer)}"


def step_label(steps):
    """'80' for 80000 steps (thousands), '60steps' otherwise: the suffix of the milestone folder."""
    return str(steps // 1000) if steps % 1000 == 0 else f"{steps}steps"


def folder_of_label(label):
    """checkpoints_step{label}: label 'full', '80' (thousands of steps) or '60steps'."""
    return f"checkpoints_step{label}"


def milestone_folder_name(steps, final=False):
    return folder_of_label(FULL if final else step_label(steps))


def milestone_dir(output_dir, steps, final=False):
    return os.path.join(output_dir, milestone_folder_name(steps, final))


def run_file_name(run):
    return f"checkpoint_run{run}.pth.tar"


def checkpoint_path(output_dir, steps, run, final=False):
    """Where run `run` writes (and readers find) its weights at `steps`, or its last step with final."""
    return os.path.join(milestone_dir(output_dir, steps, final), run_file_name(run))


def parse_step_folder(name):
    """'full', the step count in thousands as a string ('80'), '60steps', or None for another folder."""
    match = STEP_FOLDER_RE.match(name)
    return match.group(1) if match else None


def steps_of_label(label, full_steps=None):
    """The number of steps a parsed label stands for ('80' -> 80000, '60steps' -> 60, 'full' -> full_steps)."""
    if label == FULL:
        return full_steps
    return int(label[:-5]) if label.endswith("steps") else int(label) * 1000


def parse_run_file(name):
    """The run index of checkpoint_run{i}.pth(.tar), or None."""
    match = RUN_FILE_RE.match(name)
    return int(match.group(1)) if match else None


def run_index_in(path):
    """The run index a checkpoint path names anywhere in it (checkpoint_run{i}, any extension or none, as
    AlgoPerf writes it), or None: a looser reading than parse_run_file, for summaries of a probe's --pretrained."""
    match = re.search(r"checkpoint_run(\d+)", path)
    return int(match.group(1)) if match else None


def data_root(project_root):
    """The default --data_path: $TIMECAT_DATA, else <project>/data."""
    return os.environ.get(DATA_ENV) or os.path.join(project_root, "data")


def checkpoint_root(project_root):
    """The default --checkpoint_root (the folder holding supervised_pretrain/): $TIMECAT_CHECKPOINTS, else
    <project>/checkpoints."""
    return os.environ.get(CHECKPOINTS_ENV) or os.path.join(project_root, "checkpoints")


def pretrain_root(checkpoint_root):
    """<checkpoint root>/supervised_pretrain: where the recipes' run folders (resnet50_sfadamw/) go."""
    return os.path.join(checkpoint_root, PRETRAIN_DIR)


def resolve_tag_path(path, project_root, checkpoint_root):
    """A checkpoint path of a tag file: absolute as given; `checkpoints/...` under the checkpoint root (the tag
    files name the clone's checkpoints/ folder, which --checkpoint_root moves); anything else relative to the
    project folder."""
    if os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] == "checkpoints" and len(parts) > 1:
        return os.path.join(checkpoint_root, *parts[1:])
    return os.path.join(project_root, path)


def parse_checkpoint_path(path):
    """(run folder, milestone label, run index) of `<run folder>/<milestone folder>/checkpoint_run{i}.pth(.tar)`
    (a path relative to the pretraining root, any milestone form parse_step_folder reads), or None."""
    parts = path.replace(os.sep, "/").split("/")
    if len(parts) != 3:
        return None
    label, run = parse_step_folder(parts[1]), parse_run_file(parts[2])
    return None if label is None or run is None else (parts[0], label, run)
