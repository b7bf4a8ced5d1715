"""The fused dropout kernel for CUDA tensors, written in Triton; imported on first use by
:mod:`timm_dropfix.fastdrop`, so CPU-only installs never import triton.

It follows the CPU kernel's contract: one pass over the tensor in memory order, an element dropped when its 32-bit
random word falls below ``t = round(p * 2**32)``, kept values multiplied by ``2**32 / (2**32 - t)`` (in float32,
then rounded to the tensor's dtype, as torch's CUDA kernel does for half types), NaN kept as NaN, and nothing
stored but the seed: the backward pass runs the same kernel on the gradient. The words come from Triton's Philox
(``tl.randint4x``, ten rounds, keyed by a 62-bit seed): one call per four elements. A program handles ``BLOCK``
elements as four contiguous quarters, and quarter ``k`` uses word ``k`` of the counter ``program * BLOCK / 4 + j``,
so every load and store stays coalesced and an element's mask depends only on the seed and its index. With ``add``
the same pass also adds a second tensor (the residual shortcut after a branch-end dropout); with ``relu`` it applies
a ReLU first (the BN-ReLU before a pre-activation branch's last conv), or with ``add`` to the sum (a post-activation
block's activation after its residual addition). The two ReLU forms have one-pass backward kernels, as the CPU
kernel does: :func:`add_relu_backward_into` writes the shortcut's and the branch's gradients together, and
:func:`relu_backward_into` reads the mask off the saved output.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ['dropout_into', 'add_relu_backward_into', 'relu_backward_into', 'BLOCK']

BLOCK = 4096  # elements per program; part of the mask's definition (see the module docstring)
_MASK31 = (1 << 31) - 1


@triton.jit
def _mask_factor(word, t_signed, scale):
    """``scale`` where the element is kept (its unsigned word >= t), else 0: compared as signed 32-bit integers
    after flipping the top bit of both sides."""
    return tl.where((word ^ 0x80000000).to(tl.int32, bitcast=True) >= t_signed, scale, 0.0)


@triton.jit
def _quarter(x_ptr, add_ptr, out_ptr, offs, n, word, t_signed, scale, HAS_ADD: tl.constexpr, RELU: tl.constexpr):
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    if RELU and not HAS_ADD:
        x = tl.where(x < 0, 0.0, x)  # NaN stays NaN, as through torch's ReLU
    y = x * _mask_factor(word, t_signed, scale)
    if HAS_ADD:
        y += tl.load(add_ptr + offs, mask=inside).to(tl.float32)
        if RELU:  # the block's activation after the residual addition
            y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _program_words(seed_lo, seed_hi, QUARTER: tl.constexpr):
    """The first quarter's offsets of this program and its four Philox words per offset (the mask's definition)."""
    program = tl.program_id(0).to(tl.int64)
    seed = (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)
    j = tl.arange(0, QUARTER)
    w0, w1, w2, w3 = tl.randint4x(seed, program * QUARTER + j)
    return program * 4 * QUARTER + j, w0, w1, w2, w3


# the seed halves change on every call: no value specialisation, so one compiled kernel per dtype and size class
@triton.jit(do_not_specialize=['seed_lo', 'seed_hi'])
def _dropout_kernel(x_ptr, add_ptr, out_ptr, n, seed_lo, seed_hi, t_signed, scale, BLOCK: tl.constexpr,
                    HAS_ADD: tl.constexpr, RELU: tl.constexpr):
    QUARTER: tl.constexpr = BLOCK // 4
    start, w0, w1, w2, w3 = _program_words(seed_lo, seed_hi, QUARTER)
    _quarter(x_ptr, add_ptr, out_ptr, start, n, w0, t_signed, scale, HAS_ADD, RELU)
    _quarter(x_ptr, add_ptr, out_ptr, start + QUARTER, n, w1, t_signed, scale, HAS_ADD, RELU)
    _quarter(x_ptr, add_ptr, out_ptr, start + 2 * QUARTER, n, w2, t_signed, scale, HAS_ADD, RELU)
    _quarter(x_ptr, add_ptr, out_ptr, start + 3 * QUARTER, n, w3, t_signed, scale, HAS_ADD, RELU)


@triton.jit
def _split_quarter(g_ptr, y_ptr, gs_ptr, gb_ptr, offs, n, word, t_signed, scale):
    inside = offs < n
    y = tl.load(y_ptr + offs, mask=inside)
    # the ReLU's gradient as torch's threshold_backward gives it: 0 where the output is <= 0 (NaN passes)
    gs = tl.where(y <= 0, 0.0, tl.load(g_ptr + offs, mask=inside).to(tl.float32))
    tl.store(gs_ptr + offs, gs.to(gs_ptr.dtype.element_ty), mask=inside)
    tl.store(gb_ptr + offs, (gs * _mask_factor(word, t_signed, scale)).to(gb_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=['seed_lo', 'seed_hi'])
def _add_relu_backward_kernel(g_ptr, y_ptr, gs_ptr, gb_ptr, n, seed_lo, seed_hi, t_signed, scale,
                              BLOCK: tl.constexpr):
    QUARTER: tl.constexpr = BLOCK // 4
    start, w0, w1, w2, w3 = _program_words(seed_lo, seed_hi, QUARTER)
    _split_quarter(g_ptr, y_ptr, gs_ptr, gb_ptr, start, n, w0, t_signed, scale)
    _split_quarter(g_ptr, y_ptr, gs_ptr, gb_ptr, start + QUARTER, n, w1, t_signed, scale)
    _split_quarter(g_ptr, y_ptr, gs_ptr, gb_ptr, start + 2 * QUARTER, n, w2, t_signed, scale)
    _split_quarter(g_ptr, y_ptr, gs_ptr, gb_ptr, start + 3 * QUARTER, n, w3, t_signed, scale)


@triton.jit
def _relu_backward_kernel(g_ptr, y_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    y = tl.load(y_ptr + offs, mask=inside)
    g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
    tl.store(out_ptr + offs, tl.where(y <= 0, 0.0, g * scale).to(out_ptr.dtype.element_ty), mask=inside)


def _mask_args(seed: int, t: int) -> tuple[int, int, int]:
    """The seed's 62 low bits as two non-negative int32s and the threshold shifted to a signed int32: always the same
    argument types, so no recompilation, and the same words for the forward and the backward kernels."""
    return seed & _MASK31, (seed >> 31) & _MASK31, t - (1 << 31)


def _launch(kernel, n: int, *args, **meta) -> None:
    """One program per ``BLOCK`` of ``n`` elements, on the first argument's device."""
    if n == 0:  # an empty grid is not a launch triton accepts
        return
    grid = (triton.cdiv(n, BLOCK),)
    if args[0].device.type == 'cuda':
        with torch.cuda.device(args[0].device):  # triton launches on the current device
            kernel[grid](*args, BLOCK=BLOCK, num_warps=4, **meta)
    else:  # TRITON_INTERPRET=1 runs the kernel on CPU tensors (the tests)
        kernel[grid](*args, BLOCK=BLOCK, **meta)


