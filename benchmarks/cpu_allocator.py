"""CPU training with and without ``finetune.cpumem.keep_freed_memory``: step time, page faults and peak memory.

The setting is process-wide and cannot be undone, so each arm runs in fresh child processes, the arms alternating
(plain, kept, kept, plain, ...) so that both meet the same machine. Each child builds resnet50 (with
``timm_dropfix.rewrite`` defaults unless ``--no-dropout``), trains ``--steps`` steps on one fixed batch (Adam, the
toolkit's CPU configuration), and reports per step: process CPU time, minor page faults, and the peak resident size
above the size before the first step (VmHWM). A pair's speedup is its plain arm's median step time over its kept
arm's; the report gives the mean speedup with a Student-t 95 % interval over the pairs. The first
``--warmup`` steps of each child are left out of the times and faults (the heap settles over the first few).
Writes ``benchmarks/results/cpu_allocator.json`` and ``.md``.

Example::

    python benchmarks/cpu_allocator.py            # 5 pairs of 12 steps at 128 px, batch 16: about 3 min on 2 cores
                                                  # (the committed --pairs 12 took 449 s, 37 s a pair)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (RESULTS_DIR, check_output_path, check_step_size, command_line, describe_machine,  # noqa: E402
                     utc_now, write_json_and_markdown)
from finetune.stats import paired_t_interval  # noqa: E402


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One arm in this (fresh) process: per-step CPU seconds, minor faults and peak bytes above the start; the
    model and its training step are ``throughput.py``'s, in the toolkit's configuration."""
    import torch

    from finetune.cpumem import keep_freed_memory
    from throughput import Trainer, _proc_status_bytes, make_model
    applied = keep_freed_memory() if cfg['keep'] else False
    cpu_device = torch.device('cpu')
    torch.manual_seed(0)
    trainer = Trainer(make_model('resnet50', cpu_device, toolkit=True, dropout=cfg['dropout']), cpu_device, True)
    x = torch.randn(cfg['batch'], 3, cfg['size'], cfg['size'])
    y = torch.randint(0, 37, (cfg['batch'],))
    start = _proc_status_bytes('VmRSS')
    cpu, faults, peak = [], [], []
    for _ in range(cfg['steps']):
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        trainer.step(x, y)
        cpu.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        peak.append(_proc_status_bytes('VmHWM') - start)
    return {'applied': applied, 'cpu_s': cpu, 'faults': faults, 'peak_bytes': peak,
            'rss_after_bytes': _proc_status_bytes('VmRSS') - start}


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, '--_child', json.dumps(cfg)], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(pairs: int, steps: int, warmup: int, size: int, batch: int, dropout: bool) -> dict[str, Any]:
    """Alternate fresh processes of the two arms for ``pairs`` pairs and summarize them (see the module docstring).

    Example:
        >>> r = measure(1, 3, 1, 32, 2, True)  # doctest: +SKIP
        >>> sorted(r['arms'])  # doctest: +SKIP
        ['kept', 'plain']
    """
    runs: dict[str, list[dict[str, Any]]] = {'plain': [], 'kept': []}
    for p in range(pairs):
        for arm in (('plain', 'kept') if p % 2 == 0 else ('kept', 'plain')):
            runs[arm].append(run_child({'keep': arm == 'kept', 'dropout': dropout, 'steps': steps,
                                        'size': size, 'batch': batch}))
            print(f"pair {p} {arm}: median step {statistics.median(runs[arm][-1]['cpu_s'][warmup:]):.3f} s CPU",
                  flush=True)

    def arm_summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {'median_step_cpu_s': [statistics.median(r['cpu_s'][warmup:]) for r in rs],
                'faults_per_step': [statistics.mean(r['faults'][warmup:]) for r in rs],
                'peak_mib': [r['peak_bytes'][-1] / 2 ** 20 for r in rs],
                'rss_after_mib': [r['rss_after_bytes'] / 2 ** 20 for r in rs],
                'applied': [r['applied'] for r in rs], 'runs': rs}

    arms = {k: arm_summary(v) for k, v in runs.items()}
    speedups = [a / b for a, b in zip(arms['plain']['median_step_cpu_s'], arms['kept']['median_step_cpu_s'])]
    ci = paired_t_interval(speedups, [1.0] * len(speedups))
    return {'pairs': pairs, 'steps': steps, 'warmup': warmup, 'size': size, 'batch': batch, 'dropout': dropout,
            'arms': arms, 'speedup_per_pair': speedups, 'speedup_mean': statistics.mean(speedups),
            'speedup_ci95': [1.0 + ci['ci_low'], 1.0 + ci['ci_high']] if len(speedups) > 1 else None}


