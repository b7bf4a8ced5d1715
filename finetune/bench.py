"""``finetune bench``: dropout variants x seeds with the same budget, and a paired comparison against a baseline.

Every run is an ordinary ``train`` run in ``OUT/runs/<variant>/seed_<s>``; a run with a ``metrics.json`` is done
and never repeated, a run with checkpoints is resumed, so an interrupted bench continues where it stopped.
The summary compares each variant with the baseline seed by seed (same seed = same data order and head init),
which removes most of the seed-to-seed noise that an unpaired mean +- std comparison would carry.

Example:
    >>> from finetune.config import TrainConfig
    >>> results = run_bench(TrainConfig(model='resnet18', img_size=64, epochs=1, output_dir='runs/bench'),
    ...                     ['timm_default', 'recommended'], seeds=[0, 1])           # doctest: +SKIP
    >>> results['comparisons']['recommended']['n']                                    # doctest: +SKIP
    2
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import resume_or_restart, write_text_atomic
from .config import TrainConfig, changed_options
from .errors import FinetuneError
from .stats import mean_std, paired_t_interval

_NO_DROP = dict(rewrite=False, drop_rate=0.0)
_BRANCH = 0.1  # rates of the paper's fine-tuning experiments (paper.md)
_HEAD = 0.2
# name -> (TrainConfig overrides, description)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    'timm_default': (dict(rewrite=False, drop_rate=_HEAD), f"timm's head dropout p={_HEAD} after the pool"),
    'none': (_NO_DROP, 'no dropout'),
    'recommended': (dict(rewrite=True, branch_drop_rate=_BRANCH, branch_position='recommended',
                         head_drop_rate=_HEAD, head_position='before_pool'),
                    f'branch p={_BRANCH} (recommended position) + head p={_HEAD} before the pool'),
    'head_only': (dict(rewrite=True, branch_drop_rate=0.0, branch_position='none', head_drop_rate=_HEAD,
                       head_position='before_pool'), f'head p={_HEAD} before the pool only'),
    'branch_only': (dict(rewrite=True, branch_drop_rate=_BRANCH, branch_position='recommended', head_drop_rate=0.0,
                         head_position='none'), f'branch p={_BRANCH} (recommended position) only'),
    'branch_before_last_conv': (dict(rewrite=True, branch_drop_rate=_BRANCH, branch_position='before_last_conv',
                                     head_drop_rate=0.0, head_position='none'),
                                f'branch p={_BRANCH} before the last conv only (ablation)'),
    'branch_after_add': (dict(rewrite=True, branch_drop_rate=_BRANCH, branch_position='after_add',
                              head_drop_rate=0.0, head_position='none'),
                         f'branch p={_BRANCH} after the addition only (ablation)'),
    'branch_start': (dict(rewrite=True, branch_drop_rate=_BRANCH, branch_position='branch_start',
                          head_drop_rate=0.0, head_position='none'),
                     f'branch p={_BRANCH} at the start of the branch only (ablation)'),
}
DEFAULT_VARIANTS = ('timm_default', 'none', 'recommended', 'head_only', 'branch_only', 'branch_before_last_conv',
                    'branch_after_add')
METRICS = ('top1', 'mean_class_acc', 'top5', 'nll', 'ece')
# options that decide where files go or how fast a run goes, not what it computes: a run made with other values
# still belongs to the bench
_RESULT_NEUTRAL = frozenset({'data_dir', 'download', 'cache_dir', 'workers', 'output_dir', 'resume', 'log_with',
                             'keep_checkpoints', 'checkpoint_every', 'base_model', 'license', 'keep_freed_memory'})
# None leaves these to accelerate, and config.json records what was resolved: compared only when given
_RESOLVED_BY_ACCELERATE = frozenset({'mixed_precision', 'dynamo_backend'})


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The options of ``cfg`` that differ from a saved run's ``config.json`` and change what a run computes, as
    ``{name: (saved, now)}``. Options the saved file lacks (an older version) are not compared.

    Example:
        >>> changed_settings({'epochs': 1, 'workers': 4, 'lr': 1e-3}, TrainConfig(epochs=2, workers=0))
        {'epochs': (1, 2)}
    """
    left_to_accelerate = {k for k in _RESOLVED_BY_ACCELERATE if getattr(cfg, k) is None}
    return changed_options(saved, cfg, _RESULT_NEUTRAL | left_to_accelerate)

