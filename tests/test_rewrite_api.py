"""rewrite's contract: clear errors that change nothing, wrappers refused, checkpoints round-trip, real weights."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from timm.layers import SelectAdaptivePool2d
from torch import nn

import timm_dropfix

ONE = (1, 1, 1, 1)


@pytest.mark.parametrize('factory', [
    lambda: timm.create_model('vit_tiny_patch16_224'),
    lambda: timm.create_model('mobilenetv3_small_100'),
    lambda: torchvision.models.mobilenet_v3_small(),
])
def test_unsupported_model_names_the_families(factory):
    model = factory()
    before = [type(m) for m in model.modules()]
    with pytest.raises(timm_dropfix.UnsupportedModelError, match='Supported families: timm ResNetV2'):
        timm_dropfix.rewrite(model)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize('kwargs, match', [
    (dict(branch_drop_rate=1.0), r'branch_drop_rate must be in \[0, 1\)'),
    (dict(branch_drop_rate=-0.1), r'branch_drop_rate must be in \[0, 1\)'),
    (dict(head_drop_rate=float('nan')), r'head_drop_rate must be in \[0, 1\)'),
    (dict(head_drop_rate='high'), r'head_drop_rate must be a number'),
    (dict(branch_position='after_bn'), r"Unknown branch_position 'after_bn'; choose one of none, recommended"),
    (dict(head_position='middle'), r"Unknown head_position 'middle'; choose one of before_pool"),
])
def test_bad_arguments_change_nothing(kwargs, match):
    model = timm.create_model('resnet18')
    with pytest.raises(ValueError, match=match):
        timm_dropfix.rewrite(model, **kwargs)
    assert type(model).__name__ == 'ResNet' and type(model.layer1[0]).__name__ == 'BasicBlock'


def test_a_model_name_instead_of_a_model_is_a_type_error_with_the_call_to_make():
    with pytest.raises(TypeError, match=r"got an object of type str\. .*timm.create_model\('resnet50_dropfix'\)"):
        timm_dropfix.rewrite('resnet50')
    with pytest.raises(TypeError, match=r'summarize needs a torch.nn.Module, got an object of type dict\.$'):
        timm_dropfix.summarize({})


def test_unknown_blocks_of_a_known_family_are_named():
    with pytest.raises(timm_dropfix.UnsupportedModelError, match=r'ResNet \(its blocks: SelectiveKernelBasic\)'):
        timm_dropfix.rewrite(timm.create_model('skresnet18'))


@pytest.mark.parametrize('name', ['resnet18', 'resnetv2_50'])
def test_dropout_before_a_max_pool_is_refused(name):
    """Element-wise dropout feeds global *average* pooling; a max over dropped features is biased."""
    model = timm.create_model(name, layers=ONE, global_pool='avgmax')
    with pytest.raises(ValueError, match="pools with 'avgmax'.*head_position='after_pool'"):
        timm_dropfix.rewrite(model)
    assert timm_dropfix.dropfix_config(model) is None and not any(
        type(m).__name__.startswith('Dropfix') for m in model.modules())
    timm_dropfix.rewrite(model, head_position='after_pool')  # after the pool, or no head dropout, is fine
    timm_dropfix.rewrite(model, head_drop_rate=0.0)
    timm_dropfix.rewrite(model, head_position='before_pool_channel')  # whole channels scaled: max unbiased
    rewritten = timm_dropfix.rewrite(timm.create_model(name, layers=ONE))
    with pytest.raises(ValueError, match="pools with 'max'"):
        rewritten.reset_classifier(3, 'max')  # nor can a reset bring a max pool in later
    rewritten.reset_classifier(3)
    assert rewritten(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_torchvision_resnet_with_a_max_pool_is_refused_too():
    model = torchvision.models.resnet18()
    model.avgpool = nn.AdaptiveMaxPool2d(1)
    with pytest.raises(ValueError, match="pools with 'max'") as refused:
        timm_dropfix.rewrite(model)
    # torchvision's ResNet has no global_pool argument: the message names what its owner can change
    assert 'model.avgpool = nn.AdaptiveAvgPool2d(1)' in str(refused.value) and 'global_pool' not in str(refused.value)
    model.avgpool = SelectAdaptivePool2d(pool_type='avgmax')
    with pytest.raises(ValueError, match="pools with 'avgmax'"):
        timm_dropfix.rewrite(model)


def test_a_backbone_inside_a_wrapper_gets_its_head_rewritten(caplog):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model('resnet18', layers=ONE, drop_rate=0.3)

        def forward(self, x):
            return self.backbone(x)

    with caplog.at_level('WARNING', logger='timm_dropfix'):
        wrapper = timm_dropfix.rewrite(Wrapper(), head_drop_rate=0.2)
    assert "rewrote the head of its 'backbone'" in caplog.text  # it runs only if the wrapper calls that head
    assert (wrapper.backbone.head_drop_at, wrapper.backbone.drop_rate) == ('before_pool', 0.2)
    s = timm_dropfix.summarize(wrapper)
    assert (s.head_drop_rate, s.head_position, s.blocks) == (0.2, 'before_pool', 4)
    compiled = Wrapper()
    compiled.backbone = torch.compile(compiled.backbone)
    with pytest.raises(timm_dropfix.UnsupportedModelError, match="'backbone' is compiled"):
        timm_dropfix.rewrite(compiled)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_torchscript_says_what_to_use_instead():
    model = timm_dropfix.rewrite(timm.create_model('resnet18', layers=ONE, scriptable=True))
    with pytest.raises(RuntimeError, match='torch.jit.script does not support timm_dropfix blocks.*torch.compile'):
        torch.jit.script(model)


def test_after_conv3_on_basic_blocks_is_refused_before_any_change():
    model = timm.create_model('resnet18')
    with pytest.raises(ValueError, match='needs bottleneck blocks'):
        timm_dropfix.rewrite(model, branch_position='after_conv3')
    assert timm_dropfix.dropfix_config(model) is None and type(model.layer1[0]).__name__ == 'BasicBlock'


def test_wrappers_are_refused_with_advice():
    model = timm.create_model('resnet18')
    with pytest.raises(timm_dropfix.UnsupportedModelError, match='before wrapping'):
        timm_dropfix.rewrite(nn.DataParallel(model))
    with pytest.raises(timm_dropfix.UnsupportedModelError, match=r'rewrite\(model._orig_mod'):
        timm_dropfix.rewrite(torch.compile(model))
    model.compile()  # in place: same class, compiled forward
    with pytest.raises(timm_dropfix.UnsupportedModelError, match='a model that is compiled'):
        timm_dropfix.rewrite(model)


def test_summary_and_config_are_readable_and_json_ready(caplog):
    model = timm.create_model('seresnet50', layers=ONE, num_classes=4)
    with caplog.at_level('INFO', logger='timm_dropfix'):
        timm_dropfix.rewrite(model, 0.05, 0.3)
    text = str(timm_dropfix.summarize(model))
    assert 'DropfixBottleneck: branch_end' in text and 'p=0.3 before_pool' in text and '4 residual blocks' in text
    assert text in caplog.text
    json.dumps(timm_dropfix.summarize(model).to_dict())
    assert timm_dropfix.dropfix_config(model) == dict(branch_drop_rate=0.05, head_drop_rate=0.3,
                                                      branch_position='recommended', head_position='before_pool')
    timm_dropfix.rewrite(model, 0.0, 0.0, 'none', 'none')
    s = timm_dropfix.summarize(model)
    assert (s.branch_drop_rate, s.head_drop_rate, s.head_position) == (0.0, 0.0, 'none')
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize('name', ['resnet18', 'resnetv2_50'])
def test_a_head_dropout_the_model_was_built_with_is_replaced_with_a_warning(name, caplog):
    """timm's own drop_rate (after the pool) gives way to head_drop_rate; the log says so once, and how to keep it."""
    with caplog.at_level('WARNING', logger='timm_dropfix'):
        model = timm_dropfix.rewrite(timm.create_model(name, layers=ONE, drop_rate=0.5))
        timm_dropfix.rewrite(timm.create_model(name, layers=ONE, drop_rate=0.5), head_drop_rate=0.5)
        timm_dropfix.rewrite(timm.create_model(name, layers=ONE, drop_rate=0.5), head_position='none')
        timm_dropfix.rewrite(model, head_drop_rate=0.3)  # already rewritten: the caller chose both rates
    assert caplog.text.count('is replaced by') == 1
    assert 'head dropout p=0.5 (after the pool) is replaced by head_drop_rate=0.2 at before_pool' in caplog.text
    assert 'pass head_drop_rate=0.5 to keep its rate' in caplog.text


