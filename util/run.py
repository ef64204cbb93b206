"""One run's life, the same for main_linear_probe.py and main_pretrain.py (MAE's and DINO's main() pattern):

    dist_info = start_processes(args, device_request(args))   # optional packages, the GPU asked for, the group
    with open_run(args, dist_info, "epoch", ...) as run:      # lock the folder, logs, stop signal, TensorBoard/W&B
        state = run.resume_or_start(checkpoint, check_recipe, stale_files, model=model, optimizer=optimizer)
        run.write_args(vars(args))                            # args.json of what this run is
        ...                                                    # the loop; run.stop() says when to stop cleanly

A rerun of the same command resumes: restart_from_checkpoint checks the recipe of the saved run first, then loads
each object's state (DINO's restart_from_checkpoint); --start_over instead removes what the previous run left.
Depends on nothing of ours but util."""
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from util import layout
from util.checkpoint import load_file
from util.distributed import any_process, cleanup, init_distributed, require_cuda_if_requested
from util.logs import append_jsonl, claim_run_folder, close_logger, create_logger, write_json_atomic
from util.misc import requeue_slurm_job, stop_outcome
from util.signals import StopSignal
from util.tensorboard import MetricsBoard, require_tensorboard
from util.wandb_log import WandbRun, require_wandb


def start_processes(args, device):
    """Before any folder or log: the optional packages --tensorboard and --wandb need, the GPU a job asked for
    (device: None to decide from the job, 'cuda' or 'cpu'), then the process group (--debug, --dist_timeout)."""
    if args.tensorboard:
        require_tensorboard()
    if args.wandb:
        require_wandb()
    require_cuda_if_requested(device)  # a GPU job on a CPU-only torch stops here, in one line
    return init_distributed(debug=args.debug, timeout_minutes=args.dist_timeout)


def configure_cuda_numerics(device, deterministic, tf32=None):
    """On a GPU: cuDNN autotuning, or with deterministic (--cuda_deterministic) deterministic kernels and no
    autotuning; tf32 (pretraining's --tf32): TF32 matrix products, None: PyTorch's default left alone."""
    if device.type != "cuda":
        return
    # autotuning picks kernels by timing, and cuDNN's fastest backward kernels sum in a varying order: both make
    # two identical runs differ in the last bits, which then grow; --cuda_deterministic rules both out
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)  # only matters with --precision fp32


def restart_from_checkpoint(path, check_recipe, run_variables=None, what="run checkpoint", **objects):
    """Load the checkpoint at `path`: check_recipe(saved args, path) first (it raises on another recipe), then
    each object's load_state_dict from the entry of its keyword's name (an entry the checkpoint lacks is skipped,
    as DINO's), and each run variable present in the checkpoint into the dict run_variables. Returns the
    checkpoint's dict."""
    state = load_file(path, what)
    check_recipe(state["args"], path)
    for name, obj in objects.items():
        if name in state and obj is not None:
            obj.load_state_dict(state[name])
    for name in run_variables or {}:
        if name in state:
            run_variables[name] = state[name]
    return state


def report_stop(loggers, reason, where, resumes, requeue, is_main):
    """After a clean stop (the state to resume from is saved): the `Stopped by` line in each log, then on rank 0
    the slurm job's requeue when a process got SIGUSR1 (slurm's warning) or ran out of --max_time, not on a plain
    SIGTERM (scancel). scontrol missing on a slurm node is a one-line error (util.misc.requeue_slurm_job), not a
    crash."""
    for logger in loggers:
        logger.info(f"Stopped by {reason} {where}; a rerun resumes {resumes}; {stop_outcome(requeue)}")
    if is_main and requeue:
        requeue_slurm_job(loggers[0])


@dataclass
class Run:
    """An open run folder: its log, the stop signal, the metrics board (TensorBoard and W&B, rank 0), and the
    extra logs (a sweep's heads) closed with it."""
    folder: str
    dist_info: object
    start_over: bool
    logger: object = None
    stop: object = None  # util.signals.StopSignal: stop() is True once SIGTERM or SIGUSR1 arrived
    board: object = None  # util.tensorboard.MetricsBoard
    logs: list = field(default_factory=list)

    def open_log(self, folder):
        """A log in another folder (a sweep head's train.log), file only, closed with the run."""
        logger = create_logger(folder, self.dist_info.rank, console=False)
        self.logs.append(logger)
        return logger

    def resume_or_start(self, checkpoint, check_recipe, stale=(), **objects):
        """Resume from `checkpoint` (restart_from_checkpoint) unless --start_over or there is none; returns its
        dict, or None for a fresh start, which removes the checkpoint and the `stale` files a previous run left
        (rank 0)."""
        if os.path.exists(checkpoint) and not self.start_over:
            return restart_from_checkpoint(checkpoint, check_recipe, **objects)
        if self.dist_info.is_main:
            for path in (checkpoint, *stale):
                if os.path.exists(path):
                    os.remove(path)
        return None

    def report_stopped(self, where, resumes, limit=None):
        """After a stop signal or a limit reached (limit: its reason, e.g. pretraining's `--max_time 12:00:00`), every
        process (a collective): the `Stopped by` line in every log of the run (its own first, then a sweep's
        heads'), and the slurm job's requeue when a process got SIGUSR1 or on a limit."""
        requeue = any_process(self.stop.requeue or limit is not None, self.dist_info.device)
        report_stop(self.logs, self.stop.received or limit or "a stop signal to another process", where, resumes,
                    requeue, self.dist_info.is_main)

    def add_record(self, record, folder=None):
        """A metrics record (an epoch's, --mode eval_only's), rank 0: appended to metrics.jsonl in the run's folder
        (or a head's) and given to the board (--tensorboard events beside its log, --wandb)."""
        if self.dist_info.is_main:
            append_jsonl(record, os.path.join(folder or self.folder, layout.METRICS))
            self.board.add(record, folder or self.folder)

    def write_args(self, config, folder=None):
        """args.json of the run (or of one head, in its folder), rank 0, atomically."""
        if self.dist_info.is_main:
            write_json_atomic(config, os.path.join(folder or self.folder, layout.ARGS_JSON))


@contextmanager
def open_run(args, dist_info, step_key, log_name=layout.PROBE_LOG, folders=(), cpu_runtime=None):
    """Claim args.dump_path (and its sub-`folders`) for this run, open its log (its first line: what
    util.cpu_runtime chose, when the script ran it), install the stop signal and the metrics board (--tensorboard,
    --wandb; records are indexed by step_key); yields the Run. On the way out: the board, the signal handlers,
    every log, the lock and the process group are closed, whatever happened."""
    for folder in (args.dump_path, *folders):
        os.makedirs(folder, exist_ok=True)
    lock = claim_run_folder(args.dump_path, dist_info, folders)  # before any log line: a refused run writes none
    run = Run(args.dump_path, dist_info, args.start_over, create_logger(args.dump_path, dist_info.rank, log_name))
    run.logs.append(run.logger)
    try:
        if cpu_runtime is not None:
            run.logger.info(cpu_runtime.line)
        # early: a signal during the (long) dataset scan still ends in a clean stop
        wandb_run = (WandbRun(args.dump_path, args.wandb, vars(args), step_key, run.logger)
                     if args.wandb and dist_info.is_main else None)
        with ExitStack() as stack:
            run.stop = stack.enter_context(StopSignal())
            run.board = stack.enter_context(MetricsBoard(args.tensorboard and dist_info.is_main, step_key, wandb_run))
            yield run
    finally:
        for logger in run.logs:
            close_logger(logger)
        if lock is not None:
            lock.close()
        cleanup()