def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Per-seed ``a - b`` on the seeds both have, its mean, and a 95% t-interval.

    Example:
        >>> d = paired_difference({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.6})
        >>> round(d['mean'], 3), d['n']
        (0.15, 2)
    """
    seeds = sorted(set(a) & set(b))
    r = paired_t_interval([a[s] for s in seeds], [b[s] for s in seeds], confidence=0.95)
    return dict(n=r['n'], seeds=seeds, diffs=r['diffs'], mean=r['mean'], std=r['std'], ci95=[r['ci_low'], r['ci_high']])


def summarize_runs(runs: dict[str, dict[int, dict]], baseline: str, descriptions: dict[str, str],
                   setup: dict[str, Any]) -> dict[str, Any]:
    """results.json content from ``{variant: {seed: metrics}}``.

    Example:
        >>> m = lambda top1: dict(top1=top1, mean_class_acc=top1, top5=1.0, nll=0.5, ece=0.05)
        >>> runs = {'none': {0: m(0.6), 1: m(0.6)}, 'recommended': {0: m(0.7), 1: m(0.8)}}
        >>> r = summarize_runs(runs, 'none', {'none': 'no dropout'}, setup={})
        >>> r['variants']['recommended']['n'], round(r['comparisons']['recommended']['top1']['mean'], 3)
        (2, 0.15)
    """
    variants = {}
    for name, by_seed in runs.items():
        stats = {}
        for k in METRICS:
            vals = [by_seed[s][k] for s in sorted(by_seed)]
            m, sd = mean_std(vals)
            stats[k] = dict(mean=m, std=sd)
        variants[name] = dict(description=descriptions.get(name, ''), n=len(by_seed),
                              seeds={str(s): {k: by_seed[s][k] for k in METRICS + ('images_per_second',)
                                              if k in by_seed[s]} for s in sorted(by_seed)}, **stats)
    comparisons = {}
    base = {s: m['top1'] for s, m in runs.get(baseline, {}).items()}
    for name, by_seed in runs.items():
        if name != baseline:
            comparisons[name] = dict(
                top1=paired_difference({s: m['top1'] for s, m in by_seed.items()}, base),
                mean_class_acc=paired_difference({s: m['mean_class_acc'] for s, m in by_seed.items()},
                                                 {s: m['mean_class_acc'] for s, m in runs[baseline].items()}))
            comparisons[name]['n'] = comparisons[name]['top1']['n']
    return dict(setup=setup, baseline=baseline, variants=variants, comparisons=comparisons)


def results_markdown(results: dict[str, Any], heading: bool = True, unit: str = 'seed') -> str:
    """The results.md table: mean +- std per variant and the paired difference in top-1 vs the baseline.

    ``unit`` names what a pair is (``'seed'`` for ``finetune bench``; e.g. ``'(fold, seed)'`` for repeated splits).

    Example::

        >>> md = results_markdown(json.load(open('runs/bench/results.json')))   # doctest: +SKIP
    """
    base = results['baseline']
    setup = results.get('setup', {})
    lines = []
    if heading:
        lines += ['# finetune bench results', '',
                  f"model `{setup.get('model')}`, dataset `{setup.get('dataset')}` ({setup.get('data_dir')}), "
                  f"{setup.get('epochs')} epochs at {setup.get('img_size')} px, seeds {setup.get('seeds')}.", '']
    lines += [f'Paired difference = variant - `{base}` on the same {unit}; 95% t-interval over the {unit} pairs.',
              '',
              '| variant | what | n | top-1 (mean +- std) | mean class acc | NLL | ECE '
              '| top-1 diff vs baseline [95% CI] |',
              '|---|---|---|---|---|---|---|---|']
    for name, v in results['variants'].items():
        if name == base:
            diff = '(baseline)'
        else:
            c = results['comparisons'][name]['top1']
            diff = (f"{c['mean']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c['n'] > 1 else
                    f"{c['mean']:+.4f} (1 {unit}, no interval)" if c['n'] == 1 else 'n/a')
        lines.append(f"| {name} | {v['description']} | {v['n']} | {v['top1']['mean']:.4f} +- {v['top1']['std']:.4f} "
                     f"| {v['mean_class_acc']['mean']:.4f} +- {v['mean_class_acc']['std']:.4f} "
                     f"| {v['nll']['mean']:.3f} | {v['ece']['mean']:.3f} | {diff} |")
    return '\n'.join(lines) + '\n'


def plot_results(results: dict[str, Any], path: str | Path, unit: str = 'seed') -> Path:
    """Top-1 per ``unit`` (dots) and mean +- std (bar) per variant, as PNG.

    Example::

        >>> plot_results(json.load(open('runs/bench/results.json')), 'runs/bench/results.png')  # doctest: +SKIP
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(results['variants'])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 1), 4))
    for i, name in enumerate(names):
        v = results['variants'][name]
        ax.errorbar(i, v['top1']['mean'], yerr=v['top1']['std'], fmt='s', color='k', capsize=4, zorder=3)
        seeds = [s['top1'] for s in v['seeds'].values()]
        ax.scatter([i + 0.12] * len(seeds), seeds, alpha=0.6, s=18, zorder=2)
    ax.axhline(results['variants'][results['baseline']]['top1']['mean'], ls='--', color='gray', lw=1,
               label=f"baseline ({results['baseline']})")
    ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
    ax.set_ylabel('top-1 (eval split)')
    ax.legend(loc='best', fontsize=8)
    ax.set_title(f'dropout variants: mean +- std (squares), one dot per {unit}')
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_earlier_runs(out: Path, run_config: dict[tuple[str, int], TrainConfig]) -> None:
    # a finished run is reused and a dead one resumed: both only if it was made with the options given now, or
    # the table would label its numbers with settings it never ran
    clashes = []
    for (name, seed), cfg in run_config.items():
        saved = Path(cfg.output_dir) / 'config.json'
        if saved.is_file():
            diff = changed_settings(json.loads(saved.read_text()), cfg)
            if diff:
                clashes.append(f'{name} seed {seed}: ' + ', '.join(f'{k} {a!r} (now {b!r})'
                                                                   for k, (a, b) in sorted(diff.items())))
    if clashes:
        shown = '\n  '.join(clashes[:5]) + (f'\n  ... and {len(clashes) - 5} more' if len(clashes) > 5 else '')
        raise FinetuneError(f'{out} holds bench runs made with other options:\n  {shown}\nA bench compares runs made '
                            f'with one set of options: rerun with the options above to complete it, or pass a new '
                            f'--output-dir. Nothing was changed.')


