"""Progress in logs that are not a terminal (slurm's): every long stage prints progress, rate and ETA lines
(util/progress.py), where tqdm does not draw."""
import re

import pytest

from helpers import make_checkpoint, make_cifar, make_imagenet, run_script
from util.progress import Progress, progress_line

LINE = re.compile(r"progress: (.+?) (\d+)/(\d+) (\w+) \(([\d.]+)%\), ([\d.]+) \4/s, ETA (\d+:\d\d:\d\d)")


def test_the_line_gives_progress_rate_and_eta():
    assert progress_line("eval", 120, 400, "batches", 2.0) == \
        "progress: eval 120/400 batches (30.0%), 2.00 batches/s, ETA 0:02:20"


def test_a_line_every_period_and_none_between(monkeypatch):
    lines = []
    monkeypatch.setenv("TIMECAT_PROGRESS_SECONDS", "3600")
    slow = Progress("epoch 0", 10, write=lines.append)
    for _ in range(10):
        slow.update()
    assert lines == []
    monkeypatch.setenv("TIMECAT_PROGRESS_SECONDS", "0")
    resumed = Progress("pretrain", 100, "steps", write=lines.append, start=40)
    resumed.update()
    assert LINE.fullmatch(lines[0]).group(2, 3, 4) == ("41", "100", "steps")
    bar = Progress("eval", 10, bar=True, write=lines.append)  # a terminal: tqdm draws, no lines
    bar.update()
    assert len(lines) == 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("progress")
    make_cifar(str(base / "data"), "cifar10", n_train=100, n_test=30)
    make_imagenet(str(base / "data"), num_classes=4, n_train=8, n_val=3)
    make_checkpoint(str(base / "a.pth"), "resnet18", "raw", seed=1)
    return base


def stages(stderr):
    return {m.group(1).split()[0] for m in LINE.finditer(stderr)}


def test_probe_with_the_cache_reports_extraction_epochs_and_evaluation(data, tmp_path):
    done = run_script(["main_linear_probe.py", "--arch", "resnet18", "--pretrained", str(data / "a.pth"),
                       "--data_path", str(data / "data"), "--dump_path", str(tmp_path / "run"), "--img_size", "32",
                       "--workers", "0", "--batch_size", "25", "--epochs", "1", "--feature_cache",
                       str(tmp_path / "cache")], env={"TIMECAT_PROGRESS_SECONDS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert stages(done.stderr) == {"caching", "epoch", "eval"}, done.stderr[-3000:]


def test_pretraining_reports_steps_and_evaluation(data, tmp_path):
    done = run_script(["main_pretrain.py", "--arch", "resnet18", "--img_size", "32", "--global_batch", "8",
                       "--workers", "0", "--steps", "4", "--save_steps", "--eval_every", "4", "--data_path",
                       str(data / "data"), "--output_dir", str(tmp_path / "ckpt"), "--dump_path",
                       str(tmp_path / "run")], env={"TIMECAT_PROGRESS_SECONDS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert stages(done.stderr) == {"pretrain", "eval"}, done.stderr[-3000:]
    assert "progress: pretrain 4/4 steps (100.0%)" in done.stderr
