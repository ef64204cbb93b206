"""JPEG decoders and transform pipelines (--decoder, --fast_transforms) against the reference path's pixels: PIL +
torchvision's transforms. turbo must give the same tensors bit for bit; fast differs by a bounded amount."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.images import image_loader_for, load_rgb
from datasets.synthetic import make_jpeg_folder
from datasets.transforms import PIPELINES, ToNormalizedTensor, build_transform, pipeline_of
from util.cli import UserError

pytest.importorskip("simplejpeg")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpeg_folder(str(tmp_path_factory.mktemp("jpegs")), 10, num_classes=2)


def transformed(paths, decoder, fast, family, train, seed=0, img_size=None):
    """The tensors a pipeline makes of the files, each image drawn from its own seed (as SeededSamples does)."""
    load = image_loader_for(decoder)
    transform = build_transform(family, "eval", train, img_size, pipeline=pipeline_of(decoder, fast))
    out = []
    for i, path in enumerate(paths):
        torch.manual_seed(seed + i)
        out.append(transform(load(path)))
    return torch.stack(out)


def test_turbo_decodes_the_same_pixels_as_pil(jpegs):
    turbo = image_loader_for("turbo")
    for path in jpegs:
        assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(turbo(path)))


@pytest.mark.parametrize("family", ["imagenet", "cifar"])
@pytest.mark.parametrize("train", [True, False])
def test_turbo_pipeline_is_bit_identical_to_the_reference(jpegs, family, train):
    reference = transformed(jpegs, "pil", False, family, train)
    turbo = transformed(jpegs, "turbo", False, family, train)
    assert reference.shape == (len(jpegs), 3, 224, 224)
    assert torch.equal(reference, turbo)


def test_default_pipeline_is_torchvisions_pil_transforms(jpegs):
    """The default (--decoder pil, no --fast_transforms) is the reference's code itself: PIL images through
    torchvision's RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize (test: Resize, CenterCrop)."""
    from torchvision import transforms as T
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    for train, spelled in ((True, T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] + norm)),
                           (False, T.Compose([T.Resize(256), T.CenterCrop(224)] + norm))):
        assert image_loader_for("pil") is load_rgb
        for i, path in enumerate(jpegs):
            torch.manual_seed(i)
            expected = spelled(Image.open(path).convert("RGB"))
            assert torch.equal(transformed([path], "pil", False, "imagenet", train, seed=i)[0], expected)


@pytest.mark.parametrize("img_size", [96, 224, 320])
def test_turbo_train_crop_is_bit_identical_over_many_draws(jpegs, img_size):
    """--decoder turbo cuts the training crop from the array before PIL resizes it and flips the tensor: the
    reference's tensor for every draw (many seeds: small, large and border-touching crops, both flips)."""
    for seed in range(0, 60, len(jpegs)):
        reference = transformed(jpegs, "pil", False, "imagenet", True, seed, img_size)
        assert torch.equal(reference, transformed(jpegs, "turbo", False, "imagenet", True, seed, img_size))


@pytest.mark.parametrize("train", [True, False])
def test_fast_pipeline_stays_close_to_the_reference(jpegs, train):
    """The same crop boxes and flips (same draws) and the same decoded pixels; only the resampling differs (uint8
    kernels against PIL's): at most one level of 255 per pixel, a small fraction of pixels off at all."""
    reference = transformed(jpegs, "pil", False, "imagenet", train)
    fast = transformed(jpegs, "turbo", True, "imagenet", train)
    levels = (reference - fast).abs() * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    assert levels.max() < 1.01
    assert (levels > 0.5).float().mean() < 0.1


def test_to_normalized_tensor_equals_totensor_normalize():
    from torchvision import transforms as T
    rng = np.random.default_rng(0)
    for mean, std in (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.4914, 0.4822, 0.4465),
                                                                        (0.2023, 0.1994, 0.2010))):
        pic = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
        reference = T.Normalize(mean, std)(T.ToTensor()(pic))
        assert torch.equal(ToNormalizedTensor(mean, std)(pic), reference)
        gray = pic.convert("L")  # another mode goes through torchvision's own conversion
        gray_reference = T.Normalize(mean[:1], std[:1])(T.ToTensor()(gray))
        assert torch.equal(ToNormalizedTensor(mean[:1], std[:1])(gray), gray_reference)


def test_the_flag_choices_are_the_decoders():
    from arguments.common import DECODER_NAMES
    from datasets.images import DECODERS
    assert DECODER_NAMES == DECODERS


