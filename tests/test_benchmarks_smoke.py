"""Smoke tests of the benchmark scripts: each ``main`` at a tiny size, checking the files, their structure and
that the numbers make sense. Also the statistics helpers and the on-device CIFAR augmentation.

The real-data parts read ``$TIMM_DROPFIX_SHARED`` (default ``<repo>/../shared``). They are skipped only when that
folder is missing and ``CI`` is unset; in CI a missing folder fails.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import _common  # noqa: E402
import cifar10  # noqa: E402
import compare_grids  # noqa: E402
import cpu_allocator  # noqa: E402
import data_paths  # noqa: E402
import dropout_overhead  # noqa: E402
import dropout_speed  # noqa: E402
import module_tests  # noqa: E402
import pets_fewshot  # noqa: E402
import throughput  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def _check_meta(result: dict, json_path: Path) -> None:
    on_disk = json.loads(json_path.read_text())
    meta = on_disk['meta']
    assert meta['command'].startswith('python benchmarks/')
    assert meta['wall_time_s'] > 0 and meta['seeds'] == result['meta']['seeds']
    assert meta['date_utc'].endswith('Z') and meta['machine']['torch'] == torch.__version__


# ---------------------------------------------------------------- statistics helpers

def test_student_t_quantiles_and_paired_interval():
    assert _common.student_t_ppf(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert _common.student_t_ppf(0.975, 9) == pytest.approx(2.2622, abs=1e-3)
    assert _common.student_t_ppf(0.025, 9) == pytest.approx(-2.2622, abs=1e-3)
    r = _common.paired_t_interval([0.80, 0.82, 0.81, 0.83], [0.70, 0.71, 0.72, 0.70])
    assert r['verdict'] == 'higher' and r['ci_low'] < r['mean'] < r['ci_high']
    # half-width = t(0.975, 3) * s / sqrt(n)
    half = 3.1824 * r['std'] / 2.0
    assert r['ci_high'] - r['mean'] == pytest.approx(half, rel=1e-3)
    noisy = _common.paired_t_interval([0.80, 0.70], [0.75, 0.76])
    assert noisy['verdict'] == 'no significant difference'
    single = _common.paired_t_interval([0.8], [0.7])
    assert math.isnan(single['ci_low']) and single['verdict'] == 'no significant difference'
    with pytest.raises(ValueError):
        _common.paired_t_interval([1.0], [1.0, 2.0])
    assert _common.mean_std([2.0]) == (2.0, 0.0)


def test_median_interval_uses_the_sign_test_order_statistics():
    from finetune.stats import median_interval
    # the textbook ranks of the 95 % interval: n=20 -> 6th and 15th value, n=100 -> 40th and 61st
    r20 = median_interval([float(i) for i in range(1, 21)])
    assert (r20['ci_low'], r20['ci_high'], r20['median']) == (6.0, 15.0, 10.5)
    assert r20['coverage'] == pytest.approx(0.9586, abs=1e-4)
    r100 = median_interval([float(i) for i in range(100, 0, -1)])  # order of the input does not matter
    assert (r100['ci_low'], r100['ci_high']) == (40.0, 61.0) and r100['coverage'] >= 0.95
    assert math.isnan(median_interval([1.0, 2.0, 3.0, 4.0, 5.0])['ci_low'])  # 2 / 2**5 > 0.05: no interval
    big = median_interval([float(i) for i in range(1, 2001)])  # beyond float's 2**1023: exact integers
    assert 0.95 <= big['coverage'] < 0.96 and 950 < big['ci_low'] < 960 and big['ci_high'] == 2001 - big['ci_low']
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])['ci_low'] == 1.0
    with pytest.raises(ValueError):
        median_interval([])


def test_median_interval_covers_the_true_median_of_a_skewed_distribution():
    """Distribution-free: on exponential samples (median ln 2, heavy right tail) the interval covers the median
    in at least 95 % of 2000 draws of 20 (exact coverage 95.9 %; a 93 % floor leaves room for sampling error)."""
    import random
    from finetune.stats import median_interval
    rng, truth = random.Random(0), math.log(2.0)
    hits = 0
    for _ in range(2000):
        r = median_interval([rng.expovariate(1.0) for _ in range(20)])
        hits += r['ci_low'] <= truth <= r['ci_high']
    assert hits / 2000 >= 0.93


def test_dropout_overhead_verdict():
    v = dropout_overhead.verdict
    assert v({'ci_low': -0.01, 'ci_high': 0.029}) == 'met'
    assert v({'ci_low': 0.031, 'ci_high': 0.06}) == 'not met'
    assert v({'ci_low': 0.0, 'ci_high': 0.04}) == 'inconclusive'
    assert v({'ci_low': float('nan'), 'ci_high': float('nan')}) == 'inconclusive'


def test_dropout_overhead_main(tmp_path, capsys):
    dropout_overhead.main(['--size', '32', '--batch', '2', '--rounds', '6', '--arms', 'mask_only',
                           '--out-dir', str(tmp_path)])
    res = json.loads((tmp_path / 'dropout_overhead_cpu.json').read_text())
    assert res['meta']['command'].startswith('python benchmarks/dropout_overhead.py')
    d = res['overhead']
    assert set(d['step_s']) == {'no_dropout', 'dropfix', 'mask_only'} and d['overhead_per_pair']['n'] == 6
    assert d['median']['ci_low'] <= d['median']['median'] <= d['median']['ci_high']
    assert d['verdict'] == dropout_overhead.verdict(d['median'])
    assert d['dropout_call_share']['calls_per_step'] == 34  # 17 fused dropouts, forward and backward
    md = (tmp_path / 'dropout_overhead_cpu.md').read_text()
    assert f"**Verdict against the 3 % target: {d['verdict']}**" in md and '| mask_only |' in md
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('dropfix_step_overhead=') and last.endswith('verdict=' + d['verdict'].replace(' ', '_'))
    with pytest.raises(SystemExit):  # too few rounds for an interval
        dropout_overhead.main(['--rounds', '5', '--out-dir', str(tmp_path)])
    with pytest.raises(ValueError, match='unknown dropout arms'):
        throughput.measure_dropfix_time(32, 2, torch.device('cpu'), 1, arms=('dropfix_torch',))


def test_cpu_allocator_main(tmp_path):
    """Fresh processes per arm: the kept arm reports that the setting applied (glibc here) and faults far fewer
    pages per step than glibc's defaults once warmed up; the report has both arms. 64 px, batch 8 and two warm-up
    steps: at 32 px, batch 2 the activations are small enough for glibc's own heap, and the counts are noise."""
    cpu_allocator.main(['--pairs', '1', '--steps', '4', '--warmup', '2', '--size', '64', '--batch', '8',
                        '--out', str(tmp_path / 'ca')])
    res = json.loads((tmp_path / 'ca.json').read_text())
    assert res['meta']['command'].startswith('python benchmarks/cpu_allocator.py')
    a = res['allocator']['arms']
    assert a['kept']['applied'] == [True] and a['plain']['applied'] == [False]
    assert a['kept']['faults_per_step'][0] * 3 < a['plain']['faults_per_step'][0]
    assert len(res['allocator']['speedup_per_pair']) == 1 and res['allocator']['speedup_ci95'] is None
    assert '| kept |' in (tmp_path / 'ca.md').read_text()


