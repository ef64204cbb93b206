"""Options both main scripts share, spelled and meant the same way in each: the device choice and the launcher
flags of `python -m torch.distributed.launch`. Imports nothing heavy."""
import argparse
import os

from util import layout
from util.flags import add_bool

DEVICES = ("auto", "cuda", "cpu")
WANDB_MODES = ("auto", "online", "offline")  # util.wandb_log's (spelled here: --help imports no wandb or torch)
DECODER_NAMES = ("pil", "turbo")  # datasets.images.DECODERS (tests/test_decoders.py checks they are equal)


def add_device_arg(g):
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: the GPU of this process when torch sees one, else the CPU, except that a job which "
                        "clearly asked for GPUs (slurm GPU variables, CUDA_VISIBLE_DEVICES) stops with an error "
                        "rather than run on the CPU; cuda: stop with an error if torch sees no GPU; cpu: hide the "
                        "GPUs (recommended: auto)")


def add_data_path_arg(g, project_root, help):
    """--data_path, defaulting to $TIMECAT_DATA, else the clone's data/ (util/layout.py owns the names)."""
    g.add_argument("--data_path", default=layout.data_root(project_root),
                   help=f"{help}; default: ${layout.DATA_ENV} when set, else data/ of the project folder")


def add_checkpoint_root_arg(g, project_root, help):
    """--checkpoint_root, defaulting to $TIMECAT_CHECKPOINTS, else the clone's checkpoints/."""
    g.add_argument("--checkpoint_root", default=layout.checkpoint_root(project_root),
                   help=f"{help}; default: ${layout.CHECKPOINTS_ENV} when set, else checkpoints/ of the project "
                   "folder")


def add_wandb_arg(g):
    g.add_argument("--wandb", nargs="?", const="auto", default=None, choices=WANDB_MODES,
                   help="also log the metrics.jsonl records to a Weights & Biases run whose id is kept in the run "
                   "folder (wandb.json: a requeued or resumed run continues it); auto (the flag alone) = online "
                   "when api.wandb.ai answers and a key is set, else offline (`wandb sync` later); WANDB_MODE and "
                   "WANDB_PROJECT (otherwise: timecat) are read; needs the optional wandb package (`uv sync --extra "
                   "wandb`); off when not given")


def add_data_pipeline_args(g):
    """--workers, --decoder and --fast_transforms (datasets/images.py, datasets/transforms.py; measured in
    docs/benchmarks.md "data")."""
    g.add_argument("--workers", type=int, default=None, help="data-loading processes per process (default: the "
                   "CPUs slurm gives the task, SLURM_CPUS_PER_TASK, else this process's share of the machine's, "
                   "minus one)")
    g.add_argument("--decoder", default="pil", choices=DECODER_NAMES, help="JPEG decoding and tensor conversion: "
                   "pil = PIL + torchvision's ToTensor/Normalize (reference); turbo = libjpeg-turbo through "
                   "simplejpeg and a one-pass tensor conversion, the same tensors bit for bit, faster "
                   "(recommended; needs `uv sync --extra fastjpeg`)")
    add_bool(g, "fast_transforms", False, "crop, resize and flip on uint8 tensors (torchvision's vectorised "
             "kernels) instead of PIL's: faster, pixels within one level of the reference's, a recipe change "
             "(reference: off)")


def add_launcher_args(g):
    """torch.distributed.launch passes --local-rank=N (older versions --local_rank); the rank is read from the
    environment (LOCAL_RANK), so the flag is accepted and has no other effect."""
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def apply_device_choice(args, env=None):
    """--device cpu: hide the GPUs from torch. Call before torch is imported (CUDA reads this variable once)."""
    env = os.environ if env is None else env
    if getattr(args, "device", "auto") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""


def device_request(args):
    """The --device value util.distributed.require_cuda_if_requested expects (None: decide from the job)."""
    device = getattr(args, "device", "auto")
    return None if device == "auto" else device
