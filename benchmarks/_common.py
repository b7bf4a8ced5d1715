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

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from finetune.stats import mean_std, paired_t_interval, student_t_ppf  # noqa: F401  (re-exported for the scripts)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / 'benchmarks' / 'results'
# environment variables that change what a benchmark measures; command_line() records them
RESULT_ENV = ('TIMM_DROPFIX_FAST_DROPOUT',)

__all__ = [
    'REPO_ROOT', 'RESULTS_DIR', 'shared_dir', 'machine_info', 'command_line', 'utc_now', 'write_json',
    'write_result', 'write_json_and_markdown', 'mean_std', 'student_t_ppf', 'paired_t_interval', 'fmt_pm',
    'describe_machine', 'require_shared', 'check_output_path', 'check_step_size', 'check_timm_model', 'check_rates',
    'check_distinct_seeds',
]


def shared_dir(required: bool = True) -> Path:
    """Folder with the project's real data and weights (``$TIMM_DROPFIX_SHARED``, default ``<repo>/../shared``).

    Args:
        required: exit with a one-line ``SystemExit`` that says what to set when the folder is missing (the
            scripts call this before measuring, so a traceback would only hide the fix).

    Example:
        >>> shared_dir(required=False).name
        'shared'
    """
    path = Path(os.environ.get('TIMM_DROPFIX_SHARED', REPO_ROOT.parent / 'shared')).expanduser()
    if required and not path.is_dir():
        raise SystemExit(
            f'shared data folder {path} not found: set TIMM_DROPFIX_SHARED to the folder that holds '
            f'data/pets370, data/cifar10 and weights/resnet50_keras_in1k')
    return path


def require_shared(*parts: str) -> Path:
    """``shared_dir() / parts``, which must exist; else a one-line ``SystemExit`` naming what is missing.

    Scripts call this right after parsing, so a missing data set stops them before any measuring.

    Example:
        >>> require_shared('data', 'pets370').name  # doctest: +SKIP
        'pets370'
    """
    root = shared_dir()
    path = root.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} not found: set TIMM_DROPFIX_SHARED to a shared folder that holds "
                         f"{'/'.join(parts)} (now {root})")
    return path


def check_output_path(path: str | os.PathLike, option: str, *, prefix: bool = False) -> Path:
    """Check before measuring that the results can be written: the target folder (``path``, or its parent when
    ``prefix`` is true, for ``--out PREFIX`` options) must exist as a writable folder or be creatable in one.

    Nothing is created here: a run that stops for another reason leaves no empty folders behind.

    Raises:
        SystemExit: one line naming ``option``, the path and what to give instead.

    Example:
        >>> check_output_path('/tmp/some/new/folder', '--out-dir')
        PosixPath('/tmp/some/new/folder')
    """
    path = Path(path).expanduser()
    folder = path.parent if prefix else path
    probe = folder.absolute()
    while not probe.is_dir():
        if os.path.lexists(probe):  # a file (or a dangling link) where a folder must go: mkdir would fail late
            raise SystemExit(f'{option} {path}: {probe} exists and is not a folder; give a path whose folders '
                             f'are folders (or can be created)')
        if probe.parent == probe:
            break
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SystemExit(f'{option} {path}: cannot write in {probe} (no permission); give a writable location')
    return path


def check_step_size(parser: argparse.ArgumentParser, size: int, batch: int) -> None:
    """``parser.error`` unless a ResNet training step at ``--size`` and ``--batch`` can run.

    Example:
        >>> check_step_size(argparse.ArgumentParser(), 128, 16)
    """
    if size < 32:
        parser.error('--size must be at least 32: the ResNets downsample by 32')
    if batch < 2:
        # below 64 px resnet50's last feature map is 1x1, and one image fails there after the model is built
        parser.error('--batch must be at least 2: training BatchNorm needs the statistics of more than one image '
                     '(one image at small sizes leaves it one value per channel, and training fails)')


def check_rates(parser: argparse.ArgumentParser, **rates: float) -> None:
    """``parser.error`` unless every dropout rate (``--name value`` as ``name=value``) lies in [0, 1), by
    timm_dropfix's own rule and message.

    Example:
        >>> check_rates(argparse.ArgumentParser(), branch_rate=0.1, head_rate=0.2)
    """
    from timm_dropfix.positions import check_rate
    for name, rate in rates.items():
        try:
            check_rate(f"--{name.replace('_', '-')}", rate)
        except ValueError as e:
            parser.error(str(e))


