"""Optional Weights & Biases run (--wandb) of a run folder: every numeric field of each metrics.jsonl record is
logged, against the record's epoch (probe) or step (pretraining); metrics.jsonl stays the record of a run, W&B is a
view of it. One W&B run per run folder: the heads of a sweep log under their folder's name
('wd0.0005_lr0.01/test_top1').

The W&B run id is kept in <run folder>/wandb.json, written atomically before the first record, so a requeued or
resumed run continues the same W&B run (resume='allow'). Modes: online; offline (W&B's files under
<run folder>/wandb/offline-run-*-<id>/, uploaded later with `wandb sync <run folder>/wandb/offline-run-*`); auto
(the default of --wandb): online when api.wandb.ai answers and an API key is configured, else offline, and the log
says which and why. WANDB_MODE in the environment wins over all three. wandb is an optional dependency (pyproject
extra `wandb`), imported only when the flag is given. Depends on nothing of ours but util.
"""
import json
import netrc
import os
import secrets
import socket
import string

from util.cli import UserError
from util.logs import write_json_atomic

ID_FILE = "wandb.json"
HOST = "api.wandb.ai"
DEFAULT_PROJECT = "timecat"  # WANDB_PROJECT in the environment names another


def require_wandb():
    """One-line error, before any work starts, when --wandb is given without the package."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb needs the wandb package, which is not installed: run `uv sync --extra wandb` "
                        "(setup.sh installs it), or drop --wandb") from None


def has_api_key():
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode, timeout=3.0):
    """(online|offline|disabled, why): WANDB_MODE first, then the flag, then (auto) the network and the key."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE in the environment"
    if mode != "auto":
        return mode, f"--wandb {mode}"
    if not has_api_key():
        return "offline", "auto: no W&B API key (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((HOST, 443), timeout=timeout).close()
    except OSError:
        return "offline", f"auto: {HOST} does not answer (no network)"
    return "online", f"auto: {HOST} answers"


def run_id(folder):
    """The folder's W&B run id: read from wandb.json, or drawn and written there (atomically) the first time."""
    path = os.path.join(folder, ID_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)["id"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is unreadable: delete it to start a new W&B run") from None
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    write_json_atomic({"id": new}, path)
    return new


class WandbRun:
    """The W&B run of one run folder, opened on the first record; records of sub-folders (the heads of a sweep)
    are logged under their relative path. Closed by close() (MetricsBoard closes it)."""

    def __init__(self, folder, mode, config, step_key, logger=None):
        self.folder, self.config, self.step_key, self.run = folder, config, step_key, None
        self.mode, why = resolve_mode(mode)
        if logger is not None:
            logger.info(f"W&B: {self.mode} ({why}), run id in {os.path.join(folder, ID_FILE)}"
                        + (f"; upload later with `wandb sync {os.path.join(folder, 'wandb', 'offline-run-*')}`"
                           if self.mode == "offline" else ""))

    def open(self):
        import wandb

        os.makedirs(self.folder, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), id=run_id(self.folder),
                              resume="allow", dir=self.folder, mode=self.mode, config=self.config,
                              name=os.path.basename(os.path.normpath(self.folder)), reinit="create_new")
        self.run.define_metric(self.step_key)
        self.run.define_metric("*", step_metric=self.step_key)

    def add(self, record, folder):
        if self.run is None:
            self.open()
        prefix = os.path.relpath(folder, self.folder)
        prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        values = {(key if key == self.step_key else prefix + key): value for key, value in record.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.run.log(values)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
