"""Command lines: --help without heavy imports, one spelling per concept (with the field's aliases), defaults
shown once in every help line."""
import argparse
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from helpers import check_probe_args
from util.cli import HEAVY_MODULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["main_linear_probe.py", "main_pretrain.py"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))
    if 'if __name__ == "__main__":' in open(p).read())

# Runs a script as `python SCRIPT --help` would, then reports which heavy modules got imported.
HELP_PROBE = """
import json, os, runpy, sys
path = sys.argv[1]
sys.argv = [path, "--help"]
sys.path[0] = os.path.dirname(os.path.abspath(path))  # as python SCRIPT sets it
try:
    runpy.run_path(path, run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in %r if m in sys.modules)
print("HEAVY=" + json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""" % (list(HEAVY_MODULES),)


def test_the_list_covers_the_main_scripts_and_tools():
    assert {"main_linear_probe.py", "main_pretrain.py", "tools/submit.py", "tools/benchmark.py",
            "tools/download.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    """`--help` prints usage and loads none of torch, torchvision, numpy, PIL, matplotlib, requests..."""
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, os.path.join(ROOT, script)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stderr.split("HEAVY=")[-1])
    assert report["code"] == 0, out.stderr
    assert "usage:" in out.stdout
    assert report["heavy"] == [], f"{script} --help imported {report['heavy']}"


def parsers():
    """(name, parser) of every script and tool, subcommands included."""
    from arguments import linear_probe, pretrain
    found = [("main_linear_probe.py", linear_probe.get_args_parser()), ("main_pretrain.py", pretrain.get_args_parser())]
    for script in SCRIPTS:
        if script.startswith("tools/"):
            module = importlib.import_module("tools." + os.path.basename(script)[:-3])
            found.append((script, module.get_args_parser()))
    expanded = []
    for name, parser in found:
        expanded.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                expanded += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return expanded


def visible_help(parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help is not argparse.SUPPRESS and action.option_strings and action.help is not None:
            yield action, formatter._expand_help(action) if action.help else ""


def test_every_help_line_shows_its_default_once():
    problems = []
    for name, parser in parsers():
        for action, text in visible_help(parser):
            flag = action.option_strings[-1]
            if "(default: None)" in text or text.count("(default") > 1:
                problems.append(f"{name} {flag}: {text!r}")
            meaningful = action.default not in (None, argparse.SUPPRESS, [], False) and action.nargs != 0
            if meaningful and "default" not in text.lower():
                problems.append(f"{name} {flag} hides its default {action.default!r}: {text!r}")
    assert not problems, "\n".join(problems)


def test_flags_are_spelled_with_underscores():
    """One spelling across the project: --snake_case (a hyphenated spelling may remain as an alias)."""
    bad = [f"{name} {action.option_strings}" for name, parser in parsers() for action, _ in visible_help(parser)
           if "-" in [s for s in action.option_strings if s.startswith("--")][0][2:]]
    assert not bad, bad


def test_help_of_the_probe_merges_default_and_reference():
    from arguments import linear_probe
    text = linear_probe.get_args_parser().format_help()
    assert "(reference: 28)" not in " ".join(text.split())
    assert "(default and reference: 28)" in " ".join(text.split())


def test_the_fields_common_names_are_aliases():
    from arguments import linear_probe, pretrain
    args = linear_probe.get_args_parser().parse_args(["--output_dir", "out", "--weight_decay", "1e-3", "5e-3",
                                                      "--num_workers", "3", "--local-rank=1"])
    assert (args.dump_path, args.wd, args.workers, args.local_rank) == ("out", ["1e-3", "5e-3"], 3, 1)
    args = pretrain.get_args_parser().parse_args(["--weight_decay", "0.1", "--num_workers", "2", "--local_rank", "0"])
    assert (args.wd, args.workers, args.local_rank) == (0.1, 2, 0)


def test_same_concept_same_flag_in_both_scripts():
    """Options both scripts have share their spelling, type and choices."""
    from arguments import linear_probe, pretrain
    probe, train = ({a.dest: a for a in reversed(p._actions)} for p in (linear_probe.get_args_parser(),
                                                                       pretrain.get_args_parser()))
    for dest in ("data_path", "data_name", "seed", "workers", "precision", "debug", "device", "dist_timeout",
                 "print_freq", "dump_path", "start_over", "momentum", "wd", "lr", "local_rank"):
        assert f"--{dest}" in probe[dest].option_strings and f"--{dest}" in train[dest].option_strings, dest
    for dest in ("precision", "device"):
        assert probe[dest].choices == train[dest].choices, dest
    assert "--num_workers" in probe["workers"].option_strings and "--num_workers" in train["workers"].option_strings
    for parser in (linear_probe.get_args_parser(), pretrain.get_args_parser()):  # the original's bool syntax too
        assert parser.parse_args(["--debug", "True", "--start_over"]).debug is True
        assert parser.parse_args(["--debug", "False"]).debug is False


def test_help_choices_equal_their_owners():
    from arguments import pretrain
    from models.backbones import RESNET_ARCHS
    from models.init import INITS
    from util.sfadamw import MOMENT_DTYPES
    assert pretrain.ARCH_NAMES == tuple(RESNET_ARCHS)
    assert pretrain.INIT_NAMES == tuple(INITS)
    assert sorted(pretrain.MOMENT_DTYPE_NAMES) == sorted(MOMENT_DTYPES)


def probe_folder(tmp_path, monkeypatch, *extra):
    """The --dump_path a probe command line resolves to when it gives none (results root moved to tmp_path)."""
    import main_linear_probe as probe
    from arguments import linear_probe
    monkeypatch.setattr(linear_probe, "RESULTS_ROOT", str(tmp_path / "results" / "probe"))
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(b"x")  # only the path matters here
    argv = ["--arch", "resnet18", "--pretrained", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), *extra]
    args = probe.get_args_parser().parse_args(argv)
    check_probe_args(args)
    return os.path.relpath(args.dump_path, tmp_path / "results" / "probe")


def test_default_probe_folder_is_the_runs_own(tmp_path, monkeypatch):
    """Same command -> same folder (so a rerun resumes); another dataset, backbone set, weight-decay grid or
    recipe -> another folder; the order the weight decays are typed in does not matter."""
    base = probe_folder(tmp_path, monkeypatch, "--data_name", "cifar100", "--wd", "1e-4", "5e-4")
    assert base.startswith(os.path.join("cifar100", "2xresnet18-")) and "wd0.0001_0.0005-" in base
    assert probe_folder(tmp_path, monkeypatch, "--data_name", "cifar100", "--wd", "5e-4", "1e-4") == base
    others = [probe_folder(tmp_path, monkeypatch, "--data_name", "cifar10", "--wd", "1e-4", "5e-4"),
              probe_folder(tmp_path, monkeypatch, "--data_name", "cifar100", "--wd", "1e-4"),
              probe_folder(tmp_path, monkeypatch, "--data_name", "cifar100", "--wd", "1e-4", "5e-4", "--lr", "0.1"),
              probe_folder(tmp_path, monkeypatch, "--data_name", "cifar100", "--wd", "1e-4", "5e-4", "--epochs", "3")]
    assert len({base, *others}) == 5
    explicit = probe_folder(tmp_path, monkeypatch, "--output_dir", str(tmp_path / "mine"))
    assert explicit == os.path.relpath(tmp_path / "mine", tmp_path / "results" / "probe")


@pytest.fixture(scope="module")
def tiny_probe_world(tmp_path_factory):
    from helpers import make_checkpoint, make_cifar
    base = tmp_path_factory.mktemp("cli_world")
    make_cifar(str(base / "data"), "cifar10", n_train=40, n_test=20)
    ckpt = str(base / "run0.pth.tar")
    make_checkpoint(ckpt, "resnet18", "state_dict", seed=1)
    return base, ckpt


def probe_argv(world, dump, *extra):
    base, ckpt = world
    return ["--arch", "resnet18", "--pretrained", ckpt, "--data_path", str(base / "data"), "--dump_path", str(dump),
            "--img_size", "16", "--workers", "0", "--batch_size", "20", "--epochs", "2", *extra]


def test_tensorboard_events_hold_the_metrics_records(tiny_probe_world, tmp_path):
    """--tensorboard writes, beside each head's train.log, the scalars of its metrics.jsonl records."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import main_linear_probe as probe
    from util.tensorboard import events_in
    args = probe.get_args_parser().parse_args(probe_argv(tiny_probe_world, tmp_path, "--wd", "1e-3", "1e-2",
                                                         "--tensorboard"))
    probe.main(args)
    heads = [d for d in sorted(os.listdir(tmp_path)) if d.startswith("wd")]
    assert len(heads) == 2
    for head in heads:
        folder = tmp_path / head
        assert (folder / "train.log").exists() and events_in(folder)
        records = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        events = EventAccumulator(str(folder)).Reload()
        for key, tag in (("train_loss", "train/loss"), ("test_top1", "test/top1"), ("test_top5", "test/top5"),
                         ("lr", "lr")):
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [r["epoch"] for r in records] == [0, 1]
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_no_tensorboard_events_without_the_flag(tiny_probe_world, tmp_path):
    import main_linear_probe as probe
    from util.tensorboard import events_in
    probe.main(probe.get_args_parser().parse_args(probe_argv(tiny_probe_world, tmp_path, "--epochs", "1")))
    assert (tmp_path / "metrics.jsonl").exists() and not events_in(tmp_path)


@pytest.mark.parametrize("script", ["main_linear_probe", "main_pretrain"])
def test_tensorboard_flag_without_the_package_is_one_line(script, tiny_probe_world, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(script)
    from util.cli import run_main
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the extra looks like
    base, ckpt = tiny_probe_world
    argv = (probe_argv(tiny_probe_world, tmp_path / "run") if script == "main_linear_probe" else
            ["--arch", "resnet18", "--data_name", "imagefolder", "--data_path", str(base), "--dump_path",
             str(tmp_path / "run"), "--output_dir", str(tmp_path / "ckpt")])
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, module.get_args_parser().parse_args(argv + ["--tensorboard"]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --tensorboard needs the tensorboard package")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_data_column_measures_loading_only(monkeypatch):
    """Per-epoch mode: the Data time of the training log excludes the frozen backbones' forward (a fake clock:
    loading a batch takes 0.1 s, the backbone 1.0 s, the head step nothing)."""
    import types

    import torch

    import engine
    from util import log_lines
    clock = [0.0]
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(time=lambda: clock[0]))

    class Loader:  # three batches, each taking 0.1 s to load
        def __len__(self):
            return 3

        def __iter__(self):
            for _ in range(3):
                clock[0] += 0.1
                yield torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])

    class SlowEncoder(torch.nn.Module):
        def forward(self, images):
            clock[0] += 1.0
            return images.flatten(1)

    heads = torch.nn.Linear(48, 2)
    optimizer = torch.optim.SGD([{"params": heads.parameters(), "lr": 0.1, "head": 0}])
    lines = []
    logger = types.SimpleNamespace(info=lines.append)
    batches = engine.LoaderBatches(Loader(), torch.device("cpu"), SlowEncoder(), "fp32")
    engine.train_one_epoch(lambda x: [heads(x)], batches, optimizer, 0, engine.LoopLog((logger,), print_freq=1))
    data = [float(line.split("\tData ")[1].split()[0]) for line in lines]
    assert data == pytest.approx([0.1, 0.1, 0.1])
    assert batches.seconds == pytest.approx(3.0)
    assert all(log_lines.ITERATION_RE.search(line) for line in lines)  # the line format is unchanged


