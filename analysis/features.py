"""How different are the backbones of a concatenation, and which ones does a trained head use?

- linear CKA (Kornblith et al. 2019) between every pair of backbones' feature blocks;
- effective rank: the participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues l, computed as
  trace(C)^2 / ||C||_F^2 (no eigendecomposition);
- weight share: mean |W| of a trained Linear over each backbone's block of input columns (the reference's
  `feature_importance` diagnostic), and the same normalised to sum to 1.

Everything derives from one D x D covariance accumulated over row chunks (MomentAccumulator), so an
ImageNet-size cache streams through in bounded memory: 12 D^2 bytes (the float64 sum and one float32 chunk
product), 1.26 GB for cat5 ResNet50s (D = 10,240), plus one chunk of rows.
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from models.backbones import feature_dim


def backbone_dims(archs):
    """Pooled feature width of each architecture (built on the meta device where it can be: no weights)."""
    return [feature_dim(arch) for arch in archs]


def block_slices(dims):
    """Contiguous column range of each backbone in the concatenated features (ConcatEncoder's order)."""
    edges = [0]
    for d in dims:
        edges.append(edges[-1] + d)
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


def as_float32(rows, device):
    """A float32 tensor on `device` of a tensor or a numpy array (a read-only memory map is copied, not viewed)."""
    if not isinstance(rows, torch.Tensor):
        rows = torch.from_numpy(np.array(rows, dtype=np.float32))
    return rows.to(device, torch.float32)


class MomentAccumulator:
    """Running count, sum and Gram matrix of feature rows: their covariance after any number of chunks."""

    def __init__(self, dim, device="cpu"):
        self.dim, self.device, self.n = dim, torch.device(device), 0
        self.shift = None  # the first chunk's mean: centring near the mean keeps the float32 Gram accurate
        self.total = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    def update(self, chunk):
        x = as_float32(chunk, self.device)
        if not len(x):
            return
        if self.shift is None:
            self.shift = x.mean(dim=0)
        x = x - self.shift
        self.n += len(x)
        self.total += x.sum(dim=0, dtype=torch.float64)
        self.gram.add_(x.T @ x)  # float32 product per chunk, summed in float64 (cast on the fly, no copy)

    def covariance(self):
        if self.n < 2:
            raise ValueError("the covariance needs 2 feature rows or more")
        mean = self.total / self.n
        return (self.gram - self.n * torch.outer(mean, mean)) / (self.n - 1)


def effective_rank(cov):
    """Participation ratio of the covariance spectrum: 1 for one direction, D for isotropic features."""
    total = torch.trace(cov)
    squares = (cov * cov).sum()
    return float(total * total / squares) if squares > 0 else 0.0


def linear_cka_matrix(cov, slices):
    """Linear CKA between every pair of column blocks, from the covariance of the concatenated features:
    ||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F), 1 on the diagonal and for any orthogonal map or scaling."""
    n = len(slices)
    norms = [float(torch.linalg.matrix_norm(cov[s, s])) for s in slices]
    cka = torch.ones(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            cross = cov[slices[a], slices[b]]
            value = float((cross * cross).sum()) / (norms[a] * norms[b]) if norms[a] * norms[b] > 0 else math.nan
            cka[a, b] = cka[b, a] = value
    return cka


class Spectrum(NamedTuple):
    cka: torch.Tensor  # n_backbones x n_backbones
    block_ranks: list  # effective rank of each backbone's features
    concat_rank: float  # effective rank of the concatenation
    rows: int  # feature rows the statistics cover


def analyse_chunks(chunks, dims, device="cpu"):
    """CKA and effective ranks of the feature rows that `chunks` yields (N_i x D arrays or tensors)."""
    acc = MomentAccumulator(sum(dims), device)
    for chunk in chunks:
        acc.update(chunk)
    cov = acc.covariance()
    slices = block_slices(dims)
    return Spectrum(linear_cka_matrix(cov, slices), [effective_rank(cov[s, s]) for s in slices],
                    effective_rank(cov), acc.n)


def row_chunks(features, chunk, rows=None):
    """Consecutive row chunks of an N x D array (a memory map stays on disk until each chunk is read);
    `rows`: a boolean mask of the rows to keep (e.g. labels >= 0, the images that were readable)."""
    for start in range(0, len(features), chunk):
        block = features[start:start + chunk]
        yield block if rows is None else block[rows[start:start + chunk]]


class WeightShare(NamedTuple):
    mean_abs: list  # mean |W| over classes and over each backbone's columns (the reference's feature_importance)
    share: list  # the same, normalised to sum to 1


def weight_share(weight, dims):
    """Per-backbone use of a trained Linear (classes x D) on BatchNorm-normalised features."""
    if weight.dim() != 2 or weight.shape[1] != sum(dims):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not act on {sum(dims)}-d features")
    mean_abs = [float(weight[:, s].abs().mean()) for s in block_slices(dims)]
    total = sum(mean_abs)
    return WeightShare(mean_abs, [m / total if total > 0 else math.nan for m in mean_abs])


def head_weights(obj, in_dim, prefix=""):
    """{name: weight} of every Linear weight acting on in_dim features inside a saved object: the probe's
    best.pth.tar ({'head': ...}), its checkpoint.pth.tar ({'heads': {'0.linear.weight', ...}}), or another
    state_dict layout (searched recursively)."""
    found = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.update(head_weights(value, in_dim, f"{prefix}{key}."))
    elif (isinstance(obj, torch.Tensor) and obj.dim() == 2 and obj.shape[1] == in_dim and obj.is_floating_point()
          and prefix.rstrip(".").endswith("weight")):
        found[prefix.rstrip(".")] = obj
    return found