def add_relu_backward_into(grad_shortcut: torch.Tensor, grad_branch: torch.Tensor, grad: torch.Tensor,
                           out: torch.Tensor, seed: int, t: int, scale: float) -> None:
    """The backward of ``dropout_into(out, x, seed, t, scale, add=s, relu=True)`` in one pass: the ReLU's gradient
    (``grad`` where ``out > 0``, else 0) into ``grad_shortcut``, and that dropped with the same mask into
    ``grad_branch``. Dense tensors with equal strides; the same numbers as the ReLU's backward, then the dropout.

    Example:
        >>> import torch
        >>> g, y = torch.ones(8, device='cuda'), torch.tensor([1., 0.] * 4, device='cuda')  # doctest: +SKIP
        >>> gs, gb = torch.empty_like(g), torch.empty_like(g)  # doctest: +SKIP
        >>> add_relu_backward_into(gs, gb, g, y, seed=1, t=2 ** 31, scale=2.0)  # doctest: +SKIP
        >>> gs.tolist() == [1., 0.] * 4  # doctest: +SKIP
        True
    """
    _launch(_add_relu_backward_kernel, grad.numel(), grad, out, grad_shortcut, grad_branch, grad.numel(),
            *_mask_args(seed, t), scale)


def relu_backward_into(grad_x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """The backward of ``dropout_into(out, x, seed, t, scale, relu=True)``: ``grad * scale`` where ``out > 0``, else
    0 (the output is 0 wherever the ReLU or the mask zeroed). Dense tensors with equal strides.

    Example:
        >>> import torch
        >>> gx = torch.empty(2, device='cuda')  # doctest: +SKIP
        >>> y = torch.tensor([3., 0.], device='cuda')  # doctest: +SKIP
        >>> relu_backward_into(gx, torch.ones(2, device='cuda'), y, 2.0)  # doctest: +SKIP
        >>> gx.tolist()  # doctest: +SKIP
        [2.0, 0.0]
    """
    _launch(_relu_backward_kernel, grad.numel(), grad, out, grad_x, grad.numel(), scale)


def dropout_into(out: torch.Tensor, x: torch.Tensor, seed: int, t: int, scale: float,
                 add: Optional[torch.Tensor] = None, relu: bool = False) -> None:
    """Write the dropout of ``x`` (dense, same strides as ``out``; ``out`` may be ``x``) into ``out``: elements whose
    word for ``seed`` is below ``t`` (of ``2**32``) become 0, the others are multiplied by ``scale``. ``add`` (the
    same layout) is added in the same pass, in float32 before the one rounding to the output dtype; ``relu``
    applies a ReLU to ``x`` first, or with ``add`` to the sum.

    Example:
        >>> import torch
        >>> x = torch.ones(8, device='cuda')  # doctest: +SKIP
        >>> dropout_into(x, x, seed=1, t=2 ** 31, scale=2.0)  # doctest: +SKIP
        >>> sorted(set(x.tolist())) == [0.0, 2.0]  # doctest: +SKIP
        True
    """
    n = x.numel()
    _launch(_dropout_kernel, n, x, x if add is None else add, out, n, *_mask_args(seed, t), scale,
            HAS_ADD=add is not None, RELU=relu)
