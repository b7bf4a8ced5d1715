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
block's activation after its residual addition).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ['dropout_into', 'BLOCK']

BLOCK = 4096  # elements per program; part of the mask's definition (see the module docstring)
_MASK31 = (1 << 31) - 1


@triton.jit
def _quarter(x_ptr, add_ptr, out_ptr, offs, n, word, t_signed, scale, HAS_ADD: tl.constexpr, RELU: tl.constexpr):
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    if RELU and not HAS_ADD:
        x = tl.where(x < 0, 0.0, x)  # NaN stays NaN, as through torch's ReLU
    # unsigned word >= t, compared as signed 32-bit integers after flipping the top bit of both sides
    keep = (word ^ 0x80000000).to(tl.int32, bitcast=True) >= t_signed
    y = x * tl.where(keep, scale, 0.0)
    if HAS_ADD:
        y += tl.load(add_ptr + offs, mask=inside).to(tl.float32)
        if RELU:  # the block's activation after the residual addition
            y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


# the seed halves change on every call: no value specialisation, so one compiled kernel per dtype and size class
@triton.jit(do_not_specialize=['seed_lo', 'seed_hi'])
def _dropout_kernel(x_ptr, add_ptr, out_ptr, n, seed_lo, seed_hi, t_signed, scale, BLOCK: tl.constexpr,
                    HAS_ADD: tl.constexpr, RELU: tl.constexpr):
    QUARTER: tl.constexpr = BLOCK // 4
    program = tl.program_id(0).to(tl.int64)
    seed = (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)
    j = tl.arange(0, QUARTER)
    w0, w1, w2, w3 = tl.randint4x(seed, program * QUARTER + j)
    start = program * BLOCK + j
    _quarter(x_ptr, add_ptr, out_ptr, start, n, w0, t_signed, scale, HAS_ADD, RELU)
    _quarter(x_ptr, add_ptr, out_ptr, start + QUARTER, n, w1, t_signed, scale, HAS_ADD, RELU)
    _quarter(x_ptr, add_ptr, out_ptr, start + 2 * QUARTER, n, w2, t_signed, scale, HAS_ADD, RELU)
    _quarter(x_ptr, add_ptr, out_ptr, start + 3 * QUARTER, n, w3, t_signed, scale, HAS_ADD, RELU)


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
    if n == 0:  # an empty grid is not a launch triton accepts
        return
    # the seed's 62 low bits as two non-negative int32s: always the same argument types, so no recompilation
    args = (x, x if add is None else add, out, n, seed & _MASK31, (seed >> 31) & _MASK31, t - (1 << 31), scale)
    grid = (triton.cdiv(n, BLOCK),)
    if x.device.type == 'cuda':
        with torch.cuda.device(x.device):  # triton launches on the current device
            _dropout_kernel[grid](*args, BLOCK=BLOCK, HAS_ADD=add is not None, RELU=relu, num_warps=4)
    else:  # TRITON_INTERPRET=1 runs the kernel on CPU tensors (the tests)
        _dropout_kernel[grid](*args, BLOCK=BLOCK, HAS_ADD=add is not None, RELU=relu)
