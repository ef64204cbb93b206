"""The miniature Time-Cat experiment runs every stage at a tiny budget and prints its table."""
import csv
import os

import torch

import engine_pretrain
from tools import demo, summarize


def test_demo_quick_runs_every_stage_and_writes_the_table(tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    demo.main(demo.get_args_parser().parse_args(["--quick", "--workers", "0", "--out", str(out), "--data",
                                                 str(data)]))
    printed = capsys.readouterr().out
    assert "pretrained seed group 1/1" in printed and "probed texture" in printed
    table = [line for line in printed.splitlines() if line.startswith("| cat")]
    assert [row.split("|")[1].strip() for row in table[:3]] == ["cat1", "cat1", "cat2"]  # cat1, direct, cat2
    header = next(line for line in printed.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.split("|")[4:7]] == ["mixture", "shape", "texture"]
    assert "| 8 steps" in table[0] and "| 4 steps" in table[-1]  # equal total budget: 1 x 8 and 2 x 4 steps
    # direct: trained from scratch on each transfer task (not on the mixture), probed like the others
    direct = [row.split("|") for row in table if "| direct" in row]
    assert len(direct) == 2 and direct[0][4].strip() == "–" and direct[0][5].strip() != "–"
    # the cat2 probe's --subsets prefix heads give the cat-n curve: 1 and 2 backbones
    curve = printed[printed.index("Cat-n curve"):]
    assert [line.split("|")[1].strip() for line in curve.splitlines() if line.startswith("| ")][1:] == ["1", "2"]
    assert (out / "summary_catn.png").stat().st_size > 0
    for task in ("mixture", "shape", "texture"):
        for name in ("cat1_group0", "cat2_group0"):
            assert "Top-1 test accuracy" in (out / "probe" / task / name / "wd5e-4_lr0.05" / "train.log").read_text()
    with open(out / "summary.csv") as f:
        assert len([row for row in csv.DictReader(f) if row["selected"] == "1"]) == 8  # 3 + 3 + 2 direct
    # a second run reuses the generated data
    demo.main(demo.get_args_parser().parse_args(["--quick", "--workers", "0", "--out", str(out), "--data",
                                                 str(data)]))
    assert "data: reusing" in capsys.readouterr().out
    assert not os.path.exists(data / "pretrain")  # main_pretrain.py reads mixture/ itself: no symlink


def test_demo_at_a_budget_of_thousands_of_steps_plans_what_pretraining_writes(tmp_path, capsys, monkeypatch):
    """Budgets that are multiples of 1000 steps are written as checkpoints_step{k}/ (k thousand): the demo's plan
    must name the same folders (the demo stops with an error naming a planned checkpoint pretraining did not write).
    The optimizer steps are skipped (weights stay at the initialisation) so that 2000-step runs take seconds, and so
    are the probes (the quick demo test probes what pretraining wrote); milestones and checkpoints are real."""
    monkeypatch.setattr(engine_pretrain, "train_step", lambda *args: (torch.zeros(()), 0.0, None))
    monkeypatch.setattr(demo, "probe", lambda *args, **kwargs: None)
    monkeypatch.setattr(summarize, "main", lambda *args: None)
    out = tmp_path / "out"
    demo.main(demo.get_args_parser().parse_args(["--quick", "--steps", "2000", "--workers", "0", "--out", str(out),
                                                 "--data", str(tmp_path / "data"), "--epochs", "1"]))
    assert "probed texture" in capsys.readouterr().out
    written = sorted(p.relative_to(out / "checkpoints" / "group0").as_posix()
                     for p in (out / "checkpoints" / "group0").rglob("*.pth.tar")
                     if p.parent.parent.name == "group0")  # the mixture runs; direct runs sit below <task>/
    assert written == ["checkpoints_step1/checkpoint_run0.pth.tar", "checkpoints_step1/checkpoint_run1.pth.tar",
                       "checkpoints_step2/checkpoint_run0.pth.tar", "checkpoints_stepfull/checkpoint_run0.pth.tar",
                       "checkpoints_stepfull/checkpoint_run1.pth.tar"]
    args = demo.get_args_parser().parse_args(["--steps", "2000", "--n", "2", "--groups", "1", "--out", str(out)])
    assert demo.plan(args).configs == {
        "cat1_group0": [str(out / "checkpoints" / "group0" / "checkpoints_step2" / "checkpoint_run0.pth.tar")],
        "cat2_group0": [str(out / "checkpoints" / "group0" / "checkpoints_step1" / f"checkpoint_run{i}.pth.tar")
                        for i in range(2)]}


def test_sigterm_stops_the_demo_not_just_its_current_stage(tmp_path):
    """The stages run in the demo's process and stop cleanly on SIGTERM (as a slurm job would); the demo must
    then end, with the signal's exit status, rather than start the next pretraining run."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "tools/demo.py", "--quick", "--workers", "0", "--out", str(out),
                             "--data", str(tmp_path / "data")], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "pretrain" / "group0" / "run0" / "train.log"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (log.exists() and "Step: [" in log.read_text()):
        time.sleep(0.01)  # polling the log, not timing the run
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in printed and "pretrained seed group" not in printed
    assert not (out / "pretrain" / "group0" / "run1").exists()  # the next run never started
