"""Feature-richness analysis: CKA, effective rank, weight share, kNN, analyze_features on cache entries, the
subset folder naming and the cat-n curve of tools/summarize.py."""
import json
import os

import numpy as np
import pytest
import torch

from analysis.features import (MomentAccumulator, analyse_chunks, backbone_dims, block_slices, effective_rank,
                               head_weights, linear_cka_matrix, weight_share)
from analysis.knn import knn_accuracy, knn_log_line
from tools import analyze_features
from util.misc import UserError
from util.subsets import parse_subset_folder, subset_folder, subset_of_folder, subsets_for


def covariance(x):
    acc = MomentAccumulator(x.shape[1])
    acc.update(x)
    return acc.covariance()


def cka(x, y):
    return float(linear_cka_matrix(covariance(torch.cat([x, y], 1)), block_slices([x.shape[1], y.shape[1]]))[0, 1])


def random_features(n, d, seed, rank=None):
    """ReLU features of a random linear map of Gaussian inputs, like pooled backbone features (positive means)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, rank or d, generator=g)
    return torch.relu(inputs @ torch.randn(rank or d, d, generator=g)) if rank is None else \
        inputs @ torch.randn(rank, d, generator=g)


# ---------------------------------------------------------------- CKA, effective rank, weight share
def test_cka_of_a_backbone_with_itself_is_one_and_with_an_independent_network_near_zero():
    x = random_features(2000, 24, seed=0)
    rotation = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(1)))[0]
    assert cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-4)  # rotation, scale and shift
    independent = random_features(2000, 24, seed=2)  # another network, blind to x's inputs
    assert cka(x, independent) < 0.05
    assert 0.2 < cka(x, torch.cat([x[:, :12], independent[:, 12:]], 1)) < 0.9  # half shared: in between


def test_effective_rank_of_a_rank_k_matrix_is_at_most_k():
    for k in (1, 3, 7):
        x = random_features(500, 32, seed=k, rank=k)
        assert 0.5 < effective_rank(covariance(x)) <= k + 1e-6
    assert effective_rank(covariance(torch.randn(20000, 8))) == pytest.approx(8, rel=0.02)  # isotropic: full


def test_streamed_statistics_equal_the_one_shot_ones():
    x = random_features(1000, 20, seed=3) + 100.0  # large means: the centring must not lose precision
    dims = [8, 12]
    whole = analyse_chunks([x], dims)
    streamed = analyse_chunks((x[i:i + 64] for i in range(0, 1000, 64)), dims)
    assert torch.allclose(streamed.cka, whole.cka, atol=1e-6) and streamed.rows == 1000
    assert streamed.block_ranks == pytest.approx(whole.block_ranks, rel=1e-5)
    assert streamed.concat_rank == pytest.approx(whole.concat_rank, rel=1e-5)
    assert torch.allclose(covariance(x - 100.0), torch.from_numpy(np.cov(x.double().numpy().T)), atol=1e-6)


def test_weight_share_per_backbone_block():
    dims = backbone_dims(["resnet18", "resnet50"])
    assert dims == [512, 2048]
    weight = torch.cat([torch.full((10, 512), 3.0), torch.full((10, 2048), -1.0)], 1)
    share = weight_share(weight, dims)
    assert share.mean_abs == [3.0, 1.0] and share.share == pytest.approx([0.75, 0.25])
    state = {"heads": {"0.linear.weight": weight, "0.linear.bias": torch.zeros(10), "0.bn.weight": torch.ones(2560),
                       "1.linear.weight": weight}, "epoch": 3}
    assert set(head_weights(state, 2560)) == {"heads.0.linear.weight", "heads.1.linear.weight"}


# ---------------------------------------------------------------- kNN
def clusters(n, d, classes, seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, d, generator=torch.Generator().manual_seed(99)), dim=1)
    labels = torch.arange(n) % classes
    return (centres[labels] + spread * torch.randn(n, d, generator=g)).half(), labels


def test_knn_on_separable_features_is_perfect_and_chunking_changes_nothing():
    train, train_labels = clusters(300, 16, 6, seed=0)
    test, test_labels = clusters(90, 16, 6, seed=1)
    result = knn_accuracy(train, train_labels, test, test_labels, k=20, chunk=32)
    assert (result.top1, result.top5, result.count) == (100.0, 100.0, 90)
    noisy_train, _ = clusters(300, 16, 6, seed=0, spread=1.0)
    noisy_test, _ = clusters(90, 16, 6, seed=1, spread=1.0)
    a = knn_accuracy(noisy_train.numpy(), train_labels, noisy_test, test_labels, k=7, chunk=17)
    b = knn_accuracy(noisy_train, train_labels, noisy_test, test_labels, k=7, chunk=4096)
    assert a == b and a.top1 < 100.0
    assert knn_log_line(result).startswith("kNN Acc@1 100.000 Acc@5 100.000 (k=20, T=0.07")


def test_knn_leaves_out_unreadable_images():
    train, train_labels = clusters(60, 8, 3, seed=0)
    test, test_labels = clusters(30, 8, 3, seed=1)
    wrong = train_labels.clone()
    wrong[:30] = -1  # unreadable training images: they must not vote
    test_labels = test_labels.clone()
    test_labels[:5] = -1
    result = knn_accuracy(train, wrong, test, test_labels, k=5)
    assert (result.top1, result.count) == (100.0, 25)