def test_write_result_stamps_provenance(tmp_path):
    out = _common.write_result(tmp_path / 'r.json', {'x': torch.tensor(1.5), 'nan': float('nan')}, command='python x',
                               seeds=[3], wall_time_s=0.5, label='smoke')
    on_disk = json.loads((tmp_path / 'r.json').read_text())
    assert on_disk == out and on_disk['x'] == 1.5 and on_disk['nan'] is None
    assert on_disk['meta']['label'] == 'smoke' and on_disk['meta']['machine']['cpu_count'] >= 1


# ---------------------------------------------------------------- module_tests.py

def test_module_tests_main_figures(tmp_path):
    r = module_tests.main(['--part', 'figures', '--n', '4000', '--seeds', '0', '1', '--fig1-points', '3',
                           '--fig2-points', '3', '--out-dir', str(tmp_path), '--name', 'mt'])
    _check_meta(r, tmp_path / 'mt.json')
    for suffix in ('_fig1.png', '_fig2.png', '.md'):
        assert (tmp_path / f'mt{suffix}').stat().st_size > 0
    f = r['figures']
    assert f['fig1']['w_mean'] == [-0.02, 0.0, 0.02] and len(f['fig1']['after']) == 2
    s = f['summary']
    assert s['fig1_after_at_0'] > s['fig1_after_at_+0.02'] + 0.05 and s['fig1_after_at_0'] > s['fig1_after_at_-0.02'] + 0.05
    assert 0.36 < s['fig1_before_min'] <= s['fig1_before_max'] < 0.47
    assert 0.83 < s['fig2_branch_min'] <= s['fig2_branch_max'] < 0.89
    assert s['fig2_residual_at_0.2'] < s['fig2_residual_at_5'] < 1.0
    md = (tmp_path / 'mt.md').read_text()
    assert 'Fig. 1' in md and '0.87 / 0.94 / 0.996' in md
    # each part records its own seeds; meta keeps the union of them
    assert r['seeds'] == {'figures': [0, 1]} and r['meta']['seeds'] == [0, 1]
    assert 'seeds [0, 1] (Figures 1 and 2)' in md and 'real-network' not in md


def test_module_tests_main_real_network_tiny(tmp_path, shared_path):
    shared_path('data', 'pets370')
    r = module_tests.main(['--part', 'real', '--model', 'resnet10t', '--num-images', '2', '--img-size', '64',
                           '--num-masks', '2', '--out-dir', str(tmp_path), '--name', 'mtr'])
    _check_meta(r, tmp_path / 'mtr.json')
    rn = r['real_network']
    assert len(rn['settings']['image_names']) == 2 and all(n.endswith('.jpg') for n in rn['settings']['image_names'])
    names = [v['name'] for v in rn['variants']]
    assert names[0] == 'none' and 'head:before_pool' in names and 'recommended+before_pool' in names
    for v in rn['variants']:
        assert set(v['bn_ratio']) == set(rn['settings']['bn_layers'])
        assert all(math.isfinite(x) and x > 0 for x in v['bn_ratio'].values())
        assert 0.0 <= v['top1_flip_rate'] <= 1.0
    none = rn['variants'][0]
    assert none['bn_shifted_count'] == 0 and none['logit_var_over_masks'] == 0.0
    assert (tmp_path / 'mtr_bn_shift.png').stat().st_size > 0 and (tmp_path / 'mtr_logit_var.png').stat().st_size > 0
    assert '| head:before_pool |' in (tmp_path / 'mtr.md').read_text()
    assert r['seeds'] == {'real_network': [0]} and 'seeds [0] (real-network masks)' in (tmp_path / 'mtr.md').read_text()


