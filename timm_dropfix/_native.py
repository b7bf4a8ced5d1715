"""The fused CPU dropout kernel (``csrc/dropout.c``): built once per machine with the system C compiler, loaded with
ctypes.

The build (plain C, no torch headers) takes about 1.5 s on the project's idle 2-core machine, 5-7 s under load, and is
cached in ``$TIMM_DROPFIX_CACHE_DIR`` (default ``~/.cache/timm_dropfix``, or ``$XDG_CACHE_HOME/timm_dropfix``)
under ``kernels/``, named by a hash of the source, the flags, the compiler's version and the platform, so an edited
source or another compiler rebuilds it; each build deletes all but the four most recently used there. Each process
checks the library it loads against the kernels' definition first (:func:`_self_test`, about 0.07 s: masks from
:func:`reference_keep`, values from torch's ops), since a compiler can vectorize such loops wrongly. Where no
compiler works, or the check fails, :func:`load` returns None once, logs why, and :mod:`timm_dropfix.fastdrop` uses
its torch-ops path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ['load', 'kernel_dir', 'dropout_into', 'add_relu_backward_into', 'relu_backward_into', 'reference_keep']

_logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name('csrc') / 'dropout.c'
# OpenMP first: it lets the kernel use torch's intra-op threads; without it the kernel runs on one thread
_FLAG_SETS = (['-fopenmp'], ['-fopenmp', '-DTDF_NO_CLONES'], [], ['-DTDF_NO_CLONES'])
# -ffp-contract=off: x * keep + s rounds twice, as dropout-then-add does (clang would otherwise fuse it)
_BASE_FLAGS = ['-std=c99', '-O3', '-fPIC', '-shared', '-ffp-contract=off']
_PARALLEL_MIN = 65536  # csrc/dropout.c's TDF_PARALLEL_MIN: from this many elements the kernels use OpenMP threads
_KEEP = 4  # built kernels kept per folder: one per package version or compiler a machine still switches between
_lock = threading.Lock()
_state: dict = {}  # 'lib': the loaded library or None once a build failed


def kernel_dir() -> Path:
    """Where built kernels are kept: ``$TIMM_DROPFIX_CACHE_DIR/kernels`` (default ``~/.cache/timm_dropfix/kernels``).

    Example:
        >>> kernel_dir().name
        'kernels'
    """
    root = os.environ.get('TIMM_DROPFIX_CACHE_DIR') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'timm_dropfix')
    return Path(root).expanduser() / 'kernels'


def load() -> ctypes.CDLL | None:
    """The fused dropout library (``tdf_dropout_f32`` / ``tdf_dropout_f64`` and their ``_inplace`` forms), built on
    first use; None if it cannot be built here (the reason is logged once).

    Example:
        >>> lib = load()
        >>> lib is None or hasattr(lib, 'tdf_dropout_f32')
        True
    """
    if 'lib' not in _state:
        with _lock:
            if 'lib' not in _state:
                _state['lib'] = _build_and_load()
    return _state['lib']


def _compiler() -> str | None:
    for name in (os.environ.get('CC'), 'cc', 'gcc', 'clang'):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build_and_load() -> ctypes.CDLL | None:
    if sys.platform == 'win32':
        _logger.info('timm_dropfix: no fused CPU dropout kernel on Windows; using the torch-ops path')
        return None
    cc = _compiler()
    if cc is None:
        _logger.warning('timm_dropfix: no C compiler found (set CC, or install gcc or clang); the fast CPU dropout '
                        'uses its slower torch-ops path')
        return None
    try:
        version = subprocess.run([cc, '--version'], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _logger.warning('timm_dropfix: %s --version failed (%s); the fast CPU dropout uses its torch-ops path', cc, e)
        return None
    source = _SOURCE.read_bytes()
    flags = repr((_BASE_FLAGS, _FLAG_SETS)).encode()
    key = hashlib.sha256(b'\0'.join([source, flags, version.encode(), platform.machine().encode(),
                                     sys.platform.encode()])).hexdigest()[:16]
    errors = []
    for folder in (kernel_dir(), Path(tempfile.gettempdir()) / f'timm_dropfix-kernels-{os.getuid()}'):
        path = folder / f'dropout-{key}.so'
        try:
            if not path.exists():
                errors.append(_build(cc, path))
            if path.exists():
                lib = _bind(ctypes.CDLL(str(path)))
                try:  # pruning keeps the most recently used kernels, not the most recently built
                    os.utime(path)
                except OSError:  # another user's cache folder: leave its dates alone
                    pass
                wrong = _self_test(lib)
                if wrong is not None:
                    _logger.warning(
                        'timm_dropfix: the fused CPU dropout kernel built by %s (%s) gives wrong results on this '
                        'machine (%s), so the fast CPU dropout uses its slower torch-ops path. Another compiler '
                        '(set CC) may build it right; please report the compiler version.', cc,
                        version.splitlines()[0] if version else 'unknown version', wrong)
                    return None
                return lib
        except OSError as e:  # an unwritable cache folder, or a library that does not load
            errors.append(f'{path}: {e}')
    _logger.warning('timm_dropfix: could not build the fused CPU dropout kernel with %s; the fast CPU dropout uses '
                    'its slower torch-ops path. Compiler output:\n%s', cc, '\n'.join(e for e in errors if e)[-2000:])
    return None


def _build(cc: str, path: Path) -> str:
    """Compile into ``path`` (atomically: concurrent processes may build the same file); the errors if none built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + '.', suffix='.tmp')
        os.close(fd)
        try:
            cmd = [cc, *_BASE_FLAGS, *flags, str(_SOURCE), '-o', tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, path)
                _prune(path)
                return ''
            errors.append(f'{" ".join(cmd)}\n{done.stderr.strip()}')
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return '\n'.join(errors)