def run_bench(base: TrainConfig, variants: Sequence[str], seeds: Sequence[int], baseline: str = 'timm_default',
              ) -> dict[str, Any]:
    """Run (or resume) the grid and write results.json, results.md and results.png into ``base.output_dir``.

    Example:
        >>> results = run_bench(TrainConfig(model='resnet18', epochs=1, output_dir='runs/bench'),
        ...                     ['timm_default', 'recommended'], seeds=[0, 1])                # doctest: +SKIP
        >>> run_bench(TrainConfig(), ['timm_default'], seeds=[0], baseline='none')
        Traceback (most recent call last):
        ...
        finetune.errors.FinetuneError: --baseline 'none' is not among --variants ['timm_default']: add it to ...
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FinetuneError(f'unknown bench variant(s) {unknown}; choose from {", ".join(VARIANTS)}')
    if baseline not in variants:
        raise FinetuneError(f'--baseline {baseline!r} is not among --variants {list(variants)}: add it to '
                            f'--variants, or pass --baseline with one of them')
    if not seeds:
        raise FinetuneError('--seeds needs at least one seed')
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from .modeling import build_model
    from .train import check_options, train
    # every variant's options and rewrite are checked before the first run, not when its turn comes hours later
    for name in variants:
        overrides = VARIANTS[name][0]
        check_options(base.replace(**overrides))
        if overrides['rewrite']:  # architecture only: no weights are read
            build_model(base.replace(**overrides, pretrained=False, pretrained_file=None), num_classes=2)
    out = Path(base.output_dir)
    run_config = {(name, seed): base.replace(**VARIANTS[name][0], seed=seed,
                                             output_dir=str(out / 'runs' / name / f'seed_{seed}'),
                                             cache_dir=base.cache_dir or str(out / 'cache'))
                  for name in variants for seed in seeds}
    _check_earlier_runs(out, run_config)
    # as AcceleratorState does: without cpu=True a CPU launch (ACCELERATE_USE_CPU) would make this first state a
    # 1-process one, which every later Accelerator inherits, so each rank would train every run on its own
    state = PartialState(cpu=parse_flag_from_env('ACCELERATE_USE_CPU'))
    runs: dict[str, dict[int, dict]] = {}
    for name in variants:
        for seed in seeds:
            run_dir = out / 'runs' / name / f'seed_{seed}'
            done = run_dir / 'metrics.json'
            if done.is_file():
                state.print(f'bench: {name} seed {seed} already done, skipping')
            else:
                resume = resume_or_restart(run_dir, remove=state.is_main_process)
                state.wait_for_everyone()  # a dead run's folder is gone for every process
                state.print(f"bench: {name} seed {seed}{' (resuming)' if resume else ''}")
                train(run_config[name, seed].replace(resume=resume))
            runs.setdefault(name, {})[seed] = json.loads(done.read_text())
    setup = dict(model=base.model, dataset=base.dataset, data_dir=base.data_dir, epochs=base.epochs,
                 img_size=base.img_size, seeds=list(seeds), config=base.to_dict())
    results = summarize_runs(runs, baseline, {k: v[1] for k, v in VARIANTS.items()}, setup)
    if state.is_main_process:
        write_text_atomic(out / 'results.json', json.dumps(results, indent=2))
        write_text_atomic(out / 'results.md', results_markdown(results))
        plot_results(results, out / 'results.png')
        state.print(results_markdown(results))
    state.wait_for_everyone()
    return results
