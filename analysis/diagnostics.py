"""The original's --custom_eval_func diagnostics of a trained head, logged after each evaluation with the original's
names and line format (util/log_lines.diagnostic_line): how much each backbone's block of the concatenated
features weighs in the head (feature_importance), and how well each block alone classifies through it
(cat_validate_network)."""
import torch

from models.heads import batch_scores, block_spans, stacked_logits
from util import log_lines
from util.distributed import all_reduce_sum


@torch.no_grad()
def feature_importance(head, spans):
    """Mean |weight| of the trained Linear over each backbone's block of inputs (one value per backbone)."""
    weight = head.linear.weight.abs()
    return [weight[:, a:b].mean().item() for a, b in spans]


@torch.no_grad()
def cat_validate(head, batches, spans, device):
    """Loss, top-1, top-5 (%) of each backbone block scored alone through the trained head: logits =
    bn(features)[:, block] @ W[:, block]^T + bias; summed over every process. Returns [loss, top1, top5] * blocks."""
    sums = torch.zeros(len(spans), 3, dtype=torch.float64)
    count = 0
    for features, labels in batches:
        normed = head.bn(features.float())
        # each block through its columns of the trained Linear, with the whole bias (the original's formula)
        logits = [normed[:, a:b] @ head.linear.weight[:, a:b].T + head.linear.bias for a, b in spans]
        sums = sums.to(labels.device) + batch_scores(stacked_logits(logits), labels)
        count += len(labels)
    totals = all_reduce_sum(sums.flatten().tolist() + [count], device)  # a collective: every rank calls it
    count = max(totals[-1], 1)
    return [totals[i] / count * (1 if i % 3 == 0 else 100.0) for i in range(3 * len(spans))]


def log_diagnostics(names, head, dims, test_features):
    """--custom_eval_func `names`, after each evaluation, in head.logger (head: a models.heads.Head record). dims: each
    backbone's feature width; a subset head's diagnostics are over its own backbones. test_features: the test
    split's (features, labels) batches (engine.feature_batches), read only by cat_validate_network."""
    subset = head.subset
    spans = block_spans([dims[i] for i in subset] if subset is not None else dims)
    module = head.module
    module.eval()
    if "feature_importance" in names:
        head.logger.info(log_lines.diagnostic_line("feature_importance", feature_importance(module, spans)))
    if "cat_validate_network" in names:
        batches = ((module.select(x), y) for x, y in test_features)  # a subset head reads its columns only
        device = next(module.parameters()).device
        head.logger.info(log_lines.diagnostic_line("cat_validate_network", cat_validate(module, batches, spans,
                                                                                        device)))
