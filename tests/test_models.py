"""Every registered variant answers timm's model API, and loads timm's weights with unchanged keys."""
from __future__ import annotations

import pickle

import pytest
import timm
import torch
import torch.fx
from safetensors.torch import save_file

import timm_dropfix

REGISTERED = sorted(timm.list_models('*dropfix*') + timm.list_models('preresnet*_cifar'))


def _input(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


def _small(name: str, **kwargs):
    # one block per stage: the block classes and the head are what is tested, and deep nets are slow on two cores
    if '_cifar' in name:
        kwargs.setdefault('layers', (1, 1, 1))
    elif name != 'preresnet18_dropfix':
        kwargs.setdefault('layers', (1, 1, 1, 1))
    return timm.create_model(name, **kwargs)


def test_all_variants_registered():
    expected = {f'preresnet{d}_dropfix' for d in (18, 34, 50, 101, 152)}
    expected |= {f'preresnet{d}_cifar{s}' for d in (20, 56, 110, 164) for s in ('', '_dropfix')}
    expected |= {f'resnet{d}_dropfix' for d in (18, 34, 50, 101, 152)} | {'resnet50d_dropfix'}
    assert expected <= set(REGISTERED)
    pretrained = timm.list_pretrained('preresnet*')
    assert {'preresnet50_dropfix.a1h_in1k', 'preresnet101_dropfix.a1h_in1k',
            'preresnet18_dropfix.ra4_e3600_r224_in1k', 'preresnet34_dropfix.ra4_e3600_r224_in1k'} <= set(pretrained)
    assert timm.get_pretrained_cfg('preresnet101_dropfix').hf_hub_id == 'timm/resnetv2_101.a1h_in1k'
    assert timm.get_pretrained_cfg('resnet50_dropfix').hf_hub_id == 'timm/resnet50.a1_in1k'


@pytest.mark.parametrize('name', REGISTERED)
def test_timm_api(name, tmp_path):
    model = _small(name, num_classes=5).eval()
    x = _input(name)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.pretrained_cfg['architecture'] == name
    assert model.default_cfg['classifier']
    # features_only
    fx = _small(name, features_only=True)
    outs = fx(x)
    assert len(outs) == len(fx.feature_info.channels())
    assert [o.shape[1] for o in outs] == fx.feature_info.channels()
    # reset_classifier keeps the placement, to 0 classes as well
    summary = timm_dropfix.summarize(model)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    assert timm_dropfix.summarize(model).head_position == summary.head_position
    # grad checkpointing recomputes the blocks, dropout masks included: the same gradients as without it
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(0)
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert grads[0] and len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # pickling keeps the class and the placement
    clone = pickle.loads(pickle.dumps(model))
    assert str(timm_dropfix.summarize(clone)) == str(timm_dropfix.summarize(model))


@pytest.mark.parametrize('name', ['preresnet18_dropfix', 'resnet18_dropfix', 'preresnet20_cifar_dropfix'])
def test_fx_and_compile(name):
    # no head dropout and no zero-initialised last layer: only the branch dropouts can make train outputs differ
    model = _small(name, num_classes=5, drop_rate=0.0, zero_init_last=False).eval()
    x = _input(name)
    traced = torch.fx.symbolic_trace(model)
    # dropout stays a module in the graph (not a baked-in training flag)
    assert any(isinstance(m, torch.nn.Dropout) for m in traced.modules())
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
        compiled = torch.compile(model, backend='eager', fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))
    traced.train()
    torch.manual_seed(0)
    a = traced(x)
    torch.manual_seed(1)
    assert not torch.equal(a, traced(x)), 'the traced model must still drop in its branches in train mode'


def test_readme_one_liner():
    model = timm.create_model('preresnet101_dropfix', num_classes=37)
    assert 'PrePoolDropoutHead' in str(model)
    assert sum(1 for m in model.modules() if timm_dropfix.is_dropfix_block(m)) == 33


def test_defaults_and_kwargs():
    m = timm.create_model('preresnet50_dropfix', num_classes=37, layers=(1, 1, 1, 1))
    s = timm_dropfix.summarize(m)
    assert (s.branch_drop_rate, s.head_drop_rate, s.head_position) == (0.1, 0.2, 'before_pool')
    assert s.branch_positions == {'DropfixPreActBottleneck': 'before_last_conv'}
    m = timm.create_model('resnet50_dropfix', drop_rate=0.3, branch_drop_rate=0.05, branch_position='after_add',
                          head_position='after_pool', layers=(1, 1, 1, 1))
    s = timm_dropfix.summarize(m)
    assert (s.branch_drop_rate, s.head_drop_rate, s.head_position) == (0.05, 0.3, 'after_pool')
    assert s.branch_positions == {'DropfixBottleneck': 'after_add'}
    plain = timm_dropfix.summarize(timm.create_model('preresnet20_cifar'))
    assert (plain.branch_drop_rate, plain.head_drop_rate) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        timm.create_model('preresnet18_dropfix', branch_drop_rate=1.0)
    for name in ('preresnet18_dropfix', 'resnet18_dropfix'):  # the head rate too, when the model is built
        with pytest.raises(ValueError, match=r'drop_rate must be in \[0, 1\)'):
            timm.create_model(name, drop_rate=-0.1)
        with pytest.raises(ValueError, match='drop_rate must be a number'):
            timm.create_model(name, drop_rate='high')


def test_cifar_shapes_and_depth():
    m = timm.create_model('preresnet110_cifar')
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and 'downsample' not in n]
    assert len(convs) == 110  # stem conv + 108 block convs + the head's 1x1-conv classifier
    assert [f['reduction'] for f in m.feature_info] == [1, 1, 2, 4]
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 8, 8)
    m = timm.create_model('preresnet164_cifar', layers=(2, 2, 2))
    assert m.num_features == 256


@pytest.mark.parametrize('dropfix, base', [('preresnet50_dropfix', 'resnetv2_50'), ('resnet50_dropfix', 'resnet50'),
                                           ('preresnet18_dropfix', 'resnetv2_18')])
def test_pretrained_loads_timm_weights_unchanged(dropfix, base, tmp_path):
    """pretrained=True on a variant takes the timm model's weights file as it is (here from disk, not the Hub)."""
    reference = timm.create_model(base, layers=(1, 1, 1, 1)).eval()
    path = tmp_path / 'model.safetensors'
    save_file(reference.state_dict(), str(path))
    model = timm.create_model(dropfix, pretrained=True, layers=(1, 1, 1, 1),
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert list(model.state_dict()) == list(reference.state_dict())


def test_v1_strides():
    m = timm.create_model('resnet50_dropfix', v1_strides=True, layers=(1, 1, 1, 1))
    assert (m.layer2[0].conv1.stride, m.layer2[0].conv2.stride) == ((2, 2), (1, 1))
    assert m.layer1[0].conv1.stride == (1, 1)
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