def check_distinct_seeds(parser: argparse.ArgumentParser, seeds: Optional[Sequence[int]], why: str = '') -> None:
    """``parser.error`` when ``--seeds`` names a seed twice (``why``: what pairs by seed, for the message).

    Example:
        >>> check_distinct_seeds(argparse.ArgumentParser(), [0, 1, 2])
    """
    if seeds is not None and len(set(seeds)) < len(seeds):
        parser.error('--seeds must be distinct' + (f': {why}' if why else ''))


def check_timm_model(name: str, option: str) -> str:
    """``name`` if timm knows it (the ``*_dropfix`` models included), else a one-line ``SystemExit``.

    Example:
        >>> check_timm_model('resnet50', '--model')
        'resnet50'
    """
    import timm
    import timm_dropfix  # noqa: F401  (registers the *_dropfix models with timm)

    if not timm.is_model(name):
        similar = timm.list_models(f'*{name}*')[:5]
        hint = f" (similar: {', '.join(similar)})" if similar else ''
        raise SystemExit(f'{option} {name!r} is not a timm model{hint}; give a name from timm.list_models()')
    return name


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


def describe_machine(machine: dict[str, Any]) -> str:
    """One line for a report header from a result's ``meta['machine']``: processor, cores, GPU if any, torch.

    Example:
        >>> describe_machine({'processor': 'x86_64', 'cpu_count': 2, 'cuda_device': None, 'torch': '2.14.1'})
        'x86_64 (2 cores), torch 2.14.1'
    """
    gpu = f", GPU {machine['cuda_device']}" if machine.get('cuda_device') else ''
    return (f"{machine.get('processor', '')} ({machine.get('cpu_count', '?')} cores){gpu}, "
            f"torch {machine.get('torch', '')}")


def command_line(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command that reproduces a run, as a shell-quoted string relative to the repository root.

    Args:
        argv: the arguments the script's ``main`` received (``None``: ``sys.argv[1:]``).
        script: the script path; default ``sys.argv[0]`` made relative to the repository.

    Environment variables that change results (:data:`RESULT_ENV`) are written in front when set.

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
    env = [f'{k}={os.environ[k]}' for k in RESULT_ENV if k in os.environ]
    return shlex.join([*env, 'python', script, *argv])


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


def write_json_and_markdown(out_prefix: str | os.PathLike, payload: dict[str, Any], render: Any, *,
                            command: str, seeds: Iterable[int], wall_time_s: float,
                            started_at: str | None = None) -> dict[str, Any]:
    """:func:`write_result` into ``<out_prefix>.json`` (folders made as needed), then ``render(written)`` into
    ``<out_prefix>.md``; returns what was written.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> r = write_json_and_markdown(os.path.join(d, 'x'), {'acc': 0.9}, lambda r: f"# acc {r['acc']}\\n",
        ...                             command='python x.py', seeds=[0], wall_time_s=1.0)
        >>> open(os.path.join(d, 'x.md')).read()
        '# acc 0.9\\n'
    """
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_result(out.with_name(out.name + '.json'), payload, command=command, seeds=seeds,
                           wall_time_s=wall_time_s, started_at=started_at)
    out.with_name(out.name + '.md').write_text(render(written))
    return written


def write_bench_report(out_prefix: Path, header: str, results: dict[str, Any], unit: str) -> str:
    """Write ``<out_prefix>.md`` (``header`` + finetune bench's table) and ``.png``, print the text and return it.

    Example:
        >>> write_bench_report(Path('benchmarks/results/x'), '# title\\n\\n', results, unit='seed')  # doctest: +SKIP
    """
    from finetune.bench import plot_results, results_markdown
    text = header + results_markdown(results, heading=False, unit=unit)
    out_prefix.with_suffix('.md').write_text(text)
    plot_results(results, out_prefix.with_suffix('.png'), unit=unit)
    print(text)
    return text


def fmt_pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """Format ``mean +- std`` (``scale=100`` for percentages).

    Example:
        >>> fmt_pm(0.9123, 0.0041, scale=100)
        '91.23 ± 0.41'
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return 'n/a'
    return f'{mean * scale:.{digits}f} ± {std * scale:.{digits}f}'
