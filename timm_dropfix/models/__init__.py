"""Registered timm models. Importing this package (done by ``import timm_dropfix``) registers them with timm."""
from .preresnet import DropfixResNetV2, CifarPreResNet
from . import resnet  # noqa: F401  (registers resnet*_dropfix)

__all__ = ['DropfixResNetV2', 'CifarPreResNet']
