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


@pytest.fixture(params=['fused', 'torch_ops'])
def levels(request, monkeypatch):
    """Run a test on the fused C kernel (32-bit words) and on the torch-ops path used without a C compiler (16-bit
    words); the value is the number of word levels."""
    if request.param == 'torch_ops':
        monkeypatch.setattr(fastdrop._native, 'load', lambda: None)
        return 1 << 16
    assert fastdrop._native.load() is not None, 'the fused kernel did not build: is a C compiler installed?'
    return 1 << 32


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_rate_scale_and_every_lane_of_a_word(p, levels):
    """Drop rate p (rounded to a word level) overall and at each position in a block of 16 elements (the fused
    kernel's two 32-bit halves of eight hashes; the torch-ops path's four 16-bit lanes of a draw), kept values scaled
    by the exact inverse keep rate, so the mean of many outputs is the input."""
    torch.manual_seed(0)
    n = 400_000
    y = timm_dropfix.fast_dropout(torch.ones(n), p)
    t = round(p * levels)
    q = t / levels
    dropped = y == 0
    assert _within(int(dropped.sum()), n, q)
    for lane in range(16):  # a generator without the full 64-bit range would leave one lane never dropping
        assert _within(int(dropped[lane::16].sum()), n // 16, q)
    assert set(y.unique().tolist()) == {0.0, torch.tensor(levels / (levels - t), dtype=torch.float32).item()}
    assert abs(y.double().mean().item() - 1.0) < 6 * math.sqrt(q / (1 - q) / n)


def test_neighbours_drop_independently(levels):
    torch.manual_seed(1)
    n, p = 400_000, 0.3
    d = (timm_dropfix.fast_dropout(torch.ones(n), p) == 0).float()
    for gap in (1, 2, 3, 4, 5, 8, 16, 17, 64):  # same word or hash, the next ones, far apart
        both = int((d[gap:] * d[:-gap]).sum())
        assert _within(both, n - gap, p * p), gap


def test_deterministic_under_the_seed_and_gradient_is_the_mask(levels):
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


def test_keeps_channels_last_and_leaves_other_inputs_to_torch(levels):
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    y = timm_dropfix.fast_dropout(x, 0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)
    assert 0.3 < kept.float().mean().item() < 0.7
    # a half-precision tensor or a rate below half a word level is F.dropout's: the same numbers under the same seed
    for x, p in ((torch.randn(64, dtype=torch.bfloat16), 0.5), (torch.randn(64), 0.4 / levels)):
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


def test_fused_kernel_keeps_nothing_for_backward_and_recomputes_the_mask_in_any_layout():
    """The fused path saves no tensor for backward; gradients arriving in another memory layout (contiguous for a
    channels_last input, or expanded as from .sum()) meet the same mask; the result does not depend on the number
    of threads; the op is twice differentiable; NaN propagates through dropped elements as with torch's x * mask."""
    x = torch.randn(4, 32, 20, 20, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        torch.manual_seed(5)
        y = timm_dropfix.fast_dropout(x, 0.3)
    assert packed == [] and type(y.grad_fn).__name__ == '_FusedDropoutBackward'
    mask = y.detach() / x.detach()
    g = torch.randn(y.shape, dtype=torch.float64)  # contiguous, unlike y
    gx, = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * mask)
    torch.manual_seed(5)
    gx, = torch.autograd.grad(timm_dropfix.fast_dropout(x, 0.3).sum(), x)
    torch.testing.assert_close(gx, mask)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(5)
        one_thread = timm_dropfix.fast_dropout(x, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, y)
    kernel = fastdrop._native.dropout_into
    seeded = lambda t: fastdrop._FusedDropout.apply(t, 1234, round(0.3 * 2 ** 32), False, kernel)
    small = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seeded, (small,)) and torch.autograd.gradgradcheck(seeded, (small,))
    nan = torch.full((1000,), float('nan'))
    assert torch.isnan(timm_dropfix.fast_dropout(nan, 0.5)).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('inplace', [False, True])
