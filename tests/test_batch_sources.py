"""The probe's batch sources (engine.BatchSource): re-iterable, counting the unreadable images they skip, and
evaluation takes a source, so what reaches the heads is decided by the source, not guessed from tensor shapes."""
import torch
from torch.utils.data import BatchSampler

from engine import BatchSource, CachedBatches, LoaderBatches, evaluate

CPU = torch.device("cpu")


class RecordingHead(torch.nn.Module):
    """Linear logits over the flattened inputs; records whether bf16 autocast was on at each call."""

    def __init__(self, dim, classes=3):
        super().__init__()
        self.linear, self.autocast = torch.nn.Linear(dim, classes), []

    def forward(self, inputs):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.linear(inputs.flatten(1).float())


class FeatureMaps(BatchSource):
    """Features shaped like images (N x C x H x W), e.g. a backbone's feature maps: still features."""

    def __init__(self, maps, labels):
        self.maps, self.labels = maps, labels

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.maps, self.labels


def test_features_meet_the_heads_in_fp32_whatever_their_shape_images_at_the_precision():
    torch.manual_seed(0)
    maps, labels = torch.randn(6, 2, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    head = RecordingHead(8)
    evaluate(head, FeatureMaps(maps, labels), "bf16", 6)
    assert head.autocast == [False]  # a bf16 head flips predictions: features are scored in fp32
    loader = [(maps, labels)]
    evaluate(head, LoaderBatches(loader, CPU), "bf16", 6)
    assert head.autocast == [False, True]  # images go through the encoder at --precision


def test_a_cached_source_is_re_iterable_and_each_evaluation_reports_what_it_skipped():
    torch.manual_seed(0)
    features = torch.randn(10, 4)
    labels = torch.tensor([0, 1, -1, 2, 0, -1, 1, 2, 0, 1])  # -1: an image the cache skipped as unreadable
    source = CachedBatches([features], labels, BatchSampler(range(10), 3, False), CPU)
    head = RecordingHead(4)
    first = evaluate(head, source, "fp32", 10)
    second = evaluate(head, source, "fp32", 10)
    assert first == second and first["skipped"] == 2 and source.skipped == 4
    readable = labels >= 0
    expected = torch.nn.functional.cross_entropy(head(features[readable]), labels[readable]).item()
    assert abs(first["loss"] - expected) < 1e-6
