"""tools/summarize.py on generated result folders."""
import csv
import json
import os
import subprocess
import sys

import pytest

from tools import summarize
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREFIX = "INFO - 2025-06-01 12:00:00 - 0:00:01 - "
TRANSFER = "supervised/imagenet/transfer"
STEPS = {1: "full", 2: "200", 4: "100", 5: "80"}


# ---- generators
def write_run(folder, data, wd, n, accs, index=None, finished=True, args=True, lr=0.01, epochs=3,
              selected=None, steps=None):
    """A probe run folder as main_linear_probe.py leaves it: args.json, train.log, metrics.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = steps or STEPS[n]
    runs = [index] if index is not None else range(n)
    if args:
        tag = (f"supervisedimagenet_resnet50_sfadamw_run{index}" if index is not None
               else f"supervisedimagenet_resnet50_sfadamw_{n}_step{steps}k")
        (folder / "args.json").write_text(json.dumps({
            "data_name": data, "wd": wd, "lr": lr, "tag": tag, "arch": ["resnet50"] * n, "epochs": epochs,
            "pretrained": [f"checkpoints/supervised_pretrain/resnet50_sfadamw/checkpoints_step{steps}/"
                           f"checkpoint_run{i}.pth.tar" for i in runs]}))
    lines, metrics, best = [f"{PREFIX}git revision: abc1234"], [], 0.0
    for epoch, acc in enumerate(accs):
        best = max(best, acc)
        lines.append(f"{PREFIX}Epoch[{epoch}] - Iter: [0/10] Time 0.100 (0.100) Data 0.01 (0.01) "
                     f"Loss 2.3000 (2.3000) Prec 10.000 (10.000) LR 0.0100")
        lines.append(f"{PREFIX}Test: Loss 1.0000 Acc@1 {acc:.3f} Best Acc@1 so far {best:.2f}")
        metrics.append({"epoch": epoch, "train_loss": 1.0, "train_top1": 50.0, "test_loss": 1.0,
                        "test_top1": acc, "test_top5": 90.0, "lr": lr, "seconds": 1.0})
    if selected:
        lines.append(f"{PREFIX}Selected on validation: epoch 1 val Acc@1 {selected[0]:.2f} "
                     f"test Acc@1 {selected[1]:.2f}")
    if finished:
        lines.append(f"{PREFIX}Top-1 test accuracy: {best:.1f}")
    (folder / "train.log").write_text("\n".join(lines) + "\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def acc(data, n, wd, index=0):
    """Made-up accuracies: more models help, wd 1e-4 wins on cifar10, 1e-5 on inaturalist18."""
    base = {"cifar10": 80.0, "inaturalist18": 30.0}[data] + 2 * n
    good = {"cifar10": 1e-4, "inaturalist18": 1e-5}[data]
    return base + (1.0 if wd == good else 0.0) + 0.2 * index


def build_results(root, args=True):
    """The reference folder layout: catN sweeps and single runs run0..2 (cat1), on two datasets, two wds."""
    for data, wds in (("cifar10", (1e-4, 1e-3)), ("inaturalist18", (1e-5, 1e-4))):
        for wd in wds:
            for n, name in ((2, "2_step200k"), (5, "5_step80k")):
                top = acc(data, n, wd)
                write_run(root / TRANSFER / "lineareval" / f"{data}_{wd}" / f"resnet50_sfadamw_cat{name}",
                          data, wd, n, [top - 3, top, top - 0.5], args=args)
            for i in range(3):
                top = acc(data, 1, wd, i)
                write_run(root / TRANSFER / "lineareval_seer" / f"{data}_{wd}" / "resnet50_sfadamw" / f"run{i}",
                          data, wd, 1, [top - 1, top], index=i, args=args)


def run(root, *argv, capsys=None):
    summarize.main(summarize.get_args_parser().parse_args(["--root", str(root), *argv]))
    return capsys.readouterr().out if capsys else None


def table_rows(out, title):
    """The markdown rows after a title line: {method: [cells]}."""
    lines = out[out.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# ---- the table
def test_table_selection_csv_and_plot(tmp_path, capsys):
    build_results(tmp_path)
    out = run(tmp_path, capsys=capsys)
    assert "best epoch and best weight decay on the test split, as the reference" in out
    top1 = table_rows(out, "Linear-probe top-1")
    assert list(top1) == ["cat1", "cat2", "cat5"]
    # columns: steps, total, ImageNet1k, iNat18, CIFAR100, CIFAR10
    assert top1["cat1"][:2] == ["450k", "450k"] and top1["cat5"][:2] == ["80k", "400k"]
    assert top1["cat2"] == ["200k", "400k", "–", f"{acc('inaturalist18', 2, 1e-5):.1f}", "–",
                            f"{acc('cifar10', 2, 1e-4):.1f}"]
    assert top1["cat1"][5] == f"{acc('cifar10', 1, 1e-4, 1):.1f} ± 0.2"  # mean and std of run0..2
    wds = table_rows(out, "Winning weight decay")
    assert wds["cat5"] == ["80k", "400k", "–", "1e-5", "–", "1e-4"]
    assert "cat5 80k CIFAR10: 1e-4: 91.00 (n=1)* | 1e-3: 90.00 (n=1)" in out

    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2  # configs x datasets x weight decays
    chosen = [r for r in rows if r["selected"] == "1"]
    assert len(chosen) == 6 and all(r["selection"] == "test" for r in rows)
    cat1 = next(r for r in chosen if r["method"] == "cat1" and r["dataset"] == "inaturalist18")
    assert (cat1["wd"], cat1["n_runs"], cat1["steps_per_model"], cat1["total_steps"]) == ("1e-05", "3", "450k", "450k")
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_folder_names_alone_identify_runs(tmp_path, capsys):
    build_results(tmp_path, args=False)
    out = run(tmp_path, "--no-save", capsys=capsys)
    assert table_rows(out, "Winning weight decay")["cat5"] == ["80k", "400k", "–", "1e-5", "–", "1e-4"]
    assert table_rows(out, "Linear-probe top-1")["cat1"][3].endswith("± 0.2")
    assert not list(tmp_path.glob("summary*"))


def test_patterns_filter_like_the_acc1_scripts(tmp_path, capsys):
    build_results(tmp_path)
    out = run(tmp_path, "inat", "80k", capsys=capsys)
    assert "Found 20 runs" in out and "2 matching inat 80k" in out  # the two weight decays of cat5
    rows = table_rows(out, "Linear-probe top-1")
    assert list(rows) == ["cat5"] and rows["cat5"][5] == "–"
    assert (tmp_path / "summary_inat_80k.csv").exists() and not (tmp_path / "summary.csv").exists()
    out = run(tmp_path, "CAT1", "cifar10_0.0001", "--no-save", capsys=capsys)
    assert "3 matching" in out


def test_other_configurations_and_head_subfolders(tmp_path, capsys):
    # 3 models of 80k steps: a row of its own, named by its size
    write_run(tmp_path / "mine" / "cat3", "cifar100", 5e-4, 3, [60.0, 61.0], steps="80")
    # several heads of one run: args.json (wd list) at the parent, one folder per head
    for wd, top in ((1e-4, 70.0), (1e-3, 72.0)):
        write_run(tmp_path / "heads" / f"wd{wd}_lr0.01", "cifar100", wd, 5, [top], args=False)
    (tmp_path / "heads" / "args.json").write_text(json.dumps({
        "data_name": "cifar100", "wd": [1e-4, 1e-3], "lr": 0.01, "tag": None, "arch": ["resnet50"] * 5,
        "pretrained": [f"checkpoints/supervised_pretrain/resnet50_sfadamw/checkpoints_step80/checkpoint_run{i}.pth.tar"
                       for i in range(5)]}))
    out = run(tmp_path, "--no-save", capsys=capsys)
    rows = table_rows(out, "Linear-probe top-1")
    assert list(rows) == ["cat5", "cat3"]
    assert rows["cat3"][:2] == ["80k", "240k"] and rows["cat3"][4] == "61.0"
    assert rows["cat5"][4] == "72.0" and table_rows(out, "Winning weight decay")["cat5"][4] == "1e-3"


# ---- unfinished, half-written, held-out
def test_unfinished_and_half_written_runs_stay_out(tmp_path, capsys):
    build_results(tmp_path)
    cat4 = write_run(tmp_path / TRANSFER / "lineareval" / "cifar10_0.0001" / "resnet50_sfadamw_cat4_step100k",
                     "cifar10", 1e-4, 4, [99.0, 99.5], finished=False, epochs=28)
    with open(cat4 / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "test_top1": 99.')  # cut mid-line while writing
    # a finished run started over: its train.log goes on after the final line
    restarted = tmp_path / TRANSFER / "lineareval" / "cifar10_0.001" / "resnet50_sfadamw_cat5_step80k"
    with open(restarted / "train.log", "a") as f:
        f.write(f"{PREFIX}Epoch[0] - Iter: [0/10] Time 0.1 Data 0.0 Loss 2.3 Prec 10.0 LR 0.01\n")
    out = run(tmp_path, "--no-save", capsys=capsys)
    rows = table_rows(out, "Linear-probe top-1")
    assert "cat4" not in rows
    unfinished = out[out.index("Unfinished runs"):]
    assert "resnet50_sfadamw_cat4_step100k: epoch 1/28, best test top-1 so far 99.50" in unfinished
    assert "cifar10_0.001/resnet50_sfadamw_cat5_step80k: epoch 0/3" in unfinished
    assert "metrics.jsonl: 1 unreadable line(s) skipped" in out
    assert "1e-3: " not in out.split("cat5 80k CIFAR10:")[1].splitlines()[0]


def test_only_unfinished_runs(tmp_path, capsys):
    write_run(tmp_path / "a", "cifar10", 1e-4, 5, [50.0], finished=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.log").write_text(f"{PREFIX}git revision: abc\n{PREFIX}Epoch[0] - Iter: [0/9")
    out = run(tmp_path, capsys=capsys)
    assert "No finished run yet" in out and "a: epoch 0/3" in out and "b: epoch 0" in out
    assert not list(tmp_path.glob("summary*"))


def test_heldout_rule_is_reported(tmp_path, capsys):
    for wd, (val, test) in ((1e-4, (80.0, 70.0)), (1e-3, (75.0, 71.0))):
        write_run(tmp_path / f"cifar10_{wd}" / "resnet50_sfadamw_cat5_step80k", "cifar10", wd, 5, [72.0, 73.0],
                  selected=(val, test))
    out = run(tmp_path, capsys=capsys)
    assert "held-out rule" in out
    assert table_rows(out, "Linear-probe top-1")["cat5"][5] == "70.0†"  # chosen on validation, not on test
    with open(tmp_path / "summary.csv") as f:
        assert {r["selection"] for r in csv.DictReader(f)} == {"held-out"}


# ---- empty roots, environment, plot extra
def test_empty_and_missing_roots(tmp_path, capsys):
    out = run(tmp_path, capsys=capsys)
    assert "No runs under" in out
    build_results(tmp_path)
    assert "No run matches every pattern" in run(tmp_path, "svhn", capsys=capsys)
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "nowhere")


def test_cat_exp_home_and_cli(tmp_path):
    build_results(tmp_path / "results")
    env = {**os.environ, "CAT_EXP_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarize.py"), "cifar", "--no-save"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "| cat5" in proc.stdout


def test_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    build_results(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = run(tmp_path, "--plot", str(tmp_path / "p.png"), capsys=capsys)
    assert "--plot needs matplotlib" in out and not (tmp_path / "p.png").exists()
    assert (tmp_path / "summary.csv").exists()


# ---- the paper's numbers beside yours (util/paper.py)
def paper_results(root, cat1_cifar10):
    """Figure 2's layout: cat1 seeds on CIFAR10, cat2 and cat5 on CIFAR10 and iNat18 (one weight decay)."""
    for i, top in enumerate(cat1_cifar10):
        write_run(root / TRANSFER / "lineareval_seer" / "cifar10_1e-4" / "resnet50_sfadamw" / f"run{i}",
                  "cifar10", 1e-4, 1, [top - 1, top], index=i)
    for data, n, top in (("cifar10", 2, 91.5), ("cifar10", 5, 93.8), ("inaturalist18", 2, 38.0),
                         ("inaturalist18", 5, 46.0)):
        write_run(root / TRANSFER / "lineareval" / f"{data}_1e-4" / f"resnet50_sfadamw_cat{n}_step{STEPS[n]}k",
                  data, 1e-4, n, [top - 2, top])


