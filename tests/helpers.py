"""Test helpers: the synthetic on-disk data (datasets/synthetic.py) and running a script as a user would."""
import os
import subprocess
import sys

from arguments.linear_probe import check_args
from datasets.synthetic import (
    algoperf_keys,
    class_image,
    make_checkpoint,
    make_cifar,
    make_eval_sets,
    make_imagenet,
    make_inat,
)

__all__ = ["ROOT", "algoperf_keys", "class_image", "make_checkpoint", "make_cifar", "make_eval_sets", "make_imagenet",
           "make_inat", "run_script", "expect_user_error"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_probe_args(args):
    """The probe's flag checks in main()'s order: the backbones (and --data_name), then every other flag."""
    from timecat import resolve_backbones
    resolve_backbones(args)
    check_args(args)


def run_script(args, cwd=ROOT, env=None, timeout=600):
    """Run a project script as a user would; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def expect_user_error(argv, capsys, *fragments, script=None):
    """The script (default main_linear_probe) refuses argv in one `error:` line (exit code 2, no traceback) that
    names every fragment; returns the line."""
    import pytest

    from util.cli import run_main
    if script is None:
        import main_linear_probe as script
    with pytest.raises(SystemExit) as exc:
        run_main(script.main, script.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err