def test_list_positions_documents_every_name():
    docs = timm_dropfix.list_positions()
    assert set(docs['branch']) == set(timm_dropfix.BRANCH_POSITIONS)
    assert set(docs['head']) == set(timm_dropfix.HEAD_POSITIONS)
    assert 'recommended' in docs['branch']['before_last_conv'] and 'recommended' in docs['branch']['branch_end']


def test_dropfix_twin():
    assert timm_dropfix.dropfix_twin('resnet50.a1_in1k') == 'resnet50_dropfix'
    assert timm_dropfix.dropfix_twin('resnetv2_50') == 'preresnet50_dropfix'
    assert timm_dropfix.dropfix_twin('preresnet20_cifar') == 'preresnet20_cifar_dropfix'
    assert timm_dropfix.dropfix_twin('resnet50_dropfix') == 'resnet50_dropfix'
    assert timm_dropfix.dropfix_twin('convnext_tiny') is None
    for name in ('resnet50', 'resnetv2_101', 'preresnet56_cifar'):
        assert timm_dropfix.dropfix_twin(name) in timm.list_models()


def test_checkpoint_round_trip_both_ways(tmp_path):
    """A rewritten model's safetensors loads strictly into the original architecture and back."""
    original = timm.create_model('resnetv2_50', layers=ONE, num_classes=5).eval()
    rewritten = timm_dropfix.rewrite(copy.deepcopy(original)).eval()
    path = tmp_path / 'rewritten.safetensors'
    save_file(rewritten.state_dict(), str(path))
    fresh = timm.create_model('resnetv2_50', layers=ONE, num_classes=5).eval()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), rewritten(x))
    # rewrite after loading is the same as before loading
    late = timm_dropfix.rewrite(fresh).eval()
    early = timm_dropfix.rewrite(timm.create_model('resnetv2_50', layers=ONE, num_classes=5)).eval()
    early.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert torch.equal(late(x), early(x))


def test_shared_imagenet_resnet50_loads_into_variant_and_rewrite(shared_dir):
    """The real ImageNet ResNet-50 (../shared/weights) keeps its predictions through rewrite and the variant."""
    weights = shared_dir / 'weights' / 'resnet50_keras_in1k'
    plain = timm.create_model(f'local-dir:{weights}', pretrained=True).eval()
    timm_dropfix.set_v1_strides(plain)
    variant = timm.create_model('resnet50_dropfix', pretrained=True, v1_strides=True,
                                pretrained_cfg_overlay=dict(file=str(weights / 'model.safetensors'))).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        reference = plain(x)
        assert torch.equal(variant(x), reference)
        assert torch.equal(timm_dropfix.rewrite(plain).eval()(x), reference)
