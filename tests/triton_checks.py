"""The Triton (CUDA) dropout kernel: its distribution, gradient, determinism and routing.

Not collected by the suite directly. ``test_fastdrop.py::test_triton_kernel_under_the_interpreter`` runs this file
in a child pytest with ``TRITON_INTERPRET=1`` (the interpreter must be chosen before triton compiles anything);
then the module points the kernel's device at the CPU, so CPU tensors take the route that CUDA tensors take and the
interpreter executes the kernel's Triton code, Philox included, as a GPU would, apart from speed. On a machine with
a GPU, ``pytest tests/triton_checks.py`` runs the same checks on CUDA tensors with the compiled kernel
(``benchmarks/gpu_session.sh`` does).
"""
import copy
import math
import os
from unittest import mock

import pytest
import timm
import torch

import timm_dropfix
from timm_dropfix import _triton, fastdrop

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
DEVICE = 'cpu' if INTERPRETED else 'cuda'
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip('needs TRITON_INTERPRET=1 (see test_fastdrop.py) or a CUDA device', allow_module_level=True)


@pytest.fixture(autouse=True)
def _kernel_device(monkeypatch):
    if INTERPRETED:
        monkeypatch.setattr(fastdrop, '_GPU_DEVICE', 'cpu')
        monkeypatch.setattr(fastdrop, '_gpu_state', {})
    timm_dropfix.set_fast_dropout(True)


def _within(count: int, n: int, q: float, sigmas: float = 6.0) -> bool:
    return abs(count - n * q) <= sigmas * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_rate_scale_in_every_quarter_and_across_programs(dtype, p):
    """Drop rate p overall and in each quarter of a program (each of Philox's four words) and in the program that
    ends the tensor; kept values scaled by the inverse keep rate, rounded to the dtype like torch's kernel."""
    assert timm_dropfix.dropout_kernel(DEVICE) == 'triton'
    torch.manual_seed(0)
    n = 3 * _triton.BLOCK + 1000  # a partial last program
    y = timm_dropfix.fast_dropout(torch.ones(n, dtype=dtype, device=DEVICE), p)
    assert y.dtype == dtype and y.grad_fn is None
    y = y.cpu()
    dropped = (y == 0).float()
    q = round(p * 2 ** 32) / 2 ** 32
    assert _within(int(dropped.sum()), n, q)
    quarter = _triton.BLOCK // 4
    position = (torch.arange(n) % _triton.BLOCK) // quarter
    for k in range(4):
        sel = dropped[position == k]
        assert _within(int(sel.sum()), sel.numel(), q), k
    scale = torch.tensor(1 / (1 - q), dtype=torch.float32).to(dtype)
    assert set(y.unique().tolist()) == {0.0, scale.item()}