def test_fused_dropout_add_relu_is_bit_identical_to_the_three_steps(dtype, inplace):
    """relu(dropout(x) + shortcut) in one pass: the same values (NaN and -0.0 included, as torch's ReLU keeps them)
    and the same gradients for x and the shortcut as the three steps under the same seed, in either memory layout;
    backward keeps only the output (which the ReLU module keeps too); twice differentiable."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    s = torch.randn(4, 16, 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x[0, :6, 0, 0] = torch.tensor([float('nan'), -0.0, -0.0, 0.0, float('inf'), -float('inf')], dtype=dtype)
    s[0, :6, 0, 0] = torch.tensor([1.0, -0.0, 0.0, -0.0, 1.0, 1.0], dtype=dtype)
    outs, grads = {}, {}
    g = torch.randn(x.shape, dtype=dtype)
    for route in ('fused', 'steps'):
        xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        xi, si = xr * 1, sr * 1  # non-leaf inputs, which the in-place form may overwrite
        packed = []
        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            if route == 'fused':
                y = timm_dropfix.fast_dropout_add(xi, si, 0.3, inplace=inplace, relu=True)
            else:
                y = torch.relu(timm_dropfix.fast_dropout(xi, 0.3, inplace=inplace) + si)
        if route == 'fused':
            assert len(packed) == 1 and packed[0] is y and type(y.grad_fn).__name__ == '_FusedDropoutBackward'
            assert (y.data_ptr() == xi.data_ptr()) == inplace
        y.backward(g)
        outs[route], grads[route] = y.detach(), (xr.grad, sr.grad)
    assert torch.equal(outs['fused'].signbit(), outs['steps'].signbit())
    torch.testing.assert_close(outs['fused'], outs['steps'], rtol=0, atol=0, equal_nan=True)
    for a, b in zip(grads['fused'], grads['steps']):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert (outs['fused'][~outs['fused'].isnan()] >= 0).all()
    kernel = fastdrop._native.dropout_into
    seeded = lambda a, b: fastdrop._FusedDropout.apply(a, 99, round(0.3 * 2 ** 32), False, kernel, b, True)
    small = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(seeded, small) and torch.autograd.gradgradcheck(seeded, small)
    # a shortcut in another memory layout cannot share the pass: the dropout alone, then addition and ReLU
    nchw = s.contiguous()
    torch.manual_seed(3)
    with mock.patch.object(fastdrop._FusedDropout, 'apply', wraps=fastdrop._FusedDropout.apply) as spy:
        fallback = timm_dropfix.fast_dropout_add(x, nchw, 0.3, relu=True)
    assert spy.call_count == 1 and len(spy.call_args.args) == 5  # no shortcut passed to the kernel
    torch.manual_seed(3)
    torch.testing.assert_close(fallback, torch.relu(timm_dropfix.fast_dropout(x, 0.3) + nchw), rtol=0, atol=0,
                               equal_nan=True)


def test_kernel_build_is_cached_and_failures_fall_back(tmp_path, monkeypatch, caplog):
    """The kernel is built into the cache folder and loaded from there; a compiler that fails leaves a warning
    with the reason and no library (fast_dropout then takes the torch-ops path); an unwritable cache folder falls
    back to a temporary folder."""
    native = fastdrop._native
    monkeypatch.setenv('TIMM_DROPFIX_CACHE_DIR', str(tmp_path / 'cache'))
    assert native._build_and_load() is not None
    built = list((tmp_path / 'cache' / 'kernels').glob('dropout-*.so'))
    assert len(built) == 1
    inode = built[0].stat().st_ino
    assert native._build_and_load() is not None and built[0].stat().st_ino == inode  # reused, not rebuilt
    mtime = built[0].stat().st_mtime_ns
    stale = [built[0].with_name(f'dropout-{i:016x}.so') for i in range(5)]  # kernels of older sources
    for i, p in enumerate(stale):
        p.write_bytes(b'')
        os.utime(p, ns=(mtime - (i + 1) * 10 ** 9,) * 2)
    built[0].unlink()
    assert native._build_and_load() is not None  # the rebuild keeps itself and the three newest others
    assert sorted((tmp_path / 'cache' / 'kernels').glob('dropout-*.so')) == sorted([built[0], *stale[:3]])
    # loading marks a kernel used: the oldest build, once loaded, outlives newer builds at the next prune
    os.utime(built[0], ns=(mtime - 10 ** 12,) * 2)
    assert native._build_and_load() is not None and built[0].stat().st_mtime_ns > mtime
    (tmp_path / 'file').write_text('')
    monkeypatch.setenv('TIMM_DROPFIX_CACHE_DIR', str(tmp_path / 'file'))  # mkdir under a file fails
    monkeypatch.setattr(native.tempfile, 'gettempdir', lambda: str(tmp_path / 'tmp'))
    assert native._build_and_load() is not None
    assert len(list((tmp_path / 'tmp').glob('timm_dropfix-kernels-*/dropout-*.so'))) == 1
    monkeypatch.setenv('TIMM_DROPFIX_CACHE_DIR', str(tmp_path / 'other'))
    broken = tmp_path / 'broken-cc'
    broken.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\n'
                      'echo "no such flag" >&2; exit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv('CC', str(broken))
    with caplog.at_level('WARNING', logger=native.__name__):
        assert native._build_and_load() is None
    assert 'no such flag' in caplog.text and 'torch-ops path' in caplog.text
    monkeypatch.setattr(native, 'load', lambda: None)
    torch.manual_seed(0)
    y = timm_dropfix.fast_dropout(torch.ones(1000, requires_grad=True), 0.5)
    assert type(y.grad_fn).__name__ == '_WordDropoutBackward' and set(y.unique().tolist()) == {0.0, 2.0}


def _spy_fast_routes():
    """Spies on both fast routes: fast_dropout (a dropout alone) and _dropout_add (a branch-end dropout fused with
    the residual addition; its fourth argument says in place)."""
    return (mock.patch.object(fastdrop, 'fast_dropout', wraps=fastdrop.fast_dropout),
            mock.patch.object(fastdrop, '_dropout_add', wraps=fastdrop._dropout_add))


def _count_fast_calls(model, x, train=True):
    model.train(train)
    one, add = _spy_fast_routes()
    with one as spy_one, add as spy_add:
        model(x)
    return spy_one.call_count + spy_add.call_count


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


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('name', ['preresnet18_dropfix', 'resnet18_dropfix'])
def test_a_train_mode_trace_records_torch_dropout_and_stays_random(name):
    """torch.jit.trace would bake one seed into the graph (the same masks on every call) and cannot replay the
    in-place Functions: under tracing the modules run torch's dropout, which the trace records as a random op."""
    model = timm.create_model(name, num_classes=5).train()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_trace=False)
    assert _count_fast_calls(traced, x) == 0
    assert not torch.equal(traced(x), traced(x))
    seeded = torch.jit.trace(lambda t: timm_dropfix.fast_dropout(t, 0.5), torch.ones(64))
    assert not torch.equal(seeded(torch.ones(64)), seeded(torch.ones(64)))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')  # torch's forward-AD dropout
