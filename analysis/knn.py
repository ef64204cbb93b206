"""k-nearest-neighbour classification of frozen features, as DINO's evaluation: cosine similarity, the k most
similar training rows vote for their class with weight exp(similarity / T)."""
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from analysis.features import as_float32
from models.heads import subset_columns


class KnnResult(NamedTuple):
    top1: float  # %
    top5: float  # %
    count: int  # test rows evaluated (labelled, readable)
    k: int
    temperature: float


def knn_log_line(result):
    """The line a run logs next to the linear probe's Test: lines (one owner of its format)."""
    return (f"kNN Acc@1 {result.top1:.3f} Acc@5 {result.top5:.3f} (k={result.k}, T={result.temperature:g}, "
            f"{result.count} test images)")


def knn_record(result):
    """Its fields in a head's metrics.jsonl record."""
    return {"knn_top1": result.top1, "knn_top5": result.top5, "knn_k": result.k}


def _normalised(rows, device):
    return F.normalize(as_float32(rows, device), dim=1)


def _take(features, index):
    """Rows `index` (a LongTensor) of a tensor or a numpy array / memory map."""
    return features[index] if isinstance(features, torch.Tensor) else features[index.numpy()]


@torch.no_grad()
def knn_accuracy(train, test, k=20, temperature=0.07, chunk=4096, device="cpu"):
    """Top-1 and top-5 accuracy (%) of the weighted kNN vote. train, test: (features, labels), features N x D
    (fp16 memory maps are fine); label -1 marks unreadable images, left out of both sides. Memory on `device`: the
    normalised test features plus one chunk x chunk similarity block; each training chunk is read once."""
    (train_features, train_labels), (test_features, test_labels) = train, test
    device = torch.device(device)
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    keep = torch.nonzero(test_labels >= 0).flatten()
    test = torch.cat([_normalised(_take(test_features, keep[i:i + chunk]), device)
                      for i in range(0, len(keep), chunk)]) if len(keep) else torch.empty(0, 1, device=device)
    truth = test_labels[keep].to(device)
    k = min(k, int((train_labels >= 0).sum()))
    best_sim = torch.full((len(keep), k), -float("inf"), device=device)
    best_label = torch.zeros(len(keep), k, dtype=torch.long, device=device)
    for start in range(0, len(train_labels), chunk):
        labels = train_labels[start:start + chunk].to(device)
        block = _normalised(train_features[start:start + chunk], device)
        for t in range(0, len(keep), chunk):
            sim = test[t:t + chunk] @ block.T
            sim[:, labels < 0] = -float("inf")  # unreadable training images never vote
            # merge this block's candidates with the best so far: the running top-k over all training rows
            sims = torch.cat([best_sim[t:t + chunk], sim], dim=1)
            cands = torch.cat([best_label[t:t + chunk], labels.expand(len(sim), -1)], dim=1)
            top = sims.topk(k, dim=1)
            best_sim[t:t + chunk], best_label[t:t + chunk] = top.values, cands.gather(1, top.indices)
    votes = torch.zeros(len(keep), num_classes, device=device)
    votes.scatter_add_(1, best_label, (best_sim / temperature).exp())
    ranked = votes.topk(min(5, num_classes), dim=1).indices
    hits = ranked.eq(truth.unsqueeze(1))
    n = max(len(keep), 1)
    return KnnResult(100.0 * float(hits[:, :1].any(1).sum()) / n, 100.0 * float(hits.any(1).sum()) / n,
                     len(keep), k, temperature)


class SelectedRows:
    """Rows `rows` and columns `columns` of a feature matrix, read lazily by kNN's chunks (a slice or an index
    array of positions); nothing of the memory-mapped cache is copied beyond one chunk."""

    def __init__(self, features, rows, columns):
        self.features, self.rows, self.columns = features, rows, columns

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        rows = self.rows[key] if isinstance(key, slice) else self.rows[torch.as_tensor(key, dtype=torch.long)]
        block = self.features[rows]
        return block if self.columns is None else block[:, self.columns]


def knn_per_head(k, heads, dims, features, device, logger):
    """--knn: the k-NN accuracy of the features each head reads (models.heads.Head: its subset), training rows (not
    the held-out ones) against the test set, into each head's .knn; computed once per distinct subset.
    features: ((train features, train labels, training positions), (test features, test labels))."""
    (train_features, train_labels, positions), (test_features, test_labels) = features
    rows = torch.as_tensor(positions, dtype=torch.long)
    start, results = time.time(), {}
    for subset in dict.fromkeys(head.subset for head in heads):
        columns = None if subset is None else torch.as_tensor(subset_columns(dims, subset))
        results[subset] = knn_accuracy((SelectedRows(train_features, rows, columns), train_labels[rows]),
                                       (SelectedRows(test_features, torch.arange(len(test_labels)), columns),
                                        test_labels), k=k, device=device)
    logger.info(f"kNN (k={k}) on the features of {len(results)} head input(s): {time.time() - start:.1f} s")
    for head in heads:
        head.knn = results[head.subset]
