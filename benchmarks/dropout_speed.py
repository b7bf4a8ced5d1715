"""Time of one dropout, per element: torch's kernel, timm_dropfix's fused kernel (out of place and in place), its
torch-ops path (CPU, used without a C compiler), and two multiplies for scale.

CPU: the branch outputs of resnet50 at 128 px, batch 16 (where the recommended placement drops), float32, NCHW, at
torch's thread count and at one thread. ``--device cuda``: the branch outputs at 224 px, batch 128, bfloat16,
channels_last (as under ``finetune train``'s bf16 autocast), where the fused kernel is the Triton one. Each
measurement is the wall time of one call (forward) or of one forward + backward (synchronized on CUDA), repeated
``--repeats`` times after a warm-up, with the kernels' turns interleaved so that all meet the same machine;
reported as median and mean +- sample std of nanoseconds per element. Writes
``benchmarks/results/dropout_speed.json`` (``dropout_speed_gpu`` for CUDA) and ``.md``.

Example::

    python benchmarks/dropout_speed.py                 # about 75 s on 2 cores (the committed --repeats 60: 219 s)
    python benchmarks/dropout_speed.py --device cuda   # seconds on one GPU
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (RESULTS_DIR, check_output_path, command_line, describe_machine, mean_std,  # noqa: E402
                     utc_now, write_json_and_markdown)

SHAPES = [(16, 256, 32, 32), (16, 512, 16, 16), (16, 1024, 8, 8), (16, 2048, 4, 4)]
# device -> (shapes, dtype, memory format): the tensors a dropfix resnet50 drops when training there
SETTINGS = {'cpu': (SHAPES, torch.float32, torch.contiguous_format),
            'cuda': ([(128, 256, 56, 56), (128, 512, 28, 28), (128, 1024, 14, 14), (128, 2048, 7, 7)],
                     torch.bfloat16, torch.channels_last)}
P = 0.1  # rewrite()'s default branch rate


def kernels(device: str = 'cpu') -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> a function applying that dropout (or multiply) to a tensor, in training mode.

    Example:
        >>> 'fused_add_inplace' in kernels(), 'torch_ops' in kernels('cuda')
        (True, False)
    """
    import timm_dropfix
    from timm_dropfix import fastdrop
    words = round(P * 65536)
    cache: dict[tuple, torch.Tensor] = {}

    def mask_of(x: torch.Tensor) -> torch.Tensor:
        if ('mask', x.shape) not in cache:
            cache['mask', x.shape] = ((torch.rand(x.shape, device=x.device) >= P).to(x.dtype) / (1 - P)).contiguous(
                memory_format=SETTINGS[device][2])
        return cache['mask', x.shape]

    def shortcut_of(x: torch.Tensor) -> torch.Tensor:  # the residual branch's other input
        if ('shortcut', x.shape) not in cache:
            cache['shortcut', x.shape] = torch.randn_like(x)
        return cache['shortcut', x.shape]

    fns = {
        'torch': lambda x: F.dropout(x, P, training=True),
        'fused': lambda x: timm_dropfix.fast_dropout(x, P),
        # the input must be one nobody else needs, as at the end of a post-activation branch: a fresh clone per call
        'fused_inplace': lambda x: timm_dropfix.fast_dropout(x, P, inplace=True),
        'torch_ops': lambda x: fastdrop._WordDropout.apply(x, words),
        'mask_multiply': lambda x: x * mask_of(x),
        'plain_multiply': lambda x: x * 2.0,
        # the end of a post-activation branch: the residual addition alone (what a model without dropout runs),
        # after the in-place dropout, and fused with it in one pass (what dropfix blocks run)
        'add': lambda x: x + shortcut_of(x),
        'fused_inplace_then_add': lambda x: timm_dropfix.fast_dropout(x, P, inplace=True) + shortcut_of(x),
        'fused_add_inplace': lambda x: timm_dropfix.fast_dropout_add(x, shortcut_of(x), P, inplace=True),
        # the same with the block's ReLU after the addition: in place after it (the model without dropout), and
        # in the same pass (dropfix blocks where the activation is a plain ReLU)
        'add_relu': lambda x: torch.relu_(x.add_(shortcut_of(x))),
        'fused_add_relu_inplace': lambda x: timm_dropfix.fast_dropout_add(x, shortcut_of(x), P, inplace=True,
                                                                          relu=True),
        # before a pre-activation branch's last conv: the BN-ReLU's in-place ReLU alone (the model without dropout),
        # then the dropout as a module would run it, and the two in one pass into the BN output (dropfix blocks)
        'relu': lambda x: torch.relu_(x),
        'relu_then_fused': lambda x: timm_dropfix.fast_dropout(torch.relu_(x), P),
        'fused_relu_inplace': lambda x: fastdrop._FusedReluDropout.apply(x, fastdrop._draw_seed(), round(P * 2 ** 32),
                                                                         fastdrop._launcher(x)),
    }
    if device != 'cpu':
        del fns['torch_ops']  # the CPU path without a C compiler
    return fns


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def time_call(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple, backward: bool,
              device: str = 'cpu') -> float:
    """Wall seconds of one ``fn`` call on a fresh input (and its backward when ``backward``)."""
    _, dtype, fmt = SETTINGS[device]
    base = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt).requires_grad_(backward)
    x = base * 1.0 if backward else base.clone()  # a non-leaf when backward: in-place needs one
    g = torch.ones_like(x) if backward else None
    _sync(device)
    t0 = time.perf_counter()
    y = fn(x)
    if backward:
        y.backward(g)
    _sync(device)
    return time.perf_counter() - t0