def test_forward_mode_ad_gets_torch_dropout():
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.ones(100), torch.ones(100))
        out, tangent = fwAD.unpack_dual(timm_dropfix.fast_dropout(dual, 0.5))
    assert torch.equal(out, tangent) and (out == 0).any()  # the tangent is masked and scaled as the values are


def test_inplace_on_a_strided_tensor_overwrites_it():
    """The kernel writes dense memory only; a transposed or sliced x is still overwritten, by torch's kernel."""
    for make in (lambda: torch.ones(8, 8).t(), lambda: torch.ones(8, 16)[:, ::2]):
        x = make()
        assert timm_dropfix.fast_dropout(x, 0.5, inplace=True) is x and (x == 0).any() and (x == 2).any()
        x, shortcut = make(), make()
        assert timm_dropfix.fast_dropout_add(x, shortcut, 0.5, inplace=True) is x
        assert sorted(x.unique().tolist()) == [1.0, 3.0]


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
    plain = lambda module, x, producer=None: module(x)
    with mock.patch('timm_dropfix.blocks.run_dropout', plain), mock.patch('timm_dropfix.heads.run_dropout', plain), \
            mock.patch('timm_dropfix.blocks.run_dropout_add', lambda *args: None):
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


def test_branch_end_dropout_overwrites_the_fresh_bn_output_only_when_nothing_else_reads_it():
    """At the end of a post-activation branch the fused kernel drops the BN (or SE) output in place: the same
    numbers and gradients as out of place under the same seed, without allocating an output. A forward hook on
    that BN may keep its output, so there the dropout allocates and the hook's tensor stays intact; a ReLU output
    (kept by autograd) is never overwritten."""
    import copy
    # zero_init_last=False: timm zeroes the last BN's scale by default, which would make its output all zeros
    model = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5, zero_init_last=False)).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for name, m, may in (('inplace', model, fastdrop._may_overwrite), ('copy', twin, lambda x, producer: False)):
        torch.manual_seed(0)
        one, add = _spy_fast_routes()
        with one as spy_one, add as spy_add, mock.patch.object(fastdrop, '_may_overwrite', may):
            m(x).sum().backward()
        results[name] = ([call.args[3] for call in spy_add.call_args_list],
                         [call.kwargs.get('inplace', False) for call in spy_one.call_args_list])
    # 8 blocks (dropout and residual add fused), then the pre-pool head (a ReLU output)
    assert results['inplace'] == ([True] * 8, [False])
    assert results['copy'] == ([False] * 8, [False])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    kept = []
    model.layer1[0].bn2.register_forward_hook(lambda mod, i, o: kept.append(o))
    with mock.patch.object(fastdrop, '_dropout_add', wraps=fastdrop._dropout_add) as spy:
        model(x)
    assert [call.args[3] for call in spy.call_args_list][:2] == [False, True]
    assert (kept[0] == 0).float().mean().item() < 0.01  # not dropped (a dropped copy would be ~10 % zeros)
    relu_out = torch.relu(torch.randn(100, requires_grad=True))
    assert not fastdrop._may_overwrite(relu_out, torch.nn.ReLU())
    with pytest.raises(RuntimeError, match='inplace'):  # autograd would refuse it anyway
        timm_dropfix.fast_dropout(relu_out, 0.5, inplace=True).sum().backward()


