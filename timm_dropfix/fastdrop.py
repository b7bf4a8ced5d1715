"""A faster dropout for eager training: the same distribution, the same ``nn.Dropout`` modules.

torch's CPU dropout draws every element's keep/drop with a serial Bernoulli sampler (7-15 ns per element on the
project's 2-core machine) and keeps a float mask for backward, which made the recommended placement cost 10 to 20 %
of a resnet50 training step there and +22 % of its peak memory. :func:`fast_dropout` runs a fused C kernel
(``csrc/dropout.c``, built once per machine by :mod:`timm_dropfix._native`): one pass over the tensor, on torch's
threads, in which an element is dropped when its 32-bit word falls below ``round(p * 2**32)``. The words are the
two halves of SplitMix64 hashes of the seed and the element's index (one hash per two elements); the seed is one
64-bit draw from torch's CPU generator per call. So the drop probability is
``p`` within 1.2e-10, kept values are scaled by the exact inverse of the keep probability, results are deterministic
under ``torch.manual_seed`` and independent of the thread count, and the backward pass recomputes the mask from the
seed: nothing but the seed is kept for it. At the end of a post-activation branch the blocks let it overwrite the BN
or SE output it drops (see :func:`run_dropout`), so it allocates nothing there either, and add the residual shortcut
and apply the block's ReLU in the same pass (:func:`fast_dropout_add`, :func:`run_dropout_add`); before a
pre-activation branch's last conv they run the BN's ReLU and the dropout as one pass (:func:`run_norm_act_dropout`).
Where no C compiler is available, a torch-ops path draws 16 random bits per element (four lanes of one 64-bit draw
of torch's generator, ``p`` rounded to a multiple of 1/65536) and keeps a float mask, like torch's kernel.

On CUDA (float16, bfloat16, float32) the same contract runs as a Triton kernel (:mod:`timm_dropfix._triton`:
Philox words, one pass, nothing saved for backward, in place at branch ends), where torch's kernel writes a
byte mask per element and allocates the output. Its seed is also drawn from the CPU generator, which needs no
device synchronisation. Probe launches (one per dtype) on first use check it; where triton or its compiler is
missing, CUDA tensors keep torch's kernel (:func:`dropout_kernel` says which runs).

The blocks and heads of this package run their dropout modules through :func:`run_dropout`, which takes this path
only where nothing else can tell the difference: eager mode, a plain tensor of a dtype and device above, and a
plain ``nn.Dropout`` in training mode without hooks. Everything else (``torch.compile``, ``torch.export``,
``torch.fx`` tracing, CUDA graph capture, eval mode) calls the module itself, so the model's modules, state_dict and
traced graphs are exactly as without this file. :func:`set_fast_dropout` (or ``TIMM_DROPFIX_FAST_DROPOUT=0``)
turns it off, e.g. to reproduce runs made with torch's kernel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module_hooks

from . import _native

__all__ = ['fast_dropout', 'fast_dropout_add', 'run_dropout', 'run_dropout_add', 'run_norm_act_dropout',
           'set_fast_dropout', 'use_fast_dropout', 'fast_dropout_mode', 'dropout_kernel', 'cpu_dropout_kernel']

_LEVELS = 1 << 16  # the torch-ops path's 16-bit words
_LEVELS32 = 1 << 32  # the fused kernel's 32-bit words
_FLOATS = (torch.float32, torch.float64)
_GPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_GPU_DEVICE = 'cuda'  # where the Triton kernel runs (the tests point it at the CPU under TRITON_INTERPRET=1)
_gpu_state: dict = {}  # 'launch': the Triton kernel's launcher, or None once it proved unavailable
_logger = logging.getLogger(__name__)
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


@contextlib.contextmanager
def fast_dropout_mode(enable: Optional[bool]) -> Iterator[None]:
    """Set the process-wide switch of :func:`set_fast_dropout` for a block and give the previous value back after
    it (also on an error); ``None`` leaves the switch as it is.

    Example:
        >>> with fast_dropout_mode(False):
        ...     use_fast_dropout()
        False
    """
    previous = _FAST
    if enable is not None:
        set_fast_dropout(enable)
    try:
        yield
    finally:
        set_fast_dropout(previous)


def dropout_kernel(device: str | torch.device = 'cpu') -> str:
    """Which kernel the dropfix blocks and heads use in eager training on ``device`` now. CPU: ``'fused'`` (the C
    kernel), ``'torch_ops'`` (the fast path without a C compiler); CUDA: ``'triton'`` (the Triton kernel, for
    float16, bfloat16 and float32); anywhere: ``'torch'`` (torch's own kernel: switched off, another device, or the
    kernel is not available here). Builds the kernel for that device if it is not built yet. Run records keep this
    to say how they were trained.

    Example:
        >>> dropout_kernel('cpu') in ('fused', 'torch_ops', 'torch')
        True
    """
    kind = torch.device(device).type
    if not _FAST:
        return 'torch'
    if kind == _GPU_DEVICE:
        return 'triton' if _gpu_kernel() is not None else 'torch'
    if kind == 'cpu':
        return 'fused' if _native.load() is not None else 'torch_ops'
    return 'torch'


def cpu_dropout_kernel() -> str:
    """``dropout_kernel('cpu')``: ``'fused'``, ``'torch_ops'`` or ``'torch'``.

    Example:
        >>> cpu_dropout_kernel() in ('fused', 'torch_ops', 'torch')
        True
    """
    return dropout_kernel('cpu')


def fast_dropout(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """Inverted dropout of ``x`` in training mode with the fused kernel of its device (see the module docstring).

    Differentiable (the gradient is the same mask, recomputed from the seed), deterministic under
    ``torch.manual_seed``, keeps ``x``'s memory format when ``x`` is contiguous or channels_last. ``inplace``
    overwrites ``x`` as ``F.dropout(..., inplace=True)`` does (autograd refuses it where ``x`` is needed for
    backward). Rates that round to 0 or 1, and tensors that are not plain CPU float32/float64 or CUDA
    float16/bfloat16/float32 ones (another device or dtype, a tensor subclass, inside ``torch.func`` transforms,
    ``torch.jit.trace`` or forward-mode AD, CUDA without triton, CUDA graph capture) go to ``F.dropout`` instead, as
    does ``inplace`` without the fused kernel or on a tensor that is not dense (a transpose, a strided slice).

    Example:
        >>> import torch
        >>> y = fast_dropout(torch.ones(10000), 0.25)
        >>> abs((y == 0).float().mean().item() - 0.25) < 0.03, y.unique().tolist()
        (True, [0.0, 1.3333333730697632])
    """
    _check_p(p)
    if not _fast_path(x) or x.numel() == 0:
        return F.dropout(x, p, training=True, inplace=inplace)
    launch = _launcher(x)
    if launch is not None:
        t = _threshold(p)
        if t is not None:
            if not inplace or _dense_layout(x):
                return _FusedDropout.apply(x, _draw_seed(), t, inplace, launch)
        # the kernel writes dense memory only: a strided x is overwritten by torch's kernel, as inplace promises
        return F.dropout(x, p, training=True, inplace=inplace)
    t = round(p * _LEVELS)
    if inplace or not 0 < t < _LEVELS or x.numel() < 4:
        return F.dropout(x, p, training=True, inplace=inplace)
    return _WordDropout.apply(x, t)


def fast_dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float, inplace: bool = False,
                     relu: bool = False) -> torch.Tensor:
    """``fast_dropout(x, p, inplace) + shortcut`` in one pass of the fused kernel: the end of a residual branch
    whose dropout sits just before the addition. The same numbers as the two steps (on the CPU bit for bit; on
    CUDA the sum is rounded once), and the backward recomputes the mask as :func:`fast_dropout` does. ``inplace``
    writes the sum into ``x``. ``relu`` also applies a ReLU to the sum in the same pass (the activation that a
    post-activation block runs after its addition; backward then keeps the output, as the ReLU would). Where the
    kernel does not apply (see :func:`fast_dropout`; also a ``shortcut`` of another shape, dtype, device or memory
    layout) it runs the steps one by one.

    Example:
        >>> import torch
        >>> y = fast_dropout_add(torch.ones(10000), torch.ones(10000), 0.5)
        >>> sorted(y.unique().tolist())
        [1.0, 3.0]
        >>> fast_dropout_add(-torch.ones(4), torch.zeros(4), 0.5, relu=True).tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    _check_p(p)
    fused = _dropout_add(x, shortcut, p, inplace, relu) if _fast_path(x) else None
    if fused is not None:
        return fused
    dropped = fast_dropout(x, p, inplace)
    summed = dropped.add_(shortcut) if inplace else dropped + shortcut
    return summed.relu_() if relu else summed


