"""Backbone weights from every checkpoint format users bring: raw torchvision state_dicts, DDP/torch.compile
prefixes, model lists and SSL heads, and AlgoPerf's downsample.{conv,bn} names (the owner of backbone key
normalisation, for ResNets and every other torchvision architecture)."""
import math

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


def normalize_keys(state_dict, classifier="fc", ignored=()):
    """Strip wrapper prefixes and map AlgoPerf's downsample.{conv,bn} to torchvision's downsample.{0,1}.

    Returns (backbone weights, classifier weights): the classifier (the module named `classifier`: fc for ResNets,
    heads.head for ViT, ...) is split off, a probe never loads it; keys under an `ignored` prefix (auxiliary
    classifiers) are dropped.
    """
    out, classifier_weights = {}, {}
    head = classifier + "."
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in KNOWN_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        key = key.replace(".downsample.conv.", ".downsample.0.").replace(".downsample.bn.", ".downsample.1.")
        if key.startswith(head):
            classifier_weights[key[len(head):]] = value
            continue
        if not key.startswith(tuple(ignored)):
            out[key] = value
    return out, classifier_weights


def load_backbone_weights(model, path, arch, classifier="fc", ignored=()):
    """Load a backbone checkpoint into `model` (a torchvision model whose `classifier` was cut off), strictly.

    Returns the checkpoint's own classifier weights ({'weight', 'bias'}, possibly empty).
    """
    state, classifier_weights = normalize_keys(extract_state_dict(load_file(path), path), classifier, ignored)
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
        hint = input_size_hint(state, expected) or "Is --arch right for this checkpoint?"
        raise UserError(f"{path} does not match {arch}: shape mismatch at {wrong_shape[0]} "
                        f"({len(wrong_shape)} tensors). {hint}")
    for key, value in expected.items():
        if key not in state:  # a counter the export left out: a fresh BatchNorm's 0
            state[key] = torch.zeros_like(value, device="cpu")
    model.load_state_dict(state, strict=True)
    return classifier_weights


def input_size_hint(state, expected):
    """For a ViT whose positional embedding does not match: the input size the checkpoint was trained at."""
    key = "encoder.pos_embedding"
    if key not in state or "conv_proj.weight" not in state or state[key].shape == expected[key].shape:
        return None
    patch, tokens = state["conv_proj.weight"].shape[-1], state[key].shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        return None
    size = side * patch
    return (f"Its positional embedding is for {size}-px inputs: use {size}-px crops (--img_size {size}, "
            f"load_encoder(image_size={size}))")
