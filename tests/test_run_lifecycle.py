"""The run lifecycle both scripts share (util/run.py), the recipe records (arguments/recipe.py) and the optimizer
names: old run folders, args.json files and checkpoints keep resuming under today's names."""
import json
import os

import pytest
import torch

from arguments import linear_probe, pretrain
from timecat import resolve_backbones
from util import layout
from util.checkpoint import save_atomic
from util.cli import UserError
from util.run import restart_from_checkpoint


def pretrain_args(*argv):
    args = pretrain.get_args_parser().parse_args(list(argv))
    pretrain.check_args(args)
    return args


def probe_args(tmp_path, *argv):
    ckpt = tmp_path / "backbone.pth"
    ckpt.write_bytes(b"placeholder")
    args = linear_probe.get_args_parser().parse_args(["--arch", "resnet50", "--pretrained", str(ckpt),
                                                      "--data_name", "cifar10", *argv])
    resolve_backbones(args)
    linear_probe.check_args(args)
    linear_probe.resolve_batch(args, 1)
    return args


def test_pretraining_optimizer_names_say_what_they_are_and_keep_their_folders():
    for argv, canonical, folder in ((["--optimizer", "sfadamw"], layout.SFADAMW_ALGOPERF, "resnet50_sfadamw"),
                                    ([], layout.SFADAMW_ALGOPERF, "resnet50_sfadamw"),
                                    (["--optimizer", "sfadamw_package"], layout.SCHEDULEFREE_ADAMW,
                                     "resnet50_sfadamw_package"),
                                    (["--optimizer", "schedulefree_adamw"], layout.SCHEDULEFREE_ADAMW,
                                     "resnet50_sfadamw_package")):
        args = pretrain_args(*argv)
        assert args.optimizer == canonical
        assert os.path.basename(args.output_dir) == folder
        assert os.path.basename(os.path.dirname(args.dump_path)) == folder
    assert pretrain_args("--optimizer", "sgd").optimizer == "sgd"


def test_old_pretraining_runs_resume_under_the_canonical_names():
    today = pretrain.PretrainRecipe.of(vars(pretrain_args()))
    saved = {k: v for k, v in vars(pretrain_args()).items()}
    today.check(dict(saved, optimizer="sfadamw"), "old args.json")  # after --init: sfadamw was AlgoPerf's
    before_init = {k: v for k, v in saved.items() if k not in pretrain.PretrainRecipe.legacy_values()}
    # before --init, sfadamw was the package's optimizer: not today's default
    with pytest.raises(UserError, match="--optimizer schedulefree_adamw \\(now sfadamw_algoperf\\)"):
        today.check(dict(before_init, optimizer="sfadamw"), "old args.json")
    package = pretrain.PretrainRecipe.of(vars(pretrain_args("--optimizer", "sfadamw_package", "--init",
                                                             "torchvision")))
    package.check(dict(before_init, optimizer="sfadamw"), "older args.json")  # before --init: the package's
    package.check(dict(saved, optimizer="sfadamw_package", init="torchvision"), "args.json")
    with pytest.raises(UserError, match="--optimizer sfadamw_algoperf \\(now schedulefree_adamw\\)"):
        package.check(dict(saved, optimizer="sfadamw", init="torchvision"), "args.json")


def test_probe_optimizer_alias_and_old_records(tmp_path):
    args = probe_args(tmp_path, "--optimizer", "sfadamw")
    assert args.optimizer == layout.SCHEDULEFREE_ADAMW == linear_probe.SCHEDULE_FREE
    recipe = linear_probe.ProbeRecipe.of(vars(args))
    recipe.check(dict(vars(args), optimizer="sfadamw"), "old checkpoint")
    # a run written before --subsets, --head_impl and --fast_transforms existed has their legacy values
    old = {k: v for k, v in vars(args).items() if k not in ("subsets", "head_impl", "fast_transforms")}
    recipe.check(old, "old checkpoint")
    with pytest.raises(UserError, match="--head_impl separate \\(now fused\\)"):
        linear_probe.ProbeRecipe.of(vars(probe_args(tmp_path, "--optimizer", "sfadamw", "--head_impl",
                                                    "fused"))).check(old, "old checkpoint")
    with pytest.raises(UserError, match="--sync_bn"):
        recipe.check(dict(vars(args), sync_bn=True), "checkpoint")
    recipe.check(dict(vars(args), sync_bn=True, global_batch=1), "checkpoint", skip=linear_probe.TRAINING_ONLY_KEYS)