# ---------------------------------------------------------------- cifar10.py

def test_augment_is_a_padded_crop_or_its_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 2 * 3 * 8 * 8 + 1).reshape(2, 3, 8, 8).to(torch.uint8)
    out = cifar10.augment(x.repeat(16, 1, 1, 1), g, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).repeat(16, 1, 1, 1)
    flips = 0
    for i in range(len(out)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i].flip(-1), w) for w in windows)
        assert plain or flipped, i
        flips += int(flipped and not plain)
    assert 4 <= flips <= 28  # about half of 32 flipped
    assert torch.equal(cifar10.augment(x, torch.Generator().manual_seed(1), pad=0).sum(), x.sum())


def test_milestones_scale_the_paper_schedule():
    assert cifar10.milestones(164) == [82, 123]
    assert cifar10.milestones(2) == [1, 2]


def test_cifar10_main_tiny(tmp_path, shared_path):
    shared_path('data', 'cifar10', 'cifar10-jpeg.npz')
    r = cifar10.main(['--profile', 'cpu-smoke', '--epochs', '2', '--train-subset', '32', '--test-subset', '32',
                      '--seeds', '0', '1', '--variants', 'recommended+before_pool', '--out-dir', str(tmp_path),
                      '--name', 'c10'])
    _check_meta(r, tmp_path / 'c10.json')
    assert 'smoke' in r['meta']['label'] and 'JPEG' in r['data'] and not r['incomplete']
    assert r['settings']['n_train'] == 32 and r['settings']['n_test'] == 32
    assert len(r['runs']) == 4
    for run in r['runs']:
        assert 0.0 <= run['test_acc'] <= 1.0 and math.isfinite(run['final_train_loss'])
        assert run['steps'] == 2 and [h['epoch'] for h in run['history']] == [1, 2]
        assert run['history'][-1]['lr'] == pytest.approx(0.001)  # two x0.1 steps after 2 epochs
    rows = r['summary']['preresnet20_cifar']
    assert set(rows) == {'none', 'recommended+before_pool'}
    d = rows['recommended+before_pool']['diff_vs_none']
    assert d['n'] == 2 and d['ci_low'] <= d['mean'] <= d['ci_high']
    assert d['mean'] == pytest.approx(rows['recommended+before_pool']['mean'] - rows['none']['mean'])
    # same seed, same init and batches: the no-dropout runs are reproducible bit for bit
    again = cifar10.train_run('preresnet20_cifar', 'none', 0, cifar10.load_cifar10(None, 32, 32), epochs=2)
    assert again['test_acc'] == r['runs'][0]['test_acc'] and again['final_train_loss'] == r['runs'][0]['final_train_loss']
    md = (tmp_path / 'c10.md').read_text()
    assert 'lossy q75 JPEG' in md and 'smoke' in md and '| recommended+before_pool |' in md
    assert (tmp_path / 'c10.png').stat().st_size > 0


def test_cifar10_merge_equals_one_call_and_refuses_unpairable_files(tmp_path, shared_path):
    shared_path('data', 'cifar10', 'cifar10-jpeg.npz')
    common = ['--profile', 'cpu-smoke', '--epochs', '1', '--train-subset', '32', '--test-subset', '32',
              '--variants', 'head:before_pool', '--out-dir', str(tmp_path)]
    joint = cifar10.main(common + ['--seeds', '0', '1', '--name', 'joint'])
    for seed in (0, 1):
        cifar10.main(common + ['--seeds', str(seed), '--name', f's{seed}'])
    merged = cifar10.main(['--merge', str(tmp_path / 's0.json'), str(tmp_path / 's1.json'), '--out-dir',
                           str(tmp_path), '--name', 'merged', '--note', 'two calls'])
    # seeds run in two calls and merged give the same summary as one call with both seeds (runs are deterministic)
    assert merged['summary'] == joint['summary'] and not merged['incomplete']
    assert [s['file'] for s in merged['sources']] == ['s0.json', 's1.json'] and merged['meta']['seeds'] == [0, 1]
    assert merged['meta']['wall_time_s'] == pytest.approx(sum(s['wall_time_s'] for s in merged['sources']))
    md = (tmp_path / 'merged.md').read_text()
    assert 'source `s1.json`' in md and 'note: two calls' in md and (tmp_path / 'merged.png').stat().st_size > 0
    with pytest.raises(SystemExit, match='more than one file'):
        cifar10.merge_results([tmp_path / 's0.json', tmp_path / 'joint.json'])
    cifar10.main(common[:3] + ['2'] + common[4:] + ['--seeds', '1', '--name', 'long'])
    with pytest.raises(SystemExit, match='cannot be paired'):
        cifar10.merge_results([tmp_path / 's0.json', tmp_path / 'long.json'])
    with pytest.raises(SystemExit, match='cannot read'):
        cifar10.merge_results([tmp_path / 's0.json', tmp_path / 'missing.json'])