def test_paper_values_and_differences_beside_figure_2_cells(tmp_path, capsys):
    paper_results(tmp_path, [90.0, 90.2, 90.4, 90.6, 90.8])  # mean 90.4 (the paper's), std 0.32
    out = run(tmp_path, "--no-save", capsys=capsys)
    rows = table_rows(out, "Yours / the paper's")
    assert list(rows) == ["cat1", "cat2", "cat4", "cat5"]
    # columns: steps, ImageNet1k, iNat18, CIFAR100, CIFAR10
    assert rows["cat1"] == ["450k", "– / 78.4", "– / 33.7", "– / 71.0", "90.4 / 90.4 (+0.0)"]
    assert rows["cat2"][4] == "91.5 / 91.2 (+0.3)"  # within 2 x 0.32 of the paper
    assert rows["cat5"][4] == "93.8 / 92.8 (+1.0) !"  # beyond it
    # iNat18 has no cat1 seeds: the assumed default spread (0.5), said so
    assert rows["cat2"][2] == "38.0 / 40.4 (-2.4) !" and rows["cat5"][2] == "46.0 / 46.2 (-0.2)"
    assert "CIFAR10 0.32: measured, std of your 5 cat1 seeds" in out
    assert "iNat18 0.50: assumed default" in out and "the paper gives no error bars" in out
    assert "2 cell(s) flagged." in out


