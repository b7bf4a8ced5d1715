"""Named places for dropout in a residual block and in a classifier head.

The names are the vocabulary of :func:`timm_dropfix.rewrite` and of the registered models. ``'recommended'`` resolves
per block kind, because the paper's rule ("after the last BN, before the last weight layer") reads differently in a
pre-activation block (where that spot exists) and in a post-activation block (where the last BN follows the last conv).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

__all__ = [
    'BRANCH_POSITIONS', 'HEAD_POSITIONS', 'RECOMMENDED_BRANCH', 'RECOMMENDED_HEAD',
    'list_positions', 'resolve_branch_position', 'check_rate', 'check_head_position',
]

PREACT = 'preact'
POSTACT = 'postact'

BRANCH_POSITIONS: Tuple[str, ...] = (
    'none', 'recommended', 'branch_start', 'after_conv1', 'after_conv2', 'after_conv3',
    'before_last_conv', 'branch_end', 'after_add',
)
HEAD_POSITIONS: Tuple[str, ...] = ('before_pool', 'after_pool', 'before_pool_channel', 'none')

# The recommended place for each block kind (see paper.md): pre-activation blocks have a spot after their last BN
# and before their last conv; in post-activation blocks the last BN follows the last conv, so the end of the branch
# (after that BN, before the addition) is the place where no BN inside the branch sees the dropped signal.
RECOMMENDED_BRANCH: Dict[str, str] = {PREACT: 'before_last_conv', POSTACT: 'branch_end'}
RECOMMENDED_HEAD = 'before_pool'

_BRANCH_DOC: Dict[str, str] = {
    'none': 'no dropout in the residual branch',
    'recommended': 'pre-activation blocks: before_last_conv (the paper\'s rule); '
                   'post-activation blocks: branch_end (after the last BN, before the addition)',
    'branch_start': 'input of the branch, before its first layer (pre-activation blocks whose first BN also feeds a '
                    'projection shortcut: right after that shared BN, on the branch side only)',
    'after_conv1': 'right after the first conv of the branch (the next BN sees the dropped signal)',
    'after_conv2': 'right after the second conv of the branch',
    'after_conv3': 'right after the third conv (bottleneck blocks only); in pre-activation blocks this is branch_end',
    'before_last_conv': 'after the last BN(+ReLU) and right before the last conv; recommended for pre-activation '
                        'blocks; in post-activation blocks the last BN then sees the dropped signal (measured: '
                        '-11.3 points on a pretrained ResNet-50 fine-tune, see README)',
    'branch_end': 'end of the branch, after its last layer (and SE), before stochastic depth and the addition; '
                  'recommended for post-activation blocks',
    'after_add': 'after the addition (and the block\'s final ReLU): drops the trunk itself, shortcut included',
}
_HEAD_DOC: Dict[str, str] = {
    'before_pool': 'element-wise dropout on the final feature map, before global pooling (recommended: the pooled '
                   'features are far less noisy than with after_pool for the same rate)',
    'after_pool': 'dropout on the pooled features, before the classifier (timm, torchvision and fastai default)',
    'before_pool_channel': 'channel-wise Dropout2d before pooling: same distribution as after_pool, kept for ablations',
    'none': 'no dropout in the head',
}


def list_positions() -> Dict[str, Dict[str, str]]:
    """All position names with a one-line description each.

    Example:
        >>> import timm_dropfix
        >>> sorted(timm_dropfix.list_positions())
        ['branch', 'head']
        >>> 'before_pool' in timm_dropfix.list_positions()['head']
        True
    """
    return {'branch': dict(_BRANCH_DOC), 'head': dict(_HEAD_DOC)}


def check_rate(name: str, rate: float) -> float:
    """Return ``rate`` as a float, or raise a ValueError that says what a valid rate is.

    Example:
        >>> check_rate('branch_drop_rate', 0.1)
        0.1
    """
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be a number in [0, 1), got {rate!r}.') from None
    if isinstance(rate, bool) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(
            f'{name} must be in [0, 1) (the probability of zeroing an element), got {rate!r}. '
            f'Use 0 to disable dropout there.')
    return value


def check_head_position(position: str) -> str:
    """Validate a head position name.

    Example:
        >>> check_head_position('before_pool')
        'before_pool'
    """
    if position not in HEAD_POSITIONS:
        raise ValueError(f'Unknown head_position {position!r}; choose one of {", ".join(HEAD_POSITIONS)}.')
    return position


def resolve_branch_position(position: str, kind: str, num_convs: int) -> str:
    """Turn a requested branch position into the concrete place for one block kind.

    ``kind`` is ``'preact'`` or ``'postact'``; ``num_convs`` is 2 for basic blocks, 3 for bottlenecks.

    Example:
        >>> resolve_branch_position('recommended', 'preact', 3)
        'before_last_conv'
        >>> resolve_branch_position('recommended', 'postact', 3)
        'branch_end'
        >>> resolve_branch_position('branch_end', 'preact', 2)
        'after_conv2'
    """
    if position not in BRANCH_POSITIONS:
        raise ValueError(f'Unknown branch_position {position!r}; choose one of {", ".join(BRANCH_POSITIONS)}.')
    if position == 'recommended':
        return RECOMMENDED_BRANCH[kind]
    if position == 'after_conv3' and num_convs < 3:
        raise ValueError(
            "branch_position 'after_conv3' needs bottleneck blocks (3 convs); this model has basic blocks (2 convs). "
            "Use 'after_conv2' or 'branch_end'.")
    if kind == PREACT and position == 'branch_end':
        # a pre-activation branch ends with its last conv, so its end is right after that conv
        return f'after_conv{num_convs}'
    return position
