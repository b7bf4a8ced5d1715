"""Does the fast data path train as well as timm's PIL transforms? The README main job, both paths x seeds.

Every run is ``python -m finetune train`` on ``../shared/data/pets370`` (185 trainval / 185 test) with the ImageNet
ResNet-50 of ``../shared/weights`` (v1 strides, no dropout: the data path is the question) and the toolkit's recipe;
the two arms differ only in the data path:

    pil   ``--no-fast-data``: decode every JPEG every epoch, timm's per-image RandomResizedCrop/flip/ColorJitter
    fast  ``--fast-data``: decode once into the uint8 cache, the same augmentations on whole batches

The same seed gives both arms the same batch order, head initialisation and dropout stream, so the comparison is
paired by seed (``finetune bench``'s statistics). Runs go to ``runs/data_paths_<profile>/<arm>/seed_<s>``; a
finished run is never repeated and an interrupted one resumes from its checkpoint, so the script can be stopped and
started again. ``--jobs N`` trains N runs at once (``--threads`` each): on a 2-core machine 2 x 1 thread finishes
the grid sooner than one 2-thread run after another.

Arms (``--arms``, default pil and fast): also ``pil_cached_pixels``, a diagnostic: timm's PIL transforms on
the pixels the fast path caches (each training image decoded and resized to img_size / crop_pct first). It
scores like ``pil`` if the cache's pixels are not what costs accuracy, like ``fast`` if they are.

Profiles (``--profile``):
    cpu    160 px, 6 epochs, seeds 0-11 (the README main job's budget); the committed result also has the
           diagnostic arm: 36 runs, about 58 min of run time per arm on 2 cores
    smoke  48 px, 1 epoch, 24 training images, seed 0: proves the script (not evidence)

Example:
    python benchmarks/data_paths.py --profile cpu --jobs 2    # results in benchmarks/results/data_paths_cpu.*
    python benchmarks/data_paths.py --profile cpu --jobs 2 --arms pil fast pil_cached_pixels   # as committed
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
from _common import (REPO_ROOT, check_distinct_seeds, check_output_path, command_line,  # noqa: E402
                     describe_machine, require_shared, utc_now, write_bench_report, write_result)

PROFILES: dict[str, dict[str, Any]] = {
    'cpu': dict(img_size=160, epochs=6, seeds=list(range(12)), limit_train=None, limit_eval=None),
    'smoke': dict(img_size=48, epochs=1, seeds=[0], limit_train=24, limit_eval=16),
}
ARMS: dict[str, tuple[bool, str]] = {
    'pil': (False, "timm's per-image PIL transforms, every JPEG decoded every epoch (--no-fast-data)"),
    'fast': (True, 'decode-once uint8 cache, batched crops/flips/jitter (--fast-data)'),
    # diagnostic: splits the fast path's difference into "pixels of the cache" vs "batched augmentation + loop"
    'pil_cached_pixels': (False, "timm's PIL transforms on the fast path's cached pixels (training images decoded "
                                 "and resized to img/crop_pct first, as the cache holds them)"),
}
DEFAULT_ARMS = ('pil', 'fast')
BASELINE = 'pil'
# written out, not taken from TrainConfig's defaults, so that later changes of the defaults do not silently change
# what a committed result measured
RECIPE = dict(optimizer='adamw', lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05, warmup_epochs=1.0,
              min_lr_ratio=0.01, label_smoothing=0.1, rrc_scale_min=0.35, color_jitter=0.4, batch_size=16,
              rewrite=False, drop_rate=0.0, mixed_precision='no', freeze_bn_stats=False, workers=0)


def run_config(profile: str, arm: str, seed: int, work_dir: Path, data_dir: Path, weights: Path):
    """The TrainConfig of one run of the grid."""
    from finetune.config import TrainConfig
    p = PROFILES[profile]
    return TrainConfig(dataset='pets', data_dir=str(data_dir), model='resnet50', pretrained_file=str(weights),
                       v1_strides=True, img_size=p['img_size'], epochs=p['epochs'], limit_train=p['limit_train'],
                       limit_eval=p['limit_eval'], fast_data=ARMS[arm][0], seed=seed, log_with='none',
                       output_dir=str(work_dir / arm / f'seed_{seed}'), cache_dir=str(work_dir / 'cache'), **RECIPE)


def use_cached_pixels_for_training(img_size: int, crop_pct: float = 0.875) -> None:
    """Make ``finetune train``'s PIL path read its *training* images as the fast-data cache holds them.

    Each training image is decoded and resized to a short side of ``floor(img_size / crop_pct)`` with the very
    function that fills the cache, then timm's PIL train transform runs on it as usual; eval images are untouched.
    Only for the ``pil_cached_pixels`` arm, in its own process.
    """
    from PIL import Image
    from finetune import data as data_lib, fastdata
    short = fastdata.default_short_side(img_size, crop_pct)
    original = data_lib.ImageListDataset

    class CachedPixels(original):
        def __getitem__(self, i: int):
            path, label = self.samples[i]
            img = Image.fromarray(fastdata._decode_hwc(path, short, 'bilinear', fastdata.DEFAULT_MAX_ASPECT))
            return self.transform(img), label

    made = []

    def first_is_train(samples, transform=None):  # make_loaders builds the train dataset, then the eval one
        made.append(1)
        return (CachedPixels if len(made) == 1 else original)(samples, transform)

    data_lib.ImageListDataset = first_is_train


def _launch(cfg, threads: int, arm: str) -> subprocess.Popen:
    """One run in its own process (its own thread count; a crash stays in its own log)."""
    from finetune.checkpoint import resume_or_restart
    run_dir = Path(cfg.output_dir)
    cfg = cfg.replace(resume=resume_or_restart(run_dir))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    code = ('import sys, torch; torch.set_num_threads(int(sys.argv[1])); from finetune.config import TrainConfig; '
            'cfg = TrainConfig.from_json(sys.argv[2]); sys.path.insert(0, "benchmarks"); import data_paths; '
            'sys.argv[3] == "pil_cached_pixels" and data_paths.use_cached_pixels_for_training(cfg.img_size); '
            'from finetune.train import train; train(cfg)')
    log = open(run_dir.parent / f'{run_dir.name}.log', 'a')
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, '-c', code, str(threads), cfg.to_json(), arm], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def run_grid(configs: Sequence[tuple[str, Any]], jobs: int, threads: int) -> list[str]:
    """Train every ``(arm, config)`` without a metrics.json, ``jobs`` at a time; returns the output dirs that
    failed."""
    todo = [(arm, c) for arm, c in configs if not (Path(c.output_dir) / 'metrics.json').is_file()]
    running: list[tuple[Any, subprocess.Popen]] = []
    failed = []
    while todo or running:
        while todo and len(running) < jobs:
            arm, cfg = todo.pop(0)
            print(f'data_paths: start {cfg.output_dir}', flush=True)
            running.append((cfg, _launch(cfg, threads, arm)))
        time.sleep(2)
        for cfg, proc in list(running):
            if proc.poll() is not None:
                running.remove((cfg, proc))
                ok = proc.returncode == 0 and (Path(cfg.output_dir) / 'metrics.json').is_file()
                print(f"data_paths: {'done' if ok else f'FAILED (exit {proc.returncode})'} {cfg.output_dir}",
                      flush=True)
                if not ok:
                    failed.append(cfg.output_dir)
    return failed


def run(profile: str, work_dir: Path, out_prefix: Path, data_dir: Path, weights: Path,
        seeds: Sequence[int] | None = None, jobs: int = 1, threads: int = 2, argv: Sequence[str] | None = None,
        report_only: bool = False, arms: Sequence[str] = DEFAULT_ARMS) -> dict[str, Any]:
    """Train the grid (skipping finished runs) and write ``<out_prefix>.json``, ``.md`` and ``.png``."""
    from finetune.bench import summarize_runs
    if BASELINE not in arms:
        raise SystemExit(f'--arms must include the baseline {BASELINE!r}')
    p = PROFILES[profile]
    seeds = list(seeds if seeds is not None else p['seeds'])
    started, t0 = utc_now(), time.time()
    # seed-major order: whatever has finished when the grid is stopped early is paired
    configs = [(arm, run_config(profile, arm, s, work_dir, data_dir, weights)) for s in seeds for arm in arms]
    failed = [] if report_only else run_grid(configs, jobs, threads)
    runs: dict[str, dict[int, dict]] = {}
    for arm, cfg in configs:
        done = Path(cfg.output_dir) / 'metrics.json'
        if done.is_file():
            runs.setdefault(arm, {})[cfg.seed] = json.loads(done.read_text())
    if BASELINE not in runs:
        raise SystemExit(f'no finished {BASELINE!r} run under {work_dir}; failed runs: {failed} (see their .log)')
    base_cfg = configs[0][1]
    setup = dict(model='resnet50 (ImageNet weights of shared/weights/resnet50_keras_in1k, v1 strides)',
                 dataset='pets370 (185 trainval / 185 test)', data_dir=str(data_dir), epochs=p['epochs'],
                 img_size=p['img_size'], seeds=seeds, pairing='unit = seed', jobs=jobs, threads_per_job=threads,
                 config={k: v for k, v in base_cfg.to_dict().items() if k not in ('output_dir', 'seed', 'resume')})
    results = summarize_runs(runs, BASELINE, {k: v[1] for k, v in ARMS.items()}, setup)
    runs_wall = {arm: sum(m['wall_seconds'] for m in by_seed.values()) for arm, by_seed in runs.items()}
    results['setup']['sum_of_run_wall_seconds'] = {k: round(v, 1) for k, v in runs_wall.items()}
    total = len(arms) * len(seeds)
    finished = sum(len(v) for v in runs.values())
    label = ('smoke: proves the script, not evidence' if profile == 'smoke' else
             f'partial: {finished} of {total} runs finished' if finished < total else None)
    command = command_line(argv, 'benchmarks/data_paths.py')
    wall = sum(runs_wall.values()) if report_only else time.time() - t0
    written = write_result(out_prefix.with_suffix('.json'), results, command=command, seeds=seeds,
                           wall_time_s=wall, started_at=started, label=label)
    meta = written['meta']
    header = (f"# Fast data path vs timm's PIL transforms ({profile} profile)\n\n"
              f"{setup['model']}; {setup['dataset']}; {p['epochs']} epochs at {p['img_size']} px, seeds {seeds}; "
              f"pairs = seeds (same batch order and head initialisation in both arms).\n\n"
              f"Command: `{meta['command']}`  \n"
              f"Machine: {describe_machine(meta['machine'])}; {jobs} run(s) at a time, {threads} thread(s) each  \n"
              f"Date: {meta['date_utc']}; run wall time in all: "
              + ', '.join(f'{arm} {s / 60:.1f} min' for arm, s in runs_wall.items()) + '\n'
              + (f'\n**{label}**\n' if label else '') + '\n')
    write_bench_report(out_prefix, header, results, unit='seed')
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Train the grid (or, with ``--report-only``, only summarise it) and write the report; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--profile', choices=sorted(PROFILES), default='cpu')
    parser.add_argument('--seeds', type=int, nargs='+', help="override the profile's seeds")
    parser.add_argument('--arms', nargs='+', choices=list(ARMS), default=list(DEFAULT_ARMS),
                        help='data paths to train (default: pil fast; pil_cached_pixels is a diagnostic)')
    parser.add_argument('--jobs', type=int, default=1, help='runs trained at the same time (default 1)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads per run (default: the cores divided among the jobs)')
    parser.add_argument('--work-dir', default=None, help='runs and caches (default runs/data_paths_<profile>)')
    parser.add_argument('--report-only', action='store_true',
                        help='summarise the finished runs without training (partial results are labelled)')
    parser.add_argument('--out', default=None, help='result prefix (default benchmarks/results/data_paths_<profile>)')
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error('--jobs must be >= 1')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    check_distinct_seeds(parser, args.seeds, 'the arms are paired by seed')
    if BASELINE not in args.arms:
        parser.error(f'--arms must include the baseline {BASELINE!r}: every arm is compared with it')
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    work = check_output_path(args.work_dir or REPO_ROOT / 'runs' / f'data_paths_{args.profile}', '--work-dir')
    out = check_output_path(args.out or REPO_ROOT / 'benchmarks' / 'results' / f'data_paths_{args.profile}', '--out',
                            prefix=True)
    data, weights = require_shared('data', 'pets370'), require_shared('weights', 'resnet50_keras_in1k')
    out.parent.mkdir(parents=True, exist_ok=True)
    run(args.profile, work, out, data, weights, args.seeds, args.jobs, threads, argv, report_only=args.report_only,
        arms=args.arms)
    return 0


if __name__ == '__main__':
    os.environ.setdefault('MPLBACKEND', 'Agg')
    sys.exit(main())