def test_paper_table_only_for_figure_2_unless_asked(tmp_path, capsys):
    write_run(tmp_path / "demo" / "cat4", "texture", 1e-4, 4, [90.0], steps="32steps")
    assert "Yours / the paper's" not in run(tmp_path, "--no-save", capsys=capsys)
    forced = run(tmp_path, "--no-save", "--paper", capsys=capsys)
    assert table_rows(forced, "Yours / the paper's")["cat5"][1:] == ["– / 77.8", "– / 46.2", "– / 77.1", "– / 92.8"]
    paper_results(tmp_path / "fig2", [90.0, 90.8])
    assert "Yours / the paper's" not in run(tmp_path / "fig2", "--no-save", "--no-paper", capsys=capsys)


# ---- one tie rule: the probe's sweep log and the table agree on a flat sweep
def test_a_flat_sweep_selects_the_same_head_in_the_probe_and_the_table(tmp_path, capsys):
    import main_linear_probe as probe
    from helpers import make_checkpoint, make_cifar

    data, ckpt, dump = str(tmp_path / "data"), str(tmp_path / "a.pth"), tmp_path / "results" / "sweep"
    make_cifar(data, "cifar10", n_train=64, n_test=40)
    make_checkpoint(ckpt, "resnet18", "raw", seed=0)
    # an lr too small to move a head: every head keeps the same (seeded) start, so every weight decay ties; the
    # command line lists the smallest weight decay neither first nor last
    probe.main(probe.get_args_parser().parse_args([
        "--arch", "resnet18", "--pretrained", ckpt, "--data_path", data, "--dump_path", str(dump), "--img_size", "32",
        "--workers", "0", "--batch_size", "32", "--precision", "fp32", "--epochs", "1", "--lr", "1e-9",
        "--wd", "5e-3", "1e-4", "1e-3"]))
    tops = {wd: [json.loads(line)["test_top1"] for line in (dump / f"wd{wd}_lr1e-9" / "metrics.jsonl").open()]
            for wd in ("5e-3", "1e-4", "1e-3")}
    assert len({top for values in tops.values() for top in values}) == 1, tops  # a flat sweep
    picked = (dump / "sweep.log").read_text().split("Best on test (the reference's rule): ")[1].split()[0]
    assert picked == "wd1e-4_lr1e-9"  # the smallest weight decay, not the first on the command line

    out = run(tmp_path / "results", "--csv", str(tmp_path / "s.csv"), "--no-paper", capsys=capsys)
    with open(tmp_path / "s.csv") as f:
        chosen = [r for r in csv.DictReader(f) if r["selected"] == "1"]
    assert [float(r["wd"]) for r in chosen] == [1e-4]
    assert "(a flat sweep: every point ties, the smallest weight decay is taken)" in out
    assert "best at the edge" not in out
