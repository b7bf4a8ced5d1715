"""Where the dropout sits, checked from the outside: call order recorded by hooks and data flow, not by reading
the attributes that rewrite sets."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torchvision.models import resnet as tv_resnet
from torch import nn
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import ResNetV2

import timm_dropfix
from timm_dropfix.blocks import is_dropfix_block

torch.manual_seed(0)

_BN = (nn.BatchNorm2d, nn.GroupNorm)

# (factory, kind): a small model of every supported family, built with the family's own constructor arguments
# (one block per stage keeps the suite fast; the block classes are the ones the full-size models use)
_one = [1, 1, 1, 1]
FAMILIES = {
    'timm_resnetv2_preact_basic': (lambda: timm.create_model('resnetv2_18'), 'preact'),
    'timm_resnetv2_preact_bottleneck': (lambda: timm.create_model('resnetv2_50', layers=_one), 'preact'),
    'timm_resnetv2_preact_groupnorm': (lambda: ResNetV2(layers=_one), 'preact'),  # BiT default: GroupNormAct + StdConv
    'timm_resnetv2_preact_groupnorm_d': (lambda: timm.create_model('resnetv2_50d_gn', layers=_one), 'preact'),
    'timm_resnetv2_postact_bottleneck': (lambda: ResNetV2(layers=_one, preact=False, conv_layer=create_conv2d,
                                                          norm_layer=BatchNormAct2d), 'postact'),
    'timm_resnet_basic': (lambda: timm.create_model('resnet18'), 'postact'),
    'timm_resnet_bottleneck': (lambda: timm.create_model('resnet50', layers=_one), 'postact'),
    'timm_resnet_d': (lambda: timm.create_model('resnet50d', layers=_one), 'postact'),
    'timm_seresnet': (lambda: timm.create_model('seresnet50', layers=_one), 'postact'),
    'timm_resnext': (lambda: timm.create_model('resnext50_32x4d', layers=_one), 'postact'),
    'timm_wide_resnet': (lambda: timm.create_model('wide_resnet50_2', layers=_one), 'postact'),
    'torchvision_resnet18': (lambda: torchvision.models.resnet18(), 'postact'),
    'torchvision_resnet50': (lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, _one), 'postact'),
    'torchvision_resnext': (lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, _one, groups=32, width_per_group=4),
                            'postact'),
    'torchvision_wide_resnet': (lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, _one, width_per_group=128),
                                'postact'),
}
X = torch.randn(2, 3, 48, 48)


def _blocks(model: nn.Module):
    return [m for m in model.modules() if is_dropfix_block(m)]


def _record_calls(block: nn.Module):
    """Names of the block's direct children in the order they run (forward pre-hooks)."""
    calls, handles = [], []
    for name, child in block.named_children():
        handles.append(child.register_forward_pre_hook(lambda m, a, n=name: calls.append(n)))
    return calls, handles


def _dropout_children(block: nn.Module):
    return {n for n, c in block.named_children() if isinstance(c, (nn.Dropout, nn.Dropout2d))}


_CACHE: dict = {}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """Fresh copies per test (train-mode forwards change BN statistics); models are built once per session."""
    if request.param not in _CACHE:
        factory, kind = FAMILIES[request.param]
        original = factory().eval()
        rewritten = timm_dropfix.rewrite(copy.deepcopy(original), branch_drop_rate=0.1, head_drop_rate=0.2)
        _CACHE[request.param] = (kind, original, rewritten)
    kind, original, rewritten = _CACHE[request.param]
    return request.param, kind, copy.deepcopy(original), copy.deepcopy(rewritten)


def test_one_dropout_per_block_after_last_norm(family):
    _, kind, _, model = family
    model.train()
    blocks = _blocks(model)
    assert blocks, 'rewrite found no blocks'
    recorders = [_record_calls(b) for b in blocks]
    model(X)
    for block, (calls, handles) in zip(blocks, recorders):
        for h in handles:
            h.remove()
        drops = _dropout_children(block)
        ran = [c for c in calls if c in drops]
        assert len(ran) == 1, f'{type(block).__name__}: expected exactly one dropout call, got {ran}'
        i = calls.index(ran[0])
        before, after = calls[:i], calls[i + 1:]
        children = dict(block.named_children())
        convs = [n for n, c in children.items() if isinstance(c, nn.Conv2d) or type(c).__name__.endswith('Conv2d')]
        norms_after = [n for n in after if isinstance(children[n], _BN) and n != 'downsample']
        # the reason behind the rule: no BN of the branch sees the dropped signal
        assert not norms_after, f'a BN runs after the dropout in {type(block).__name__}: {norms_after}'
        # the shortcut's downsample may run before the branch's dropout (post-act blocks fuse the dropout with the
        # residual addition, which needs the shortcut first): the branch's own modules are what must precede it
        branch_before = [n for n in before if n != 'downsample']
        assert isinstance(children[branch_before[-1]], _BN) or branch_before[-1] in (
            'se', 'aa', 'act2', 'act1', 'drop_block'), f'dropout does not follow the last norm: {calls}'
        last_conv = max(convs, key=lambda n: int(n[-1]))
        if kind == 'preact':
            assert after[0] == last_conv, f'pre-act: dropout must sit right before {last_conv}, got {calls}'
        else:
            assert last_conv in before, f'post-act: dropout must follow the last conv, got {calls}'
            assert 'se' not in after, 'dropout must not sit before the SE gate'


