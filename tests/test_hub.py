"""The encoder from Python: timecat.load_encoder and torch.hub.load(<repo>, 'load_encoder', source='local') give
the frozen concatenation of a tag's or of explicit checkpoints, with its test transform."""
import pytest
import torch
import yaml
from PIL import Image

from helpers import ROOT, make_checkpoint
from models import ConcatEncoder
from timecat import load_encoder
from util.cli import UserError


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    paths = [str(base / "run0.pth.tar"), str(base / "checkpoint_80000"), str(base / "regnet.pth")]
    make_checkpoint(paths[0], "resnet18", "algoperf", seed=1)
    make_checkpoint(paths[1], "resnet18", "state_dict", seed=2)
    make_checkpoint(paths[2], "regnet_y_400mf", "raw", seed=3)
    tag_file = base / "tags.yaml"
    tag_file.write_text(yaml.safe_dump({"tiny_cat2": {"arch": ["resnet18", "resnet18"], "pretrained": paths[:2]}}))
    image = Image.new("RGB", (40, 48), (200, 30, 90))
    return {"paths": paths, "tag_file": str(tag_file), "image": image}


def test_a_tag_gives_the_frozen_concatenation_and_its_transform(checkpoints):
    encoder, transform = load_encoder("tiny_cat2", tag_file=checkpoints["tag_file"], image_size=32)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    x = transform(checkpoints["image"]).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)  # the probe's test transform: resize 36, centre crop 32, ImageNet statistics
    with torch.no_grad():
        features = encoder(x)
        expected = ConcatEncoder(["resnet18", "resnet18"], checkpoints["paths"][:2]).eval()(x)
    assert features.shape == (1, 1024) and [b.out_dim for b in encoder.backbones] == [512, 512]
    assert torch.equal(features, expected)
    # the default crop is the reference's 224
    assert load_encoder("tiny_cat2", tag_file=checkpoints["tag_file"])[1](checkpoints["image"]).shape == (3, 224, 224)


def test_explicit_checkpoints_of_mixed_architectures(checkpoints):
    paths = checkpoints["paths"]
    encoder, _ = load_encoder([paths[0], paths[2]], arch=["resnet18", "regnet_y_400mf"], image_size=32)
    assert [b.out_dim for b in encoder.backbones] == [512, 440] and encoder.out_dim == 952
    single, _ = load_encoder(paths[1], arch="resnet18")  # one path, AlgoPerf's extension-less name
    assert single.out_dim == 512


def test_torch_hub_local_gives_the_same_encoder(checkpoints):
    hub_encoder, hub_transform = torch.hub.load(ROOT, "load_encoder", "tiny_cat2", tag_file=checkpoints["tag_file"],
                                                image_size=32, source="local")
    encoder, transform = load_encoder("tiny_cat2", tag_file=checkpoints["tag_file"], image_size=32)
    x = transform(checkpoints["image"]).unsqueeze(0)
    assert torch.equal(hub_transform(checkpoints["image"]).unsqueeze(0), x)
    with torch.no_grad():
        assert torch.equal(hub_encoder(x), encoder(x))


def test_errors_are_one_line_and_say_what_to_do(checkpoints, tmp_path):
    with pytest.raises(UserError, match="unknown --tag 'nope'"):
        load_encoder("nope", tag_file=checkpoints["tag_file"])
    missing = yaml.safe_dump({"gone": {"arch": ["resnet50"], "pretrained": [str(tmp_path / "absent.pth")]}})
    (tmp_path / "tags.yaml").write_text(missing)
    with pytest.raises(UserError, match="absent.pth; `python tools/download.py` fetches the released ones"):
        load_encoder("gone", tag_file=str(tmp_path / "tags.yaml"))
    with pytest.raises(UserError, match="does not match resnet50"):
        load_encoder(checkpoints["paths"][0])  # the default arch is the released checkpoints' resnet50
    with pytest.raises(UserError, match="--allow_mixed_transforms"):
        load_encoder([checkpoints["paths"][0]] * 2, arch=["resnet18", "swin_t"])
