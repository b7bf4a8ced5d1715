"""finetune bench: a tiny grid, its summary statistics, and resuming without repeating finished runs."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from finetune.bench import VARIANTS, paired_difference, results_markdown, run_bench
from finetune.stats import student_t_ppf
from finetune.config import TrainConfig
from finetune.errors import FinetuneError


def test_paired_difference_t_interval():
    d = paired_difference({0: 0.70, 1: 0.74, 2: 0.75}, {0: 0.68, 1: 0.70, 2: 0.74})
    diffs = [0.02, 0.04, 0.01]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d['mean'] == pytest.approx(mean) and d['std'] == pytest.approx(sd)
    t2 = 4.302653  # t_{0.975, 2}
    assert d['ci95'] == pytest.approx([mean - t2 * sd / math.sqrt(3), mean + t2 * sd / math.sqrt(3)])
    assert paired_difference({0: 1.0}, {1: 1.0})['n'] == 0  # no common seed, no comparison
    assert student_t_ppf(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert student_t_ppf(0.975, 22) == pytest.approx(2.074, abs=1e-3)
    assert student_t_ppf(0.975, 1000) == pytest.approx(1.962, abs=1e-3)


def test_bench_grid_and_resume(tiny_pets, tmp_path):
    # timm's 0.4M-parameter test_resnet (BasicBlock + Bottleneck stages) keeps 6 runs cheap
    base = TrainConfig(model='test_resnet', data_dir=str(tiny_pets), output_dir=str(tmp_path / 'bench'), img_size=32,
                       epochs=1, batch_size=16, lr=3e-3, backbone_lr_mult=1.0, log_with='none')
    variants = ['timm_default', 'recommended']
    res = run_bench(base, variants, seeds=[0, 1])
    out = tmp_path / 'bench'
    saved = json.loads((out / 'results.json').read_text())
    assert saved == json.loads(json.dumps(res))
    assert set(saved['variants']) == set(variants) and saved['baseline'] == 'timm_default'
    for name in variants:
        seeds = saved['variants'][name]['seeds']
        assert set(seeds) == {'0', '1'}
        run_cfg = json.loads((out / 'runs' / name / 'seed_0' / 'config.json').read_text())
        for k, v in VARIANTS[name][0].items():
            assert run_cfg[k] == v
    c = saved['comparisons']['recommended']['top1']
    seeds_of = {name: saved['variants'][name]['seeds'] for name in variants}
    per_seed = [seeds_of['recommended'][s]['top1'] - seeds_of['timm_default'][s]['top1'] for s in ('0', '1')]
    assert c['n'] == 2 and c['diffs'] == pytest.approx(per_seed)
    mean, sd = sum(per_seed) / 2, abs(per_seed[0] - per_seed[1]) / math.sqrt(2)  # sample std of two values
    half = 12.7062 * sd / math.sqrt(2)  # Student's t, 1 degree of freedom, 97.5 %
    assert c['mean'] == pytest.approx(mean)
    assert c['ci95'] == pytest.approx([mean - half, mean + half], rel=1e-5, abs=1e-9)
    md = (out / 'results.md').read_text()
    assert '| recommended |' in md and '(baseline)' in md and '+-' in md
    assert (out / 'results.png').stat().st_size > 1000

    # resume: one run "crashed" after its checkpoint (no metrics.json); a new seed was added
    done = out / 'runs' / 'recommended' / 'seed_0' / 'metrics.json'
    mtime = done.stat().st_mtime_ns
    (out / 'runs' / 'recommended' / 'seed_1' / 'metrics.json').unlink()
    shutil.rmtree(out / 'runs' / 'recommended' / 'seed_1' / 'model')
    res2 = run_bench(base, variants[1:], seeds=[0, 1, 2], baseline='recommended')
    assert done.stat().st_mtime_ns == mtime  # finished runs are not repeated
    assert res2['variants']['recommended']['seeds']['1'] == res['variants']['recommended']['seeds']['1']
    assert res2['variants']['recommended']['n'] == 3 and res2['comparisons'] == {}
    assert '(baseline)' in results_markdown(res2)

    # other options than the saved runs': refused before anything runs, naming the runs and the options
    results = (out / 'results.json').read_bytes()
    with pytest.raises(FinetuneError, match=r"(?s)other options.*recommended seed 0: epochs 1 \(now 2\)"):
        run_bench(base.replace(epochs=2), variants, seeds=[0, 1])
    assert done.stat().st_mtime_ns == mtime and (out / 'results.json').read_bytes() == results


def test_bench_rejects_unknown_variant(tmp_path):
    with pytest.raises(FinetuneError, match='unknown bench variant'):
        run_bench(TrainConfig(output_dir=str(tmp_path)), ['timm_default', 'nope'], [0])
    with pytest.raises(FinetuneError, match='--baseline'):
        run_bench(TrainConfig(output_dir=str(tmp_path)), ['none'], [0])
    # a variant that cannot run is refused before the first run starts, not after the others have trained
    with pytest.raises(FinetuneError, match="--rewrite does not support 'vit_tiny_patch16_224'"):
        run_bench(TrainConfig(model='vit_tiny_patch16_224', output_dir=str(tmp_path / 'vit')),
                  ['timm_default', 'recommended'], [0])
    with pytest.raises(FinetuneError, match='--batch-size 0'):
        run_bench(TrainConfig(batch_size=0, output_dir=str(tmp_path / 'b0')), ['timm_default'], [0])
    assert not (tmp_path / 'vit').exists() and not (tmp_path / 'b0').exists()
