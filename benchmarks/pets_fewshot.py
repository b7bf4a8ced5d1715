"""Does the placement help when fine-tuning? The ImageNet ResNet-50 on real Pets images, variants x folds x seeds.

All 370 images of ``../shared/data/pets370`` (37 breeds x 10) are split into ``--folds`` stratified folds (2 images
per breed each for 5 folds). For every fold, every variant of ``finetune bench`` is trained with the same budget
from the same weights, seed by seed; the paired unit is (fold, seed), so a variant is compared with no dropout on
exactly the same data, order and head initialisation.

Profiles (``--profile``):
    cpu    96 px, 4 epochs, 5 folds x 1 seed, 7 variants: its 35 runs took 89 min on 2 CPU cores shared with
           other jobs (2.5 min each on average)
    cpu-long  96 px, 10 epochs, 5 folds x 1 seed, variants none and recommended: does a longer budget (where
           the cpu profile's 4-epoch runs were still underfitting) change the verdict?
    cpu-160   160 px, 6 epochs (the README main job's budget), 5 folds x 1 seed, none and recommended
    gpu    224 px, 15 epochs, bf16 autocast, 5 folds x 1 seed, 8 variants (40 runs): the setting for one GPU;
           ``--jobs 5`` trains the five folds at once (add seeds with ``--seeds 0 1 2``)
    smoke  48 px, 1 epoch, 2 folds x 1 seed, 2 variants: proves the script (not evidence)

``--jobs N`` trains N folds at the same time, each in its own process (its log in ``<work-dir>/fold_<k>.log``);
every run is resumable, so an interrupted grid continues where it stopped, and ``--report-only`` summarises the
runs finished so far.

Example:
    python benchmarks/pets_fewshot.py --profile cpu        # results in benchmarks/results/pets_fewshot_cpu.*
    python benchmarks/pets_fewshot.py --profile gpu --jobs 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO_ROOT, check_output_path, command_line, describe_machine, require_shared,  # noqa: E402
                     utc_now, write_bench_report, write_result)

PROFILES: dict[str, dict[str, Any]] = {
    'cpu': dict(img_size=96, epochs=4, folds=5, seeds=[0], batch_size=32,
                variants=['none', 'timm_default', 'head_only', 'branch_only', 'recommended',
                          'branch_before_last_conv', 'branch_after_add']),
    # recipe: overrides of RECIPE for this profile only (bf16 autocast for the GPU's tensor cores; a checkpoint
    # every 5 epochs: 40 runs x 15 epochs of 300 MB checkpoints would spend more time writing than training)
    'gpu': dict(img_size=224, epochs=15, folds=5, seeds=[0], batch_size=32,
                recipe=dict(mixed_precision='bf16', checkpoint_every=5),
                variants=['none', 'timm_default', 'head_only', 'branch_only', 'recommended',
                          'branch_before_last_conv', 'branch_after_add', 'branch_start']),
    # the budget question: the cpu profile's size and recipe, 2.5x the epochs, the two variants that matter most
    'cpu-long': dict(img_size=96, epochs=10, folds=5, seeds=[0], batch_size=32, variants=['none', 'recommended']),
    # the budget of the README's main job (160 px, 6 epochs), none vs recommended
    'cpu-160': dict(img_size=160, epochs=6, folds=5, seeds=[0], batch_size=32, variants=['none', 'recommended']),
    'smoke': dict(img_size=48, epochs=1, folds=2, seeds=[0], batch_size=16, variants=['none', 'recommended']),
}
BASELINE = 'none'
PETS370_PER_BREED = 10  # images of each breed in pets370: the most folds that still give every fold one of each
UNIT_STRIDE = 1000  # a unit's key is fold * UNIT_STRIDE + seed, so seeds must stay below it
# the recipe is written out, not taken from TrainConfig's defaults, so that tuning the toolkit's defaults later
# does not silently change what a committed result measured. fast_data: the committed cpu and cpu-long runs used
# the cache of that time (centre square of each image), cpu-160 the whole-image cache (commit 135d41f)
RECIPE = dict(optimizer='adamw', lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05, warmup_epochs=1.0,
              min_lr_ratio=0.01, label_smoothing=0.1, rrc_scale_min=0.35, mixed_precision='no',
              freeze_bn_stats=False, fast_data=True, color_jitter=0.0)


def make_folds(data_dir: str | Path, work_dir: str | Path, folds: int) -> list[Path]:
    """Stratified folds over trainval + test as ImageFolder trees of symlinks: ``work_dir/fold_k/{train,val}``.

    Within a breed, images are ordered by name and dealt round-robin into folds, so every fold holds the same number
    of images of every breed and the split is the same on every machine.

    Example:
        >>> make_folds('../shared/data/pets370', '/tmp/pets_folds', 5)[0].name     # doctest: +SKIP
        'fold_0'
    """
    from finetune.data import pets_samples
    samples, classes = [], None
    for split in ('trainval', 'test'):
        s, classes = pets_samples(data_dir, split)
        samples += s
    by_class: dict[int, list[str]] = {}
    for path, label in sorted(samples):
        by_class.setdefault(label, []).append(path)
    smallest = min(len(v) for v in by_class.values())
    if smallest < folds:
        raise ValueError(f'{folds} folds need at least {folds} images per class; the smallest class has {smallest}.')
    out = []
    for k in range(folds):
        root = Path(work_dir) / f'fold_{k}'
        for label, paths in by_class.items():
            for i, path in enumerate(paths):
                split = 'val' if i % folds == k else 'train'
                link = root / split / classes[label] / Path(path).name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(Path(path).resolve())
        out.append(root)
    return out


def _fold_grid_argv(profile: str, work_dir: Path, fold: int, variants: Sequence[str], folds: int,
                    seeds: Sequence[int]) -> list[str]:
    return ['--profile', profile, '--work-dir', str(work_dir.resolve()), '--train-fold', str(fold),
            '--folds', str(folds), '--variants', *variants, '--seeds', *map(str, seeds)]


def train_folds_in_parallel(profile: str, work_dir: Path, variants: Sequence[str], folds: int, seeds: Sequence[int],
                            jobs: int) -> list[int]:
    """Train every fold in its own process, ``jobs`` at a time (torch threads: the cores divided among them).

    The fold folders must exist (:func:`make_folds`). Returns the folds whose process failed; their finished runs
    count, and a rerun resumes the rest.

    Example:
        >>> train_folds_in_parallel('gpu', Path('runs/pf'), ['none', 'recommended'], 5, [0], jobs=5)  # doctest: +SKIP
        []
    """
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    # the repository on the path: a child runs the script file, which an uninstalled checkout must still import
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=path)
    todo, running, failed = list(range(folds)), [], []
    while todo or running:
        while todo and len(running) < jobs:
            k = todo.pop(0)
            log = open(work_dir / f'fold_{k}.log', 'a')
            cmd = [sys.executable, str(Path(__file__).resolve()),
                   *_fold_grid_argv(profile, work_dir, k, variants, folds, seeds)]
            print(f'pets_fewshot: fold {k + 1}/{folds} started (log {log.name})', flush=True)
            running.append((k, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT),
                            log))
        time.sleep(1)
        for item in list(running):
            k, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"pets_fewshot: fold {k + 1}/{folds} "
                      f"{'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode}, see {log.name})'}",
                      flush=True)
                if proc.returncode != 0:
                    failed.append(k)
    return failed


def run(profile: str, work_dir: Path, out_prefix: Path, data_dir: Path, weights: Path,
        variants: Sequence[str] | None = None, folds: int | None = None, seeds: Sequence[int] | None = None,
        argv: Sequence[str] | None = None, report_only: bool = False, jobs: int = 1,
        train_fold: int | None = None) -> dict[str, Any] | None:
    """Train the grid (resuming finished runs) and write ``<out_prefix>.json``, ``.md`` and ``.png``.

    With ``report_only`` nothing is trained: the runs finished so far are summarised, and the result is labelled
    partial when some are missing. ``jobs > 1`` trains that many folds at once in child processes;
    ``train_fold`` (what each child runs) trains that one fold and writes no report.
    """
    from finetune.bench import VARIANTS, run_bench, summarize_runs
    from finetune.config import TrainConfig
    p = dict(PROFILES[profile])
    variants = list(variants or p['variants'])
    folds = folds if folds is not None else p['folds']
    seeds = list(seeds if seeds is not None else p['seeds'])
    started, t0 = utc_now(), time.time()
    fold_dirs = make_folds(data_dir, work_dir / 'folds', folds)
    base = TrainConfig(dataset='imagefolder', model='resnet50', pretrained_file=str(weights), v1_strides=True,
                       img_size=p['img_size'], epochs=p['epochs'], batch_size=p['batch_size'], log_with='none',
                       cache_dir=str(work_dir / 'cache'), **{**RECIPE, **p.get('recipe', {})})
    if train_fold is not None:
        if not 0 <= train_fold < folds:
            raise SystemExit(f'--train-fold {train_fold} is not among the {folds} folds (0..{folds - 1})')
        run_bench(base.replace(data_dir=str(fold_dirs[train_fold]), output_dir=str(work_dir / f'fold_{train_fold}')),
                  variants, seeds, baseline=BASELINE)
        return None
    failed = []
    if jobs > 1 and not report_only:
        failed = train_folds_in_parallel(profile, work_dir, variants, folds, seeds, jobs)
    runs: dict[str, dict[int, dict]] = {}
    missing = 0
    for k, fold_dir in enumerate(fold_dirs):
        cfg = base.replace(data_dir=str(fold_dir), output_dir=str(work_dir / f'fold_{k}'))
        if not report_only and jobs <= 1:
            print(f'pets_fewshot: fold {k + 1}/{folds}', flush=True)
            run_bench(cfg, variants, seeds, baseline=BASELINE)
        for name in variants:
            for s in seeds:
                done = work_dir / f'fold_{k}' / 'runs' / name / f'seed_{s}' / 'metrics.json'
                if done.is_file():
                    runs.setdefault(name, {})[k * UNIT_STRIDE + s] = json.loads(done.read_text())
                else:
                    missing += 1
    if BASELINE not in runs:
        raise SystemExit(f'no finished {BASELINE!r} run under {work_dir}: nothing to compare yet')
    setup = dict(model='resnet50 (ImageNet weights of shared/weights/resnet50_keras_in1k, v1 strides)',
                 dataset=f'pets370, {folds} stratified folds over all 370 images', data_dir=str(data_dir),
                 epochs=p['epochs'], img_size=p['img_size'], seeds=seeds, folds=folds, jobs=jobs,
                 pairing='unit = (fold, seed); key = fold * 1000 + seed', config=base.to_dict())
    if failed:
        setup['failed_folds'] = failed
    results = summarize_runs(runs, BASELINE, {k: v[1] for k, v in VARIANTS.items()}, setup)
    # with --report-only this process trained nothing: the runs' own wall times are what the grid cost
    runs_wall = sum(m['wall_seconds'] for by_unit in runs.values() for m in by_unit.values())
    wall = runs_wall if report_only else time.time() - t0
    results['setup']['sum_of_run_wall_seconds'] = round(runs_wall, 1)
    total = len(variants) * len(seeds) * folds
    label = ('smoke: proves the script, not evidence' if profile == 'smoke' else
             f'partial: {total - missing} of {total} runs finished' if missing else None)
    command = command_line(argv, 'benchmarks/pets_fewshot.py')
    written = write_result(out_prefix.with_suffix('.json'), results, command=command,
                           seeds=seeds, wall_time_s=wall, started_at=started, label=label)
    meta = written['meta']
    header = (f"# pets370 few-shot fine-tuning ({profile} profile)\n\n"
              f"{setup['model']}; {setup['dataset']}; {p['epochs']} epochs at {p['img_size']} px, seeds {seeds}; "
              f"pairs = (fold, seed).\n\nCommand: `{meta['command']}`  \n"
              f"Machine: {describe_machine(meta['machine'])}; mixed precision {base.mixed_precision}; "
              f"{jobs} fold(s) at a time  \n"
              f"Date: {meta['date_utc']}; the finished runs took {runs_wall / 60:.1f} min of wall time in all\n"
              + (f'\n**{label}**\n' if label else '') + '\n')
    write_bench_report(out_prefix, header, results, unit='(fold, seed)')
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Train the grid (or, with ``--report-only``, only summarise it) and write the report; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--profile', choices=sorted(PROFILES), default='cpu')
    parser.add_argument('--variants', nargs='+', help='override the profile\'s variants (see finetune bench)')
    parser.add_argument('--folds', type=int,
                        help=f"override the profile's folds (2..{PETS370_PER_BREED}; smoke 2, the others 5)")
    parser.add_argument('--seeds', type=int, nargs='+',
                        help=f"override the profile's seeds (0..{UNIT_STRIDE - 1}; every profile: 0)")
    parser.add_argument('--work-dir', default=None, help='runs and caches (default runs/pets_fewshot_<profile>)')
    parser.add_argument('--jobs', type=int, default=1,
                        help='folds trained at the same time, each in its own process (default 1)')
    parser.add_argument('--train-fold', type=int, default=None, help=argparse.SUPPRESS)  # what a --jobs child runs
    parser.add_argument('--report-only', action='store_true',
                        help='summarise the finished runs without training (partial results are labelled)')
    parser.add_argument('--out', default=None,
                        help='result prefix (default benchmarks/results/pets_fewshot_<profile>)')
    args = parser.parse_args(argv)
    from finetune.bench import VARIANTS
    if args.jobs < 1:
        parser.error('--jobs must be >= 1')
    folds = args.folds if args.folds is not None else PROFILES[args.profile]['folds']
    if not 2 <= folds <= PETS370_PER_BREED:
        parser.error(f'--folds must be 2..{PETS370_PER_BREED}: every fold needs training images and a validation '
                     f'image of each breed, and pets370 has {PETS370_PER_BREED} per breed')
    if args.seeds is not None and (len(set(args.seeds)) < len(args.seeds)
                                   or not all(0 <= s < UNIT_STRIDE for s in args.seeds)):
        parser.error(f'--seeds must be distinct and in 0..{UNIT_STRIDE - 1}: a unit is keyed fold * {UNIT_STRIDE} '
                     '+ seed')
    if args.variants is not None:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            parser.error(f"--variants {' '.join(unknown)}: unknown; choose from {', '.join(VARIANTS)}")
        if BASELINE not in args.variants:
            parser.error(f'--variants must include {BASELINE!r}: every variant is compared with it')
    if args.train_fold is not None and not 0 <= args.train_fold < folds:
        parser.error(f'--train-fold {args.train_fold} is not among the {folds} folds (0..{folds - 1})')
    work = check_output_path(args.work_dir or REPO_ROOT / 'runs' / f'pets_fewshot_{args.profile}', '--work-dir')
    out = check_output_path(args.out or REPO_ROOT / 'benchmarks' / 'results' / f'pets_fewshot_{args.profile}',
                            '--out', prefix=True)
    data, weights = require_shared('data', 'pets370'), require_shared('weights', 'resnet50_keras_in1k')
    out.parent.mkdir(parents=True, exist_ok=True)
    run(args.profile, work, out, data, weights, args.variants, args.folds, args.seeds, argv,
        report_only=args.report_only, jobs=args.jobs, train_fold=args.train_fold)
    return 0


if __name__ == '__main__':
    os.environ.setdefault('MPLBACKEND', 'Agg')
    sys.exit(main())