def _dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float, inplace: bool,
                 relu: bool = False) -> Optional[torch.Tensor]:
    """The fused pass for an ``x`` that passed :func:`_fast_path`, or None where ``shortcut`` or the rate do not
    suit it (the caller then runs its own two steps)."""
    t = _threshold(p)
    if not (t is not None and x.numel() and type(shortcut) is torch.Tensor and shortcut.shape == x.shape
            and shortcut.dtype == x.dtype and shortcut.device == x.device and shortcut.stride() == x.stride()
            and _dense_layout(x) and not torch._C._functorch.is_functorch_wrapped_tensor(shortcut)
            and shortcut.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()):
        return None
    launch = _launcher(x)
    return None if launch is None else _FusedDropout.apply(x, _draw_seed(), t, inplace, launch, shortcut, relu)


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f'dropout rate must be in [0, 1), got {p}: pass a rate like 0.1')


def _threshold(p: float) -> Optional[int]:
    """The fused kernels' drop threshold for rate ``p`` (a word below it drops), or None where it rounds to 0 or to
    every word (F.dropout's business)."""
    t = round(p * _LEVELS32)
    return t if 0 < t < _LEVELS32 else None


def _draw_seed() -> int:
    # one draw of torch's CPU generator: manual_seed and checkpoint's generator restore govern the masks
    return int(torch.empty((), dtype=torch.int64).random_(-2 ** 63, None)) & (_LEVELS32 * _LEVELS32 - 1)


