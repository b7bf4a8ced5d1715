"""The one-call pass: a ResNet in, the same ResNet out with its dropout where the paper says.

``rewrite`` swaps each supported block's class for its dropfix subclass (same layers, one extra parameter-free
dropout) and moves the head dropout before global pooling. Nothing with parameters is added, removed or renamed,
so it works before or after loading weights and checkpoints keep loading both ways.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from torch import nn
from timm.layers import ClassifierHead
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from torchvision.models.resnet import ResNet as TvResNet

from .blocks import DropfixBlockMixin, dropfix_block_class
from .heads import (DropfixResNet, DropfixTvResNet, HeadDropMixin, PrePoolDropoutHead, check_pool_for_dropout,
                    make_head_drop)
from .positions import BRANCH_POSITIONS, check_head_position, check_rate, resolve_branch_position

__all__ = ['rewrite', 'summarize', 'dropfix_config', 'dropfix_twin', 'DropfixSummary', 'UnsupportedModelError',
           'SUPPORTED_FAMILIES']

_logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = (
    'timm ResNetV2 (resnetv2_*, any of its norm layers, pre-activation or not)',
    "timm's ResNet class with basic or bottleneck blocks (resnet*, resnet*d, seresnet*, ecaresnet*, resnext*, "
    'wide_resnet*, resnetrs*, resnetblur*)',
    'torchvision resnet*, resnext*, wide_resnet*',
    'the registered preresnet*_dropfix, preresnet*_cifar and resnet*_dropfix models',
)

_TWINS = {
    **{f'resnet{d}': f'resnet{d}_dropfix' for d in (18, 34, 50, 101, 152)},
    'resnet50d': 'resnet50d_dropfix',
    **{f'resnetv2_{d}': f'preresnet{d}_dropfix' for d in (18, 34, 50, 101, 152)},
    **{f'preresnet{d}_cifar': f'preresnet{d}_cifar_dropfix' for d in (20, 56, 110, 164)},
}


class UnsupportedModelError(ValueError):
    """Raised for a model that has no residual block ``rewrite`` knows, or that is wrapped (DDP, torch.compile).

    A ``ValueError`` subclass, so code that catches bad arguments catches it too; the message names what is supported.

    Example:
        >>> import torch, timm_dropfix
        >>> try:
        ...     timm_dropfix.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        ... except timm_dropfix.UnsupportedModelError as e:
        ...     print('refused')
        refused
    """


@dataclass
class DropfixSummary:
    """What a model's dropout looks like: counts per block kind, where the branch dropout sits, the head.

    Example:
        >>> import timm, timm_dropfix
        >>> s = timm_dropfix.summarize(timm_dropfix.rewrite(timm.create_model('resnet18')))
        >>> s.blocks, s.head_position
        (8, 'before_pool')
    """
    model: str
    blocks: int = 0
    block_kinds: Dict[str, int] = field(default_factory=dict)
    branch_drop_rate: float = 0.0
    branch_positions: Dict[str, str] = field(default_factory=dict)
    head: str = 'not found'
    head_drop_rate: float = 0.0
    head_position: str = 'none'

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (used in configs and model cards).

        Example:
            >>> import timm, timm_dropfix
            >>> d = timm_dropfix.summarize(timm_dropfix.rewrite(timm.create_model('resnet18'))).to_dict()
            >>> d['branch_drop_rate'], d['head_drop_rate']
            (0.1, 0.2)
        """
        return asdict(self)

    def __str__(self) -> str:
        kinds = ', '.join(f'{n} x{c}' for n, c in self.block_kinds.items()) or 'none'
        places = ', '.join(f'{n}: {p}' for n, p in self.branch_positions.items()) or 'none'
        return (f'{self.model}: {self.blocks} residual blocks ({kinds}); branch dropout p={self.branch_drop_rate:g} '
                f'at {places}; head {self.head}: dropout p={self.head_drop_rate:g} {self.head_position}')


