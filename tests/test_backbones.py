"""Any torchvision classification model as a backbone: its pooled feature is the documented tensor in front of its
classifier, widths add up, checkpoints load through the key normalisation, and transforms are chosen per family."""
import json
import os

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import main_linear_probe as probe
from datasets.transforms import build_transform
from helpers import make_checkpoint, make_cifar
from models.backbones import ConcatEncoder, encoder_recipe, feature_dim, input_recipe
from models.checkpoint_keys import input_size_hint
from util.cli import UserError, run_main

# The pooled feature of each family as docs and models/backbones.py name it: a node of torchvision's own graph
# (torchvision.models.feature_extraction), computed independently of how the encoder cuts the classifier off.
FEATURE_NODE = {"resnet18": "flatten", "regnet_y_400mf": "flatten", "convnext_tiny": "classifier.1",
                "vit_b_16": "encoder.ln", "swin_t": "flatten", "efficientnet_b0": "flatten"}
SIZE = 32  # tiny inputs: ViT built with image_size=32 (a 2 x 2 grid of 16-px patches and the class token)


def own_pooled_output(backbone, arch, images):
    """The backbone's weights in a fresh full torchvision model (classifier included), read at the feature node."""
    kwargs = {"image_size": SIZE} if arch.startswith("vit") else {}
    full = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    missing, unexpected = full.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and all(k.rpartition(".")[0] in ("fc", "classifier.2", "heads.head", "head",
                                                            "classifier.1") for k in missing), missing
    node = FEATURE_NODE[arch]
    out = create_feature_extractor(full, {node: "feature"})(images)["feature"]
    return out[:, 0] if arch.startswith("vit") else out


@pytest.mark.parametrize("archs", [
    ["vit_b_16", "resnet18"], ["convnext_tiny", "resnet18"], ["regnet_y_400mf", "resnet18", "swin_t"],
    ["efficientnet_b0", "resnet18"]])
def test_each_block_is_the_backbones_own_pooled_output_and_widths_add_up(archs):
    torch.manual_seed(0)
    encoder = ConcatEncoder(archs, [None] * len(archs), image_size=SIZE).freeze()
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        features = encoder(images)
        widths = [net.out_dim for net in encoder.backbones]
        assert widths == [feature_dim(a, SIZE) for a in archs] and features.shape == (3, sum(widths))
        assert encoder.out_dim == sum(widths)
        start = 0
        for net, arch, width in zip(encoder.backbones, archs, widths):
            block = features[:, start:start + width]
            torch.testing.assert_close(block, own_pooled_output(net, arch, images), rtol=1e-5, atol=1e-5)
            start += width
    # widths read from the model: the classifier's in_features of each family
    known = {"vit_b_16": 768, "resnet18": 512, "convnext_tiny": 768, "regnet_y_400mf": 440, "swin_t": 768,
             "efficientnet_b0": 1280}
    assert widths == [known[a] for a in archs]


@pytest.mark.parametrize("arch,fmt", [("regnet_y_400mf", "state_dict"), ("efficientnet_b0", "backbone"),
                                      ("mobilenet_v3_small", "raw")])
def test_checkpoints_of_other_families_load_through_the_key_normalisation(tmp_path, arch, fmt):
    path = str(tmp_path / f"{arch}.pth")
    state = make_checkpoint(path, arch, fmt, seed=3, num_classes=10)
    encoder = ConcatEncoder([arch], [path], image_size=SIZE)
    loaded = encoder.backbones[0].state_dict()
    classifier = {"regnet_y_400mf": "fc", "efficientnet_b0": "classifier.1", "mobilenet_v3_small": "classifier.3"}
    prefix = classifier[arch] + "."
    assert set(loaded) == {k for k in state if not k.startswith(prefix)}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)  # BatchNorm statistics included
    # the checkpoint's own classifier is kept for --headinit cat_weights
    assert torch.equal(encoder.classifiers[0]["weight"], state[prefix + "weight"])
    os.remove(path)