def _dense_layout(x: torch.Tensor) -> bool:
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


class _FusedDropout(torch.autograd.Function):
    """The kernel's dropout for one seed: a diagonal linear map, so its backward is itself (which also makes it
    twice differentiable). Element ``i`` is the ``i``-th in memory, so the gradient is brought to the output's
    strides before the mask is recomputed. ``inplace`` (for a dense ``x``) writes into ``x``. ``shortcut`` (dense,
    ``x``'s strides) is added in the same pass; its gradient is the output's, unchanged. ``relu`` (with
    ``shortcut``): a ReLU on the sum in the same pass; backward keeps the output for it, as the ReLU module would,
    and passes the gradient through the ReLU's backward first. Where autograd builds no graph of the backward, one
    pass of the kernel writes both gradients; with ``create_graph`` it composes differentiable ops with the same
    numbers (twice differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, t: int, inplace: bool, launch: Callable,
                shortcut: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x
        else:
            if not _dense_layout(x):
                x = x.contiguous()
            out = torch.empty_like(x)  # the same strides as a dense x
        assert shortcut is not None or not relu, 'relu here is the ReLU after the residual addition'
        launch(out, x, seed, t, _LEVELS32 / (_LEVELS32 - t), add=shortcut, relu=relu)
        ctx.seed, ctx.t, ctx.stride, ctx.launch, ctx.added = seed, t, out.stride(), launch, shortcut is not None
        ctx.relu = relu
        if relu:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.relu:  # the shortcut's gradient, and the dropout's input
            out, = ctx.saved_tensors
            kernels = _one_pass_backward(ctx.launch)
            if kernels is not None:  # one pass of the kernel for both gradients
                grad = _in_layout(grad, ctx.stride)
                shortcut_grad, branch_grad = torch.empty_like(out), torch.empty_like(out)
                kernels.add_relu_backward_into(shortcut_grad, branch_grad, grad, out, ctx.seed, ctx.t,
                                               _LEVELS32 / (_LEVELS32 - ctx.t))
                return branch_grad, None, None, None, None, shortcut_grad, None
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        # gradients for the optional inputs too when they were not given: autograd accepts trailing Nones
        dropped = _FusedDropout.apply(_in_layout(grad, ctx.stride), ctx.seed, ctx.t, False, ctx.launch)
        return dropped, None, None, None, None, grad if ctx.added else None, None


def _one_pass_backward(launch: Callable) -> Optional[ModuleType]:
    """The module whose one-pass backward kernels (``add_relu_backward_into``, ``relu_backward_into``) go with the
    forward launcher ``launch`` (the C kernel's or the Triton kernel's), where autograd builds no graph of this
    backward; None for any other launcher, or under ``create_graph`` (the kernels are not differentiable)."""
    if torch.is_grad_enabled():
        return None
    if launch is _native.dropout_into:
        return _native
    gpu = sys.modules.get(f'{__package__}._triton')  # imported by _gpu_kernel only where triton works
    return gpu if gpu is not None and launch is gpu.dropout_into else None


def _in_layout(grad: torch.Tensor, stride: tuple) -> torch.Tensor:
    """``grad`` with the forward output's strides (the kernel's element order is memory order)."""
    if grad.stride() == stride:  # equal strides on the same shape: the output's dense layout
        return grad
    return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


class _FusedReluDropout(torch.autograd.Function):
    """ReLU, then the kernel's dropout, written into ``z`` (a fresh BN output). Backward needs only the output (the
    gradient is ``scale`` where it is positive, 0 elsewhere), which the next conv keeps anyway: nothing is added to
    what autograd holds, where the ReLU and the dropout as modules keep one more tensor. That gradient is one pass
    of the kernel (two ops of torch's) where autograd builds no graph of the backward. One difference from the
    modules, by design: a NaN or inf arriving in the gradient at a dropped position gives 0 here (the position is
    not in the output), where the modules' backward multiplies it by the mask's 0 and passes NaN on."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, seed: int, t: int, launch: Callable) -> torch.Tensor:
        ctx.mark_dirty(z)
        ctx.scale, ctx.launch = _LEVELS32 / (_LEVELS32 - t), launch
        launch(z, z, seed, t, ctx.scale, relu=True)
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, = ctx.saved_tensors
        kernels = _one_pass_backward(ctx.launch)
        if kernels is not None:  # one pass of the kernel: the same numbers
            grad = _in_layout(grad, out.stride())
            grad_z = torch.empty_like(out)
            kernels.relu_backward_into(grad_z, grad, out, ctx.scale)
            return grad_z, None, None, None
        return torch.ops.aten.threshold_backward(grad * ctx.scale, out, 0), None, None, None


class _WordDropout(torch.autograd.Function):
    """The torch-ops path (no C compiler): 16-bit words of torch's generator, a float mask kept for backward."""

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


def _fast_path(x: torch.Tensor) -> bool:
    """Whether ``x`` may take this module's dropout: a plain tensor (a Proxy (fx) or tensor subclass fails the exact
    type check; vmap/grad wrap tensors in the same Python type) in a float dtype that one of the kernels takes."""
    if type(x) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    # torch.jit.trace would record the seed as a constant (one mask for every call) and cannot replay the in-place
    # Functions; forward-mode AD needs a jvp they do not define. torch's dropout does both.
    if torch._C._is_tracing() or _forward_ad._current_level >= 0:
        return False
    if x.device.type == _GPU_DEVICE:
        # a CUDA graph replays its kernels with the seed drawn at capture: torch's kernel advances its own offset
        return (x.dtype in _GPU_FLOATS and _gpu_kernel() is not None
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing()))
    return x.device.type == 'cpu' and x.dtype in _FLOATS


