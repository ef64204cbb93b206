"""Fault injection, fuzzed command lines (driver: tests/faults/driver.py; docs/reliability.md)."""
import contextlib
import io
import itertools
import os
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import main_linear_probe as probe
import main_pretrain as pretrain
from helpers import make_cifar, make_imagenet, make_inat
from util.cli import run_main

# flag: (valid values, invalid values); None is a flag without value, a value with spaces is several values
BAD_NUMBERS = ["-1", "nan", "inf", "-inf", "x", ""]
PROBE_FLAGS = {
    "--arch": (["resnet18"], ["resnet7", "resnet18 resnet18 resnet18", "vgg16"]),
    "--pretrained": (["{ckpt}", "{ckpt} {ckpt}"], ["{missing}", "{garbage}"]),
    "--tag": ([], ["nope", "supervisedimagenet_resnet50_sfadamw_run0"]),
    "--tag_file": ([], ["{missing}", "{garbage}"]),
    "--exp_mode": (["lineareval", "finetune"], ["other"]),
    "--use_bn": ([None], []), "--no-use_bn": ([None], []), "--nesterov": ([None], []),
    "--no-nesterov": ([None], []), "--wd_skip_bn": ([None], []), "--no-wd_skip_bn": ([None], []),
    "--headinit": (["normal", "none", "cat_weights"], ["zeros"]),
    "--optimizer": (["sgd", "adam", "sfadamw"], ["lbfgs"]),
    "--lr": (["0.1", "1e-3", "0.1 0.01", "1e30"], BAD_NUMBERS + ["0", "0.1 0.1"]),
    "--wd": (["0", "1e-4", "1e-4 1e-3"], BAD_NUMBERS + ["1e-4 1e-4"]),
    "--momentum": (["0", "0.5", "0.9"], BAD_NUMBERS), "--gamma": (["0.1", "0.5"], BAD_NUMBERS),
    "--final_lr": (["0", "1e-4"], BAD_NUMBERS),
    "--epochs": (["1", "2"], ["0", "-2", "x"]),
    "--scheduler_type": (["step", "cosine", "constant"], ["linear"]),
    "--decay_epochs": (["1", "1 2", "0"], ["x"]),
    "--seed": (["0", "7"], ["-1", "x", "4611686018427387904"]),
    "--data_name": (["cifar10", "cifar100", "cifar10_10perc", "imagenet1k", "inaturalist18"],
                    ["cifar10_0perc", "cifar10_101perc", "imagefolder", "mnist"]),
    "--data_path": (["{data}"], ["{missing}"]),
    "--checkpoint_root": (["{missing}", "{data}"], []),  # only read through --tag's checkpoints/... paths
    "--tf_name": (["eval", "224px", "32px", "384px", "vit384px"], ["64px"]),
    "--eval_datasets": (["imagenet_r", "imagenet_v2 imagenet_a"], ["imagenet_c"]),
    "--img_size": (["8", "16"], ["7", "0", "-3", "x"]),
    "--data_rate": (["1", "0.5", "0.05"], BAD_NUMBERS + ["0", "2"]),
    "--val_split": (["0", "0.1", "0.5"], BAD_NUMBERS + ["1"]),
    "--batch_size": (["1", "2", "8", "64"], ["0", "-4", "x"]),
    "--workers": (["0", "1"], ["-1", "x"]),
    "--feature_cache": (["{cache}"], []), "--cache_views": (["0", "1", "2"], ["-1", "x"]),
    "--precision": (["auto", "fp32", "bf16"], ["fp16"]),
    "--mode": (["train", "eval_only"], ["test"]),
    "--start_over": ([None], []), "--sync_bn": ([None], []), "--debug": ([None], []),
    "--skip_bad_images": ([None], []),
    "--dist_timeout": (["1", "0.5"], ["0", "-1", "nan", "x"]),
    "--print_freq": (["1", "3"], ["0", "x"]),
    "--beta2": (["0.99", "0"], BAD_NUMBERS), "--lr_last_layer": (["0.1"], BAD_NUMBERS + ["0"]),
    "--classifier": (["linear"], ["mlp"]), "--eval_freq": (["1"], ["0", "2", "x"]),
    "--save_freq": (["1", "999"], ["0", "x"]), "--knn": (["0", "2"], ["-1", "x"]),
    "--subsets": (["none", "each", "prefix"], ["some"]),
    "--head_impl": (["separate", "fused"], ["fast"]),
    "--allow_mixed_transforms": ([None], []), "--no-allow_mixed_transforms": ([None], []),
    "--decoder": (["pil", "turbo"], ["nvjpeg"]),
    "--fast_transforms": ([None], []), "--no-fast_transforms": ([None], []),
    "--custom_eval_func": (["feature_importance", "feature_importance cat_validate_network"], ["other"]),
    "--cuda_deterministic": ([None], []), "--no-cuda_deterministic": ([None], []), "--no-debug": ([None], []),
    "--no-skip_bad_images": ([None], []), "--no-start_over": ([None], []), "--no-sync_bn": ([None], []),
    "--bogus": ([], [None, "1"]),
    "--eval_checkpoint": (["last", "best"], ["first"]),
    "--extra_log_lines": ([None], []), "--no-extra_log_lines": ([None], []),
}
PRETRAIN_FLAGS = {
    "--arch": (["resnet18"], ["resnet7", "vgg16"]),
    "--data_path": (["{data}"], ["{missing}"]),
    "--checkpoint_root": (["{missing}"], []),  # the harness's --output_dir wins over it
    "--img_size": (["8", "16"], ["7", "0", "x"]),
    "--workers": (["0", "1"], ["-1", "x"]),
    "--global_batch": (["2", "4", "8"], ["3", "0", "-8", "x", "64"]),
    "--batch_size": (["1", "2", "4"], ["3", "0", "x"]),
    "--accum_steps": (["1", "2"], ["3", "0", "x"]),
    "--steps": (["1", "2", "3"], ["0", "-1", "x"]),
    "--save_steps": ([None, "1", "2"], ["5", "0", "x"]),
    "--eval_every": (["0", "1", "2"], ["-1", "x"]),
    "--optimizer": (["sfadamw", "sgd"], ["adam"]),
    "--lr": (["0.01", "1e30"], BAD_NUMBERS + ["0"]), "--wd": (["0", "0.1"], BAD_NUMBERS),
    "--eps": (["1e-8", "0"], BAD_NUMBERS), "--sf_r": (["0", "0.75"], BAD_NUMBERS),
    "--weight_lr_power": (["0", "2"], BAD_NUMBERS),
    "--betas": (["0.9 0.999", "0 0"], ["0.9", "1 1", "-0.1 0.5", "x y"]),
    "--warmup_steps": (["0", "1", "5"], ["-1", "x"]),
    "--label_smoothing": (["0", "0.2"], BAD_NUMBERS + ["1"]),
    "--momentum": (["0", "0.9"], BAD_NUMBERS), "--gamma": (["0.1"], BAD_NUMBERS),
    "--schedule": (["step", "cosine"], ["linear"]),
    "--decay_epochs": ([None, "1", "0"], ["x"]),
    "--bn_refresh_batches": (["0", "1", "3"], ["-1", "x"]),
    "--bn_refresh_every": (["0", "1", "2"], ["-1", "x"]),
    "--run": (["0", "5"], ["-1", "x"]),
    "--seed": (["0", "7"], ["-1", "x"]),
    "--precision": (["auto", "fp32", "bf16"], ["fp16"]),
    "--max_time": (["1:00", "1-00:00:00", "0.001"], ["0", "-5", "x", "::"]),
    "--print_freq": (["1", "5"], ["0", "x"]),
    "--dist_timeout": (["1"], ["0", "nan", "x"]),
    "--start_over": ([None], []), "--debug": ([None], []), "--skip_bad_images": ([None], []),
    "--no-start_over": ([None], []), "--no-debug": ([None], []), "--no-skip_bad_images": ([None], []),
    "--no-compile": ([None], []), "--no-tensorboard": ([None], []),
    "--decoder": (["pil", "turbo"], ["nvjpeg"]),
    "--fast_transforms": ([None], []), "--no-fast_transforms": ([None], []),
    "--sf_foreach": ([None], []), "--no-sf_foreach": ([None], []),
    "--cuda_deterministic": ([None], []), "--no-cuda_deterministic": ([None], []),
    "--tf32": ([None], []), "--no-tf32": ([None], []),
    # in-process: --device cpu would hide the GPUs from every later test through the environment
    "--device": (["auto"], ["gpu"]), "--local_rank": (["0", "1"], ["x"]),
    "--bogus": ([], [None]),
}