def test_dropout_is_in_the_branch_not_the_shortcut(family):
    """Killing what the dropout passes on must leave exactly the shortcut path."""
    _, kind, _, model = family
    model.eval()
    block = next(b for b in _blocks(model) if getattr(b, 'downsample', None) is not None)
    x = torch.randn(2, block.conv1.in_channels, 16, 16)
    kill = copy.deepcopy(block)
    kill.branch_drop = _Zero()
    with torch.no_grad():
        out = kill(x)
        if kind == 'preact':
            expected = block.downsample(block.norm1(x))
        else:
            act = next(getattr(block, n) for n in ('act3', 'act2', 'relu') if hasattr(block, n))
            expected = act(block.downsample(x))
    torch.testing.assert_close(out, expected)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_eval_output_bitwise_equal(family):
    _, _, original, model = family
    model.eval()
    with torch.no_grad():
        assert torch.equal(original(X), model(X))


def test_state_dict_unchanged(family):
    _, _, original, model = family
    a, b = original.state_dict(), model.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_idempotent(family):
    _, _, _, model = family
    again = timm_dropfix.rewrite(copy.deepcopy(model), branch_drop_rate=0.1, head_drop_rate=0.2)
    assert str(timm_dropfix.summarize(again)) == str(timm_dropfix.summarize(model))
    assert [n for n, _ in again.named_modules()] == [n for n, _ in model.named_modules()]
    again.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def _pool_module(model: nn.Module) -> nn.Module:
    if hasattr(model, 'head') and hasattr(model.head, 'global_pool'):
        return model.head.global_pool
    return getattr(model, 'global_pool', None) or model.avgpool


def _fc(model: nn.Module) -> nn.Module:
    return model.head.fc if hasattr(model, 'head') and hasattr(model.head, 'fc') else model.fc


def _capture_head(model: nn.Module, x: torch.Tensor):
    """Train-mode dropout only (BN in eval): features, the pool's input and output, and the classifier input."""
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            m.train()
    seen = {}
    pool, fc = _pool_module(model), _fc(model)
    h = [pool.register_forward_hook(lambda m, a, o: seen.update(pool_in=a[0], pool_out=o)),
         fc.register_forward_pre_hook(lambda m, a: seen.update(fc_in=a[0]))]
    with torch.no_grad():
        model(x)
        feats = model.forward_features(x) if hasattr(model, 'forward_features') else None
    for handle in h:
        handle.remove()
    return feats, seen


@pytest.mark.parametrize('name', ['resnet18', 'resnetv2_18', 'tv_resnet18'])
@pytest.mark.parametrize('position', ['before_pool', 'before_pool_channel'])
def test_head_mask_is_elementwise_before_pool(name, position):
    model = torchvision.models.resnet18() if name == 'tv_resnet18' else timm.create_model(name, num_classes=7)
    torch.manual_seed(1)
    timm_dropfix.rewrite(model, branch_drop_rate=0.0, head_drop_rate=0.5, head_position=position)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        model.eval()
        if hasattr(model, 'forward_features'):
            clean = model.forward_features(x)
        else:
            clean = {}
            hook = model.avgpool.register_forward_pre_hook(lambda m, a: clean.update(x=a[0]))
            model(x)
            hook.remove()
            clean = clean['x']
    _, seen = _capture_head(model, x)
    pool_in = seen['pool_in']
    assert pool_in.shape == clean.shape and pool_in.dim() == 4
    live = clean != 0  # post-ReLU maps hold zeros of their own
    kept = (pool_in != 0) & live
    assert 0.4 < kept[live].float().mean() < 0.6, 'about half of the elements must be dropped at p=0.5'
    torch.testing.assert_close(pool_in[kept], clean[kept] / 0.5)
    # element-wise: within a channel, some live positions kept and some dropped (a channel-wise mask fails here)
    frac = kept.flatten(2).sum(-1).float() / live.flatten(2).sum(-1).clamp(min=1).float()
    has_live = live.flatten(2).sum(-1) > 1
    mixed = ((frac > 0) & (frac < 1))[has_live].float().mean()
    if position == 'before_pool':
        assert mixed > 0.5
    else:
        assert mixed == 0, 'before_pool_channel is Dropout2d: whole channels drop'
    # nothing drops after the pool: the classifier sees exactly the pooled map
    torch.testing.assert_close(seen['fc_in'].flatten(1), seen['pool_out'].flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['resnet18', 'resnetv2_18'])