def test_device_flag(monkeypatch):
    """--device cuda on a machine whose torch sees no GPU is a one-line user error; --device cpu hides the GPUs;
    a slurm GPU job on a CPU-only torch is refused rather than silently run on the CPU."""
    import torch

    from arguments import common, linear_probe
    from util.cli import UserError
    from util.distributed import require_cuda_if_requested
    parse = linear_probe.get_args_parser().parse_args
    assert parse([]).device == "auto" and common.device_request(parse([])) is None
    env = {}
    common.apply_device_choice(parse(["--device", "cpu"]), env)
    assert env == {"CUDA_VISIBLE_DEVICES": ""}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            require_cuda_if_requested(common.device_request(parse(["--device", "cuda"])), env={})
        with pytest.raises(UserError, match="SLURM_GPUS_ON_NODE"):
            require_cuda_if_requested(None, env={"SLURM_GPUS_ON_NODE": "4"})
    require_cuda_if_requested(common.device_request(parse(["--device", "cpu"])), env={"SLURM_GPUS_ON_NODE": "4"},
                              cuda_available=False)


@pytest.mark.parametrize("module, main_name, alias", [("tools.download", "--keep_archive", "--keep-archive"),
                                                      ("tools.summarize", "--no_save", "--no-save")])
def test_the_two_hyphenated_tool_options_are_aliases_of_the_underscore_spelling(module, main_name, alias):
    parser = importlib.import_module(module).get_args_parser()
    dest = main_name[2:]
    assert getattr(parser.parse_args([main_name]), dest) is True
    assert getattr(parser.parse_args([alias]), dest) is True
    assert getattr(parser.parse_args([]), dest) is False
    assert main_name in parser.format_help()