def _check_module(model: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        hint = (f" To build one by name: timm.create_model({model!r}), or its twin "
                f"timm.create_model('{dropfix_twin(model)}') with the placement built in."
                if isinstance(model, str) and dropfix_twin(model) else '')
        raise TypeError(f'{caller} needs a torch.nn.Module, got an object of type {type(model).__name__}.{hint}')


def _refuse_wrappers(model: nn.Module) -> None:
    _check_module(model, 'rewrite')
    name = type(model).__name__
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise UnsupportedModelError(
            f'rewrite got a {name} wrapper. Call rewrite on the bare model before wrapping it (before '
            f'accelerator.prepare / DDP), or pass model.module.')
    # compiled graphs are traced once with whatever dropout they saw; rewriting first keeps one placement per graph
    # instead of relying on dynamo's guards to notice swapped classes
    if hasattr(model, '_orig_mod') and 'OptimizedModule' in name:
        raise UnsupportedModelError(
            'rewrite got a torch.compile wrapper. Rewrite the model before compiling it: call '
            'rewrite(model._orig_mod, ...), then compile again.')
    inner = next((n for n, m in model.named_modules()
                  if 'OptimizedModule' in type(m).__name__ or getattr(m, '_compiled_call_impl', None) is not None),
                 None)
    if inner is not None:
        what = f"whose '{inner}' is" if inner else 'that is'
        raise UnsupportedModelError(
            f'rewrite got a model {what} compiled (torch.compile or Module.compile). Rewrite the model before '
            'compiling it.')


def _drop(rate: float, training: bool) -> nn.Module:
    module = nn.Dropout(rate) if rate > 0 else nn.Identity()
    return module.train(training)


def _head_kind(model: nn.Module) -> Optional[str]:
    if isinstance(model, ResNetV2) and type(model.head) in (ClassifierHead, PrePoolDropoutHead):
        return 'classifier_head'
    if type(model) in (ResNet, DropfixResNet) or isinstance(model, DropfixResNet):
        return 'timm_resnet'
    if type(model) in (TvResNet, DropfixTvResNet) or isinstance(model, DropfixTvResNet):
        return 'tv_resnet'
    return None


def _nets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The networks whose head rewrite changes, by name: the model itself (''), or the known networks it holds
    (a wrapper module with a timm or torchvision ResNet as its backbone)."""
    if _head_kind(model) is not None:
        return [('', model)]
    return [(name, m) for name, m in model.named_modules() if _head_kind(m) is not None]


def _pool_type(net: nn.Module) -> Optional[str]:
    if isinstance(net, TvResNet):  # its pool is a module of its own, which a user may have swapped
        pool = net.avgpool
        if isinstance(pool, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return 'max'
        return getattr(pool, 'pool_type', 'avg')  # e.g. timm's SelectAdaptivePool2d put there
    pool = net.head.global_pool if _head_kind(net) == 'classifier_head' else getattr(net, 'global_pool', None)
    return getattr(pool, 'pool_type', None)


def _unknown_blocks(model: nn.Module) -> str:
    """' (its blocks: X, Y)' for a ResNet-family model whose residual blocks are of kinds rewrite does not know."""
    stages = [getattr(model, f'layer{i}', None) for i in range(1, 5)] + list(getattr(model, 'stages', []))
    kinds = []
    for stage in stages:
        for block in (getattr(stage, 'blocks', stage) or []) if isinstance(stage, nn.Module) else []:
            if type(block).__name__ not in kinds:
                kinds.append(type(block).__name__)
    return f' (its blocks: {", ".join(kinds)})' if kinds else ''


def _head_drop_rate(net: nn.Module) -> float:
    """The rate of the head dropout ``net`` runs now: a ResNetV2 head's ``drop``, a dropfix head's ``head_drop``
    (0 before rewrite has set it), timm ResNet's own ``drop_rate``; a torchvision ResNet has none of its own."""
    if isinstance(net, ResNetV2) and isinstance(net.head, ClassifierHead):
        return _rate_of(net.head.drop)
    if isinstance(net, HeadDropMixin):
        return _rate_of(getattr(net, 'head_drop', None))
    if isinstance(net, ResNet):
        return float(net.drop_rate)
    return 0.0


def _rewrite_head(model: nn.Module, kind: Optional[str], rate: float, position: str) -> None:
    if position == 'none':
        rate = 0.0
    if kind == 'classifier_head':
        head = model.head
        head.__class__ = PrePoolDropoutHead if position in ('before_pool', 'before_pool_channel') else ClassifierHead
        head.drop = make_head_drop(rate, position).train(head.training)
        model.drop_rate = rate
    elif kind in ('timm_resnet', 'tv_resnet'):
        if kind == 'timm_resnet' and not isinstance(model, DropfixResNet):
            model.__class__ = DropfixResNet
        elif kind == 'tv_resnet' and not isinstance(model, DropfixTvResNet):
            model.__class__ = DropfixTvResNet
        model.head_drop = make_head_drop(rate, position).train(model.training)
        model.head_drop_at = 'none' if rate == 0.0 else ('before_pool' if position.startswith('before') else position)
        if kind == 'timm_resnet':
            # DropfixResNet.forward_head ignores drop_rate; keep timm's attribute truthful for anyone reading it
            model.drop_rate = rate


def rewrite(
        model: nn.Module,
        branch_drop_rate: float = 0.1,
        head_drop_rate: float = 0.2,
        branch_position: str = 'recommended',
        head_position: str = 'before_pool',
) -> nn.Module:
    """Put one dropout in every residual branch and the head dropout before pooling, in place.

    Args:
        model: a timm ResNetV2 / ResNet-family model or a torchvision ResNet-family model, before or after its
            weights are loaded. Not wrapped: rewrite before DDP, ``accelerator.prepare`` or ``torch.compile``.
        branch_drop_rate: dropout probability in each residual branch, in [0, 1).
        head_drop_rate: dropout probability in the head, in [0, 1); replaces timm's ``drop_rate``.
        branch_position: one of :data:`BRANCH_POSITIONS`. ``'recommended'`` resolves per block kind:
            pre-activation blocks after the last BN(+ReLU) and before the last conv (the paper's rule);
            post-activation blocks after the last BN, before the addition (their last BN follows the last conv).
        head_position: one of :data:`HEAD_POSITIONS`; ``'before_pool'`` (element-wise, recommended).

    Returns:
        The same model object (class of its blocks and head swapped, parameters untouched). Calling it again
        with other arguments changes the placement; with the same arguments it changes nothing.

    Example:
        >>> import timm, torch, timm_dropfix
        >>> model = timm.create_model('resnet50', num_classes=37)
        >>> model = timm_dropfix.rewrite(model, branch_drop_rate=0.1, head_drop_rate=0.2)
        >>> model.layer1[0].branch_drop_at, model.head_drop_at
        ('branch_end', 'before_pool')
        >>> model.eval()(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 37])
    """
    branch_drop_rate = check_rate('branch_drop_rate', branch_drop_rate)
    head_drop_rate = check_rate('head_drop_rate', head_drop_rate)
    check_head_position(head_position)
    if branch_position not in BRANCH_POSITIONS:
        raise ValueError(f'Unknown branch_position {branch_position!r}; choose one of {", ".join(BRANCH_POSITIONS)}.')
    _refuse_wrappers(model)

    blocks = [(m, cls) for m in model.modules() if (cls := dropfix_block_class(m)) is not None]
    if not blocks:
        raise UnsupportedModelError(
            f'{type(model).__name__}{_unknown_blocks(model)} has no residual block that timm_dropfix knows. '
            'Supported families: ' + '; '.join(SUPPORTED_FAMILIES) + '.')
    # resolve every place before touching the model, so a bad position leaves it unchanged
    resolved = {cls: 'none' if branch_position == 'none' else
                resolve_branch_position(branch_position, cls.dropfix_kind, cls.dropfix_num_convs)
                for _, cls in blocks}
    nets = _nets(model)
    if head_position == 'before_pool':  # a channel-wise Dropout2d scales whole channels: their max is unbiased
        for name, net in nets:
            remedy = ("Put an average pool back (model.avgpool = nn.AdaptiveAvgPool2d(1)), or pass "
                      "head_position='after_pool'." if isinstance(net, TvResNet) else None)
            check_pool_for_dropout(_pool_type(net), _drop(head_drop_rate, False),
                                   f'{type(net).__name__}{f" ({name})" if name else ""}', remedy)

    for module, cls in blocks:
        module.__class__ = cls
        at = resolved[cls] if branch_drop_rate > 0 else 'none'
        module.branch_drop = _drop(branch_drop_rate if at != 'none' else 0.0, module.training)
        module.branch_drop_at = at
    if not nets:
        _logger.warning('%s: no classifier head that timm_dropfix knows; only the residual branches were changed.',
                        type(model).__name__)
    for name, net in nets:
        old_rate = _head_drop_rate(net)
        if dropfix_config(model) is None and head_position != 'none' and 0 < old_rate != head_drop_rate:
            # the model was built with a head dropout of its own (timm's drop_rate): say that its rate changes
            _logger.warning('%s: its head dropout p=%g (after the pool) is replaced by head_drop_rate=%g at %s; pass '
                            'head_drop_rate=%g to keep its rate', type(net).__name__, old_rate, head_drop_rate,
                            head_position, old_rate)
        _rewrite_head(net, _head_kind(net), head_drop_rate, head_position)
        if name:
            _logger.warning("%s: rewrote the head of its '%s' (%s); the head dropout runs only where %s's forward "
                            'calls that forward or forward_head', type(model).__name__, name, type(net).__name__,
                            type(model).__name__)

    model._dropfix_cfg = dict(
        branch_drop_rate=branch_drop_rate, head_drop_rate=head_drop_rate,
        branch_position=branch_position, head_position=head_position)
    _logger.info('%s', summarize(model))
    return model


def _rate_of(module: nn.Module) -> float:
    return float(getattr(module, 'p', 0.0))


def summarize(model: nn.Module) -> DropfixSummary:
    """Describe where a model drops: blocks per kind, the branch position each kind got, and the head.

    Works on any model (a model never rewritten reports its blocks with no branch dropout).

    Example:
        >>> import timm, timm_dropfix
        >>> print(timm_dropfix.summarize(timm.create_model('preresnet18_dropfix')))  # doctest: +ELLIPSIS
        DropfixResNetV2: 8 residual blocks (DropfixPreActBasic x8); branch dropout p=0.1 at ...
    """
    _check_module(model, 'summarize')
    summary = DropfixSummary(model=type(model).__name__)
    for m in model.modules():
        if dropfix_block_class(m) is None:
            continue
        name = type(m).__name__
        summary.blocks += 1
        summary.block_kinds[name] = summary.block_kinds.get(name, 0) + 1
        if isinstance(m, DropfixBlockMixin):
            summary.branch_positions[name] = m.branch_drop_at
            summary.branch_drop_rate = max(summary.branch_drop_rate, _rate_of(m.branch_drop))
    net = (_nets(model) or [('', model)])[0][1]  # a wrapper's backbone holds the head
    if isinstance(net, ResNetV2) and isinstance(net.head, ClassifierHead):
        summary.head = type(net.head).__name__
        summary.head_drop_rate = _head_drop_rate(net)
        before = isinstance(net.head, PrePoolDropoutHead)
        channel = isinstance(net.head.drop, nn.Dropout2d)
        summary.head_position = ('none' if summary.head_drop_rate == 0 else
                                 'before_pool_channel' if before and channel else
                                 'before_pool' if before else 'after_pool')
    elif isinstance(net, HeadDropMixin):
        method = 'forward_head' if isinstance(net, ResNet) else '_forward_impl'
        summary.head = f'{type(net).__name__}.{method}'
        summary.head_drop_rate = _head_drop_rate(net)
        channel = isinstance(net.head_drop, nn.Dropout2d)
        summary.head_position = 'before_pool_channel' if channel else net.head_drop_at
    elif isinstance(net, ResNet):
        summary.head = 'ResNet.forward_head'
        summary.head_drop_rate = _head_drop_rate(net)
        summary.head_position = 'after_pool' if net.drop_rate else 'none'
    elif isinstance(net, TvResNet):
        summary.head = 'ResNet._forward_impl'
    return summary


def dropfix_config(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The arguments of the last :func:`rewrite` on ``model`` (JSON-ready), or None if it was never rewritten.

    Example:
        >>> import timm, timm_dropfix
        >>> timm_dropfix.dropfix_config(timm.create_model('resnet18')) is None
        True
        >>> timm_dropfix.dropfix_config(timm_dropfix.rewrite(timm.create_model('resnet18')))['head_position']
        'before_pool'
    """
    cfg = getattr(model, '_dropfix_cfg', None)
    return dict(cfg) if cfg is not None else None


def dropfix_twin(name: str) -> Optional[str]:
    """The registered dropfix model that has the same architecture (and weights) as timm model ``name``.

    Lets a rewritten model be saved under a name whose ``model_args`` rebuild the same dropout on reload.

    Example:
        >>> dropfix_twin('resnetv2_101.a1h_in1k')
        'preresnet101_dropfix'
        >>> dropfix_twin('vit_base_patch16_224') is None
        True
    """
    arch = name.split('.', 1)[0]
    if arch.endswith('_dropfix'):
        return arch
    return _TWINS.get(arch)
