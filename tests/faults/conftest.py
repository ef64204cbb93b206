"""Fixtures of the fault suite (tests/faults/): one world of tiny datasets and checkpoints, and the uninterrupted
reference runs every scenario compares with, built once per session."""
import pytest

from driver import pretrain_reference_run, probe_reference_run
from helpers import make_checkpoint, make_cifar, make_imagenet, make_inat


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    data = str(base / "data")
    make_cifar(data, "cifar10", n_train=200, n_test=61)
    make_imagenet(data, num_classes=4, n_train=8, n_val=3)
    make_inat(data)
    ckpt = str(base / "a.pth")
    make_checkpoint(ckpt, "resnet18", "raw", seed=1)
    return {"base": base, "data": data, "ckpt": ckpt}


@pytest.fixture(scope="session")
def probe_reference(world):
    return probe_reference_run(world, world["base"] / "probe_reference")


@pytest.fixture(scope="session")
def pretrain_reference(world):
    return pretrain_reference_run(world, world["base"] / "pretrain_reference")