def test_triton_kernel_under_the_interpreter():
    """The CUDA path (the Triton kernel, its routing and autograd) on the CPU: ``tests/triton_checks.py`` in a child
    pytest with TRITON_INTERPRET=1, which triton reads before it compiles anything."""
    if os.environ.get('CI'):  # torch's Linux wheels install triton: in CI its absence is a broken install
        import triton  # noqa: F401
    else:
        pytest.importorskip('triton')
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET='1')
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-W', 'error::UserWarning',
                          os.path.join(here, 'triton_checks.py')], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(here), timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert ' passed' in run.stdout and ' failed' not in run.stdout and 'skipped' not in run.stdout


def test_triton_kernels_compile_for_an_h100():
    """Every Triton kernel, in every dtype and form the package launches, compiles to an sm_90 (H100/H200) binary with
    the ptxas that triton ships: no GPU needed, so a kernel that only the interpreter accepts fails here rather than
    in a device session."""
    if os.environ.get('CI'):
        import triton  # noqa: F401
    triton = pytest.importorskip('triton')
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from timm_dropfix import _triton
    types = {'n': 'i64', 'seed_lo': 'i32', 'seed_hi': 'i32', 't_signed': 'i32', 'scale': 'fp32'}
    forms = [(_triton._dropout_kernel, {'HAS_ADD': add, 'RELU': relu})
             for add in (False, True) for relu in (False, True)]
    forms += [(_triton._add_relu_backward_kernel, {}), (_triton._relu_backward_kernel, {})]
    for dtype in ('fp16', 'bf16', 'fp32'):
        for kernel, flags in forms:
            signature = {name: 'constexpr' if param.is_constexpr else f'*{dtype}' if name.endswith('_ptr')
                         else types[name] for name, param in zip(kernel.arg_names, kernel.params)}
            source = ASTSource(fn=kernel, signature=signature, constexprs={'BLOCK': _triton.BLOCK, **flags})
            compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32), options={'num_warps': 4})
            assert len(compiled.asm['cubin']) > 0, (kernel, dtype, flags)