def test_a_vit_checkpoint_of_another_input_size_names_its_size():
    state = {"conv_proj.weight": torch.zeros(768, 3, 16, 16), "encoder.pos_embedding": torch.zeros(1, 197, 768)}
    expected = {"encoder.pos_embedding": torch.zeros(1, 5, 768)}
    assert "224-px" in input_size_hint(state, expected) and "--img_size 224" in input_size_hint(state, expected)


def test_a_model_without_a_linear_classifier_is_refused():
    with pytest.raises(UserError, match="squeezenet1_0 has no Linear classifier"):
        ConcatEncoder(["squeezenet1_0"], [None])


def test_transforms_per_family_and_mixed_ones_refused():
    reference = build_transform("imagenet", "eval", False)
    assert encoder_recipe(["resnet50", "wide_resnet50_2", "resnext101_64x4d"]) is None  # ResNets: the reference's
    # ViT-B/16 and RegNet expect the reference's transform: allowed beside a ResNet, the same transform
    vit = encoder_recipe(["vit_b_16", "resnet50", "regnet_y_400mf"])
    assert repr(build_transform("imagenet", "eval", False, recipe=vit)) == repr(reference)
    swin = input_recipe("swin_t")
    assert (swin.resize, swin.crop, swin.interpolation) == (232, 224, "bicubic")
    assert "Resize(size=232, interpolation=bicubic" in repr(build_transform("imagenet", "eval", False, recipe=swin))
    # at another crop the resize keeps the family's ratio
    assert "Resize(size=33, interpolation=bicubic" in repr(build_transform("imagenet", "eval", False, 32, recipe=swin))
    with pytest.raises(UserError, match=r"resnet50 \(resize 256, crop 224, bilinear\) and convnext_tiny "
                                        r"\(resize 236, crop 224, bilinear\).*--allow_mixed_transforms"):
        encoder_recipe(["resnet50", "convnext_tiny"])
    assert encoder_recipe(["convnext_tiny", "resnet50"], allow_mixed=True) == input_recipe("convnext_tiny")
    # CIFAR keeps the reference's transform whatever the backbones
    assert repr(build_transform("cifar", "eval", False, recipe=swin)) == repr(build_transform("cifar", "eval", False))


@pytest.fixture(scope="module")
def mixed_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("mixed")
    make_cifar(str(base / "data"), "cifar10", n_train=64, n_test=20)
    ckpts = [str(base / "resnet18.pth"), str(base / "regnet.pth"), str(base / "convnext_stub.pth")]
    make_checkpoint(ckpts[0], "resnet18", "algoperf", seed=1)
    make_checkpoint(ckpts[1], "regnet_y_400mf", "state_dict", seed=2)
    open(ckpts[2], "wb").write(b"never read: the mixed-transform check comes first")
    return base, ckpts


def test_the_probe_trains_on_a_resnet_and_regnet_concatenation(mixed_world, tmp_path):
    base, ckpts = mixed_world
    argv = ["--arch", "resnet18", "regnet_y_400mf", "--pretrained", *ckpts[:2], "--data_path", str(base / "data"),
            "--dump_path", str(tmp_path / "run"), "--img_size", "32", "--workers", "0", "--batch_size", "32",
            "--epochs", "1", "--print_freq", "1"]
    probe.main(probe.get_args_parser().parse_args(argv))
    log = open(tmp_path / "run" / "train.log").read()
    assert "['resnet18', 'regnet_y_400mf'], 952-d features" in log and "Top-1 test accuracy:" in log
    assert json.load(open(tmp_path / "run" / "args.json"))["arch"] == ["resnet18", "regnet_y_400mf"]


def test_the_probe_refuses_mixed_transforms_before_reading_data(mixed_world, tmp_path, capsys):
    base, ckpts = mixed_world
    argv = ["--arch", "resnet18", "convnext_tiny", "--pretrained", ckpts[0], ckpts[2], "--data_name",
            "imagenet1k", "--data_path", str(tmp_path / "no_data_here"), "--dump_path", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        run_main(probe.main, probe.get_args_parser().parse_args(argv))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--allow_mixed_transforms" in err, err
    assert not os.path.exists(tmp_path / "run" / "train.log")
