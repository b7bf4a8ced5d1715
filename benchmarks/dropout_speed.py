"""Time of one dropout on the CPU, per element: torch's kernel, timm_dropfix's fused kernel (out of place and in
place), its torch-ops path (used without a C compiler), and two multiplies for scale.

The tensors are the branch outputs of resnet50 at 128 px, batch 16 (where the recommended placement drops), in
float32, NCHW. Each measurement is the wall time of one call (forward) or of one forward + backward, repeated
``--repeats`` times after a warm-up, with the kernels' turns interleaved so that all meet the same machine;
reported as median and mean +- sample std of nanoseconds per element, at torch's thread count and at one thread.
Writes ``benchmarks/results/dropout_speed.json`` and ``.md``.

Example::

    python benchmarks/dropout_speed.py            # about a minute on 2 cores
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

from _common import RESULTS_DIR, command_line, describe_machine, mean_std, utc_now, write_result  # noqa: E402

SHAPES = [(16, 256, 32, 32), (16, 512, 16, 16), (16, 1024, 8, 8), (16, 2048, 4, 4)]
P = 0.1  # rewrite()'s default branch rate


def kernels() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> a function applying that dropout (or multiply) to a tensor, in training mode.

    Example:
        >>> sorted(kernels())[:2]
        ['fused', 'fused_inplace']
    """
    import timm_dropfix
    from timm_dropfix import fastdrop
    words = round(P * 65536)
    cache: dict[tuple, torch.Tensor] = {}

    def mask_of(x: torch.Tensor) -> torch.Tensor:
        if x.shape not in cache:
            cache[x.shape] = (torch.rand(x.shape) >= P).float() / (1 - P)
        return cache[x.shape]

    return {
        'torch': lambda x: F.dropout(x, P, training=True),
        'fused': lambda x: timm_dropfix.fast_dropout(x, P),
        # the input must be one nobody else needs, as at the end of a post-activation branch: a fresh clone per call
        'fused_inplace': lambda x: timm_dropfix.fast_dropout(x, P, inplace=True),
        'torch_ops': lambda x: fastdrop._WordDropout.apply(x, words),
        'mask_multiply': lambda x: x * mask_of(x),
        'plain_multiply': lambda x: x * 2.0,
    }


def time_call(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple, backward: bool) -> float:
    """Wall seconds of one ``fn`` call on a fresh input (and its backward when ``backward``)."""
    base = torch.randn(shape, requires_grad=backward)
    x = base * 1.0 if backward else base.clone()  # a non-leaf when backward: in-place needs one
    g = torch.ones(shape) if backward else None
    t0 = time.perf_counter()
    y = fn(x)
    if backward:
        y.backward(g)
    return time.perf_counter() - t0


def measure(repeats: int, threads: list[int]) -> dict[str, Any]:
    """Per thread count, pass (forward / forward_backward), shape and kernel: ns per element over the repeats.

    Example:
        >>> r = measure(1, [1])
        >>> r['1']['forward']['16x256x32x32']['fused']['n']
        1
    """
    fns = kernels()
    out: dict[str, Any] = {}
    saved = torch.get_num_threads()
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            per_pass = out.setdefault(str(nt), {})
            for backward in (False, True):
                per_shape = per_pass.setdefault('forward_backward' if backward else 'forward', {})
                for shape in SHAPES:
                    n = math.prod(shape)
                    for fn in fns.values():
                        time_call(fn, shape, backward)  # warm-up: kernel build, first-touch of the allocator
                    samples: dict[str, list[float]] = {k: [] for k in fns}
                    for r in range(repeats):
                        order = list(fns) if r % 2 == 0 else list(reversed(fns))
                        for k in order:
                            samples[k].append(time_call(fns[k], shape, backward) * 1e9 / n)
                    per_shape['x'.join(map(str, shape))] = {
                        k: dict(zip(('mean', 'std'), mean_std(v)), median=statistics.median(v), n=len(v),
                                values=[round(t, 4) for t in v]) for k, v in samples.items()}
    finally:
        torch.set_num_threads(saved)
    return out


def to_markdown(res: dict[str, Any]) -> str:
    meta = res['meta']
    lines = ['# One dropout on the CPU: nanoseconds per element', '', f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date_utc']}, wall time {meta['wall_time_s']:.0f} s",
             f"- machine: {describe_machine(meta['machine'])}",
             f"- rate p = {P}, float32, NCHW; resnet50's branch outputs at 128 px, batch 16; fused kernel: "
             f"{res['cpu_dropout_kernel']}", '',
             'Wall time of one call on a fresh input (forward), or of the call and its backward; median and '
             'mean +- sample std over the repeats, kernels interleaved.', '']
    for nt, passes in res['timings'].items():
        for pas, shapes in passes.items():
            names = list(next(iter(shapes.values())))
            lines += [f"## {pas.replace('_', ' + ')}, {nt} thread{'s' if nt != '1' else ''}", '',
                      '| shape | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
            for shape, ks in shapes.items():
                lines.append(f'| {shape} | ' + ' | '.join(
                    f"{ks[k]['median']:.2f} ({ks[k]['mean']:.2f} +- {ks[k]['std']:.2f})" for k in names) + ' |')
            lines.append('')
    lines += ['torch: `F.dropout`; fused / fused_inplace: `timm_dropfix.fast_dropout` (C kernel; in place as at the '
              'end of a post-activation branch); torch_ops: its path without a C compiler (16-bit words of '
              "torch's generator, float mask); mask_multiply: `x * mask` with a mask drawn once (an unfused "
              'dropout before it draws anything); plain_multiply: `x * 2`.', '']
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--out', default=str(RESULTS_DIR / 'dropout_speed'),
                        help='output prefix (.json and .md are added)')
    args = parser.parse_args(argv)
    import timm_dropfix
    t0, started = time.perf_counter(), utc_now()
    torch.manual_seed(0)
    threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    res = {'p': P, 'shapes': SHAPES, 'cpu_dropout_kernel': timm_dropfix.cpu_dropout_kernel(),
           'timings': measure(args.repeats, threads)}
    out = Path(args.out)
    written = write_result(out.with_suffix('.json'), res, command=command_line(argv, 'benchmarks/dropout_speed.py'),
                           seeds=[0], wall_time_s=time.perf_counter() - t0, started_at=started)
    out.with_suffix('.md').write_text(to_markdown(written))
    print(to_markdown(written))


if __name__ == '__main__':
    main()