def test_neighbours_and_quarters_drop_independently():
    torch.manual_seed(1)
    n, p = 8 * _triton.BLOCK, 0.3
    d = (timm_dropfix.fast_dropout(torch.ones(n, device=DEVICE), p) == 0).float().cpu()
    for gap in (1, 2, 3, 4, _triton.BLOCK // 4, _triton.BLOCK // 2, _triton.BLOCK):  # same counter, next program
        assert _within(int((d[gap:] * d[:-gap]).sum()), n - gap, p * p), gap


def test_mask_depends_on_the_seed_and_index_only_and_the_gradient_is_the_mask():
    x = torch.randn(2 * _triton.BLOCK + 77, device=DEVICE)
    a, b = torch.empty_like(x), torch.empty_like(x[:500])
    _triton.dropout_into(a, x, 12345, 2 ** 31, 2.0)
    _triton.dropout_into(b, x[:500].clone(), 12345, 2 ** 31, 2.0)
    assert torch.equal(a[:500], b)  # a shorter tensor: the same mask on its elements
    c = torch.empty_like(x)
    _triton.dropout_into(c, x, 12346, 2 ** 31, 2.0)
    assert not torch.equal(a, c)
    x = torch.randn(4, 8, 5, 5, device=DEVICE, requires_grad=True)
    torch.manual_seed(3)
    y = timm_dropfix.fast_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(y, timm_dropfix.fast_dropout(x, 0.2))
    g = torch.randn_like(y)
    y.backward(g)
    mask = y.detach() / x.detach()
    torch.testing.assert_close(x.grad, g * mask)
    assert set(mask.unique().round(decimals=5).tolist()) == {0.0, 1.25}


@pytest.mark.filterwarnings('ignore:Input #.* is not a double precision')
def test_keeps_nothing_for_backward_any_layout_twice_differentiable_nan():
    x = torch.randn(2, 16, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        torch.manual_seed(5)
        y = timm_dropfix.fast_dropout(x, 0.3)
    assert packed == [] and type(y.grad_fn).__name__ == '_FusedDropoutBackward'
    assert y.is_contiguous(memory_format=torch.channels_last)
    mask = y.detach() / x.detach()
    g = torch.randn(y.shape, device=DEVICE)  # contiguous, unlike y
    gx, = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * mask)
    kernel = fastdrop._gpu_kernel()
    seeded = lambda t: fastdrop._FusedDropout.apply(t, 99, round(0.3 * 2 ** 32), False, kernel)
    small = torch.randn(3, 5, 7, device=DEVICE, requires_grad=True)
    # float32 (the kernel's CUDA dtypes): the op is linear, so loose finite differences are exact up to rounding
    assert torch.autograd.gradcheck(seeded, (small,), eps=1e-2, atol=1e-3)
    assert torch.autograd.gradgradcheck(seeded, (small,), eps=1e-2, atol=1e-3)
    assert torch.isnan(timm_dropfix.fast_dropout(torch.full((1000,), float('nan'), device=DEVICE), 0.5)).all()
    x64 = torch.randn(64, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(0)  # float64 is not the kernel's: torch's dropout, the same numbers under the same seed
    ours = timm_dropfix.fast_dropout(x64, 0.5)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.functional.dropout(x64, 0.5))


def test_branch_end_dropout_runs_in_place_in_a_dropfix_model():
    """The blocks' routing with the kernel standing in for CUDA: every branch-end dropout is fused with the residual
    addition and writes into its BN output (the same gradients as out of place under the same seed; on a GPU the
    BN is cuDNN's); the pre-pool head's dropout (a ReLU output) is not in place. The fused sum equals dropout then
    add up to the one rounding it saves."""
    model = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5, zero_init_last=False))
    model = model.to(DEVICE).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    calls = {}
    for name, m, may in (('inplace', model, fastdrop._may_overwrite), ('copy', twin, lambda x, producer: False)):
        torch.manual_seed(0)
        with mock.patch.object(fastdrop, 'fast_dropout', wraps=fastdrop.fast_dropout) as one, \
                mock.patch.object(fastdrop, '_dropout_add', wraps=fastdrop._dropout_add) as add, \
                mock.patch.object(fastdrop, '_may_overwrite', may), \
                mock.patch.object(fastdrop._native, 'dropout_into', side_effect=AssertionError('C kernel used')):
            m(x).sum().backward()
        calls[name] = ([c.args[3] for c in add.call_args_list],
                      [c.kwargs.get('inplace', False) for c in one.call_args_list])
    assert calls == {'inplace': ([True] * 8, [False]), 'copy': ([False] * 8, [False])}
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    branch, shortcut = torch.randn(2, 4096, device=DEVICE), torch.randn(2, 4096, device=DEVICE)
    torch.manual_seed(1)
    fused = timm_dropfix.fast_dropout_add(branch, shortcut, 0.3)
    torch.manual_seed(1)
    torch.testing.assert_close(fused, timm_dropfix.fast_dropout(branch, 0.3) + shortcut)
    branch.view(-1)[:3] = torch.tensor([float('nan'), -1e6, 0.0])
    shortcut.view(-1)[1] = -1.0  # element 1's sum is negative whether its branch value is dropped or kept
    for dtype in (torch.float32, torch.bfloat16):  # with the block's ReLU on the sum: the same up to that rounding
        b = branch.to(dtype, copy=True).requires_grad_(True)
        s = shortcut.to(dtype, copy=True).requires_grad_(True)
        torch.manual_seed(2)
        fused = timm_dropfix.fast_dropout_add(b * 1, s * 1, 0.3, relu=True)
        fused.sum().backward()
        grads = (b.grad, s.grad)
        b.grad = s.grad = None
        torch.manual_seed(2)
        steps = torch.relu(timm_dropfix.fast_dropout(b * 1, 0.3) + s * 1)
        steps.sum().backward()
        torch.testing.assert_close(fused, steps, equal_nan=True, atol=0.05 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=0.016 if dtype == torch.bfloat16 else 1e-5)
        # where the one rounding puts a sum near 0 on the other side of the ReLU, the gradient there differs
        same_side = (fused > 0) == (steps > 0)
        assert same_side.float().mean() > 0.99
        assert torch.equal(grads[0][same_side], b.grad[same_side])
        assert torch.equal(grads[1][same_side], s.grad[same_side])
        assert fused[0, 1] == 0 and fused.isnan()[0, 0]