def test_cifar10_budget_guard_and_calibration(tmp_path, shared_path):
    shared_path('data', 'cifar10', 'cifar10-jpeg.npz')
    assert cifar10.epochs_for_budget(0.01, 100, 2, 1e6, 2, 7) == 7       # a huge budget hits the cap
    assert cifar10.epochs_for_budget(0.01, 100, 2, 1e-3, 2, 7) == 2      # a tiny one hits the floor
    assert cifar10.epochs_for_budget(0.01, 100, 2, 11.0, 2, 70) == 5     # 2 runs x 5 epochs x 1.1 s = 11 s
    # the gpu profile's own path (auto epochs from timed steps, budget guard) on CPU with a budget too small
    # for even one run: the epochs fall to the profile's floor, one run is made, the rest is reported as not run
    r = cifar10.main(['--profile', 'gpu', '--device', 'cpu', '--models', 'preresnet20_cifar', '--variants',
                      'head:before_pool', '--train-subset', '32', '--test-subset', '32', '--seeds', '0',
                      '--calib-steps', '2', '--time-budget-s', '0.001', '--out-dir', str(tmp_path), '--name', 'c10b'])
    assert r['calibration']['preresnet20_cifar']['epochs'] == cifar10.PROFILES['gpu']['min_epochs']
    assert r['incomplete'] and len(r['runs']) == 1 and r['not_run'] == ['preresnet20_cifar/head:before_pool/seed0']
    assert r['runs'][0]['epochs'] == cifar10.PROFILES['gpu']['min_epochs'] and not r['settings']['amp_bf16']
    assert 'incomplete' in (tmp_path / 'c10b.md').read_text()


def test_data_paths_smoke_pairs_the_arms_and_skips_finished_runs(tmp_path, shared_path):
    shared_path('data', 'pets370')
    shared_path('weights', 'resnet50_keras_in1k')
    out = tmp_path / 'dp'
    argv = ['--profile', 'smoke', '--jobs', '2', '--work-dir', str(tmp_path / 'work'), '--out', str(out),
            '--arms', 'pil', 'fast', 'pil_cached_pixels']
    assert data_paths.main(argv) == 0
    r = json.loads(out.with_suffix('.json').read_text())
    _check_meta(r, out.with_suffix('.json'))
    assert r['meta']['label'].startswith('smoke') and r['baseline'] == 'pil'
    assert set(r['variants']) == {'pil', 'fast', 'pil_cached_pixels'} and r['comparisons']['fast']['n'] == 1
    arms = ('pil', 'fast', 'pil_cached_pixels')
    cfgs = {arm: json.loads((tmp_path / 'work' / arm / 'seed_0' / 'config.json').read_text()) for arm in arms}
    assert cfgs['pil']['fast_data'] is False and cfgs['fast']['fast_data'] is True
    # the arms differ in the data path only
    assert {k for k in cfgs['pil'] if cfgs['pil'][k] != cfgs['fast'][k]} == {'fast_data', 'output_dir'}
    assert {k for k in cfgs['pil'] if cfgs['pil'][k] != cfgs['pil_cached_pixels'][k]} == {'output_dir'}
    # ... and the diagnostic arm really trained on other pixels (same config, same seed, another loss)
    losses = {arm: json.loads((tmp_path / 'work' / arm / 'seed_0' / 'metrics.json').read_text())['history'][0]
              ['train_loss'] for arm in arms}
    assert losses['pil_cached_pixels'] != losses['pil']
    pil = r['variants']['pil']['seeds']['0']['top1']
    assert r['comparisons']['fast']['top1']['mean'] == pytest.approx(r['variants']['fast']['seeds']['0']['top1'] - pil)
    assert '| fast |' in out.with_suffix('.md').read_text() and out.with_suffix('.png').stat().st_size > 0
    # finished runs are not trained again: the second call only reports
    stamp = (tmp_path / 'work' / 'pil' / 'seed_0' / 'metrics.json').stat().st_mtime_ns
    assert data_paths.main(argv) == 0
    assert (tmp_path / 'work' / 'pil' / 'seed_0' / 'metrics.json').stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- pets_fewshot.py

def test_pets_fewshot_folds_in_parallel_pair_by_fold_and_resume(tmp_path, shared_path):
    shared_path('data', 'pets370')
    shared_path('weights', 'resnet50_keras_in1k')
    work, out = tmp_path / 'work', tmp_path / 'pf'
    argv = ['--profile', 'smoke', '--jobs', '2', '--work-dir', str(work), '--out', str(out)]
    assert pets_fewshot.main(argv) == 0
    r = json.loads(out.with_suffix('.json').read_text())
    _check_meta(r, out.with_suffix('.json'))
    assert r['meta']['label'].startswith('smoke') and r['setup']['jobs'] == 2 and 'failed_folds' not in r['setup']
    # one process per fold, each with its own log; the unit is (fold, seed): two folds x seed 0
    assert sorted(p.name for p in work.glob('fold_*.log')) == ['fold_0.log', 'fold_1.log']
    assert r['comparisons']['recommended']['n'] == 2
    assert sorted(r['variants']['none']['seeds']) == ['0', '1000']
    # the folds hold different validation images, together all 370 exactly once
    vals = [sorted(q.name for q in (work / 'folds' / f'fold_{k}' / 'val').rglob('*.jpg')) for k in range(2)]
    assert len(vals[0]) + len(vals[1]) == 370 and not set(vals[0]) & set(vals[1])
    cfg = json.loads((work / 'fold_1' / 'runs' / 'recommended' / 'seed_0' / 'config.json').read_text())
    assert cfg['data_dir'].endswith('fold_1') and cfg['mixed_precision'] == 'no' and cfg['img_size'] == 48
    # a second call finds every run finished and only reports
    stamp = (work / 'fold_0' / 'runs' / 'none' / 'seed_0' / 'metrics.json').stat().st_mtime_ns
    assert pets_fewshot.main(argv) == 0
    assert (work / 'fold_0' / 'runs' / 'none' / 'seed_0' / 'metrics.json').stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):
        pets_fewshot.main(['--profile', 'smoke', '--work-dir', str(work), '--train-fold', '2'])


