"""Backbone weights from every checkpoint format users bring: raw torchvision state_dicts, DDP/torch.compile
prefixes, model lists and SSL heads, and AlgoPerf's downsample.{conv,bn} names (the owner of ResNet key
normalisation)."""
import torch

from util.checkpoint import load_file
from util.cli import UserError

# Wrappers that training code puts in front of parameter names: torch.compile, DDP, model lists, SSL heads.
KNOWN_PREFIXES = ("_orig_mod.", "module.", "model0.", "backbone.")
# Dicts that hold the model's weights inside a training checkpoint, by the key each framework uses.
STATE_KEYS = ("model_params", "state_dict", "model")


def extract_state_dict(obj, path):
    """The parameter dict inside a checkpoint: raw, or under model_params / state_dict / model."""
    for key in STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return extract_state_dict(obj[key], path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise UserError(f"no model weights found in {path}: expected a state_dict or a dict with one of "
                    f"{list(STATE_KEYS)}, found {keys}")


def normalize_resnet_keys(state_dict):
    """Strip wrapper prefixes and map AlgoPerf's downsample.{conv,bn} to torchvision's downsample.{0,1}.

    Returns (backbone weights, classifier weights): the fc layer is split off, a probe never loads it.
    """
    out, classifier = {}, {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in KNOWN_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        key = key.replace(".downsample.conv.", ".downsample.0.").replace(".downsample.bn.", ".downsample.1.")
        if key.startswith("fc."):
            classifier[key[3:]] = value
            continue
        out[key] = value
    return out, classifier


def load_backbone_weights(model, path, arch):
    """Load a backbone checkpoint into `model` (a torchvision ResNet without fc), strictly.

    Returns the checkpoint's own classifier weights ({'weight', 'bias'}, possibly empty).
    """
    state, classifier = normalize_resnet_keys(extract_state_dict(load_file(path), path))
    expected = model.state_dict()
    # BatchNorm's num_batches_tracked is a counter that plays no role in eval mode; older exports omit it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise UserError(f"{path} does not match {arch}: {'; '.join(parts)}. Is --arch right for this checkpoint?")
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if wrong_shape:
        raise UserError(f"{path} does not match {arch}: shape mismatch at {wrong_shape[0]} "
                        f"({len(wrong_shape)} tensors). Is --arch right for this checkpoint?")
    for key, value in expected.items():
        if key not in state:  # a counter the export left out: a fresh BatchNorm's 0
            state[key] = torch.zeros_like(value, device="cpu")
    model.load_state_dict(state, strict=True)
    return classifier
