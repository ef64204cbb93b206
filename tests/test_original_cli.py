"""The original repository's command lines run unchanged and give the recipe of this project's own flags."""
import os

import pytest

import main_linear_probe as probe
from arguments.linear_probe import RECIPE_KEYS, resolve_batch
from helpers import check_probe_args
from util.cli import UserError, run_main

TAG = "supervisedimagenet_resnet50_sfadamw_5_step80k"
# The six linear-probing sbatch scripts of the original release (facebookresearch/richreps-timecat): every one
# passes --debug (one process), the same head flags and the dataset's batch; CIFAR also --tf_name 224px, iNat18
# also --sync_bn True.
COMMON = "--debug --data_path data --tag {tag} --wd {wd} --dump_path {dump} --nesterov True --wd_skip_bn True " \
         "--use_bn True --headinit normal --batch_size {batch} --eval_freq 1"
SBATCH = [
    ("cifar10", "1e-4", 256, "--tf_name 224px"),
    ("cifar100", "5e-4", 256, "--tf_name 224px"),
    ("cifar10_10perc", "1e-3", 256, "--tf_name 224px"),
    ("cifar100_1perc", "5e-3", 256, "--tf_name 224px"),
    ("imagenet1k", "1e-4", 32, ""),
    ("inaturalist18", "1e-5", 32, "--sync_bn True"),
]
OURS = {"cifar10": [], "cifar100": [], "cifar10_10perc": [], "cifar100_1perc": [], "imagenet1k": [],
        "inaturalist18": []}


def parsed(argv, tmp_path):
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    args = probe.get_args_parser().parse_args(argv)
    args.tag, args.arch, args.pretrained = None, ["resnet50"], [str(ckpt)]  # the tag's files are not here
    check_probe_args(args)
    resolve_batch(args, 1)
    return {k: getattr(args, k) for k in RECIPE_KEYS}


@pytest.mark.parametrize("data,wd,batch,extra", SBATCH)
def test_original_sbatch_command_line_gives_our_recipe(tmp_path, data, wd, batch, extra):
    line = COMMON.format(tag=TAG, wd=wd, dump=tmp_path / "out", batch=batch) + f" --data_name {data} {extra}"
    original = parsed(line.split(), tmp_path)
    ours = ["--data_name", data, "--wd", wd, "--dump_path", str(tmp_path / "out")] + OURS[data]
    if data.startswith("cifar"):
        ours += ["--tf_name", "224px"]
    expected = parsed(ours, tmp_path)
    # the original gave the batch per process, which under --debug is also the global batch
    assert {**original, "batch_semantics": None} == {**expected, "batch_semantics": None}
    assert original["global_batch"] == batch and original["precision"] == "fp32"


def test_original_flags_are_accepted_with_their_value_syntax(tmp_path):
    argv = ["--start_over", "True", "--sync_bn", "False", "--classifier", "linear", "--optimizer",
            "schedulefree_adamw", "--nesterov", "False", "--custom_eval_func", "feature_importance",
            "cat_validate_network", "--dist_url", "tcp://localhost:40000", "--config", "cfg.yaml", "--lr_last_layer",
            "0.1", "--beta2", "0.9", "--save_freq", "5", "--world_size", "-1", "--rank", "0", "--gpu", "0",
            "--cuda_deterministic", "False", "--skip_pool", "False", "--save_init", "False"]
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    args = probe.get_args_parser().parse_args(argv + ["--arch", "resnet50", "--pretrained", str(ckpt)])
    check_probe_args(args)
    assert args.start_over is True and args.sync_bn is False and args.nesterov is False
    assert args.optimizer == "schedulefree_adamw" and args.lr_last_layer == 0.1 and args.save_freq == 5
    assert args.ignored == ["config", "dist_url", "gpu", "world_size", "rank"]