# ---------------------------------------------------------------- throughput.py

def test_throughput_smoke_measures_both_paths_and_the_dropout(tmp_path, shared_path, capsys):
    shared_path('data', 'pets370')
    throughput.main(['--smoke', '--out-dir', str(tmp_path), '--dropfix-compile', 'eager'])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads((tmp_path / 'throughput_smoke.json').read_text())
    h = r['headline']
    # the contract of the last line: ratios toolkit / baseline and the dropout overhead, as stored
    assert last == (f"loader_speedup={h['loader_speedup']:.2f} step_speedup={h['step_speedup']:.2f} "
                    f"dropfix_step_overhead={h['dropfix_step_overhead']:.4f}")
    assert r['meta']['command'].startswith('python benchmarks/throughput.py') and r['n_source_images'] == 370
    size = r['sizes'][0]
    lo = size['loader']
    rates = {p: lo[p]['images_per_s']['mean'] for p in ('baseline', 'toolkit')}
    assert lo['speedup'] == pytest.approx(rates['toolkit'] / rates['baseline'])
    assert lo['baseline']['epoch_images'] == lo['toolkit']['epoch_images'] == 16
    st = size['steps']['resnet50']
    assert st['baseline']['images_per_s']['n'] == st['toolkit']['images_per_s']['n'] == 1
    assert st['train_gflop_per_image'] > 0 and st['toolkit']['memory']['peak_mem'] > 0
    # the smoke profile also runs the --cache-on-device path (loader of indices, batches gathered from memory)
    assert lo['toolkit_device']['epoch_images'] == 16 and st['toolkit_device']['images_per_s']['mean'] > 0
    assert st['device_speedup'] == pytest.approx(st['toolkit_device']['images_per_s']['mean']
                                                 / st['baseline']['images_per_s']['mean'])
    d = r['dropfix']
    # torch's kernel keeps a mask per dropout for backward; the fused kernel recomputes it from the seed
    saved = {k: d['memory'][k]['saved_activation_bytes'] for k in ('no_dropout', 'dropfix', 'dropfix_torch_kernel')}
    assert saved['dropfix'] == saved['no_dropout'] < saved['dropfix_torch_kernel']
    assert d['dropout_kernel'] == 'fused' and '`fused`' in (tmp_path / 'throughput_smoke.md').read_text()
    share = d['dropout_call_share']  # resnet50: 17 dropouts (16 blocks + head), each forward and backward
    assert share['calls_per_step'] == 34 and share['cpu']['n'] == 3 and 0 < share['wall']['mean'] < 1
    assert d['compiled']['compile_backend'] == 'eager' and d['compiled']['overhead_per_pair']['n'] == 1
    # on CPU also torch's own dropout kernel and the mask-only floor, each against the same no-dropout steps
    assert set(d['arms']) == {'dropfix_torch_kernel', 'mask_only'} and d['compiled']['arms'] == {}
    assert all(a['overhead_per_pair']['n'] == 1 for a in d['arms'].values())
    md = (tmp_path / 'throughput_smoke.md').read_text()
    assert "torch.compile(backend='eager')" in md and '| dropfix |' in md and '| mask_only |' in md
    assert r['keep_freed_memory'] is False and d['memory']['dropfix']['keep_freed_memory'] is False
    assert 'freed memory kept in the process (finetune/cpumem.py, both arms and every memory probe): False' in md


def test_throughput_memory_probe_keeps_freed_memory_when_asked():
    """--keep-freed-memory reaches the fresh processes that measure peak memory, as `finetune train` would set it."""
    cfg = {'kind': 'dropfix', 'dropout': True, 'fast_dropout': None, 'size': 32, 'batch': 2, 'model': 'resnet18'}
    kept, default = throughput.run_children([dict(cfg, keep=True), cfg])
    assert kept['keep_freed_memory'] is (sys.platform == 'linux') and default['keep_freed_memory'] is False
    assert kept['peak_mem'] > 0 and default['peak_mem'] > 0


# ---------------------------------------------------------------- compare_grids.py

