"""The per-backbone feature cache (feature_cache.py): one entry per backbone, concatenations assembled at load,
bit-identical to the concatenated encoder's forward; shared, invalidated and resumed backbone by backbone."""
import logging
import shutil

import numpy as np
import pytest
import torch

from engine import autocast
from feature_cache import Backbone, CacheInputs, FeatureCache, assemble
from helpers import make_checkpoint
from models import ConcatEncoder
from util.distributed import DistInfo

BATCH = 8
LOG = logging.getLogger("test_feature_cache")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("per_backbone")
    ckpts = {name: str(base / f"{name}.pth") for name in "abc"}
    for seed, path in enumerate(ckpts.values()):
        make_checkpoint(path, "resnet18", "raw", seed=seed)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(37, 3, 32, 32, generator=generator)  # 5 batches of 8, the last one of 5
    labels = torch.arange(37) % 4
    return {"ckpts": ckpts, "data": torch.utils.data.TensorDataset(images, labels)}


def inputs(precision="fp32"):
    return CacheInputs("cifar10", "/data", 1.0, None, {"tf_name": "224px", "img_size": 32}, precision, 0, BATCH, 0,
                       False)


def backbones(world, names):
    """The probe's encoder (channels_last, frozen) of checkpoints `names`, and its members as cache backbones."""
    paths = [world["ckpts"][n] for n in names]
    encoder = ConcatEncoder(["resnet18"] * len(paths), paths, 32).to(memory_format=torch.channels_last).freeze()
    return encoder, [Backbone("resnet18", p, net, net.out_dim) for p, net in zip(paths, encoder.backbones)]


def forward(encoder, dataset, precision):
    """The concatenated encoder's forward over the dataset in the cache's batches, stored as the cache stores it
    (what the per-concatenation cache of before wrote: encoder(images) -> fp16)."""
    rows = []
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        for start in range(0, len(dataset), BATCH):
            images = dataset.tensors[0][start:start + BATCH].contiguous(memory_format=torch.channels_last)
            rows.append(encoder(images).float().numpy().astype(np.float16))
    return np.concatenate(rows)


def rows_of(parts):
    """Every row of the assembled concatenation, gathered as the cached batches gather theirs."""
    return assemble(parts)[torch.arange(len(parts[0]))].numpy()


def cache(tmp_path, precision="fp32", should_stop=None):
    return FeatureCache(str(tmp_path / "cache"), inputs(precision), DistInfo(), LOG, False, should_stop)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_concatenations_share_entries_and_equal_the_forward_bit_for_bit(world, tmp_path, monkeypatch, precision):
    """cat2 {a, b} then {a, c} and {c, a}: a is extracted once, c once; every assembled concatenation is the
    concatenated encoder's forward, bit for bit, in the --pretrained order."""
    monkeypatch.setenv("TIMECAT_CACHE_CHUNK", "2")  # 3 chunks
    first = cache(tmp_path, precision)
    encoder, members = backbones(world, "ab")
    parts, labels = first.load(members, world["data"], "test", -1)
    assert [c for _, c, _, _ in first.extracted] == [world["ckpts"]["a"], world["ckpts"]["b"]]
    assert np.array_equal(rows_of(parts), forward(encoder, world["data"], precision))
    assert torch.equal(labels, world["data"].tensors[1])

    second = cache(tmp_path, precision)
    for names in ("ac", "ca"):
        encoder, members = backbones(world, names)
        parts, _ = second.load(members, world["data"], "test", -1)
        assert np.array_equal(rows_of(parts), forward(encoder, world["data"], precision))
    assert second.extracted == [("resnet18", world["ckpts"]["c"], "test", -1)]  # a and c: reused
    assert len(first.extracted) + len(second.extracted) == 3  # 3 backbones, 3 concatenations: 3 extractions


def test_a_changed_checkpoint_invalidates_only_its_backbone(world, tmp_path):
    ckpts = {"a": str(tmp_path / "a.pth"), "b": world["ckpts"]["b"]}
    shutil.copy(world["ckpts"]["a"], ckpts["a"])
    mine = dict(world, ckpts=ckpts)
    cache(tmp_path).load(backbones(mine, "ab")[1], world["data"], "train", -1)
    copy = dict(world, ckpts=dict(ckpts, a=str(tmp_path / "copy_of_a.pth")))
    shutil.copy(ckpts["a"], copy["ckpts"]["a"])
    again = cache(tmp_path)
    again.load(backbones(copy, "ab")[1], world["data"], "train", -1)
    assert again.extracted == []  # the same content elsewhere: the same features
    make_checkpoint(ckpts["a"], "resnet18", "raw", seed=9)  # retrained in place
    retrained = cache(tmp_path)
    encoder, members = backbones(mine, "ab")
    parts, _ = retrained.load(members, world["data"], "train", -1)
    assert retrained.extracted == [("resnet18", ckpts["a"], "train", -1)]
    assert np.array_equal(rows_of(parts), forward(encoder, world["data"], "fp32"))


def test_a_stopped_extraction_resumes_backbone_by_backbone(world, tmp_path, monkeypatch, caplog):
    """A stop during {a, b}'s extraction keeps the chunks written; {a, b, c} then resumes a and b where they
    stopped and extracts c from the start, in one pass: the features of an uninterrupted extraction."""
    monkeypatch.setenv("TIMECAT_CACHE_CHUNK", "1")  # 5 chunks of one batch
    calls = []

    def stop_at_the_fourth_batch():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(InterruptedError, match="3 of 5 chunks written"):
        cache(tmp_path, should_stop=stop_at_the_fourth_batch).load(backbones(world, "ab")[1], world["data"],
                                                                    "test", -1)
    resumed = cache(tmp_path)
    encoder, members = backbones(world, "abc")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        parts, _ = resumed.load(members, world["data"], "test", -1)
    assert caplog.text.count("resuming resnet18 at chunk 3 of 5") == 2
    assert "for 3 of 3 backbone(s), in one pass" in caplog.text
    assert len(resumed.extracted) == 3
    assert np.array_equal(rows_of(parts), forward(encoder, world["data"], "fp32"))


def test_a_concatenation_reads_the_rows_asked_for():
    parts = [torch.arange(8, dtype=torch.float16).reshape(4, 2), torch.ones(4, 1, dtype=torch.float16)]
    whole = torch.cat(parts, 1)
    lazy = assemble(parts)
    assert lazy.shape == whole.shape and len(lazy) == 4 and lazy.dtype == torch.float16
    assert torch.equal(lazy[1:3], whole[1:3]) and torch.equal(lazy[np.array([3, 0])], whole[[3, 0]])
    assert torch.equal(lazy.materialize("cpu"), whole)
    assert assemble(parts[:1]) is parts[0]  # one backbone: its memory map, not a copy
