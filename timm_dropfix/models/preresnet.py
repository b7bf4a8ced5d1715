"""Pre-activation ResNets with dropout where the paper puts it.

* ``preresnet{18,34,50,101,152}_dropfix``: timm's ResNetV2 with BatchNorm (the ``resnetv2_*`` models), one
  element-wise dropout in every residual branch after the last BN+ReLU and before the last conv, and the head
  dropout before global pooling. Pretrained tags reuse timm's ``resnetv2_*`` weights (identical keys).
* ``preresnet{20,56,110}_cifar`` (basic blocks) and ``preresnet164_cifar`` (bottleneck): the paper's CIFAR
  networks (3x3 stem, three stages of 16/32/64 channels, 32x32 input), without dropout; each has a ``_dropfix``
  twin with the recommended placement.

Defaults of the ``_dropfix`` models: ``branch_drop_rate=0.1``, ``drop_rate=0.2`` (head, timm's meaning),
``branch_position='recommended'``, ``head_position='before_pool'``; all can be passed to ``timm.create_model``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnetv2 import ResNetV2

from ..rewrite import rewrite
from ..positions import check_rate
from ._cfgs import reuse_cfg

__all__ = ['DropfixResNetV2', 'CifarPreResNet']


class DropfixResNetV2(ResNetV2):
    """timm ``ResNetV2`` built with dropfix placement; every other argument is ResNetV2's.

    Example:
        >>> import timm, timm_dropfix
        >>> m = timm.create_model('preresnet50_dropfix', num_classes=37, branch_drop_rate=0.05)
        >>> m.stages[0].blocks[0].branch_drop_at, type(m.head).__name__
        ('before_last_conv', 'PrePoolDropoutHead')
    """

    def __init__(
            self,
            *args: Any,
            branch_drop_rate: float = 0.1,
            branch_position: str = 'recommended',
            head_position: str = 'before_pool',
            drop_rate: float = 0.2,
            **kwargs: Any,
    ):
        # checked before timm builds the model: torch's own check would only come at the first forward
        drop_rate = check_rate('drop_rate', drop_rate)
        super().__init__(*args, drop_rate=drop_rate, **kwargs)
        self._init_stem()
        rewrite(self, branch_drop_rate, drop_rate, branch_position, head_position)

    def _init_stem(self) -> None:
        """Hook for subclasses that change the stem (the CIFAR variants)."""


class CifarPreResNet(DropfixResNetV2):
    """The paper's CIFAR pre-activation ResNet on timm's ResNetV2: 3x3 stride-1 stem, no stem pooling.

    Example:
        >>> import timm, torch, timm_dropfix
        >>> m = timm.create_model('preresnet20_cifar_dropfix')
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def _init_stem(self) -> None:
        conv = self.stem.conv
        # same key ('stem.conv.weight'), 3x3 stride 1 instead of 7x7 stride 2 + max pool: 32x32 inputs keep their size
        new_conv = create_conv2d(conv.in_channels, conv.out_channels, 3, stride=1)
        nn.init.kaiming_normal_(new_conv.weight, mode='fan_out', nonlinearity='relu')
        self.stem = nn.Sequential(OrderedDict(conv=new_conv))
        self.stem_feat_idx = 0
        reduction = 1
        for i, info in enumerate(self.feature_info):
            if i == 0:
                info.update(reduction=1, module='stem.conv')
            else:
                reduction *= 1 if i == 1 else 2
                info['reduction'] = reduction


def _cfg(**kwargs: Any) -> dict:
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
            'interpolation': 'bilinear', 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
            'first_conv': 'stem.conv', 'classifier': 'head.fc', **kwargs}


def _cifar_cfg() -> dict:
    # CIFAR-10 channel statistics of the training set
    return _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


default_cfgs = generate_default_cfgs({
    'preresnet18_dropfix.ra4_e3600_r224_in1k': reuse_cfg('resnetv2_18.ra4_e3600_r224_in1k'),
    'preresnet34_dropfix.ra4_e3600_r224_in1k': reuse_cfg('resnetv2_34.ra4_e3600_r224_in1k'),
    'preresnet50_dropfix.a1h_in1k': reuse_cfg('resnetv2_50.a1h_in1k'),
    'preresnet101_dropfix.a1h_in1k': reuse_cfg('resnetv2_101.a1h_in1k'),
    'preresnet152_dropfix.untrained': _cfg(),
    **{f'preresnet{d}_cifar{s}.untrained': _cifar_cfg() for d in (20, 56, 110, 164) for s in ('', '_dropfix')},
})