def test_compare_grids_pairs_units_and_spots_identical_runs(tmp_path):
    """The same variant in two grids, paired by unit; runs that trained identically are flagged (their speed may
    differ), units missing from one grid are left out, and a missing file is a clear error."""
    def grid(rec_top1, speed):
        seeds = lambda top1: {str(u): {'top1': t, 'nll': 1.0, 'images_per_second': speed}
                              for u, t in zip((0, 1000, 2000), top1)}
        return {'meta': {'seeds': [0], 'date_utc': '2026-01-02T03:04:05Z',
                         'machine': {'processor': 'x86_64', 'cpu_count': 2, 'cuda_device': None, 'torch': '2.x'}},
                'variants': {'none': {'seeds': seeds([0.5, 0.6, 0.7])}, 'recommended': {'seeds': seeds(rec_top1)}}}
    a, b = tmp_path / 'a.json', tmp_path / 'b.json'
    a.write_text(json.dumps(grid([0.55, 0.65, 0.70], 12.0)))
    b_grid = grid([0.50, 0.60, 0.70], 10.0)
    b_grid['variants']['recommended']['seeds']['3000'] = {'top1': 0.9, 'nll': 1.0}  # not in a: not paired
    b.write_text(json.dumps(b_grid))
    compare_grids.main([str(a), str(b), '--labels', 'fast', 'torch', '--out', str(tmp_path / 'cmp')])
    r = json.loads((tmp_path / 'cmp.json').read_text())
    assert r['variants']['none']['identical'] is True and r['variants']['none']['top1']['mean'] == 0
    rec = r['variants']['recommended']
    assert rec['identical'] is False and rec['units'] == ['0', '1000', '2000']
    assert rec['top1']['mean'] == pytest.approx(0.1 / 3) and rec['images_per_second']['mean'] == pytest.approx(2.0)
    md = (tmp_path / 'cmp.md').read_text()
    assert '| recommended | 3 | False | +3.33 [' in md
    # where and when each grid was measured (the comparison itself is computed anywhere)
    assert f"- fast: `{a}`, dated 2026-01-02T03:04:05Z (UTC), x86_64 (2 cores), torch 2.x" in md
    assert 'regenerated' not in md
    # the same comparison again into the same files: it says that it regenerated them, and what they were dated
    compare_grids.main([str(a), str(b), '--labels', 'fast', 'torch', '--out', str(tmp_path / 'cmp')])
    again = json.loads((tmp_path / 'cmp.json').read_text())
    assert again['regenerated'] == {'previous_date_utc': r['meta']['date_utc']}
    assert again['variants'] == r['variants']
    assert f"(regenerated from the same source files; the previous version was dated {r['meta']['date_utc']})" in (
        tmp_path / 'cmp.md').read_text()
    with pytest.raises(SystemExit, match='no such results file'):
        compare_grids.main([str(tmp_path / 'missing.json'), str(b), '--out', str(tmp_path / 'x')])


# ---------------------------------------------------------------- dropout_speed.py

def test_dropout_speed_times_every_kernel_at_every_shape(tmp_path):
    dropout_speed.main(['--repeats', '2', '--out', str(tmp_path / 'ds')])
    r = json.loads((tmp_path / 'ds.json').read_text())
    assert r['meta']['command'].startswith('python benchmarks/dropout_speed.py') and r['dropout_kernel'] == 'fused'
    assert set(r['timings']) == {str(torch.get_num_threads()), '1'}
    for passes in r['timings'].values():
        assert set(passes) == {'forward', 'forward_backward'}
        for shapes in passes.values():
            assert len(shapes) == 4
            for ks in shapes.values():
                assert set(ks) == {'torch', 'fused', 'fused_inplace', 'torch_ops', 'mask_multiply', 'plain_multiply',
                                   'add', 'fused_inplace_then_add', 'fused_add_inplace', 'add_relu',
                                   'fused_add_relu_inplace', 'relu', 'relu_then_fused', 'fused_relu_inplace'}
                assert all(k['n'] == 2 and k['median'] > 0 for k in ks.values())
    assert '| 16x256x32x32 |' in (tmp_path / 'ds.md').read_text()


def test_dropout_cost_of_a_preactivation_model():
    """--dropfix-model: the same arms on another timm model; a pre-activation resnetv2_50 runs its 16 branch
    dropouts fused with the BN's ReLU, each timed in forward and backward, plus the head's dropout."""
    d = throughput.measure_dropfix_time(64, 2, torch.device('cpu'), 1, model='resnetv2_50')
    assert d['model'] == 'resnetv2_50' and d['dropout_kernel'] == 'fused'
    assert set(d['arms']) == {'dropfix_torch_kernel', 'mask_only'}
    assert d['dropout_call_share']['calls_per_step'] == 34


def test_memory_probe_rounds_report_the_median_and_every_run():
    runs = [{'peak_mem': 900, 'saved': 1}, {'peak_mem': 850, 'saved': 2}, {'peak_mem': 1000, 'saved': 3}]
    assert throughput.median_probe(runs) == {'peak_mem': 900, 'saved': 1, 'peak_mem_runs': [900, 850, 1000]}
    assert throughput.median_probe(runs[:2])['peak_mem'] == 850  # even count: the lower middle
    assert throughput.PROFILES['quick']['memory_repeats'] == throughput.PROFILES['default']['memory_repeats'] == 3


# ---------------------------------------------------------------- bad input: refused before any work