@pytest.mark.parametrize('failing', ['dropout_into', 'add_relu_backward_into', 'relu_backward_into'])
def test_gpu_kernel_that_fails_its_probe_leaves_torchs_kernel(monkeypatch, caplog, failing):
    """A Triton kernel that cannot run (no compiler for this GPU, say) is found by its probe launches, the backward
    kernels' included (which would otherwise fail in the middle of a step): a warning with the reason, and tensors
    of its device go to torch's dropout."""
    import types
    broken = types.ModuleType('timm_dropfix._triton')

    def fail(*args):
        raise RuntimeError('ptxas not found')

    def keep(x):  # a stand-in mask: every other element
        return (torch.arange(x.numel()) % 2 == 0).view(x.shape)
    # kernels that keep the contract on the probe's half and float dtypes, but for the one that fails
    broken.dropout_into = lambda out, x, seed, t, scale: out.copy_(x * keep(x) * scale)
    broken.add_relu_backward_into = lambda gs, gb, g, y, seed, t, scale: (
        gs.copy_(torch.where(y <= 0, 0, g)), gb.copy_(gs * keep(g) * scale))
    broken.relu_backward_into = lambda gx, g, y, scale: gx.copy_(torch.where(y <= 0, 0, g * scale))
    setattr(broken, failing, fail)
    monkeypatch.setitem(sys.modules, 'timm_dropfix._triton', broken)
    monkeypatch.setattr(timm_dropfix, '_triton', broken, raising=False)
    monkeypatch.setattr(fastdrop, '_GPU_DEVICE', 'cpu')  # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(fastdrop, '_gpu_state', {})
    x = torch.randn(1000)
    with caplog.at_level('WARNING', logger=fastdrop.__name__):
        torch.manual_seed(0)
        ours = timm_dropfix.fast_dropout(x, 0.5)
    assert 'ptxas not found' in caplog.text and "torch's" in caplog.text
    torch.manual_seed(0)
    assert torch.equal(ours, F.dropout(x, 0.5))
    assert timm_dropfix.dropout_kernel('cpu') == 'torch'


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'seresnet18', 'tv_resnet18', 'tv_resnet50', 'v2_postact'])
def test_branch_end_dropout_fused_with_the_residual_add_is_bit_identical(name):
    """Post-activation blocks with the dropout at the branch end add the shortcut in the same pass: the forward
    output and every gradient are bit for bit those of the dropout followed by the addition (same seed), in place
    or not, and a drop_path between them (timm's drop_path_rate) keeps the two steps."""
    import copy
    import torchvision
    if name.startswith('tv_'):
        base = getattr(torchvision.models, name[3:])(num_classes=5)
    elif name == 'v2_postact':
        base = timm.create_model('resnetv2_50', num_classes=5, preact=False)
    else:
        base = timm.create_model(name, num_classes=5, zero_init_last=False)
    model = timm_dropfix.rewrite(base, branch_position='branch_end').train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for key, m, patch in (('fused', model, None), ('steps', twin, lambda *args: None)):
        torch.manual_seed(0)
        with mock.patch.object(fastdrop, '_dropout_add', wraps=fastdrop._dropout_add) as spy, \
                mock.patch('timm_dropfix.blocks.run_dropout_add', patch or fastdrop.run_dropout_add):
            outs[key] = m(x)
            outs[key].sum().backward()
        n_blocks = sum(1 for b in m.modules() if timm_dropfix.is_dropfix_block(b))
        assert spy.call_count == (n_blocks if key == 'fused' else 0)
        if key == 'fused':  # every block's activation after the addition (a ReLU) ran in the same pass
            assert all(c.args[4] is True for c in spy.call_args_list)
    assert torch.equal(outs['fused'], outs['steps'])
    for (k, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), k
    with_drop_path = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5, drop_path_rate=0.1),
                                          branch_position='branch_end').train()
    assert _count_fast_calls(with_drop_path, x) == 9
    blocks = [b for b in with_drop_path.modules() if timm_dropfix.is_dropfix_block(b)]
    plain = sum(1 for b in blocks if b.drop_path is None or isinstance(b.drop_path, torch.nn.Identity))
    assert 0 < plain < len(blocks)  # the rate grows with depth from 0
    with mock.patch.object(fastdrop, '_dropout_add', wraps=fastdrop._dropout_add) as spy:
        with_drop_path(x)
    assert spy.call_count == plain


