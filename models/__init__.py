from models.backbones import RESNET_ARCHS, ConcatEncoder, build_backbone
from models.heads import LinearHead, MultiHead
