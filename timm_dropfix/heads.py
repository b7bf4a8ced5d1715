"""Classifier heads that can drop before global pooling.

Dropping element-wise on the final feature map before the average pool gives pooled features whose noise over
masks is much smaller than dropping the pooled vector with the same rate (paper.md, guideline 2), while still
regularising every position. A channel-wise ``Dropout2d`` there has the same distribution as dropping after the pool,
so it is only offered for ablations.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from timm.layers import ClassifierHead
from timm.models.resnet import ResNet
from torchvision.models.resnet import ResNet as TvResNet

from .fastdrop import run_dropout
from .positions import check_rate

__all__ = ['PrePoolDropoutHead', 'DropfixResNet', 'DropfixTvResNet', 'make_head_drop', 'HeadDropMixin',
           'set_v1_strides', 'check_pool_for_dropout']


def make_head_drop(rate: float, position: str) -> nn.Module:
    """The dropout module for a head position (``nn.Identity`` when nothing drops).

    Example:
        >>> make_head_drop(0.2, 'before_pool_channel')
        Dropout2d(p=0.2, inplace=False)
    """
    if position == 'none' or rate == 0.0:
        return nn.Identity()
    if position == 'before_pool_channel':
        return nn.Dropout2d(rate)
    return nn.Dropout(rate)


def check_pool_for_dropout(pool_type: Optional[str], head_drop: nn.Module, owner: str,
                           remedy: Optional[str] = None) -> None:
    """Refuse a max-type global pool after an element-wise head dropout (``head_drop`` an ``nn.Dropout``).

    The guideline drops before *average* pooling, whose mean over masks equals the eval-mode output; the maximum of
    dropped and rescaled features is biased upward, so training and eval would disagree (the shift the paper's head
    rule avoids). A channel-wise ``Dropout2d`` scales whole channels by c >= 0, and max(c * x) = c * max(x), so it
    passes. ``pool_type`` is timm's ('avg', 'max', 'avgmax', 'catavgmax', 'fast...', '' for none); ``remedy`` ends
    the message (what the owner of this model can change; default: timm's ``global_pool='avg'``).

    Example:
        >>> check_pool_for_dropout('avg', nn.Dropout(0.2), 'resnet50')
        >>> check_pool_for_dropout('max', nn.Identity(), 'resnet50')
        >>> check_pool_for_dropout('max', nn.Dropout2d(0.2), 'resnet50')
        >>> check_pool_for_dropout('avgmax', nn.Dropout(0.2), 'resnet50')
        Traceback (most recent call last):
        ...
        ValueError: resnet50 pools with 'avgmax' after its dropout before the pool: ...
    """
    if pool_type and 'max' in pool_type and not isinstance(head_drop, (nn.Identity, nn.Dropout2d)):
        remedy = remedy or "Use global_pool='avg', or head_position='after_pool'."
        raise ValueError(
            f"{owner} pools with {pool_type!r} after its dropout before the pool: a max over dropped and rescaled "
            f"features is biased, so training and eval would disagree. {remedy}")


def set_v1_strides(model: nn.Module) -> nn.Module:
    """Move the stride of every strided bottleneck from its 3x3 conv to its first 1x1 conv (ResNet v1 layout).

    Keras and Caffe ResNet-50 weights were trained this way; timm and torchvision build v1.5 (stride on the 3x3).
    Parameters are untouched. Example:

        >>> import timm
        >>> m = set_v1_strides(timm.create_model('resnet50'))
        >>> m.layer2[0].conv1.stride, m.layer2[0].conv2.stride
        ((2, 2), (1, 1))
    """
    for block in model.modules():
        conv1, conv2 = getattr(block, 'conv1', None), getattr(block, 'conv2', None)
        if not (hasattr(block, 'conv3') and isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)):
            continue
        if conv2.stride != (1, 1):
            if not isinstance(getattr(block, 'aa', None), (nn.Identity, type(None))):
                raise ValueError('v1 strides are not defined for anti-aliased (blur pool) blocks.')
            conv1.stride, conv2.stride = conv2.stride, (1, 1)
    return model


class PrePoolDropoutHead(ClassifierHead):
    """timm ``ClassifierHead`` that runs drop -> pool -> fc instead of pool -> drop -> fc.

    Everything else (``reset``, ``pre_logits``, conv classifiers, pooling types) is ClassifierHead's, so a model
    using it still answers timm's ``reset_classifier`` and ``forward_head(pre_logits=True)``.

    Example:
        >>> import torch
        >>> head = PrePoolDropoutHead(64, 10, drop_rate=0.2)
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
    """

    def reset(self, num_classes: int, pool_type: Optional[str] = None, *args: Any, **kwargs: Any) -> None:
        """ClassifierHead's reset; a max-type ``pool_type`` is refused while a dropout runs before the pool.

        Example:
            >>> head = PrePoolDropoutHead(64, 10, drop_rate=0.2)
            >>> head.reset(5)
            >>> head.fc.out_features
            5
            >>> head.reset(5, pool_type='max')
            Traceback (most recent call last):
            ...
            ValueError: ...
        """
        check_pool_for_dropout(pool_type, self.drop, type(self).__name__)
        super().reset(num_classes, pool_type, *args, **kwargs)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = run_dropout(self.drop, x)
        x = self.global_pool(x)
        if pre_logits:
            return self.flatten(x)
        x = self.fc(x)
        return self.flatten(x)


class HeadDropMixin:
    """A model whose own forward applies ``self.head_drop`` before or after pooling (``self.head_drop_at``).

    Example:
        >>> import torchvision, timm_dropfix
        >>> model = timm_dropfix.rewrite(torchvision.models.resnet18(), head_drop_rate=0.3)
        >>> model.head_drop_at, model.head_drop.p
        ('before_pool', 0.3)
    """
    head_drop: nn.Module
    head_drop_at: str = 'none'

    def _hd(self, x: torch.Tensor, here: str) -> torch.Tensor:
        return run_dropout(self.head_drop, x) if self.head_drop_at == here else x


class DropfixResNet(HeadDropMixin, ResNet):
    """timm ``ResNet`` whose head drops at ``head_drop_at`` instead of timm's ``F.dropout`` after the pool.

    Created by :func:`timm_dropfix.rewrite` (class swap, no new parameters) or by the registered
    ``resnet*_dropfix`` models.

    Example:
        >>> import timm, timm_dropfix
        >>> type(timm_dropfix.rewrite(timm.create_model('resnet18'))).__name__
        'DropfixResNet'
    """

    def __init__(
            self,
            *args: Any,
            branch_drop_rate: float = 0.1,
            branch_position: str = 'recommended',
            head_position: str = 'before_pool',
            v1_strides: bool = False,
            drop_rate: float = 0.2,
            **kwargs: Any,
    ):
        """Build a timm ResNet (same arguments) with dropfix placement; ``drop_rate`` is the head rate.

        ``v1_strides=True`` puts each downsampling bottleneck's stride on its first 1x1 conv (ResNet v1, as in
        Keras/Caffe weights) instead of the 3x3 conv (v1.5, timm's default); the weights are the same shapes.
        """
        # checked before timm builds the model: torch's own check would only come at the first forward
        drop_rate = check_rate('drop_rate', drop_rate)
        super().__init__(*args, drop_rate=drop_rate, **kwargs)
        self.v1_strides = v1_strides
        if v1_strides:
            set_v1_strides(self)
        from .rewrite import rewrite  # rewrite maps ResNet to this class, so the import must be lazy
        rewrite(self, branch_drop_rate, drop_rate, branch_position, head_position)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's reset_classifier; a max-type ``global_pool`` is refused while the head drops before the pool.

        Example:
            >>> import timm, timm_dropfix
            >>> model = timm_dropfix.rewrite(timm.create_model('resnet18'))
            >>> model.reset_classifier(37)
            >>> model.fc.out_features
            37
        """
        if self.head_drop_at == 'before_pool':
            check_pool_for_dropout(global_pool, self.head_drop, type(self).__name__)
        super().reset_classifier(num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's forward_head with the head dropout at ``head_drop_at`` (a no-op in eval mode).

        Example:
            >>> import torch, timm, timm_dropfix
            >>> model = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=10)).eval()
            >>> model.forward_head(torch.randn(2, 512, 7, 7), pre_logits=True).shape
            torch.Size([2, 512])
        """
        x = self._hd(x, 'before_pool')
        x = self.global_pool(x)
        x = self._hd(x, 'after_pool')
        return x if pre_logits else self.fc(x)


class DropfixTvResNet(HeadDropMixin, TvResNet):
    """torchvision ``ResNet`` with a head dropout before (or after) the average pool.

    Example:
        >>> import torchvision, timm_dropfix
        >>> type(timm_dropfix.rewrite(torchvision.models.resnet18())).__name__
        'DropfixTvResNet'
    """

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self._hd(x, 'before_pool')
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self._hd(x, 'after_pool')
        x = self.fc(x)
        return x