def to_markdown(res: dict[str, Any]) -> str:
    """Report of a result written by :func:`main`."""
    meta, d = res['meta'], res['allocator']
    ci = d['speedup_ci95'] or [float('nan')] * 2

    def cells(arm: str, key: str, fmt: str) -> str:
        vals = d['arms'][arm][key]
        return f"{format(statistics.mean(vals), fmt)} ({', '.join(format(v, fmt) for v in vals)})"

    lines = [f"# CPU training with and without keep_freed_memory: resnet50{' + rewrite()' if d['dropout'] else ''}, "
             f"{d['size']} px, batch {d['batch']}",
             '',
             f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date_utc']}, wall time {meta['wall_time_s']:.0f} s",
             f"- machine: {describe_machine(meta['machine'])}",
             f"- {d['pairs']} pairs of fresh processes, arms alternating; {d['steps']} steps each, the first "
             f"{d['warmup']} left out of times and faults",
             *([f"- note: {res['note']}"] if res.get('note') else []),
             '',
             f"**Speedup of a step with freed memory kept: {d['speedup_mean']:.3f}x** (mean over pairs of the "
             f"plain arm's median step CPU time over the kept arm's; 95 % CI [{ci[0]:.3f}, {ci[1]:.3f}]).",
             '',
             '| arm | median step CPU s | minor page faults per step | peak MiB above start | RSS after MiB |',
             '|---|---|---|---|---|']
    for arm in ('plain', 'kept'):
        lines.append(f"| {arm} | {cells(arm, 'median_step_cpu_s', '.3f')} | {cells(arm, 'faults_per_step', '.0f')} | "
                     f"{cells(arm, 'peak_mib', '.0f')} | {cells(arm, 'rss_after_mib', '.0f')} |")
    lines += ['', 'Each cell: mean over the pairs (each process in brackets). plain: glibc\'s malloc defaults; kept: '
                  '`finetune.cpumem.keep_freed_memory()` first, as `finetune train` does on a CPU.']
    return '\n'.join(lines) + '\n'


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=5,
                        help='pairs of fresh processes, one per arm each (default 5; 2 or more give an interval)')
    parser.add_argument('--steps', type=int, default=12, help='training steps per process (default 12)')
    parser.add_argument('--warmup', type=int, default=4,
                        help='first steps of each process left out of times and faults (default 4)')
    parser.add_argument('--size', type=int, default=128, help='image size in pixels (default 128)')
    parser.add_argument('--batch', type=int, default=16, help='batch size (default 16)')
    parser.add_argument('--no-dropout', action='store_true', help='resnet50 as timm builds it (no rewrite)')
    parser.add_argument('--out', default=str(RESULTS_DIR / 'cpu_allocator'), help='output prefix (.json, .md)')
    parser.add_argument('--note', default=None, help='free text stored with the results (e.g. machine load)')
    parser.add_argument('--_child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    if args.pairs < 1 or args.warmup < 0 or args.steps <= args.warmup:
        parser.error('--pairs must be at least 1, --warmup at least 0 and --steps more than --warmup')
    check_step_size(parser, args.size, args.batch)
    check_output_path(args.out, '--out', prefix=True)
    started, t0 = utc_now(), time.perf_counter()
    result: dict[str, Any] = {'allocator': measure(args.pairs, args.steps, args.warmup, args.size, args.batch,
                                                   not args.no_dropout)}
    if args.note:
        result['note'] = args.note
    written = write_json_and_markdown(args.out, result, to_markdown,
                                      command=command_line(argv, 'benchmarks/cpu_allocator.py'), seeds=[0],
                                      wall_time_s=time.perf_counter() - t0, started_at=started)
    print(to_markdown(written))


if __name__ == '__main__':
    main()
