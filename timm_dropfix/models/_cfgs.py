"""Pretrained configs for the registered variants: copies of timm's own, so the variants load timm's weights."""
from __future__ import annotations

from typing import Any, Dict

from timm.models import get_pretrained_cfg


def reuse_cfg(timm_name: str, **overrides: Any) -> Dict[str, Any]:
    """A pretrained cfg dict that points at the weights of ``timm_name`` (``'arch.tag'``) on the Hub.

    The dropfix variants have the same state_dict keys as the timm model, so its weights load unchanged.

    Example:
        >>> reuse_cfg('resnet50.a1_in1k')['hf_hub_id']
        'timm/resnet50.a1_in1k'
    """
    cfg = get_pretrained_cfg(timm_name)
    if cfg is None:
        raise KeyError(f'timm has no pretrained cfg {timm_name!r}; check timm.list_pretrained().')
    out = cfg.to_dict()
    out['hf_hub_id'] = f'timm/{timm_name}'
    out.update(overrides)
    return out