def _refusal(main, argv, capsys) -> str:
    """The one-line message with which ``main(argv)`` refuses to start (argparse's on stderr, or the exit's own)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return f'{e.value.code} {err}'


def test_check_output_path_refuses_a_file_where_a_folder_must_go(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert _common.check_output_path(tmp_path / 'new' / 'deeper', '--out-dir') == tmp_path / 'new' / 'deeper'
    assert _common.check_output_path(tmp_path / 'prefix', '--out', prefix=True) == tmp_path / 'prefix'
    with pytest.raises(SystemExit, match=r'--out-dir .*file exists and is not a folder'):
        _common.check_output_path(blocker / 'sub', '--out-dir')
    with pytest.raises(SystemExit, match='not a folder'):
        _common.check_output_path(blocker / 'sub' / 'name', '--out', prefix=True)
    assert not (tmp_path / 'new').exists()  # checked, not created


def _every_script(out: Path, work: Path) -> list[tuple]:
    """(main, argv) of every script, writing to ``out`` (a folder, or a prefix inside it) and ``work``."""
    return [
        (cifar10.main, ['--profile', 'cpu-smoke', '--out-dir', str(out)]),
        (compare_grids.main, ['a.json', 'b.json', '--out', str(out / 'cmp')]),
        (cpu_allocator.main, ['--out', str(out / 'ca')]),
        (data_paths.main, ['--profile', 'smoke', '--out', str(out / 'dp'), '--work-dir', str(work)]),
        (dropout_overhead.main, ['--out-dir', str(out)]),
        (dropout_speed.main, ['--out', str(out / 'ds')]),
        (module_tests.main, ['--out-dir', str(out)]),
        (pets_fewshot.main, ['--profile', 'smoke', '--out', str(out / 'pf'), '--work-dir', str(work)]),
        (throughput.main, ['--smoke', '--out-dir', str(out)]),
    ]


def test_every_script_checks_its_output_folders_before_measuring(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    for main, argv in _every_script(blocker / 'out', tmp_path / 'work'):
        assert 'not a folder' in _refusal(main, argv, capsys), main.__module__
    for main, argv in _every_script(tmp_path / 'out', blocker / 'work'):
        if '--work-dir' in argv:
            assert '--work-dir' in _refusal(main, argv, capsys), main.__module__
    assert not (tmp_path / 'work').exists()


def test_missing_shared_folder_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('TIMM_DROPFIX_SHARED', str(tmp_path / 'nonexistent'))
    out, work = tmp_path / 'out', tmp_path / 'work'
    for main, argv in [
            (cifar10.main, ['--profile', 'cpu-smoke', '--out-dir', str(out)]),
            (pets_fewshot.main, ['--profile', 'smoke', '--out', str(out / 'pf'), '--work-dir', str(work)]),
            (data_paths.main, ['--profile', 'smoke', '--out', str(out / 'dp'), '--work-dir', str(work)]),
            (module_tests.main, ['--part', 'real', '--out-dir', str(out)]),
            (throughput.main, ['--smoke', '--out-dir', str(out)])]:
        assert 'set TIMM_DROPFIX_SHARED' in _refusal(main, argv, capsys), main.__module__
    # a shared folder without the data set a script needs: named, with the variable to fix
    (tmp_path / 'empty').mkdir()
    monkeypatch.setenv('TIMM_DROPFIX_SHARED', str(tmp_path / 'empty'))
    assert 'data/cifar10/cifar10-jpeg.npz' in _refusal(cifar10.main, ['--profile', 'cpu-smoke', '--out-dir', str(out)],
                                                       capsys)
    assert not out.exists() and not work.exists()


def test_unknown_names_are_refused_at_parse_time(tmp_path, capsys):
    out = tmp_path / 'out'
    assert "'bogus_model' is not a timm model" in _refusal(
        dropout_overhead.main, ['--model', 'bogus_model', '--out-dir', str(out)], capsys)
    assert "'bogus_model' is not a timm model" in _refusal(
        module_tests.main, ['--part', 'real', '--model', 'bogus_model', '--out-dir', str(out)], capsys)
    assert "--dropfix-model 'bogus_model'" in _refusal(
        throughput.main, ['--quick', '--dropfix-model', 'bogus_model', '--out-dir', str(out)], capsys)
    assert "--dropfix-compile 'bogus'" in _refusal(
        throughput.main, ['--quick', '--dropfix-compile', 'bogus', '--out-dir', str(out)], capsys)
    msg = _refusal(pets_fewshot.main, ['--profile', 'smoke', '--variants', 'none', 'bogus', '--work-dir',
                                       str(tmp_path / 'work'), '--out', str(out / 'pf')], capsys)
    assert '--variants bogus: unknown' in msg and 'recommended' in msg
    assert "must include 'none'" in _refusal(pets_fewshot.main, ['--profile', 'smoke', '--variants', 'recommended'],
                                             capsys)
    assert 'not in profile cpu-smoke' in _refusal(cifar10.main, ['--profile', 'cpu-smoke', '--models', 'bogus'],
                                                  capsys)
    assert not out.exists() and not (tmp_path / 'work').exists()


def test_results_of_another_kind_are_named_with_what_they_lack(tmp_path, capsys):
    other = tmp_path / 'other.json'
    other.write_text(json.dumps({'meta': {'seeds': [0]}, 'sizes': []}))
    grid = tmp_path / 'grid.json'
    grid.write_text(json.dumps({'variants': {'none': {'seeds': {'0': {'top1': 0.5}}}}}))
    msg = _refusal(compare_grids.main, [str(grid), str(other), '--out', str(tmp_path / 'cmp')], capsys)
    assert f'{other}: not a grid result' in msg and "'variants'" in msg
    (tmp_path / 'bad.json').write_text('{not json')
    assert 'cannot read it as JSON' in _refusal(
        compare_grids.main, [str(grid), str(tmp_path / 'bad.json'), '--out', str(tmp_path / 'cmp')], capsys)
    msg = _refusal(cifar10.main, ['--merge', str(other), str(other), '--out-dir', str(tmp_path)], capsys)
    assert f'{other} is not a cifar10.py result' in msg and 'settings' in msg and 'runs' in msg
    assert not list(tmp_path.glob('cmp*')) and not list(tmp_path.glob('cifar10_*'))


@pytest.mark.parametrize('main, argv, expected', [
    (pets_fewshot.main, ['--profile', 'smoke', '--folds', '0'], '--folds must be 2..10'),
    (pets_fewshot.main, ['--profile', 'smoke', '--folds', '11'], '--folds must be 2..10'),
    (pets_fewshot.main, ['--profile', 'smoke', '--seeds', '0', '1000'], '--seeds must be distinct and in 0..999'),
    (pets_fewshot.main, ['--profile', 'smoke', '--seeds', '1', '1'], '--seeds must be distinct'),
    (data_paths.main, ['--profile', 'smoke', '--threads', '0'], '--threads must be >= 1'),
    (data_paths.main, ['--profile', 'smoke', '--seeds', '3', '3'], '--seeds must be distinct'),
    (dropout_overhead.main, ['--batch', '1'], '--batch must be at least 2: training BatchNorm'),
    (dropout_overhead.main, ['--size', '16'], '--size must be at least 32'),
    (cpu_allocator.main, ['--batch', '1'], '--batch must be at least 2: training BatchNorm'),
    (cpu_allocator.main, ['--warmup', '-1'], '--warmup at least 0'),
    (dropout_speed.main, ['--repeats', '0'], '--repeats must be at least 2'),
    (dropout_speed.main, ['--repeats', '1'], '--repeats must be at least 2'),
    (cifar10.main, ['--profile', 'cpu-smoke', '--epochs', '0'], '--epochs must be at least 1'),
    (cifar10.main, ['--profile', 'cpu-smoke', '--train-subset', '129'], 'leaves a batch of one image'),
    (cifar10.main, ['--profile', 'cpu-smoke', '--train-subset', '1'], 'leaves a batch of one image'),
    (cifar10.main, ['--profile', 'cpu-smoke', '--seeds', '0', '0'], '--seeds must be distinct'),
    (cifar10.main, ['--profile', 'cpu-smoke', '--head-rate', '1'], '--head-rate must be in [0, 1)'),
    (cifar10.main, ['--profile', 'gpu', '--time-budget-s', '0'], '--time-budget-s must be more than 0'),
    (cifar10.main, ['--profile', 'cpu-smoke', '--device', 'bogus'], "--device 'bogus' is not a torch device"),
    (module_tests.main, ['--part', 'figures', '--num-masks', '1'], '--num-masks must be at least 2'),
    (module_tests.main, ['--part', 'figures', '--fig1-points', '4'], '--fig1-points must be odd'),
    (module_tests.main, ['--part', 'figures', '--n', '1'], '--n must be at least 2'),
    (module_tests.main, ['--part', 'figures', '--branch-rate', '-0.1'], '--branch-rate must be in [0, 1)'),
    (throughput.main, ['--quick', '--workers', '-1'], '--workers must be 0 or more'),
])
def test_bad_counts_are_refused_before_any_work(main, argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working folder either
    assert expected in _refusal(main, argv, capsys)
    assert not list(tmp_path.iterdir())


def test_pets_fewshot_run_takes_the_folds_it_is_given(tmp_path, monkeypatch):
    """``folds=0`` used to fall back to the profile's folds (``0 or p['folds']``); now only ``None`` does."""
    asked = []

    def make_folds(data_dir, work_dir, folds):
        asked.append(folds)
        raise RuntimeError('stop before training')
    monkeypatch.setattr(pets_fewshot, 'make_folds', make_folds)
    for folds in (0, None):
        with pytest.raises(RuntimeError, match='stop before training'):
            pets_fewshot.run('smoke', tmp_path / 'w', tmp_path / 'o', tmp_path, tmp_path, folds=folds)
    assert asked == [0, pets_fewshot.PROFILES['smoke']['folds']]


def test_gpu_session_prints_its_usage_instead_of_running(tmp_path):
    import subprocess
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_session.sh'
    env = {'PATH': '/usr/bin:/bin', 'OUT': str(tmp_path / 'out')}
    for flag in ('-h', '--help'):
        done = subprocess.run(['bash', str(script), flag], capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 0 and done.stdout.startswith('Everything this project measures on a lent GPU')
        assert 'bash benchmarks/gpu_session.sh' in done.stdout and 'set -uo' not in done.stdout
    done = subprocess.run(['bash', str(script), '--gpu'], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2 and "unknown argument '--gpu'" in done.stderr and 'Everything' in done.stderr
    assert not (tmp_path / 'out').exists()