@st.composite
def command_lines(draw, flags):
    """Up to 6 random flags; in about half of the examples only valid values (to reach deep into a run), else
    any value, valid or not."""
    valid_only = draw(st.booleans())
    names = [f for f, (valid, invalid) in sorted(flags.items()) if valid or not valid_only]
    options = []
    for flag in draw(st.lists(st.sampled_from(names), max_size=6)):
        valid, invalid = flags[flag]
        options.append((flag, draw(st.sampled_from(valid if valid_only else valid + invalid))))
    return options


def fuzz_once(main, parser, argv):
    """A fuzzed run ends normally, or in one 'error: ...' line (its last) and a non-zero exit, never in a
    traceback. Returns which."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_main(main, parser.parse_args(argv))
        except SystemExit as exc:
            text = err.getvalue().strip()
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            assert exc.code not in (0, None) and len(errors) == 1 and text.endswith(errors[0]), (argv, text)
            assert "Traceback" not in text, (argv, text)
            return "error"
    return "ran"


def expand(options, names):
    """argv of (flag, value) pairs."""
    argv = []
    for flag, value in options:
        argv.append(flag)
        if value is not None:
            argv.extend(value.format(**names).split(" "))
    return argv


RUN_IDS = itertools.count()  # a fresh folder per example (hypothesis seeds `random` itself)


@pytest.fixture(scope="module")
def fuzz_world(world):
    base = world["base"] / "fuzz"
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=20, n_test=10)
    make_cifar(data, "cifar100", n_train=100, n_test=10)
    make_imagenet(data, num_classes=2, n_train=4, n_val=2, size=16)
    make_inat(data, category_ids=(1, 2), n_train=2, n_val=1, size=16)
    garbage = base / "garbage.pth"
    garbage.write_bytes(b"\x80\x04garbage")
    return {"base": base, "ckpt": world["ckpt"], "data": data, "missing": str(base / "missing"),
            "garbage": str(garbage), "cache": str(base / "cache")}


def fuzz_settings(examples):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= 100,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def check_probe_command_line(fuzz_world, options):
    dump = os.path.join(fuzz_world["base"], f"probe{next(RUN_IDS)}")
    # tiny defaults first, so the fuzzed flags override them; no download ever (no network)
    argv = ["--arch", "resnet18", "--pretrained", fuzz_world["ckpt"], "--data_path", fuzz_world["data"],
            "--img_size", "8", "--batch_size", "4", "--workers", "0", "--epochs", "1", "--precision", "fp32",
            "--dump_path", dump, *expand(options, fuzz_world), "--no-download"]
    if "--tag" in argv:  # --tag refuses --arch/--pretrained: keep the fuzzed ones only
        argv = argv[4:]
    try:
        event(fuzz_once(probe.main, probe.get_args_parser(), argv))
    finally:
        shutil.rmtree(dump, ignore_errors=True)  # checkpoints add up over hundreds of examples


def check_pretrain_command_line(fuzz_world, options):
    out = os.path.join(fuzz_world["base"], f"pretrain{next(RUN_IDS)}")
    argv = ["--arch", "resnet18", "--data_path", fuzz_world["data"], "--img_size", "8", "--global_batch", "4",
            "--workers", "0", "--steps", "2", "--save_steps", "--eval_every", "0", "--precision", "fp32",
            "--bn_refresh_batches", "1", "--warmup_steps", "1", "--output_dir", os.path.join(out, "ckpt"),
            "--dump_path", os.path.join(out, "run"), *expand(options, fuzz_world)]
    try:
        event(fuzz_once(pretrain.main, pretrain.get_args_parser(), argv))
    finally:
        shutil.rmtree(out, ignore_errors=True)


@fuzz_settings(20)  # the slow-marked variant below draws 600
@given(options=command_lines(PROBE_FLAGS))
def test_fuzzed_probe_command_lines_never_end_in_a_traceback(fuzz_world, options):
    check_probe_command_line(fuzz_world, options)


@fuzz_settings(12)  # the slow-marked variant below draws 400
@given(options=command_lines(PRETRAIN_FLAGS))
def test_fuzzed_pretraining_command_lines_never_end_in_a_traceback(fuzz_world, options):
    check_pretrain_command_line(fuzz_world, options)


@pytest.mark.slow
@fuzz_settings(600)
@given(options=command_lines(PROBE_FLAGS))
def test_fuzzed_probe_command_lines_many(fuzz_world, options):
    check_probe_command_line(fuzz_world, options)


@pytest.mark.slow
@fuzz_settings(400)
@given(options=command_lines(PRETRAIN_FLAGS))
def test_fuzzed_pretraining_command_lines_many(fuzz_world, options):
    check_pretrain_command_line(fuzz_world, options)
