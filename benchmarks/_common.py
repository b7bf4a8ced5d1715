"""Shared helpers for the benchmark scripts in ``benchmarks/``.

Every committed result must say how it was made: the command, the machine, the date, the seeds and the wall
time. :func:`write_result` stamps that metadata onto a JSON payload; :func:`mean_std` and :func:`paired_t_interval`
give the spread and the paired comparison the README quotes. Nothing here knows about a particular benchmark, so
``module_tests.py``, ``cifar10.py`` and ``pets_fewshot.py`` can all use it.

The scripts import this module as ``_common`` (they are run as ``python benchmarks/<script>.py``, which puts
``benchmarks/`` on ``sys.path``); tests add ``benchmarks/`` to ``sys.path`` themselves.

Example:
    >>> from _common import mean_std, paired_t_interval
    >>> mean_std([0.90, 0.92])
    (0.91, 0.014142135623730963)
    >>> round(paired_t_interval([0.92, 0.93, 0.95], [0.90, 0.92, 0.93])['mean'], 4)
    0.0167
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / 'benchmarks' / 'results'

__all__ = [
    'REPO_ROOT', 'RESULTS_DIR', 'shared_dir', 'machine_info', 'command_line', 'utc_now', 'write_json',
    'write_result', 'mean_std', 'student_t_ppf', 'paired_t_interval', 'fmt_pm',
]


def shared_dir(required: bool = True) -> Path:
    """Folder with the project's real data and weights (``$TIMM_DROPFIX_SHARED``, default ``<repo>/../shared``).

    Args:
        required: raise ``FileNotFoundError`` with a hint when the folder is missing.

    Example:
        >>> shared_dir(required=False).name
        'shared'
    """
    path = Path(os.environ.get('TIMM_DROPFIX_SHARED', REPO_ROOT.parent / 'shared')).expanduser()
    if required and not path.is_dir():
        raise FileNotFoundError(
            f'shared data folder {path} not found: set TIMM_DROPFIX_SHARED to the folder that holds '
            f'data/pets370, data/cifar10 and weights/resnet50_keras_in1k')
    return path


def machine_info() -> dict[str, Any]:
    """Describe the machine a result was measured on (CPU/GPU, thread count, library versions).

    Example:
        >>> sorted(machine_info())[:3]
        ['cpu_count', 'cuda_device', 'hostname']
    """
    import torch  # local import: keeps `import _common` cheap for scripts that only need statistics

    info: dict[str, Any] = {
        'hostname': platform.node(),
        'platform': platform.platform(),
        'processor': platform.processor() or platform.machine(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'python': sys.version.split()[0],
        'torch': torch.__version__,
        'cuda_device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ('torchvision', 'timm', 'numpy'):
        try:
            info[name] = __import__(name).__version__
        except ImportError:  # optional for statistics-only callers
            info[name] = None
    try:
        import timm_dropfix
        info['timm_dropfix'] = getattr(timm_dropfix, '__version__', 'unknown')
    except ImportError:
        info['timm_dropfix'] = None
    return info


def command_line(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command that reproduces a run, as a shell-quoted string relative to the repository root.

    Args:
        argv: the arguments the script's ``main`` received (``None``: ``sys.argv[1:]``).
        script: the script path; default ``sys.argv[0]`` made relative to the repository.

    Example:
        >>> command_line(['--quick'], script='benchmarks/module_tests.py')
        'python benchmarks/module_tests.py --quick'
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if script is None:
        script = sys.argv[0]
        try:
            script = str(Path(script).resolve().relative_to(REPO_ROOT))
        except ValueError:
            pass
    return shlex.join(['python', script, *argv])


def utc_now() -> str:
    """Current UTC time, ISO 8601 to the second (``2026-01-31T12:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _jsonable(obj: Any) -> Any:
    """Turn numpy/torch scalars, tuples and paths into plain JSON values (NaN becomes null)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, 'item') and callable(obj.item) and getattr(obj, 'ndim', 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1) + '\n')
    return path


def write_result(
        path: str | os.PathLike,
        payload: dict[str, Any],
        *,
        command: str,
        seeds: Iterable[int],
        wall_time_s: float,
        started_at: str | None = None,
        label: str | None = None,
) -> dict[str, Any]:
    """Stamp provenance onto ``payload`` and write it as JSON.

    The written object is ``{'meta': {...}, **payload}`` with meta holding command, machine, date (UTC), seeds,
    wall time and an optional label (e.g. ``'smoke: not evidence'``).

    Args:
        path: output ``.json`` path.
        payload: the measured data (JSON-able after numpy/torch scalars are converted).
        command: the command line that reproduces it (see :func:`command_line`).
        seeds: every seed the result depends on.
        wall_time_s: wall-clock seconds the run took.
        started_at: UTC start time; default now.
        label: a short qualifier shown next to the numbers.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> r = write_result(os.path.join(d, 'x.json'), {'acc': 0.9}, command='python x.py', seeds=[0], wall_time_s=1.0)
        >>> r['meta']['seeds'], r['acc']
        ([0], 0.9)
    """
    meta = {
        'command': command,
        'date_utc': started_at or utc_now(),
        'finished_utc': utc_now(),
        'wall_time_s': round(float(wall_time_s), 2),
        'seeds': [int(s) for s in seeds],
        'machine': machine_info(),
    }
    if label:
        meta['label'] = label
    result = {'meta': meta, **payload}
    write_json(path, result)
    return _jsonable(result)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value, NaN for none).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    n = len(values)
    if n == 0:
        return float('nan'), float('nan')
    mean = sum(values) / n
    if n == 1:
        return float(mean), 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return float(mean), math.sqrt(var)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _student_t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t distribution (no SciPy needed; bisection on the exact CDF).

    Example:
        >>> round(student_t_ppf(0.975, 4), 3)
        2.776
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f'q must be in (0, 1), got {q}')
    if df <= 0:
        raise ValueError(f'df must be positive, got {df}')
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_t_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference ``a - b`` with a Student-t confidence interval for its mean.

    Pairs are matched by position (same seed / same split). With fewer than two pairs the interval is
    undefined (NaN, written as null in JSON).

    Returns:
        dict with ``mean``, ``std`` (sample), ``n``, ``ci_low``, ``ci_high``, ``confidence`` and ``verdict``:
        ``'higher'`` / ``'lower'`` when the interval excludes 0, else ``'no significant difference'``.

    Example:
        >>> r = paired_t_interval([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])
        >>> r['verdict'], round(r['mean'], 3)
        ('higher', 0.1)
    """
    if len(a) != len(b):
        raise ValueError(f'paired samples need equal lengths, got {len(a)} and {len(b)}')
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    if n < 2:
        lo = hi = float('nan')
    else:
        half = student_t_ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
    if n >= 2 and lo > 0:
        verdict = 'higher'
    elif n >= 2 and hi < 0:
        verdict = 'lower'
    else:
        verdict = 'no significant difference'
    return {'mean': mean, 'std': std, 'n': n, 'ci_low': lo, 'ci_high': hi, 'confidence': confidence,
            'verdict': verdict, 'diffs': diffs}


def fmt_pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """Format ``mean +- std`` (``scale=100`` for percentages).

    Example:
        >>> fmt_pm(0.9123, 0.0041, scale=100)
        '91.23 ± 0.41'
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return 'n/a'
    return f'{mean * scale:.{digits}f} ± {std * scale:.{digits}f}'