def test_preact_bn_relu_and_dropout_fused():
    """A pre-activation model with the kernel standing in for CUDA: each block's BN-ReLU and dropout run as one pass
    (the Triton kernel's ReLU form), with the modules' numbers and gradients under the same seed."""
    model = timm.create_model('preresnet18_dropfix', num_classes=5).to(DEVICE).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    outs = {}
    for key, m, route in (('fused', model, fastdrop.run_norm_act_dropout), ('modules', twin, lambda *a: None)):
        torch.manual_seed(0)
        with mock.patch('timm_dropfix.blocks.run_norm_act_dropout', route), \
                mock.patch.object(fastdrop._FusedReluDropout, 'apply', wraps=fastdrop._FusedReluDropout.apply) as spy, \
                mock.patch.object(fastdrop._native, 'dropout_into', side_effect=AssertionError('C kernel used')):
            outs[key] = m(x)
            outs[key].sum().backward()
        assert spy.call_count == (8 if key == 'fused' else 0)
    torch.testing.assert_close(outs['fused'], outs['modules'])
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('form', ['add_relu', 'relu'])
def test_one_pass_backward_kernels_match_the_composed_backward(dtype, form):
    """The one-pass backward kernels of the two ReLU forms give the bits of the composed ops (the ReLU's backward,
    then the dropout; or the scaled gradient, then the ReLU's backward) that create_graph uses, NaN and inf
    included, over several programs and a partial last one, for a gradient in either layout."""
    kernel = fastdrop._gpu_kernel()
    one_pass = 'add_relu_backward_into' if form == 'add_relu' else 'relu_backward_into'
    t = round(0.3 * 2 ** 32)
    shape = (2, 3, _triton.BLOCK // 8 + 5, 9)  # about 3.4 programs
    torch.manual_seed(0)
    x, s = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    x.view(-1)[:4] = torch.tensor([float('nan'), -0.0, float('inf'), -float('inf')])
    x, s = x.to(dtype).contiguous(memory_format=torch.channels_last), s.to(dtype).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    g.view(-1)[4:7] = torch.tensor([float('nan'), float('inf'), -0.0])
    results = {}
    for route in ('one_pass', 'composed'):
        xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        with mock.patch.object(_triton, one_pass, wraps=getattr(_triton, one_pass)) as spy:
            if form == 'add_relu':
                y = fastdrop._FusedDropout.apply(xr * 1, 11, t, True, kernel, sr * 1, True)
            else:
                y = fastdrop._FusedReluDropout.apply(xr * 1, 11, t, kernel)
            for grad in (g, g.contiguous(memory_format=torch.channels_last)):
                grads = torch.autograd.grad(y, [xr, sr], grad, retain_graph=True, allow_unused=True,
                                            create_graph=route == 'composed')
                results.setdefault(route, []).extend(v.detach() for v in grads if v is not None)
        assert spy.call_count == (2 if route == 'one_pass' else 0)
    assert len(results['one_pass']) == (4 if form == 'add_relu' else 2)
    # the relu form's composed ops scale with torch's multiply; the interpreter rounds the kernel's float32 product
    # to bfloat16 toward zero, where a GPU rounds it to nearest even as torch does: one unit in the last place
    ulp = 2 ** -7 if INTERPRETED and dtype == torch.bfloat16 and form == 'relu' else 0
    for a, b in zip(results['one_pass'], results['composed']):
        torch.testing.assert_close(a, b, rtol=ulp, atol=0, equal_nan=True)
        assert torch.equal(a.signbit(), b.signbit())
