"""timm_dropfix: dropout where it helps in residual networks with batch normalization.

Importing the package registers the ``preresnet*_dropfix``, ``preresnet*_cifar`` and ``resnet*_dropfix`` models
with timm, and gives :func:`rewrite`, the one call that moves an existing ResNet's dropout to the places that
Kim et al. (UAI 2023) recommend, weights untouched.

Example:
    >>> import timm, timm_dropfix
    >>> model = timm.create_model('preresnet18_dropfix', num_classes=37)
    >>> model = timm_dropfix.rewrite(timm.create_model('resnet18'), branch_drop_rate=0.1, head_drop_rate=0.2)
"""
from .blocks import DROPFIX_BLOCKS, is_dropfix_block
from .fastdrop import (
    cpu_dropout_kernel, dropout_kernel, fast_dropout, fast_dropout_add, fast_dropout_mode, set_fast_dropout,
    use_fast_dropout,
)
from .heads import DropfixResNet, DropfixTvResNet, PrePoolDropoutHead, set_v1_strides
from .positions import BRANCH_POSITIONS, HEAD_POSITIONS, RECOMMENDED_BRANCH, RECOMMENDED_HEAD, list_positions
from .rewrite import (
    SUPPORTED_FAMILIES, DropfixSummary, UnsupportedModelError, dropfix_config, dropfix_twin, rewrite, summarize,
)
from .models import CifarPreResNet, DropfixResNetV2

__version__ = '0.1.0'

__all__ = [
    'rewrite', 'summarize', 'dropfix_config', 'dropfix_twin', 'list_positions', 'set_v1_strides',
    'BRANCH_POSITIONS', 'HEAD_POSITIONS', 'RECOMMENDED_BRANCH', 'RECOMMENDED_HEAD', 'SUPPORTED_FAMILIES',
    'DropfixSummary', 'UnsupportedModelError', 'PrePoolDropoutHead', 'DropfixResNet', 'DropfixTvResNet',
    'DropfixResNetV2', 'CifarPreResNet', 'DROPFIX_BLOCKS', 'is_dropfix_block', 'fast_dropout', 'fast_dropout_add',
    'set_fast_dropout', 'use_fast_dropout', 'fast_dropout_mode', 'dropout_kernel', 'cpu_dropout_kernel', '__version__',
]