def test_block_activation_is_fused_only_when_it_is_a_plain_relu():
    """A GELU after the addition, or a hook on the ReLU, keeps the dropout and the addition fused but runs the
    activation module itself (so the hook sees it); the numbers are those of the unfused steps."""
    import copy
    x = torch.randn(2, 3, 32, 32)
    gelu = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5, act_layer='gelu')).train()
    hooked = timm_dropfix.rewrite(timm.create_model('resnet18', num_classes=5)).train()
    seen = []
    hooked.layer1[0].act2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    for model, fused_relus in ((gelu, 0), (hooked, 7)):
        twin = copy.deepcopy(model)
        torch.manual_seed(0)
        with mock.patch.object(fastdrop, '_dropout_add', wraps=fastdrop._dropout_add) as spy:
            out = model(x)
        assert spy.call_count == 8 and sum(c.args[4] for c in spy.call_args_list) == fused_relus
        torch.manual_seed(0)
        with mock.patch('timm_dropfix.blocks.run_dropout_add', lambda *args: None):
            assert torch.equal(out, twin(x))
    assert seen == [(2, 64, 8, 8)] * 2  # the hooked model's forward and its twin's


@pytest.mark.parametrize('name', ['preresnet18_dropfix', 'preresnet50_dropfix'])
def test_preact_bn_relu_and_dropout_fused_are_bit_identical_and_keep_one_tensor_less(name):
    """Before a pre-activation branch's last conv the BN's ReLU and the dropout run as one pass into the BN output:
    output, gradients and running statistics bit for bit those of the modules (same seed), and autograd keeps
    exactly one tensor less per block (the ReLU's output, which the modules keep besides the dropout's). A hook on
    the BN-ReLU module, eval mode or the switch turned off leave the modules in charge."""
    import copy
    model = timm.create_model(name, num_classes=5).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    blocks = [b for b in model.modules() if timm_dropfix.is_dropfix_block(b)]
    outs, kept, relu_bytes = {}, {}, []
    for key, m, route in (('fused', model, fastdrop.run_norm_act_dropout), ('modules', twin, lambda *a: None)):
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        torch.manual_seed(0)
        with mock.patch('timm_dropfix.blocks.run_norm_act_dropout', route), \
                mock.patch.object(fastdrop._FusedReluDropout, 'apply', wraps=fastdrop._FusedReluDropout.apply) as spy, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs[key] = m(x)
        outs[key].sum().backward()
        kept[key] = sum(saved.values())
        assert spy.call_count == (len(blocks) if key == 'fused' else 0)
    assert torch.equal(outs['fused'], outs['modules'])
    for (k, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), k
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)
    last_norms = [b.norm3 if hasattr(b, 'norm3') else b.norm2
                  for b in twin.modules() if timm_dropfix.is_dropfix_block(b)]
    handles = [n.register_forward_hook(lambda mod, i, o: relu_bytes.append(o.untyped_storage().nbytes()))
               for n in last_norms]
    with torch.no_grad():
        twin(x)
    assert kept['modules'] - kept['fused'] == sum(relu_bytes)
    for h in handles[1:]:
        h.remove()  # the first block's BN-ReLU keeps its hook: that block runs the modules
    with mock.patch.object(fastdrop._FusedReluDropout, 'apply', wraps=fastdrop._FusedReluDropout.apply) as spy:
        twin(x)
        assert spy.call_count == len(blocks) - 1
        twin.eval()(x)
        handles[0].remove()
        torch.compile(twin.train(), backend='eager', fullgraph=True)(x)  # traced: the modules, no graph break
        timm_dropfix.set_fast_dropout(False)
        twin(x)
        assert spy.call_count == len(blocks) - 1