def _create(variant: str, pretrained: bool, cls: type = DropfixResNetV2, **kwargs: Any) -> DropfixResNetV2:
    # the stem plus one tap per stage: five for the ImageNet nets, four for the three-stage CIFAR nets
    num_taps = 1 + len(kwargs.get('layers', (0,) * 4))
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(num_taps)))
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


_BN = dict(conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
_BASIC = dict(channels=(64, 128, 256, 512), basic=True, bottle_ratio=1.0, **_BN)


@register_model
def preresnet18_dropfix(pretrained: bool = False, **kwargs: Any) -> DropfixResNetV2:
    """Pre-activation ResNet-18 (timm resnetv2_18) with dropfix placement."""
    return _create('preresnet18_dropfix', pretrained, **dict(dict(layers=(2, 2, 2, 2), **_BASIC), **kwargs))


@register_model
def preresnet34_dropfix(pretrained: bool = False, **kwargs: Any) -> DropfixResNetV2:
    """Pre-activation ResNet-34 (timm resnetv2_34) with dropfix placement."""
    return _create('preresnet34_dropfix', pretrained, **dict(dict(layers=(3, 4, 6, 3), **_BASIC), **kwargs))


@register_model
def preresnet50_dropfix(pretrained: bool = False, **kwargs: Any) -> DropfixResNetV2:
    """Pre-activation ResNet-50 (timm resnetv2_50) with dropfix placement."""
    return _create('preresnet50_dropfix', pretrained, **dict(dict(layers=(3, 4, 6, 3), **_BN), **kwargs))


@register_model
def preresnet101_dropfix(pretrained: bool = False, **kwargs: Any) -> DropfixResNetV2:
    """Pre-activation ResNet-101 (timm resnetv2_101) with dropfix placement."""
    return _create('preresnet101_dropfix', pretrained, **dict(dict(layers=(3, 4, 23, 3), **_BN), **kwargs))


@register_model
def preresnet152_dropfix(pretrained: bool = False, **kwargs: Any) -> DropfixResNetV2:
    """Pre-activation ResNet-152 (timm resnetv2_152) with dropfix placement (timm has no weights for it)."""
    return _create('preresnet152_dropfix', pretrained, **dict(dict(layers=(3, 8, 36, 3), **_BN), **kwargs))


def _cifar(variant: str, pretrained: bool, depth: int, dropfix: bool, **kwargs: Any) -> CifarPreResNet:
    if depth == 164:  # bottleneck: 9n + 2 layers, stage widths 16/32/64 x4 at the block outputs
        n = (depth - 2) // 9
        args = dict(layers=(n, n, n), channels=(64, 128, 256), bottle_ratio=0.25)
    else:  # basic blocks: 6n + 2 layers
        n = (depth - 2) // 6
        args = dict(layers=(n, n, n), channels=(16, 32, 64), basic=True, bottle_ratio=1.0)
    args.update(stem_chs=16, num_classes=10, **_BN)
    if not dropfix:
        # the plain twin: no dropout anywhere, timm's head (pool -> fc)
        args.update(branch_drop_rate=0.0, drop_rate=0.0, head_position='after_pool')
    return _create(variant, pretrained, cls=CifarPreResNet, **dict(args, **kwargs))


@register_model
def preresnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-20 (basic blocks, 3x3 per stage), no dropout."""
    return _cifar('preresnet20_cifar', pretrained, 20, False, **kwargs)


@register_model
def preresnet20_cifar_dropfix(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-20 with dropfix placement."""
    return _cifar('preresnet20_cifar_dropfix', pretrained, 20, True, **kwargs)


@register_model
def preresnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-56 (basic blocks, 9 per stage), no dropout."""
    return _cifar('preresnet56_cifar', pretrained, 56, False, **kwargs)


@register_model
def preresnet56_cifar_dropfix(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-56 with dropfix placement."""
    return _cifar('preresnet56_cifar_dropfix', pretrained, 56, True, **kwargs)


@register_model
def preresnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-110 (basic blocks, 18 per stage; the paper's 94.44 % CIFAR-10 model), no dropout."""
    return _cifar('preresnet110_cifar', pretrained, 110, False, **kwargs)


@register_model
def preresnet110_cifar_dropfix(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-110 with dropfix placement."""
    return _cifar('preresnet110_cifar_dropfix', pretrained, 110, True, **kwargs)


@register_model
def preresnet164_cifar(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-164 (bottleneck blocks, 18 per stage), no dropout."""
    return _cifar('preresnet164_cifar', pretrained, 164, False, **kwargs)


@register_model
def preresnet164_cifar_dropfix(pretrained: bool = False, **kwargs: Any) -> CifarPreResNet:
    """CIFAR PreResNet-164 with dropfix placement."""
    return _cifar('preresnet164_cifar_dropfix', pretrained, 164, True, **kwargs)
