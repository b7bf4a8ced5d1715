"""Two runs of the same ``finetune bench`` grid that differ in one setting: each variant of one against the same
variant of the other, paired by unit (fold x seed).

``pets_fewshot.py`` compares variants with ``none`` inside one grid; this compares whole grids, e.g. the same folds
trained with timm_dropfix's fast CPU dropout and with torch's kernel (``TIMM_DROPFIX_FAST_DROPOUT=0``). A variant
whose runs must not depend on the setting (``none`` here) should come out identical, which checks that nothing else
differed. Writes ``<out>.json`` and ``<out>.md``.

Example::

    python benchmarks/compare_grids.py benchmarks/results/pets_fewshot_cpu-fastdrop.json \\
        benchmarks/results/pets_fewshot_cpu-torchdrop.json --labels fast torch \\
        --out benchmarks/results/dropout_kernels_cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import check_output_path, command_line, describe_machine, utc_now, write_result  # noqa: E402
from finetune.bench import paired_difference  # noqa: E402

METRICS = ('top1', 'nll', 'images_per_second')


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per variant present in both grids: for each metric, ``a - b`` on the units both have.

    Example:
        >>> g = lambda x: {'variants': {'v': {'seeds': {'0': {'top1': x}, '1000': {'top1': x + 0.1}}}}}
        >>> r = compare(g(0.5), g(0.4))['v']
        >>> round(r['top1']['mean'], 3), r['top1']['n'], r['identical']
        (0.1, 2, False)
    """
    out = {}
    for name in sorted(set(a['variants']) & set(b['variants'])):
        ua, ub = a['variants'][name]['seeds'], b['variants'][name]['seeds']
        units = sorted(set(ua) & set(ub), key=int)
        # identical training gives identical metrics; only the measured speed differs from run to run
        same = all({k: v for k, v in ua[u].items() if k != 'images_per_second'}
                   == {k: v for k, v in ub[u].items() if k != 'images_per_second'} for u in units)
        res: dict[str, Any] = {'units': units, 'identical': same}
        for k in METRICS:
            if all(k in ua[u] and k in ub[u] for u in units):
                res[k] = paired_difference({u: ua[u][k] for u in units}, {u: ub[u][k] for u in units})
        out[name] = res
    return out


def load_grid(path: str | Path) -> dict[str, Any]:
    """A grid result (``pets_fewshot.py`` / ``finetune bench``) read from ``path``; a one-line ``SystemExit`` naming
    the file and what it lacks when it is missing or is another kind of JSON.

    Example:
        >>> sorted(load_grid('benchmarks/results/pets_fewshot_cpu-fastdrop.json')['variants'])  # doctest: +SKIP
        ['none', 'recommended']
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'{path}: no such results file; give the JSON a pets_fewshot.py run wrote')
    try:
        grid = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f'{path}: cannot read it as JSON ({e}); give the JSON a pets_fewshot.py run wrote') from e
    variants = grid.get('variants') if isinstance(grid, dict) else None
    if not isinstance(variants, dict) or not all(isinstance(v, dict) and isinstance(v.get('seeds'), dict)
                                                  for v in variants.values()):
        raise SystemExit(f"{path}: not a grid result (it lacks 'variants' with per-unit 'seeds'); give the JSON a "
                         'pets_fewshot.py or finetune bench run wrote')
    return grid


def source_provenance(grid: dict[str, Any]) -> dict[str, Any]:
    """Where and when a source grid was measured, from its ``meta`` (``None`` for what it does not record)."""
    meta = grid.get('meta', {})
    return {'command': meta.get('command'), 'date_utc': meta.get('date_utc'), 'machine': meta.get('machine')}


def to_markdown(res: dict[str, Any]) -> str:
    """Report of a result written by :func:`main`."""
    la, lb = res['labels']
    meta = res['meta']
    date = f"- date (UTC): {meta['date_utc']}"
    if res.get('regenerated'):
        date += (f" (regenerated from the same source files; the previous version was dated "
                 f"{res['regenerated']['previous_date_utc']})")
    lines = [f"# Same grid, two settings: {la} - {lb}", '', f"- command: `{meta['command']}`", date]
    # the comparison is computed anywhere; the runs it compares were measured where each source says
    for label, src, prov in zip((la, lb), res['sources'], res.get('source_provenance', [{}, {}])):
        machine = describe_machine(prov['machine']) if prov.get('machine') else 'machine not recorded'
        lines.append(f"- {label}: `{src}`, dated {prov.get('date_utc') or 'not recorded'} (UTC), {machine}")
    lines += ['', f"Paired by unit (fold x seed); mean difference {la} - {lb} and 95% t-interval.", '',
             '| variant | units | identical runs | top-1 | NLL | images/s |', '|---|---|---|---|---|---|']
    for name, r in res['variants'].items():
        cells = []
        for k, scale in (('top1', 100), ('nll', 1), ('images_per_second', 1)):
            d = r.get(k)
            cells.append('-' if d is None else
                         f"{d['mean'] * scale:+.2f} [{d['ci95'][0] * scale:+.2f}, {d['ci95'][1] * scale:+.2f}]")
        lines.append(f"| {name} | {len(r['units'])} | {r['identical']} | " + ' | '.join(cells) + ' |')
    lines += ['', 'top-1 in points; images/s of each run as its metrics.json reports it.', '']
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """Compare two grid results and write ``<out>.json`` and ``<out>.md`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('a', help='results JSON of the first grid (pets_fewshot.py / finetune bench)')
    parser.add_argument('b', help='results JSON of the second grid')
    parser.add_argument('--labels', nargs=2, default=('a', 'b'), metavar=('A', 'B'),
                        help='names of the two grids in the report (default: a b)')
    parser.add_argument('--out', required=True, help='output prefix (.json and .md are added)')
    args = parser.parse_args(argv)
    out = check_output_path(args.out, '--out', prefix=True)
    t0, started = time.perf_counter(), utc_now()
    grids = [load_grid(args.a), load_grid(args.b)]
    res: dict[str, Any] = {'labels': list(args.labels), 'sources': [args.a, args.b],
                           'source_provenance': [source_provenance(g) for g in grids], 'variants': compare(*grids)}
    if not res['variants']:
        raise SystemExit('the two grids share no variant: nothing to compare')
    previous = _previous_date(out.with_suffix('.json'), res)
    if previous:
        res['regenerated'] = {'previous_date_utc': previous}
    seeds = sorted({int(s) for g in grids for s in g.get('meta', {}).get('seeds', [])})
    written = write_result(out.with_suffix('.json'), res, command=command_line(argv, 'benchmarks/compare_grids.py'),
                           seeds=seeds, wall_time_s=time.perf_counter() - t0, started_at=started)
    out.with_suffix('.md').write_text(to_markdown(written))
    print(to_markdown(written))


def _previous_date(path: Path, res: dict[str, Any]) -> Optional[str]:
    """Date of the comparison ``path`` already holds when it compared the same sources with the same labels: a
    rerun then says that it regenerated it (the new date is not when the comparison was first made)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(old, dict) and old.get('sources') == res['sources'] and old.get('labels') == res['labels']:
        return old.get('meta', {}).get('date_utc')
    return None


if __name__ == '__main__':
    main()