@pytest.mark.parametrize("argv,fragment", [
    (["--use_bn", "maybe"], "is not a boolean"),
    (["--classifier", "mlp"], "--classifier"),
    (["--richway", "True"], "--richway"),
    (["--reweight_path", "w.pt"], "--reweight_path"),
    (["--eval_freq", "2"], "--eval_freq"),
    (["--optimizer", "adam", "--nesterov", "True"], "--nesterov"),
])
def test_unsupported_original_values_are_one_line_errors(tmp_path, capsys, argv, fragment):
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    with pytest.raises(SystemExit) as exc:
        run_main(probe.main, probe.get_args_parser().parse_args(argv + ["--arch", "resnet50", "--pretrained",
                                                                       str(ckpt), "--dump_path", str(tmp_path)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and fragment in err, err


def test_custom_eval_func_logs_the_original_diagnostics(tmp_path):
    """feature_importance = mean |W| per backbone block; cat_validate_network = each block scored alone."""
    import torch

    from helpers import make_checkpoint, make_cifar
    from util import log_lines
    data = str(tmp_path / "data")
    make_cifar(data, "cifar10", n_train=40, n_test=20)
    ckpts = [str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]
    for seed, ckpt in enumerate(ckpts):
        make_checkpoint(ckpt, "resnet18", "raw", seed=seed)
    probe.main(probe.get_args_parser().parse_args(
        ["--arch", "resnet18", "--pretrained", *ckpts, "--data_path", data, "--dump_path", str(tmp_path / "run"),
         "--img_size", "16", "--workers", "0", "--batch_size", "20", "--epochs", "1", "--custom_eval_func",
         "feature_importance", "cat_validate_network"]))
    log = (tmp_path / "run" / "train.log").read_text()
    found = dict(log_lines.DIAGNOSTIC_RE.findall(log))
    importance = [float(v) for v in found["feature_importance"].split(",")]
    weight = torch.load(tmp_path / "run" / "best.pth.tar", weights_only=False)["head"]["linear.weight"].abs()
    assert importance == pytest.approx([weight[:, :512].mean().item(), weight[:, 512:].mean().item()], abs=1e-4)
    scores = [float(v) for v in found["cat_validate_network"].split(",")]
    assert len(scores) == 6 and all(0 <= scores[i] <= 100 for i in (1, 2, 4, 5)) and scores[0] > 0


def test_fail_fast_errors_are_one_line(tmp_path, capsys):
    """Checked before any dataset is scanned: empty or file --dump_path, 0-byte checkpoint, unknown arch; a CIFAR
    --data_path that does not exist is not created and filled by a download."""
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    (tmp_path / "empty.pth").touch()
    (tmp_path / "file").write_text("")
    base = ["--arch", "resnet50", "--pretrained", str(ckpt), "--data_path", str(tmp_path / "nowhere")]
    cases = [(base + ["--dump_path", ""], "--dump_path is empty"),
             (base + ["--dump_path", str(tmp_path / "file")], "is a file"),
             (["--arch", "resnet50", "--pretrained", str(tmp_path / "empty.pth"), "--dump_path", str(tmp_path)],
              "0 bytes"),
             (["--arch", "resnet7", "--pretrained", str(ckpt), "--dump_path", str(tmp_path)], "unknown arch")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit):
            run_main(probe.main, probe.get_args_parser().parse_args(argv))
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1 and fragment in err, err
    from datasets.cifar import build_cifar
    with pytest.raises(UserError, match="does not exist"):
        build_cifar("cifar10", str(tmp_path / "nowhere"), True, None, True)
    assert not (tmp_path / "nowhere").exists()


def test_feature_cache_key_holds_the_training_subset(tmp_path):
    from feature_cache import cache_inputs, entry_key
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    keys = []
    for seed in ("1", "2"):
        args = probe.get_args_parser().parse_args(["--arch", "resnet50", "--pretrained", str(ckpt), "--data_rate",
                                                   "0.5", "--seed", seed])
        check_probe_args(args)
        keys.append(entry_key(cache_inputs(args), args.arch[0], args.pretrained[0], "train", -1, 100))
    assert keys[0] != keys[1]


# ---------------------------------------------------------------- the six scripts' command lines, verbatim
ORIGINAL_LINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "original_command_lines.txt")
# the reference recipe (the original release's linear-probe scripts); per line: the data name,
# the weight decay and the global batch come from the line itself, the number of backbones from its tag
REFERENCE_RECIPE = {"exp_mode": "lineareval", "use_bn": True, "headinit": "normal", "optimizer": "sgd",
                    "lr": ["0.01"], "momentum": 0.9, "nesterov": True, "wd_skip_bn": True, "epochs": 28,
                    "scheduler_type": "step", "decay_epochs": [8, 16, 24], "gamma": 0.1, "final_lr": 0.0,
                    "seed": 31, "img_size": None, "data_rate": 1.0, "precision": "fp32", "feature_cache": None,
                    "cache_views": 0, "val_split": 0.0, "lr_last_layer": None, "sync_bn": False,
                    "batch_semantics": "per_process", "subsets": "none", "head_impl": "separate"}


def original_lines():
    with open(ORIGINAL_LINES) as f:
        lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
    assert len(lines) == 6 and all(line[:2] == ["python", "supervised.py"] for line in lines)
    return [line[2:] for line in lines]


@pytest.mark.parametrize("argv", original_lines(), ids=lambda argv: argv[argv.index("--dump_path") + 1])
def test_the_six_original_command_lines_run_verbatim_and_give_the_reference_recipe(tmp_path, argv):
    import yaml

    from arguments.linear_probe import DEFAULT_TAG_FILE
    from datasets.transforms import build_transform
    args = probe.get_args_parser().parse_args(argv)  # verbatim: every flag of the original's line is accepted
    with open(DEFAULT_TAG_FILE) as f:
        tag = yaml.safe_load(f)[args.tag]  # the original's tag names are this project's
    placeholders = []
    for i in range(len(tag["pretrained"])):  # the released checkpoints are not here: same count, placeholders
        placeholders.append(str(tmp_path / f"ckpt{i}.pth"))
        (tmp_path / f"ckpt{i}.pth").write_bytes(b"placeholder")
    (tmp_path / "tags.yaml").write_text(yaml.safe_dump({args.tag: {"arch": tag["arch"],
                                                                   "pretrained": placeholders}}))
    args.tag_file = str(tmp_path / "tags.yaml")
    check_probe_args(args)
    resolve_batch(args, 1)
    value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    expected = dict(REFERENCE_RECIPE, data_name=value["--data_name"], wd=[value["--wd"]],
                    global_batch=256 if value["--data_name"].startswith("cifar") else 32)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.arch == ["resnet50"] * len(placeholders) and args.pretrained == placeholders
    assert args.dump_path == value["--dump_path"] and args.classifier == "linear" and args.debug
    # --tf_name eval (cat_cifar_sf.sh) and 224px (run_cifar_sf.sh) are the same transforms, the reference's
    family = "cifar" if args.data_name.startswith("cifar") else "imagenet"
    for train in (True, False):
        assert repr(build_transform(family, args.tf_name, train)) == repr(build_transform(family, "eval", train))
    # the original's slurm flags with its defaults, out of the recipe
    assert (args.hours, args.tasks_per_node, args.cpus_per_task, args.gpus_per_node, args.nodes, args.mem,
            args.constraint, args.gres, args.exclude, args.job_name, args.account, args.server) == \
        (12.0, 8, 8, 1, 1, "64G", None, None, None, "submitit", None, "nyu")


def test_the_originals_slurm_flags_are_accepted_and_change_no_recipe(tmp_path):
    from arguments.linear_probe import RECIPE_KEYS, SLURM_KEYS, default_dump_path
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"placeholder")
    base = ["--arch", "resnet50", "--pretrained", str(ckpt)]
    slurm = ["--hours", "5.5", "--tasks_per_node", "1", "--cpus_per_task", "4", "--gpus_per_node", "2", "--nodes",
             "3", "--mem", "128G", "--constraint", "volta32gb", "--gres", "gpu:1", "--exclude", "node1",
             "--job_name", "probe", "--account", "acct", "--server", "fair"]
    plain, with_slurm = (probe.get_args_parser().parse_args(base + extra) for extra in ([], slurm))
    assert with_slurm.hours == 5.5 and with_slurm.nodes == 3 and with_slurm.mem == "128G"
    assert not set(SLURM_KEYS) & set(RECIPE_KEYS)
    assert default_dump_path(plain, RECIPE_KEYS) == default_dump_path(with_slurm, RECIPE_KEYS)