def _launcher(x: torch.Tensor) -> Optional[Callable]:
    """The fused kernel for a tensor that passed :func:`_fast_path`, or None (no C compiler: the torch-ops path)."""
    if x.device.type == _GPU_DEVICE:
        return _gpu_kernel()
    return _native.dropout_into if _native.load() is not None else None


def _gpu_kernel() -> Optional[Callable]:
    """The Triton kernel's launcher, after a probe launch per dtype; None where triton is missing or a probe fails
    (the reason is logged once, and CUDA tensors keep torch's kernel)."""
    if 'launch' not in _gpu_state:
        launch = None
        try:
            if _GPU_DEVICE == 'cuda' and not torch.cuda.is_available():
                raise LookupError('no CUDA device')
            from . import _triton
            right = True
            for dtype in _GPU_FLOATS:  # compiles the kernels for each dtype now, not in the middle of a step
                probe = torch.ones(8, device=_GPU_DEVICE, dtype=dtype)
                _triton.dropout_into(probe, probe, 1, 1 << 31, 2.0)
                # the backward kernels, with the same seed: the ReLU's gradient of ones is 1 where the probe was
                # kept (2) and 0 where dropped, and masked again it is the probe itself
                ones, grads = torch.ones_like(probe), [torch.empty_like(probe) for _ in range(3)]
                _triton.add_relu_backward_into(grads[0], grads[1], ones, probe, 1, 1 << 31, 2.0)
                _triton.relu_backward_into(grads[2], ones, probe, 2.0)
                right = (right and set(probe.tolist()) <= {0.0, 2.0} and torch.equal(grads[0] * 2, probe)
                         and torch.equal(grads[1], probe) and torch.equal(grads[2], probe))
            if right:
                launch = _triton.dropout_into
            else:
                _logger.warning('the Triton dropout kernel gave wrong values in its probe; using torch\'s kernel')
        except LookupError:
            pass
        except Exception as e:  # no triton, no compiler for this GPU, ...: torch's kernel still works
            _logger.warning('the Triton dropout kernel is not available (%s: %s); CUDA tensors use torch\'s '
                            'dropout kernel', type(e).__name__, e)
        _gpu_state['launch'] = launch
    return _gpu_state['launch']


def _has_hooks(module: nn.Module) -> bool:
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    shared = (getattr(_module_hooks, name, None) for name in (
        '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
        '_global_backward_pre_hooks'))
    return any(own) or any(shared)


