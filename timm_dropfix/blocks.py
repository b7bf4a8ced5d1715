"""Residual blocks with one parameter-free dropout at a named place in the branch.

Each class here subclasses a timm or torchvision block and only replaces ``forward``: the same layers run in the
same order, plus ``self.branch_drop`` (an ``nn.Dropout`` or ``nn.Identity``) at ``self.branch_drop_at``. Swapping an
existing block's ``__class__`` to its subclass therefore keeps every state_dict key, and in eval mode the output is
the original's bit for bit. The dropout is a module (not ``F.dropout(training=...)``) so that torch.fx and export do
not bake the training flag in; eager training runs it through :func:`~timm_dropfix.fastdrop.run_dropout` (and
:func:`~timm_dropfix.fastdrop.run_dropout_add` at a post-activation branch's end, fused with the addition).
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch
from torch import nn
from timm.models import resnet as timm_resnet
from timm.models import resnetv2 as timm_resnetv2
from torchvision.models import resnet as tv_resnet

from .fastdrop import run_dropout, run_dropout_add, run_norm_act_dropout
from .positions import POSTACT, PREACT

__all__ = ['DropfixBlockMixin', 'DROPFIX_BLOCKS', 'dropfix_block_class', 'is_dropfix_block']


class DropfixBlockMixin:
    """What every dropfix block shares: the kind of block and a helper that drops at one named place.

    Blocks get their dropfix class from :func:`timm_dropfix.rewrite` (a class swap) or from the registered
    ``*_dropfix`` models; the position names are :data:`timm_dropfix.BRANCH_POSITIONS`.

    Example:
        >>> import timm, timm_dropfix
        >>> block = timm_dropfix.rewrite(timm.create_model('resnet18'), branch_drop_rate=0.1).layer1[0]
        >>> block.dropfix_kind, block.branch_drop_at, block.branch_drop.p
        ('postact', 'branch_end', 0.1)
    """
    dropfix_kind: str = PREACT
    dropfix_num_convs: int = 3
    branch_drop: nn.Module
    branch_drop_at: str = 'none'

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule first: without it, scripting fails deep in TorchScript's
        # type parser on a message that never names this package
        raise RuntimeError(
            f'torch.jit.script does not support timm_dropfix blocks ({type(self).__name__}): their forward chooses '
            'the fused dropout kernel in Python. Use torch.compile, torch.export, or torch.jit.trace (which records '
            'one mode: trace in eval mode for inference).')

    def _d(self, x: torch.Tensor, here: str, producer: Optional[nn.Module] = None) -> torch.Tensor:
        # branch_drop_at is a plain str, so fx and dynamo specialise on it instead of tracing a branch;
        # producer: x is this module's fresh output and only the dropout reads it (see run_dropout)
        return run_dropout(self.branch_drop, x, producer) if self.branch_drop_at == here else x

    def _nd(self, norm: nn.Module, x: torch.Tensor, here: str) -> torch.Tensor:
        # norm(x), then the dropout when placed here; a BN-ReLU and its dropout run as one fused pass where
        # run_norm_act_dropout applies (the same numbers, one pass and one kept tensor less)
        if self.branch_drop_at == here:
            fused = run_norm_act_dropout(self.branch_drop, norm, x)
            if fused is not None:
                return fused
        return self._d(norm(x), here)

    def _end(self, x: torch.Tensor, shortcut: torch.Tensor, producer: nn.Module, drop_path: Optional[nn.Module],
             inplace_add: bool, act: nn.Module) -> torch.Tensor:
        # a post-activation branch's end: the dropout when placed here, drop_path, the residual addition (into x
        # where the original block adds in place), then the block's activation. Without a drop_path in between,
        # the dropout, the addition and a ReLU run as one pass of the fused kernel where run_dropout_add applies:
        # the same numbers, two passes less.
        if self.branch_drop_at == 'branch_end' and (drop_path is None or isinstance(drop_path, nn.Identity)):
            fused = run_dropout_add(self.branch_drop, x, shortcut, producer, act)
            if fused is not None:
                return fused
        x = self._d(x, 'branch_end', producer)
        if drop_path is not None:
            x = drop_path(x)
        if inplace_add:
            x += shortcut
        else:
            x = x + shortcut
        return act(x)


class DropfixPreActBasic(DropfixBlockMixin, timm_resnetv2.PreActBasic):
    """timm ``PreActBasic`` (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with one branch dropout.

    Example:
        >>> import timm, timm_dropfix
        >>> block = timm_dropfix.rewrite(timm.create_model('resnetv2_18')).stages[0].blocks[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixPreActBasic', 'before_last_conv')
    """
    dropfix_kind = PREACT
    dropfix_num_convs = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            x_preact = self.norm1(x)
            shortcut = self.downsample(x_preact)
            x = self._d(x_preact, 'branch_start')
        else:
            x = self.norm1(self._d(x, 'branch_start'))
        x = self._d(self.conv1(x), 'after_conv1')
        x = self.conv2(self._nd(self.norm2, x, 'before_last_conv'))
        x = self._d(x, 'after_conv2')
        x = self.drop_path(x)
        return self._d(x + shortcut, 'after_add')


class DropfixPreActBottleneck(DropfixBlockMixin, timm_resnetv2.PreActBottleneck):
    """timm ``PreActBottleneck`` (BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1) with one branch dropout.

    Example:
        >>> import timm, timm_dropfix
        >>> block = timm_dropfix.rewrite(timm.create_model('resnetv2_50')).stages[0].blocks[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixPreActBottleneck', 'before_last_conv')
    """
    dropfix_kind = PREACT
    dropfix_num_convs = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            x_preact = self.norm1(x)
            shortcut = self.downsample(x_preact)
            x = self._d(x_preact, 'branch_start')
        else:
            x = self.norm1(self._d(x, 'branch_start'))
        x = self._d(self.conv1(x), 'after_conv1')
        x = self._d(self.conv2(self.norm2(x)), 'after_conv2')
        x = self.conv3(self._nd(self.norm3, x, 'before_last_conv'))
        x = self._d(x, 'after_conv3')
        x = self.drop_path(x)
        return self._d(x + shortcut, 'after_add')


class DropfixV2Bottleneck(DropfixBlockMixin, timm_resnetv2.Bottleneck):
    """timm ResNetV2's post-activation ``Bottleneck`` (``preact=False`` models) with one branch dropout.

    Example:
        >>> import timm, timm_dropfix
        >>> block = timm_dropfix.rewrite(timm.create_model('resnetv2_50', preact=False)).stages[0].blocks[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixV2Bottleneck', 'branch_end')
    """
    dropfix_kind = POSTACT
    dropfix_num_convs = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)
        x = self._d(x, 'branch_start')
        x = self.norm1(self._d(self.conv1(x), 'after_conv1'))
        x = self.norm2(self._d(self.conv2(x), 'after_conv2'))
        x = self._d(x, 'before_last_conv')
        x = self.norm3(self._d(self.conv3(x), 'after_conv3'))
        x = self._end(x, shortcut, self.norm3, self.drop_path, inplace_add=False, act=self.act3)
        return self._d(x, 'after_add')


class DropfixBasicBlock(DropfixBlockMixin, timm_resnet.BasicBlock):
    """timm ``BasicBlock`` (resnet18/34 family) with one branch dropout; DropBlock, SE and drop_path kept.

    Example:
        >>> import timm, timm_dropfix
        >>> block = timm_dropfix.rewrite(timm.create_model('resnet18')).layer1[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixBasicBlock', 'branch_end')
    """
    dropfix_kind = POSTACT
    dropfix_num_convs = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self._d(x, 'branch_start')
        x = self.bn1(self._d(self.conv1(x), 'after_conv1'))
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self._d(x, 'before_last_conv')
        x = self.bn2(self._d(self.conv2(x), 'after_conv2'))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self._end(x, shortcut, self.bn2 if self.se is None else self.se, self.drop_path, inplace_add=True,
                      act=self.act2)
        return self._d(x, 'after_add')


class DropfixBottleneck(DropfixBlockMixin, timm_resnet.Bottleneck):
    """timm ``Bottleneck`` (resnet50+, resnet*d, seresnet*, resnext*, wide_resnet*) with one branch dropout.

    Example:
        >>> import timm, timm_dropfix
        >>> block = timm_dropfix.rewrite(timm.create_model('resnet50')).layer1[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixBottleneck', 'branch_end')
    """
    dropfix_kind = POSTACT
    dropfix_num_convs = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self._d(x, 'branch_start')
        x = self.bn1(self._d(self.conv1(x), 'after_conv1'))
        x = self.act1(x)
        x = self.bn2(self._d(self.conv2(x), 'after_conv2'))
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self._d(x, 'before_last_conv')
        x = self.bn3(self._d(self.conv3(x), 'after_conv3'))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self._end(x, shortcut, self.bn3 if self.se is None else self.se, self.drop_path, inplace_add=True,
                      act=self.act3)
        return self._d(x, 'after_add')


class DropfixTvBasicBlock(DropfixBlockMixin, tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` with one branch dropout.

    Example:
        >>> import torchvision, timm_dropfix
        >>> block = timm_dropfix.rewrite(torchvision.models.resnet18()).layer1[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixTvBasicBlock', 'branch_end')
    """
    dropfix_kind = POSTACT
    dropfix_num_convs = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self._d(x, 'branch_start')
        out = self.relu(self.bn1(self._d(self.conv1(out), 'after_conv1')))
        out = self._d(out, 'before_last_conv')
        out = self.bn2(self._d(self.conv2(out), 'after_conv2'))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self._end(out, identity, self.bn2, None, inplace_add=True, act=self.relu)
        return self._d(out, 'after_add')


class DropfixTvBottleneck(DropfixBlockMixin, tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` (resnet50+, resnext*, wide_resnet*) with one branch dropout.

    Example:
        >>> import torchvision, timm_dropfix
        >>> block = timm_dropfix.rewrite(torchvision.models.resnet50()).layer1[0]
        >>> type(block).__name__, block.branch_drop_at
        ('DropfixTvBottleneck', 'branch_end')
    """
    dropfix_kind = POSTACT
    dropfix_num_convs = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self._d(x, 'branch_start')
        out = self.relu(self.bn1(self._d(self.conv1(out), 'after_conv1')))
        out = self.relu(self.bn2(self._d(self.conv2(out), 'after_conv2')))
        out = self._d(out, 'before_last_conv')
        out = self.bn3(self._d(self.conv3(out), 'after_conv3'))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self._end(out, identity, self.bn3, None, inplace_add=True, act=self.relu)
        return self._d(out, 'after_add')


# exact original class -> dropfix subclass; exact classes only, so a user's own subclass with another forward is
# never silently replaced
DROPFIX_BLOCKS: Dict[type, Type[DropfixBlockMixin]] = {
    timm_resnetv2.PreActBasic: DropfixPreActBasic,
    timm_resnetv2.PreActBottleneck: DropfixPreActBottleneck,
    timm_resnetv2.Bottleneck: DropfixV2Bottleneck,
    timm_resnet.BasicBlock: DropfixBasicBlock,
    timm_resnet.Bottleneck: DropfixBottleneck,
    tv_resnet.BasicBlock: DropfixTvBasicBlock,
    tv_resnet.Bottleneck: DropfixTvBottleneck,
}


def is_dropfix_block(module: nn.Module) -> bool:
    """True for a block that already carries a dropfix branch dropout.

    Example:
        >>> import timm
        >>> is_dropfix_block(timm.create_model('resnet18').layer1[0])
        False
    """
    return isinstance(module, DropfixBlockMixin)


def dropfix_block_class(module: nn.Module) -> Type[DropfixBlockMixin] | None:
    """The dropfix class for ``module``'s block type, or None when it is not a supported residual block.

    Example:
        >>> import timm
        >>> dropfix_block_class(timm.create_model('resnet18').layer1[0]).__name__
        'DropfixBasicBlock'
    """
    if is_dropfix_block(module):
        return type(module)
    return DROPFIX_BLOCKS.get(type(module))