def test_the_recipe_keys_are_the_records_fields_and_args_json_holds_them(tmp_path):
    args = probe_args(tmp_path)
    assert set(linear_probe.RECIPE_KEYS) <= set(vars(args))
    assert set(pretrain.RECIPE_KEYS) <= set(vars(pretrain_args()))
    assert "steps" not in pretrain.RECIPE_KEYS and "steps" in pretrain.RUN_ONLY_KEYS
    cosine = pretrain.PretrainRecipe.of(vars(pretrain_args("--optimizer", "sgd", "--schedule", "cosine",
                                                           "--steps", "100")))
    with pytest.raises(UserError, match="--steps 50 \\(now 100\\)"):  # the cosine schedule ends at --steps
        cosine.check(dict(vars(pretrain_args("--optimizer", "sgd", "--schedule", "cosine", "--steps", "50"))),
                     "resume.pth.tar")
    step = pretrain.PretrainRecipe.of(vars(pretrain_args("--optimizer", "sgd", "--steps", "100")))
    step.check(vars(pretrain_args("--optimizer", "sgd", "--steps", "50")), "resume.pth.tar")


def test_restart_from_checkpoint_checks_the_recipe_before_loading(tmp_path):
    path = str(tmp_path / "checkpoint.pth.tar")
    saved_model, saved_opt_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(saved_opt_model.parameters(), lr=0.1, momentum=0.9)
    saved_opt_model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_atomic({"model": saved_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                 "args": {"lr": 0.1}}, path)

    def refuse(saved_args, where):
        raise UserError(f"{where}: another recipe")

    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    with pytest.raises(UserError, match="another recipe"):
        restart_from_checkpoint(path, refuse, model=model)
    assert torch.equal(model.weight, before)  # nothing was loaded

    seen, run_variables = [], {"epoch": 0, "best_acc": 1.5}
    fresh_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    state = restart_from_checkpoint(path, lambda saved, where: seen.append((saved, where)), run_variables,
                                    model=model, optimizer=fresh_opt, encoder=torch.nn.Linear(3, 3))
    assert seen == [({"lr": 0.1}, path)] and state["epoch"] == 3
    assert run_variables == {"epoch": 3, "best_acc": 1.5}  # a variable the checkpoint lacks keeps its default
    assert torch.equal(model.weight, saved_model.weight)
    assert json.dumps(fresh_opt.state_dict()["state"][0]["momentum_buffer"].tolist()) == \
        json.dumps(optimizer.state_dict()["state"][0]["momentum_buffer"].tolist())


def test_one_meter_serves_both_loops():
    """util.misc.Meters: the probe's per-epoch meters and pretraining's windows are the same kind; a device tensor
    is summed as a tensor (no host synchronisation per step), a float as the float weighted by the batch size."""
    from engine import epoch_meters, update_head_meters
    from engine_pretrain import since_eval_meters, window_meters
    from util.misc import Meters

    epoch, window, since = epoch_meters(2), window_meters(), since_eval_meters(torch.device("cpu"), 1.5, 3)
    assert all(isinstance(m, Meters) for m in (epoch, window, since))
    since.loss.update(torch.tensor(0.25))
    assert torch.is_tensor(since.loss.sum) and since.loss.sum.item() == 1.75 and since.loss.count == 4
    window.data.update(0.5)
    window.data.update(0.25)
    assert (window.data.count, window.data.avg) == (2, 0.375)
    logits = torch.tensor([[[0.0, 1.0]] * 4, [[1.0, 0.0]] * 4])  # (heads, batch, classes)
    update_head_meters(epoch, [1.0, 3.0], logits, torch.tensor([1, 1, 0, 0]))
    assert [[getattr(head, name).avg for name in ("loss", "top1")] for head in epoch.heads] == \
        [[1.0, 50.0], [3.0, 50.0]]
    with pytest.raises(AttributeError):
        epoch.no_such_meter
