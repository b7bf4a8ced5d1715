"""The fast CPU dropout: its distribution, gradient and determinism, and when dropfix models use it."""
import math
import os
import subprocess
import sys
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_dropfix
from timm_dropfix import fastdrop


@pytest.fixture(autouse=True)
def _restore_switch():
    before = timm_dropfix.use_fast_dropout()
    yield
    timm_dropfix.set_fast_dropout(before)


def _within(count: int, n: int, q: float, sigmas: float = 6.0) -> bool:
    return abs(count - n * q) <= sigmas * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_rate_scale_and_every_lane_of_a_word(p):
    """Drop rate p (rounded to 1/65536) in each of the four 16-bit lanes of a draw, kept values scaled by the exact
    inverse keep rate, so the mean of many outputs is the input."""
    torch.manual_seed(0)
    n = 400_000
    y = timm_dropfix.fast_dropout(torch.ones(n), p)
    t = round(p * 65536)
    q = t / 65536
    dropped = y == 0
    assert _within(int(dropped.sum()), n, q)
    for lane in range(4):  # a generator without the full 64-bit range would leave one lane never dropping
        assert _within(int(dropped[lane::4].sum()), n // 4, q)
    assert set(y.unique().tolist()) == {0.0, torch.tensor(65536 / (65536 - t), dtype=torch.float32).item()}
    assert abs(y.double().mean().item() - 1.0) < 6 * math.sqrt(q / (1 - q) / n)


def test_neighbours_drop_independently():
    torch.manual_seed(1)
    n, p = 400_000, 0.3
    d = (timm_dropfix.fast_dropout(torch.ones(n), p) == 0).float()
    for gap in (1, 2, 3, 4, 5, 64):  # same word, next word, far apart
        both = int((d[gap:] * d[:-gap]).sum())
        assert _within(both, n - gap, p * p), gap


def test_deterministic_under_the_seed_and_gradient_is_the_mask():
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    torch.manual_seed(3)
    a = timm_dropfix.fast_dropout(x, 0.2)
    torch.manual_seed(3)
    b = timm_dropfix.fast_dropout(x, 0.2)
    torch.manual_seed(4)
    c = timm_dropfix.fast_dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.randn_like(a)
    a.backward(g)
    mask = a.detach() / x.detach()
    torch.testing.assert_close(x.grad, g * mask)
    assert set(mask.unique().round(decimals=5).tolist()) == {0.0, 1.25}


def test_keeps_channels_last_and_leaves_other_inputs_to_torch():
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    y = timm_dropfix.fast_dropout(x, 0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)
    assert 0.3 < kept.float().mean().item() < 0.7
    # a half-precision tensor or a rate below 1/131072 is F.dropout's: the same numbers under the same seed
    for x, p in ((torch.randn(64, dtype=torch.bfloat16), 0.5), (torch.randn(64), 1e-6)):
        torch.manual_seed(0)
        ours = timm_dropfix.fast_dropout(x, p)
        torch.manual_seed(0)
        assert torch.equal(ours, F.dropout(x, p, training=True))
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        timm_dropfix.fast_dropout(x, 1.0)
    # torch.func transforms wrap tensors in the plain Tensor type: they get F.dropout, which supports them
    drop = torch.nn.Dropout(0.5)
    y = torch.func.vmap(lambda t: fastdrop.run_dropout(drop, t), randomness='different')(torch.ones(4, 100))
    assert y.shape == (4, 100) and not torch.equal(y[0], y[1])
    g = torch.func.grad(lambda t: timm_dropfix.fast_dropout(t, 0.5).sum())(torch.ones(100))
    assert set(g.unique().tolist()) <= {0.0, 2.0}


def _count_fast_calls(model, x, train=True):
    model.train(train)
    with mock.patch.object(fastdrop, 'fast_dropout', wraps=fastdrop.fast_dropout) as spy:
        model(x)
    return spy.call_count


def test_dropfix_models_use_it_only_in_eager_cpu_training():
    """Every dropfix block and the pre-pool head take the fast path in eager CPU training; eval, the switch, a hook
    on the module, torch.compile and an fx-traced copy all run the nn.Dropout module itself."""
    model = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    n_drops = sum(1 for m in model.modules() if timm_dropfix.is_dropfix_block(m)) + 1  # + the head
    assert n_drops == 9
    assert _count_fast_calls(model, x) == n_drops
    assert _count_fast_calls(model, x, train=False) == 0
    timm_dropfix.set_fast_dropout(False)
    assert _count_fast_calls(model, x) == 0
    timm_dropfix.set_fast_dropout(True)
    handle = model.layer1[0].branch_drop.register_forward_hook(lambda m, i, o: None)
    assert _count_fast_calls(model, x) == n_drops - 1
    handle.remove()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    assert _count_fast_calls(compiled, x) == 0
    traced = torch.fx.symbolic_trace(model.eval())
    assert _count_fast_calls(traced, x) == 0


def test_switch_off_reproduces_torch_dropout_exactly():
    """With the switch off, a dropfix model's training forward is bit-identical to the same blocks calling their
    nn.Dropout modules (what earlier versions did)."""
    model = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5)).train()
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for fast in (False, True):
        timm_dropfix.set_fast_dropout(fast)
        torch.manual_seed(0)
        outs[fast] = model(x)
    plain = lambda module, x: module(x)
    with mock.patch('timm_dropfix.blocks.run_dropout', plain), mock.patch('timm_dropfix.heads.run_dropout', plain):
        torch.manual_seed(0)
        outs['modules'] = model(x)
    assert torch.equal(outs[False], outs['modules'])
    assert not torch.equal(outs[True], outs['modules'])


def test_environment_variable_sets_the_default():
    code = 'import timm_dropfix; print(timm_dropfix.use_fast_dropout())'
    env = dict(os.environ, TIMM_DROPFIX_FAST_DROPOUT='0')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'False'


def test_activation_checkpointing_recomputes_the_same_masks():
    """torch.utils.checkpoint restores the CPU generator before recomputing a segment; the fast path draws from
    that generator, so the gradients equal those of the same step without checkpointing."""
    import copy
    plain = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        torch.manual_seed(0)
        with mock.patch.object(fastdrop, 'fast_dropout', wraps=fastdrop.fast_dropout) as spy:
            model(x).sum().backward()
        assert spy.call_count > 0
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad)
