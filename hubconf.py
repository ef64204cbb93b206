"""torch.hub entry points of the Time-Cat encoders (local checkpoints; see timecat.load_encoder):

    encoder, transform = torch.hub.load("path/to/this/repo", "load_encoder",
                                        "supervisedimagenet_resnet50_sfadamw_5_step80k", source="local")
"""
from timecat import load_encoder

dependencies = ["torch", "torchvision", "yaml"]
__all__ = ["load_encoder"]
