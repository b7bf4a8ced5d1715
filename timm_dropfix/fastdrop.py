"""A faster dropout for eager training on the CPU: the same distribution, the same ``nn.Dropout`` modules.

torch's CPU dropout draws every element's keep/drop with a serial Bernoulli sampler (7-9 ns per element on the
project's 2-core machine), which made the recommended placement cost 10 to 20 % of a resnet50 training step there
(``benchmarks/throughput.py --quick``; 7 to 10 % with this path). :func:`fast_dropout` takes 16 random bits per
element from torch's generator instead (four lanes of one 64-bit draw, about 1.2 ns per element) and drops an
element when its word falls below ``round(p * 65536)``: the drop probability is ``p`` rounded to a multiple of
1/65536 (within 7.7e-6 of ``p``), and kept values are scaled by the exact inverse of the keep probability, so the
output's expectation is still the input.

The blocks and heads of this package run their dropout modules through :func:`run_dropout`, which takes this path
only where nothing else can tell the difference: eager mode, a plain CPU float32/float64 tensor, and a plain
``nn.Dropout`` in training mode without hooks. Everything else (CUDA, ``torch.compile``, ``torch.export``,
``torch.fx`` tracing, eval mode) calls the module itself, so the model's modules, state_dict and traced graphs are
exactly as without this file. :func:`set_fast_dropout` (or ``TIMM_DROPFIX_FAST_DROPOUT=0``) turns it off, e.g. to
reproduce runs made with torch's kernel.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module_hooks

__all__ = ['fast_dropout', 'run_dropout', 'set_fast_dropout', 'use_fast_dropout']

_LEVELS = 1 << 16
_FLOATS = (torch.float32, torch.float64)
_FAST = os.environ.get('TIMM_DROPFIX_FAST_DROPOUT', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def set_fast_dropout(enable: bool = True) -> None:
    """Turn the fast CPU dropout of dropfix blocks and heads on (the default) or off (torch's own kernel).

    Like timm's ``set_fused_attn``: a process-wide switch, read on every forward. The environment variable
    ``TIMM_DROPFIX_FAST_DROPOUT=0`` sets the default to off.

    Example:
        >>> set_fast_dropout(False); use_fast_dropout()
        False
        >>> set_fast_dropout(True); use_fast_dropout()
        True
    """
    global _FAST
    _FAST = bool(enable)


def use_fast_dropout() -> bool:
    """Whether dropfix blocks and heads use :func:`fast_dropout` where it applies (see :func:`set_fast_dropout`).

    Example:
        >>> isinstance(use_fast_dropout(), bool)
        True
    """
    return _FAST


def _drop_words(p: float) -> int:
    """The number of 16-bit words (of 65536) that drop an element at rate ``p``."""
    return round(p * _LEVELS)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` in training mode, with 16 random bits per element (see the module docstring).

    Differentiable (the gradient is the same mask), deterministic under ``torch.manual_seed``, keeps ``x``'s memory
    format. Rates that round to 0 or 65536 words, tensors that are not plain CPU float32/float64 ones (another
    device or dtype, a tensor subclass, inside ``torch.func`` transforms) go to ``F.dropout`` instead.

    Example:
        >>> import torch
        >>> y = fast_dropout(torch.ones(10000), 0.25)
        >>> abs((y == 0).float().mean().item() - 0.25) < 0.03, y.unique().tolist()
        (True, [0.0, 1.3333333730697632])
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f'dropout rate must be in [0, 1), got {p}: pass a rate like 0.1')
    t = _drop_words(p)
    if not 0 < t < _LEVELS or not _plain_cpu_float(x) or x.numel() < 4:
        return F.dropout(x, p, training=True)
    return _FastDropout.apply(x, t)


class _FastDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, t: int) -> torch.Tensor:
        mask = torch.empty_like(x, memory_format=torch.preserve_format)  # dense, with x's strides when x is dense
        out = torch.empty_like(mask)
        # the random words are drawn into the output's memory (16 bits per element fit in its 32 or 64), which the
        # product then overwrites: no buffer besides the mask and the output, as in torch's kernel
        n = x.numel()
        words = torch.empty(0, dtype=torch.int64).set_(out.untyped_storage(), 0, ((n + 3) // 4,))
        words.random_(-2 ** 63, None)  # the full 64-bit range
        lanes = words.view(torch.int16)[:n].as_strided(x.shape, mask.stride())
        torch.ge(lanes, t - _LEVELS // 2, out=mask)
        mask.mul_(_LEVELS / (_LEVELS - t))
        torch.mul(x, mask, out=out)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, = ctx.saved_tensors
        return grad * mask, None


def _plain_cpu_float(x: torch.Tensor) -> bool:
    # a Proxy (fx) or tensor subclass fails the exact type check; vmap/grad wrap tensors in the same Python type
    return (type(x) is torch.Tensor and x.device.type == 'cpu' and x.dtype in _FLOATS
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def _has_hooks(module: nn.Module) -> bool:
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    shared = (getattr(_module_hooks, name, None) for name in (
        '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
        '_global_backward_pre_hooks'))
    return any(own) or any(shared)


def run_dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, except that a training ``nn.Dropout`` on a plain CPU float tensor in eager mode runs
    :func:`fast_dropout` (when :func:`use_fast_dropout`).

    Example:
        >>> import torch
        >>> run_dropout(torch.nn.Dropout(0.5).eval(), torch.ones(3))
        tensor([1., 1., 1.])
    """
    # is_compiling covers dynamo and export
    if (_FAST and not torch.compiler.is_compiling() and type(module) is nn.Dropout and module.training
            and not module.inplace and _plain_cpu_float(x) and 0 < _drop_words(module.p) < _LEVELS
            and not _has_hooks(module)):
        return fast_dropout(x, module.p)
    return module(x)