def test_head_after_pool_moves_dropout_after(name):
    model = timm_dropfix.rewrite(timm.create_model(name, num_classes=7), 0.0, 0.5, head_position='after_pool')
    clean, seen = _capture_head(model, X)
    assert torch.equal(seen['pool_in'], clean), 'nothing may drop before the pool'
    fc_in, pooled = seen['fc_in'].flatten(1), seen['pool_out'].flatten(1)
    assert (fc_in == 0).float().mean() > 0.3
    torch.testing.assert_close(fc_in[fc_in != 0], pooled[fc_in != 0] / 0.5)


def test_timm_drop_rate_after_pool_is_taken_over():
    model = timm.create_model('resnet18', drop_rate=0.5, num_classes=7)
    timm_dropfix.rewrite(model, branch_drop_rate=0.0, head_drop_rate=0.0, head_position='none')
    _, seen = _capture_head(model, X)
    torch.testing.assert_close(seen['fc_in'], seen['pool_out'], rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert torch.equal(model.forward_head(torch.ones(2, 512, 2, 2)),
                           model.forward_head(torch.ones(2, 512, 2, 2)))


@pytest.mark.parametrize('position', ['branch_start', 'after_conv1', 'after_conv2', 'after_conv3',
                                      'before_last_conv', 'branch_end', 'after_add'])
def test_ablation_positions_run_once(position):
    for model in (timm.create_model('resnet50', layers=_one), timm.create_model('resnetv2_50', layers=_one),
                  tv_resnet.ResNet(tv_resnet.Bottleneck, _one)):
        timm_dropfix.rewrite(model, branch_drop_rate=0.1, branch_position=position)
        model.train()
        counts = []
        for b in _blocks(model):
            b.branch_drop.register_forward_pre_hook(lambda m, a: counts.append(1))
        model(X)
        assert len(counts) == len(_blocks(model))


def test_before_last_conv_on_postact_feeds_a_bn():
    """The ablation position the README warns about: the last BN of a post-act block sees the dropped signal."""
    model = timm_dropfix.rewrite(timm.create_model('resnet50', layers=_one), 0.1,
                                 branch_position='before_last_conv').train()
    block = _blocks(model)[0]
    calls, handles = _record_calls(block)
    model(X)
    i = calls.index('branch_drop')
    assert calls[i + 1] == 'conv3' and 'bn3' in calls[i + 1:]


def test_drop_path_and_drop_block_keep_working():
    model = timm.create_model('resnet50', layers=_one, drop_path_rate=0.5, drop_block_rate=0.5)
    timm_dropfix.rewrite(model, 0.1)
    model.train()
    calls = []
    block = model.layer3[0]  # DropBlock runs in layer3/layer4 only
    for n in ('drop_path', 'drop_block', 'branch_drop'):
        getattr(block, n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
    model(X)
    assert calls == ['drop_block', 'branch_drop', 'drop_path']
    pre = timm_dropfix.rewrite(timm.create_model('resnetv2_50', layers=_one, drop_path_rate=0.5), 0.1).train()
    calls.clear()
    block = pre.stages[1].blocks[0]
    for n in ('drop_path', 'branch_drop'):
        getattr(block, n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
    pre(X)
    assert calls == ['branch_drop', 'drop_path']  # the dropout inside the branch, drop_path on its output


def test_rate_zero_means_no_dropout_module():
    model = timm_dropfix.rewrite(timm.create_model('resnet18'), branch_drop_rate=0.0, head_drop_rate=0.0)
    assert not [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    model.train()
    torch.manual_seed(0)
    a = model(X)
    torch.manual_seed(1)
    assert torch.equal(a, model(X))


def test_new_dropout_follows_model_mode():
    model = timm.create_model('resnet18').eval()
    timm_dropfix.rewrite(model)
    assert not any(m.training for m in model.modules())