def measure(repeats: int, threads: list[int], device: str = 'cpu') -> dict[str, Any]:
    """Per thread count (CUDA: the key ``'gpu'``), pass (forward / forward_backward), shape and kernel: ns per
    element over the repeats.

    Example:
        >>> r = measure(1, [1])
        >>> r['1']['forward']['16x256x32x32']['fused']['n']
        1
    """
    fns = kernels(device)
    out: dict[str, Any] = {}
    saved = torch.get_num_threads()
    try:
        for nt in (threads if device == 'cpu' else ['gpu']):
            if device == 'cpu':
                torch.set_num_threads(nt)
            per_pass = out.setdefault(str(nt), {})
            for backward in (False, True):
                per_shape = per_pass.setdefault('forward_backward' if backward else 'forward', {})
                for shape in SETTINGS[device][0]:
                    n = math.prod(shape)
                    for fn in fns.values():  # warm-up: kernel build, first-touch of the allocator
                        time_call(fn, shape, backward, device)
                    samples: dict[str, list[float]] = {k: [] for k in fns}
                    for r in range(repeats):
                        order = list(fns) if r % 2 == 0 else list(reversed(fns))
                        for k in order:
                            samples[k].append(time_call(fns[k], shape, backward, device) * 1e9 / n)
                    per_shape['x'.join(map(str, shape))] = {
                        k: dict(zip(('mean', 'std'), mean_std(v)), median=statistics.median(v), n=len(v),
                                values=[round(t, 4) for t in v]) for k, v in samples.items()}
    finally:
        torch.set_num_threads(saved)
    return out


def to_markdown(res: dict[str, Any]) -> str:
    meta = res['meta']
    gpu = res.get('device') == 'cuda'
    kernel = res.get('dropout_kernel', res.get('cpu_dropout_kernel'))
    lines = [f"# One dropout on the {'GPU' if gpu else 'CPU'}: nanoseconds per element", '',
             f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date_utc']}, wall time {meta['wall_time_s']:.0f} s",
             f"- machine: {describe_machine(meta['machine'])}" + (f", {res['gpu']}" if gpu else ''),
             f"- rate p = {P}, " + ('bfloat16, channels_last; resnet50\'s branch outputs at 224 px, batch 128'
                                    if gpu else 'float32, NCHW; resnet50\'s branch outputs at 128 px, batch 16')
             + f"; fused kernel: {kernel}", '',
             'Wall time of one call on a fresh input (forward), or of the call and its backward; median and '
             'mean +- sample std over the repeats, kernels interleaved.', '']
    for nt, passes in res['timings'].items():
        for pas, shapes in passes.items():
            names = list(next(iter(shapes.values())))
            where = 'GPU' if nt == 'gpu' else f"{nt} thread{'s' if nt != '1' else ''}"
            lines += [f"## {pas.replace('_', ' + ')}, {where}", '',
                      '| shape | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
            for shape, ks in shapes.items():
                lines.append(f'| {shape} | ' + ' | '.join(
                    f"{ks[k]['median']:.2f} ({ks[k]['mean']:.2f} +- {ks[k]['std']:.2f})" for k in names) + ' |')
            lines.append('')
    lines += ['torch: `F.dropout`; fused / fused_inplace: `timm_dropfix.fast_dropout` (C kernel on CPU, Triton on '
              'CUDA; in place as at the end of a post-activation branch); torch_ops: its CPU path without a C '
              "compiler (16-bit words of torch's generator, float mask); mask_multiply: `x * mask` with a mask drawn "
              'once (an unfused dropout before it draws anything); plain_multiply: `x * 2`; add: `x + shortcut` (the '
              'residual addition that follows a branch-end dropout, also run without dropout); '
              'fused_inplace_then_add: the in-place dropout, then that addition; fused_add_inplace: '
              '`timm_dropfix.fast_dropout_add` in place, the two in one pass; add_relu: the in-place addition and '
              'ReLU of a post-activation block without dropout; fused_add_relu_inplace: dropout, addition and ReLU '
              'in one pass (`fast_dropout_add(..., relu=True)`), as dropfix blocks run them; relu: '
              'the in-place ReLU of a BN-ReLU module (also run without dropout); relu_then_fused: that ReLU, then '
              'the fused dropout; fused_relu_inplace: the two in one pass into the BN output, as pre-activation '
              'dropfix blocks run them.', '']
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """Time every kernel and write ``<out>.json`` and ``<out>.md`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed calls per kernel, shape and pass, after one warm-up call (default 20)')
    parser.add_argument('--device', choices=sorted(SETTINGS), default='cpu', help='cpu (default) or cuda')
    parser.add_argument('--out', default=None,
                        help='output prefix (.json and .md are added; default benchmarks/results/dropout_speed, '
                             'dropout_speed_gpu for CUDA)')
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error('--repeats must be at least 2: the report gives a sample std over the repeats')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda needs a CUDA device; run without it on the CPU')
    out = check_output_path(args.out or RESULTS_DIR / ('dropout_speed_gpu' if args.device == 'cuda'
                                                       else 'dropout_speed'), '--out', prefix=True)
    import timm_dropfix
    t0, started = time.perf_counter(), utc_now()
    torch.manual_seed(0)
    threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    res = {'p': P, 'device': args.device, 'shapes': SETTINGS[args.device][0],
           'dtype': str(SETTINGS[args.device][1]), 'dropout_kernel': timm_dropfix.dropout_kernel(args.device),
           'timings': measure(args.repeats, threads, args.device)}
    if args.device == 'cuda':
        res['gpu'] = torch.cuda.get_device_name(0)
    written = write_json_and_markdown(out, res, to_markdown, command=command_line(argv, 'benchmarks/dropout_speed.py'),
                                      seeds=[0], wall_time_s=time.perf_counter() - t0, started_at=started)
    print(to_markdown(written))


if __name__ == '__main__':
    main()