def run_dropout(module: nn.Module, x: torch.Tensor, producer: nn.Module | None = None) -> torch.Tensor:
    """``module(x)``, except that a training ``nn.Dropout`` on a plain CPU or CUDA float tensor in eager mode runs
    :func:`fast_dropout` (when :func:`use_fast_dropout`).

    ``producer``: the module whose output ``x`` is, passed where nothing but that module's hooks can hold ``x``
    (the end of a post-activation branch: a BN or SE output that only this dropout reads). There the fused kernel
    overwrites ``x`` instead of allocating an output, when autograd does not need ``x`` either (its ``grad_fn`` is a
    batch norm, a multiply or an add, none of which keeps its output) and ``producer`` has no hooks. This is what
    keeps the placement's peak memory near the model's without dropout.

    Example:
        >>> import torch
        >>> run_dropout(torch.nn.Dropout(0.5).eval(), torch.ones(3))
        tensor([1., 1., 1.])
    """
    if _module_takes_fast_path(module, x):
        return fast_dropout(x, module.p, inplace=producer is not None and _may_overwrite(x, producer))
    return module(x)


def run_dropout_add(module: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, producer: nn.Module | None = None,
                    act: nn.Module | None = None) -> Optional[torch.Tensor]:
    """``act(module(x) + shortcut)`` with the dropout and the addition in one fused pass (:func:`fast_dropout_add`)
    where :func:`run_dropout` would take the fast path and ``shortcut`` suits the kernel; None otherwise, and the
    caller runs its own steps. ``producer`` as in :func:`run_dropout`: where it allows, the sum is written into
    ``x``. ``act``: the block's activation after the addition (None: none); a plain ``nn.ReLU`` without hooks runs
    in the same pass, any other module after it.

    Example:
        >>> import torch
        >>> run_dropout_add(torch.nn.Dropout(0.5).eval(), torch.ones(3), torch.ones(3)) is None  # eval: caller's
        True
    """
    if not _module_takes_fast_path(module, x):
        return None
    fuse_act = type(act) is nn.ReLU and not _has_hooks(act)
    out = _dropout_add(x, shortcut, module.p, producer is not None and _may_overwrite(x, producer), fuse_act)
    return out if out is None or fuse_act or act is None else act(out)


def run_norm_act_dropout(module: nn.Module, norm: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``module(norm(x))`` for a timm ``BatchNormAct2d`` with a ReLU (the BN-ReLU before a pre-activation branch's
    last conv, where the recommended dropout sits): the BN as the module computes it, then the ReLU and the dropout
    in one pass of the fused kernel, written into the BN output. The same numbers as the modules (on the CPU bit
    for bit), and one tensor fewer kept for backward. None where :func:`run_dropout` would not take the fast path or
    ``norm`` is anything else or has hooks (its own or its activation's); the caller then runs the modules.

    Example:
        >>> import torch
        >>> from timm.layers import BatchNormAct2d
        >>> run_norm_act_dropout(torch.nn.Dropout(0.5).eval(), BatchNormAct2d(4), torch.ones(2, 4, 3, 3)) is None
        True
    """
    if not (_module_takes_fast_path(module, x) and type(norm) is BatchNormAct2d
            and type(getattr(norm, 'act', None)) is nn.ReLU
            and type(getattr(norm, 'drop', None)) in (nn.Identity, type(None))
            and not _has_hooks(norm) and not _has_hooks(norm.act)):
        return None
    launch, t = _launcher(x), _threshold(module.p)
    if launch is None or t is None:
        return None
    # BatchNormAct2d.forward runs this same batch norm (a copy of BatchNorm2d's), then its drop and act
    z = nn.BatchNorm2d.forward(norm, x)
    if not _dense_layout(z):
        return run_dropout(module, norm.act(z))
    return _FusedReluDropout.apply(z, _draw_seed(), t, launch)


def _module_takes_fast_path(module: nn.Module, x: torch.Tensor) -> bool:
    # is_compiling covers dynamo and export
    return (_FAST and not torch.compiler.is_compiling() and type(module) is nn.Dropout and module.training
            and not module.inplace and 0.0 < module.p < 1.0 and _fast_path(x) and not _has_hooks(module))


# autograd nodes that keep their inputs (or nothing) for backward, never their output
_OVERWRITABLE = frozenset({'NativeBatchNormBackward0', 'CudnnBatchNormBackward0', 'MiopenBatchNormBackward0',
                           'BatchNormWithUpdateBackward0', 'MulBackward0', 'AddBackward0'})


def _may_overwrite(x: torch.Tensor, producer: nn.Module) -> bool:
    return (type(x.grad_fn).__name__ in _OVERWRITABLE and x._base is None and not _has_hooks(producer)
            and _launcher(x) is not None)