@pytest.mark.parametrize('form', ['add_relu', 'relu'])
def test_one_pass_backward_kernels_match_the_composed_backward(form):
    """Where autograd builds no graph of the backward, the post-activation branch end (dropout, addition, ReLU) and
    the pre-activation BN-ReLU-dropout take their gradients from one pass of the C kernel; with create_graph they
    compose differentiable ops. Both give the same bits (NaN, inf and the sign of zeros included) for any length
    (the kernel's 16-element blocks, a tail, the OpenMP split) and for a gradient in another layout."""
    kernel = fastdrop._native.dropout_into
    one_pass = 'add_relu_backward_into' if form == 'add_relu' else 'relu_backward_into'
    t = round(0.3 * 2 ** 32)
    for shape in ((3, 5, 7), (2, 64, 33, 33)):
        torch.manual_seed(0)
        x, s = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        x.view(-1)[:5] = torch.tensor([float('nan'), -0.0, float('inf'), -float('inf'), 0.0], dtype=torch.float64)
        g = torch.randn(shape, dtype=torch.float64)
        g.view(-1)[5:8] = torch.tensor([float('nan'), float('inf'), -0.0], dtype=torch.float64)
        results = {}
        for route in ('one_pass', 'composed'):
            xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
            with mock.patch.object(fastdrop._native, one_pass, wraps=getattr(fastdrop._native, one_pass)) as spy:
                if form == 'add_relu':
                    y = fastdrop._FusedDropout.apply(xr * 1, 11, t, True, kernel, sr * 1, True)
                else:
                    y = fastdrop._FusedReluDropout.apply(xr * 1, 11, t, kernel)
                for grad in (g, torch.ones(()).expand(shape)):  # dense, then expanded as from .sum()
                    grads = torch.autograd.grad(y, [xr, sr], grad, retain_graph=True, allow_unused=True,
                                                create_graph=route == 'composed')
                    results.setdefault(route, []).extend(v for v in grads if v is not None)
            assert spy.call_count == (2 if route == 'one_pass' else 0)
        assert len(results['one_pass']) == len(results['composed']) == (4 if form == 'add_relu' else 2)
        for a, b in zip(results['one_pass'], results['composed']):
            assert a.stride() == b.stride() or a.is_contiguous()
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0, equal_nan=True)
            assert torch.equal(a.signbit(), b.detach().signbit())


def test_c_kernel_refuses_tensors_it_cannot_read():
    """The C kernels read raw memory, so a tensor of another dtype or device is refused with a TypeError instead of
    being read as float64 past its end."""
    for x in (torch.ones(4, dtype=torch.float16), torch.ones(4, dtype=torch.bfloat16), torch.ones(4, device='meta')):
        with pytest.raises(TypeError, match='CPU float32/float64'):
            fastdrop._native.dropout_into(x, x, 1, 1 << 31, 2.0)
        with pytest.raises(TypeError, match='CPU float32/float64'):
            fastdrop._native.relu_backward_into(x, x, x, 2.0)


@pytest.mark.parametrize('edit', [
    ('out[i] = y[i] <= 0 ? 0 : g[i] * scale;', 'out[i] = y[i] <= 0 ? 0 : g[i];', 'relu backward'),
    ('>= t ? scale : (T)0', '>= t / 2 ? scale : (T)0', 'dropout forward'),
    ('if (y[16 * b + j] <= 0) a[j] = 0;', 'if (y[16 * b + j] < 0) a[j] = 0;', 'add_relu backward'),
])
def test_a_kernel_built_wrong_is_caught_by_its_self_test(tmp_path, monkeypatch, caplog, edit):
    """Each process checks the library it loads against the kernels' definition (a compiler can vectorize such loops
    wrongly: GCC 12.2 did, for one form of the backward): the library as built here passes; one whose source (standing
    in for a wrong compilation) drops too few elements, forgets the scale or lets zeros through is refused with a
    warning that names what differed, and the fast dropout keeps its torch-ops path."""
    native = fastdrop._native
    assert native._self_test(native.load()) is None
    old, new, what = edit
    source = native._SOURCE.read_text()
    assert source.count(old) >= 1
    wrong = tmp_path / 'dropout.c'
    wrong.write_text(source.replace(old, new))
    monkeypatch.setattr(native, '_SOURCE', wrong)
    monkeypatch.setenv('TIMM_DROPFIX_CACHE_DIR', str(tmp_path / 'cache'))
    with caplog.at_level('WARNING', logger=native.__name__):
        assert native._build_and_load() is None
    assert 'gives wrong results' in caplog.text and what in caplog.text and 'torch-ops path' in caplog.text
