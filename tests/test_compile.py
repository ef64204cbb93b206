"""--compile (torch.compile) of the pretraining step and of the probe's frozen forward, on a tiny model on CPU
(inductor compiles C++ with the machine's gcc): it runs, and gives the eager path's numbers to float rounding."""
import argparse

import pytest
import torch

import engine_pretrain
from engine import compile_module
from models import build_backbone
from util import layout

pytestmark = pytest.mark.slow  # about a minute of compilation on 2 cores; tools/benchmark.py e2e --compile covers it


def recipe(foreach=False):
    return argparse.Namespace(optimizer=layout.SFADAMW_ALGOPERF, lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.05,
                              warmup_steps=2, sf_r=0.75, weight_lr_power=2.0, sf_moment_dtype="bfloat16",
                              sf_foreach=foreach, accum_steps=1, precision="fp32", label_smoothing=0.1)


def test_compiled_pretraining_step_follows_the_eager_one():
    """The same loss and gradients at the same weights, and main_pretrain.py's steps run compiled. (Whole
    trajectories are not compared: Adam's normalised update turns rounding-level gradient differences of
    near-zero gradients into full-size steps.)"""
    device = torch.device("cpu")
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads, losses = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_backbone("resnet18", 10).to(memory_format=torch.channels_last).train()
        step_model = compile_module(model, device) if compiled else model
        loss = torch.nn.functional.cross_entropy(step_model(images), labels, label_smoothing=0.1)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)

    class Batches:
        def __next__(self):
            return images, labels

    optimizer = engine_pretrain.build_optimizer(model, recipe(foreach=True))
    optimizer.train()
    model.zero_grad(set_to_none=True)
    for _ in range(3):
        loss = engine_pretrain.train_step(step_model, optimizer, Batches(), recipe(), device, False)[0]
        assert torch.isfinite(loss)


def test_compiled_frozen_forward_gives_the_eager_features():
    torch.manual_seed(0)
    encoder = build_backbone("resnet18").eval().to(memory_format=torch.channels_last)
    images = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = encoder(images)
        compiled = compile_module(encoder, torch.device("cpu"))(images)
    assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-4)


def test_probe_with_compile_and_turbo_gives_the_plain_probes_accuracy(tmp_path):
    """main_linear_probe.py --compile --decoder turbo on a generated imagefolder, against the same probe without
    them: the same top-1 (features equal to rounding; the decoder is bit-identical)."""
    from datasets.synthetic import make_checkpoint, make_jpeg_folder
    from tools.bench_common import timed_probe
    make_jpeg_folder(str(tmp_path / "data"), 60, num_classes=3)
    ckpt = str(tmp_path / "backbone.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=0)
    common = ["--arch", "resnet18", "--pretrained", ckpt, "--data_name", "imagefolder", "--data_path",
              str(tmp_path / "data"), "--img_size", "32", "--batch_size", "16", "--workers", "0", "--epochs", "2",
              "--device", "cpu"]
    plain = timed_probe(common + ["--feature_cache", str(tmp_path / "cache_plain"), "--dump_path",
                                  str(tmp_path / "plain")])[1]
    # a cache of its own: the key leaves out run-only flags, so a shared one would hand back the plain features
    fast = timed_probe(common + ["--compile", "--decoder", "turbo", "--feature_cache", str(tmp_path / "cache_fast"),
                                 "--dump_path", str(tmp_path / "fast")])[1]
    assert plain is not None and fast == pytest.approx(plain, abs=100 / 12 + 1e-6)  # at most one of 12 flips
