from models.backbones import RESNET_ARCHS, ConcatEncoder, build_backbone
from models.heads import LinearHead, MultiHead

__all__ = ["RESNET_ARCHS", "ConcatEncoder", "build_backbone", "LinearHead", "MultiHead"]