def _prune(path: Path) -> None:
    """Delete all but the ``_KEEP`` most recently used kernels beside ``path`` (each edit of the source or flags adds
    one); a process that still has a deleted one loaded keeps it, and another version that needs it rebuilds it."""
    def age(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # pruned by a concurrent build
            return 0.0

    old = sorted((p for p in path.parent.glob('dropout-*.so') if p != path), key=age, reverse=True)[_KEEP - 1:]
    for p in old:
        try:
            p.unlink()
        except OSError:
            pass


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, real in (('tdf_dropout_f32', ctypes.c_float), ('tdf_dropout_f64', ctypes.c_double)):
        tail = [ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, real, ctypes.c_int]  # n, seed, t, scale, threads
        # the pointers: x, then add's (the _add forms), then out's (all but the _inplace forms); the backward
        # passes take grad and out, then the one or two gradients they write (_relu_backward: no seed, no t)
        for suffix, pointers, rest in (('', 2, tail), ('_inplace', 1, tail), ('_add', 3, tail),
                                       ('_add_inplace', 2, tail), ('_add_relu', 3, tail),
                                       ('_add_relu_inplace', 2, tail), ('_relu', 2, tail), ('_relu_inplace', 1, tail),
                                       ('_add_relu_backward', 4, tail),
                                       ('_relu_backward', 3, [ctypes.c_int64, real, ctypes.c_int])):
            fn = getattr(lib, name + suffix)
            fn.argtypes = [ctypes.c_void_p] * pointers + rest
            fn.restype = None
    return lib


def dropout_into(out: torch.Tensor, x: torch.Tensor, seed: int, t: int, scale: float,
                 add: Optional[torch.Tensor] = None, relu: bool = False) -> None:
    """Run the kernel over ``x``'s memory into ``out``'s: both dense CPU float32/float64 tensors with equal strides,
    or ``out`` is ``x`` (in place). ``add`` (the same layout, another storage) is added in the same pass; ``relu``
    applies a ReLU to ``x`` first, or with ``add`` to the sum (a post-activation block's activation). The caller
    (:mod:`timm_dropfix.fastdrop`) checks that and that :func:`load` returned a library.

    Example:
        >>> import torch
        >>> x = torch.ones(8); out = torch.empty_like(x)
        >>> if load() is not None: dropout_into(out, x, seed=1, t=2 ** 31, scale=2.0)
        >>> load() is None or set(out.tolist()) <= {0.0, 2.0}
        True
    """
    _dropout_into(load(), out, x, seed, t, scale, add, relu)


def _dropout_into(lib: ctypes.CDLL, out: torch.Tensor, x: torch.Tensor, seed: int, t: int, scale: float,
                  add: Optional[torch.Tensor] = None, relu: bool = False) -> None:
    name = _name(x)
    pointers = (x.data_ptr(),) + (() if add is None else (add.data_ptr(),)) + (() if out is x else (out.data_ptr(),))
    name += ('' if add is None else '_add') + ('_relu' if relu else '') + ('_inplace' if out is x else '')
    getattr(lib, name)(*pointers, x.numel(), seed, t, scale, torch.get_num_threads())


def _name(x: torch.Tensor) -> str:
    # the kernels read raw memory: another dtype would be read (and written) past its end
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != 'cpu':
        raise TypeError(f'the C dropout kernel takes CPU float32/float64 tensors, not {x.device.type} {x.dtype}')
    return 'tdf_dropout_f32' if x.dtype == torch.float32 else 'tdf_dropout_f64'


def add_relu_backward_into(grad_shortcut: torch.Tensor, grad_branch: torch.Tensor, grad: torch.Tensor,
                           out: torch.Tensor, seed: int, t: int, scale: float) -> None:
    """The backward of ``dropout_into(out, x, seed, t, scale, add=s, relu=True)`` in one pass: the ReLU's gradient
    (``grad`` where ``out > 0``, else 0) into ``grad_shortcut``, and that dropped with the same mask into
    ``grad_branch``. All four tensors dense with equal strides and distinct memory; the caller checks that.

    Example:
        >>> import torch
        >>> g, y = torch.ones(8), torch.tensor([1., 0.] * 4)
        >>> gs, gb = torch.empty(8), torch.empty(8)
        >>> if load() is not None: add_relu_backward_into(gs, gb, g, y, seed=1, t=2 ** 31, scale=2.0)
        >>> load() is None or (gs.tolist() == [1., 0.] * 4 and set(gb[::2].tolist()) <= {0., 2.})
        True
    """
    _add_relu_backward_into(load(), grad_shortcut, grad_branch, grad, out, seed, t, scale)


def _add_relu_backward_into(lib: ctypes.CDLL, grad_shortcut: torch.Tensor, grad_branch: torch.Tensor,
                            grad: torch.Tensor, out: torch.Tensor, seed: int, t: int, scale: float) -> None:
    getattr(lib, _name(grad) + '_add_relu_backward')(
        grad.data_ptr(), out.data_ptr(), grad_shortcut.data_ptr(), grad_branch.data_ptr(), grad.numel(), seed, t,
        scale, torch.get_num_threads())


def relu_backward_into(grad_x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """The backward of ``dropout_into(out, x, seed, t, scale, relu=True)``: ``grad * scale`` where ``out > 0``, else
    0 (the output is 0 wherever the ReLU or the mask zeroed, so no mask is recomputed). Dense tensors with equal
    strides, ``grad_x`` distinct from the others.

    Example:
        >>> import torch
        >>> gx = torch.empty(2)
        >>> if load() is not None: relu_backward_into(gx, torch.ones(2), torch.tensor([3., 0.]), 2.0)
        >>> load() is None or gx.tolist() == [2.0, 0.0]
        True
    """
    _relu_backward_into(load(), grad_x, grad, out, scale)


def _relu_backward_into(lib: ctypes.CDLL, grad_x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
                        scale: float) -> None:
    getattr(lib, _name(grad) + '_relu_backward')(grad.data_ptr(), out.data_ptr(), grad_x.data_ptr(), grad.numel(),
                                                 scale, torch.get_num_threads())


_SPLITMIX = (0x9e3779b97f4a7c15, 0xbf58476d1ce4e5b9, 0x94d049bb133111eb)  # csrc/dropout.c's GAMMA and multipliers


def reference_keep(n: int, seed: int, t: int) -> torch.Tensor:
    """Which of ``n`` elements the kernel keeps for ``seed`` and threshold ``t``, computed from its definition (see
    ``csrc/dropout.c``) with numpy's wrapping uint64 arithmetic instead of the compiled code.

    Example:
        >>> import torch
        >>> x = torch.ones(100); out = torch.empty_like(x)
        >>> if load() is not None: dropout_into(out, x, seed=7, t=2 ** 31, scale=2.0)
        >>> load() is None or torch.equal(out > 0, reference_keep(100, seed=7, t=2 ** 31))
        True
    """
    gamma, m1, m2 = (np.uint64(c) for c in _SPLITMIX)
    i = np.arange(n, dtype=np.uint64)
    within = i % np.uint64(16)
    with np.errstate(over='ignore'):
        z = np.uint64(seed) + (np.uint64(8) * (i // np.uint64(16)) + within % np.uint64(8) + np.uint64(1)) * gamma
        z = (z ^ (z >> np.uint64(30))) * m1
        z = (z ^ (z >> np.uint64(27))) * m2
    z ^= z >> np.uint64(31)
    word = np.where(within >= np.uint64(8), z >> np.uint64(32), z & np.uint64(0xFFFFFFFF))
    return torch.from_numpy(word >= np.uint64(t))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN, and the sign of every zero."""
    nan = a.isnan()
    return (torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])
            and torch.equal(a[~nan].signbit(), b[~nan].signbit()))


def _self_test(lib: ctypes.CDLL) -> Optional[str]:
    """Every kernel of ``lib`` against its definition (:func:`reference_keep` and torch's ops) on lengths that
    cover the 16-element blocks, a tail and the OpenMP split, in both dtypes, NaN, infinities and signed zeros
    included; None when all agree, else what differed. A compiler that vectorizes the kernel wrongly (GCC 12.2 did,
    for one form of the backward while it was written) would otherwise train with wrong masks or gradients."""
    seed, t = 0x0123456789ABCDEF, round(0.3 * 2 ** 32)
    scale = 2 ** 32 / (2 ** 32 - t)
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for n in (16 * 5 + 13, _PARALLEL_MIN + 16 * 3 + 5):
            x, s, g = (torch.randn(n, generator=generator, dtype=dtype) for _ in range(3))
            x[:6] = torch.tensor([float('nan'), float('inf'), -float('inf'), -0.0, 0.0, -1e-30], dtype=dtype)
            s[3:6] = torch.tensor([0.0, -0.0, 1e-30], dtype=dtype)
            keep = reference_keep(n, seed, t)
            mask = torch.where(keep, torch.tensor(scale, dtype=dtype), torch.tensor(0.0, dtype=dtype))
            expected = {'dropout': x * mask, 'add': x * mask + s, 'add_relu': torch.relu(x * mask + s),
                        'relu': torch.relu(x) * mask}
            for form, want in expected.items():
                add = s if form.startswith('add') else None
                relu = form.endswith('relu')
                out = torch.empty_like(x)
                _dropout_into(lib, out, x, seed, t, scale, add, relu)
                inplace = x.clone()
                _dropout_into(lib, inplace, inplace, seed, t, scale, add, relu)
                if not (_same(out, want) and _same(inplace, want)):
                    return f'{form} forward, {dtype}, {n} elements'
            y = torch.relu(x * mask + s)
            shortcut_grad, branch_grad = torch.empty_like(x), torch.empty_like(x)
            _add_relu_backward_into(lib, shortcut_grad, branch_grad, g, y, seed, t, scale)
            want = torch.ops.aten.threshold_backward(g, y, 0)
            if not (_same(shortcut_grad, want) and _same(branch_grad, want * mask)):
                return f'add_relu backward, {dtype}, {n} elements'
            y = torch.relu(x) * mask
            grad_x = torch.empty_like(x)
            _relu_backward_into(lib, grad_x, g, y, scale)
            if not _same(grad_x, torch.ops.aten.threshold_backward(g * scale, y, 0)):
                return f'relu backward, {dtype}, {n} elements'
    return None