def test_non_jpeg_files_and_unknown_decoders(tmp_path):
    png = tmp_path / "x.JPEG"  # a PNG named .JPEG, as one file of ImageNet
    Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(png, format="PNG")
    assert np.array_equal(np.asarray(image_loader_for("turbo")(str(png))), np.full((9, 9, 3), 7, np.uint8))
    cmyk = tmp_path / "cmyk.JPEG"  # CMYK JPEGs (a few in ImageNet): PIL converts them, as the reference does
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(cmyk, quality=95)
    assert np.array_equal(np.asarray(image_loader_for("turbo")(str(cmyk))), np.asarray(load_rgb(str(cmyk))))
    gray = tmp_path / "gray.JPEG"  # greyscale JPEGs: decoded by libjpeg-turbo, the same RGB as PIL's convert
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)).save(gray, quality=90)
    assert np.array_equal(np.asarray(image_loader_for("turbo")(str(gray))), np.asarray(load_rgb(str(gray))))
    with pytest.raises(UserError, match="--decoder"):
        image_loader_for("nvjpeg")
    assert set(PIPELINES) == {"reference", "turbo", "fast"}


def test_pretraining_through_turbo_ends_with_the_reference_weights(jpegs, tmp_path):
    """main_pretrain.py --decoder turbo (through DataLoader workers) trains the same weights, bit for bit, as the
    default PIL path: the decoder and its transforms change nothing a run computes."""
    import main_pretrain
    from arguments import pretrain
    data = os.path.dirname(os.path.dirname(os.path.dirname(jpegs[0])))  # root of {train,val}/c{k}/
    weights = {}
    for decoder in ("pil", "turbo"):
        out = tmp_path / decoder
        args = pretrain.get_args_parser().parse_args([
            "--arch", "resnet18", "--img_size", "32", "--global_batch", "4", "--workers", "1", "--precision",
            "fp32", "--device", "cpu", "--data_name", "imagefolder", "--data_path", data, "--steps", "3",
            "--warmup_steps", "1", "--bn_refresh_batches", "1", "--save_steps", "--decoder", decoder,
            "--output_dir", str(out / "ckpt"), "--dump_path", str(out / "run")])
        main_pretrain.main(args)
        [path] = [os.path.join(d, f) for d, _, files in os.walk(out / "ckpt") for f in files if f.endswith(".pth.tar")]
        weights[decoder] = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert weights["pil"].keys() == weights["turbo"].keys()
    assert all(torch.equal(weights["pil"][k], weights["turbo"][k]) for k in weights["pil"])


def test_probe_through_turbo_ends_with_the_reference_heads(jpegs, tmp_path):
    """main_linear_probe.py --decoder turbo (train and test transforms, DataLoader workers) ends with the default
    PIL path's head weights and top-1, bit for bit."""
    from datasets.synthetic import make_checkpoint
    from tools.bench_common import timed_probe
    data = os.path.dirname(os.path.dirname(os.path.dirname(jpegs[0])))
    ckpt = str(tmp_path / "backbone.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=0)
    heads, top1 = {}, {}
    for decoder in ("pil", "turbo"):
        dump = tmp_path / decoder
        top1[decoder] = timed_probe(["--arch", "resnet18", "--pretrained", ckpt, "--data_name", "imagefolder",
                                     "--data_path", data, "--img_size", "32", "--batch_size", "4", "--workers", "1",
                                     "--epochs", "2", "--device", "cpu", "--precision", "fp32", "--decoder",
                                     decoder, "--dump_path", str(dump)])[1]
        saved = [os.path.join(d, f) for d, _, files in os.walk(dump) for f in files if f.endswith(".pth.tar")]
        heads[decoder] = {os.path.relpath(p, dump): torch.load(p, map_location="cpu", weights_only=False)
                          for p in saved}
    assert top1["pil"] is not None and top1["pil"] == top1["turbo"]
    assert heads["pil"] and heads["pil"].keys() == heads["turbo"].keys()

    def tensors(obj, prefix=""):  # every tensor of a saved record by its path, the args (naming the decoder) aside
        if isinstance(obj, torch.Tensor):
            return {prefix: obj}
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
        return {k: v for key, value in items if key != "args" for k, v in tensors(value, f"{prefix}/{key}").items()}

    for name, state in heads["pil"].items():
        reference, turbo = tensors(state), tensors(heads["turbo"][name])
        assert reference and reference.keys() == turbo.keys()
        assert all(torch.equal(v, turbo[k]) for k, v in reference.items()), name
