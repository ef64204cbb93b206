"""Options both main scripts share, spelled and meant the same way in each: the device choice and the launcher
flags of `python -m torch.distributed.launch`. Imports nothing heavy."""
import argparse
import os

from util.flags import add_bool

DEVICES = ("auto", "cuda", "cpu")
DECODER_NAMES = ("pil", "turbo")  # datasets.images.DECODERS (tests/test_decoders.py checks they are equal)


def add_device_arg(g):
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: the GPU of this process when torch sees one, else the CPU, except that a job which "
                        "clearly asked for GPUs (slurm GPU variables, CUDA_VISIBLE_DEVICES) stops with an error "
                        "rather than run on the CPU; cuda: stop with an error if torch sees no GPU; cpu: hide the "
                        "GPUs (recommended: auto)")


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
