"""The miniature Time-Cat experiment runs every stage at a tiny budget and prints its table."""
import csv
import os

from tools import demo


def test_demo_quick_runs_every_stage_and_writes_the_table(tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    demo.main(demo.get_args_parser().parse_args(["--quick", "--workers", "0", "--out", str(out), "--data",
                                                 str(data)]))
    printed = capsys.readouterr().out
    assert "pretrained seed group 1/1" in printed and "probed texture" in printed
    table = [line for line in printed.splitlines() if line.startswith("| cat")]
    assert [row.split("|")[1].strip() for row in table[:2]] == ["cat1", "cat2"]
    header = next(line for line in printed.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.split("|")[4:7]] == ["mixture", "shape", "texture"]
    assert "| 8 steps" in table[0] and "| 4 steps" in table[1]  # equal total budget: 1 x 8 and 2 x 4 steps
    for task in ("mixture", "shape", "texture"):
        for name in ("cat1_group0", "cat2_group0"):
            assert "Top-1 test accuracy" in (out / "probe" / task / name / "wd5e-4_lr0.05" / "train.log").read_text()
    with open(out / "summary.csv") as f:
        assert len([row for row in csv.DictReader(f) if row["selected"] == "1"]) == 6
    # a second run reuses the generated data
    demo.main(demo.get_args_parser().parse_args(["--quick", "--workers", "0", "--out", str(out), "--data",
                                                 str(data)]))
    assert "data: reusing" in capsys.readouterr().out
    assert os.path.islink(data / "pretrain" / "imagenet")
