"""The paper's module tests (Figures 1 and 2) as tests, plus the placement checks of the real-network probe.

Sizes are 20,000 x 128 instead of the paper's 100,000 x 128 (seconds instead of a minute); with a fixed seed every
number is deterministic, and the tolerances are wide enough for any seed yet would fail if dropout sat elsewhere
(e.g. Figure 1's two placements swapped, or Figure 2's dropout moved before the BN).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import module_tests as mt  # noqa: E402

N = 20_000


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def fig1():
    return {w: mt.figure1_ratios(w, n=N, d=128, p=0.5, seed=0) for w in (-0.02, 0.0, 0.02)}


@pytest.fixture(scope='module')
def fig2():
    return {s: mt.figure2_ratios(s, n=N, d=128, p=0.1, seed=0) for s in (0.2, 1.0, 5.0)}


def test_theory_constants():
    # E[ReLU(z)] = 1/sqrt(2 pi), E[ReLU(z)^2] = 1/2: the flat lines of the paper's figures
    assert mt.relu_dropout_ratio_theory(0.5) == pytest.approx(0.405, abs=1e-3)
    assert mt.relu_dropout_ratio_theory(0.1) == pytest.approx(0.860, abs=1e-3)


def test_figure1_dropout_after_weight_falls_with_weight_mean(fig1):
    assert fig1[0.0]['after'] == pytest.approx(0.41, abs=0.03)            # paper: about 0.41 at 0
    for w in (-0.02, 0.02):
        assert 0.22 <= fig1[w]['after'] <= 0.30, (w, fig1[w])              # paper: 0.24-0.27 at +-0.02
        assert fig1[w]['after'] < fig1[0.0]['after'] - 0.1


def test_figure1_dropout_before_weight_is_flat(fig1):
    for w, r in fig1.items():
        assert r['before'] == pytest.approx(0.41, abs=0.035), (w, r)       # paper: about 0.41 for every w_mean
    values = [r['before'] for r in fig1.values()]
    assert max(values) - min(values) < 0.05


def test_figure2_branch_constant_residual_tends_to_one(fig2):
    for s, r in fig2.items():
        assert r['branch'] == pytest.approx(0.86, abs=0.01), (s, r)         # paper: about 0.86 at every scale
    assert fig2[0.2]['residual'] == pytest.approx(0.87, abs=0.01)          # paper: 0.87
    assert fig2[1.0]['residual'] == pytest.approx(0.94, abs=0.01)          # paper: 0.94
    assert fig2[5.0]['residual'] == pytest.approx(0.996, abs=0.002)        # paper: 0.996
    assert fig2[0.2]['residual'] < fig2[1.0]['residual'] < fig2[5.0]['residual'] < 1.0


def test_single_points_are_deterministic_and_match_the_sweep():
    a = mt.figure1_ratio(0.01, dropout_before=False, n=5_000, seed=3)
    assert a == mt.figure1_ratio(0.01, dropout_before=False, n=5_000, seed=3)
    sweep = mt.run_figures(n=5_000, d=128, seeds=[3], fig1_points=5, fig2_points=3)
    assert sweep['fig1']['w_mean'][3] == pytest.approx(0.01)
    assert sweep['fig1']['after'][0][3] == pytest.approx(a, rel=1e-6)
    assert sweep['fig2']['residual'][0][0] == pytest.approx(mt.figure2_ratios(0.2, n=5_000, seed=3)['residual'],
                                                          rel=1e-6)
    assert set(sweep['summary']) >= {'fig1_after_at_0', 'fig2_residual_at_5'}


# ---- real-network probe on a random-init tiny timm ResNet (basic blocks) ----

@pytest.fixture(scope='module')
def tiny_probe():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    return mt.run_real_network('resnet10t', 0, 64, 2, 0.1, 0.2, seed=0, images=images)


def _variant(res, name):
    return next(v for v in res['variants'] if v['name'] == name)


def test_probe_baseline_and_head_variants_leave_bn_untouched(tiny_probe):
    for name in ('none', 'head:before_pool', 'head:after_pool', 'head:before_pool_channel'):
        v = _variant(tiny_probe, name)
        assert all(r == pytest.approx(1.0, abs=1e-9) for r in v['bn_ratio'].values()), name
    assert _variant(tiny_probe, 'none')['logit_var_over_masks'] == 0.0
    # element-wise dropout before the pool averages its noise over the map: less logit noise than after the pool
    assert (_variant(tiny_probe, 'head:before_pool')['logit_var_over_masks']
            < _variant(tiny_probe, 'head:after_pool')['logit_var_over_masks'])


def test_probe_sees_dropout_exactly_where_it_was_placed(tiny_probe):
    first = 'layer1.0'
    # branch end (recommended for post-activation blocks): no BN of the first block sees the dropped signal
    rec = _variant(tiny_probe, 'branch:recommended')['bn_ratio']
    assert rec[f'{first}.bn1'] == pytest.approx(1.0, abs=1e-9) and rec[f'{first}.bn2'] == pytest.approx(1.0, abs=1e-9)
    assert rec['layer2.0.bn1'] < 0.99                       # ... but the next block's first BN does
    # before the last conv: the block's own last BN sees it, its first BN does not
    blc = _variant(tiny_probe, 'branch:before_last_conv')['bn_ratio']
    assert blc[f'{first}.bn1'] == pytest.approx(1.0, abs=1e-9) and blc[f'{first}.bn2'] < 0.95
    # branch start / after conv1: the block's first BN already sees it
    for name in ('branch:branch_start', 'branch:after_conv1'):
        assert _variant(tiny_probe, name)['bn_ratio'][f'{first}.bn1'] < 0.95, name
    assert 'branch:after_conv3' in tiny_probe['skipped']    # basic blocks have no third conv
    assert all(v['logit_var_over_masks'] > 0 for v in tiny_probe['variants'] if v['name'] != 'none')


def test_dropout_active_bn_frozen_keeps_bnact_drop_child_active():
    from timm.layers import BatchNormAct2d
    m = torch.nn.Sequential(BatchNormAct2d(4, drop_layer=torch.nn.Dropout))
    mt.dropout_active_bn_frozen(m)
    assert not m[0].training and m[0].drop.training
    assert math.isclose(mt._feature_var(torch.ones(3, 2)), 0.0)
