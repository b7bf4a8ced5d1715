"""The paper's module tests (Figures 1 and 2) and the same variance-shift question on a real ResNet-50.

Part 1, module tests (pure torch, Kim et al., UAI 2023, settings in ``../shared/docs/paper.md``): inputs of
100,000 x 128, BN and dropout in train mode, bias-free linear layers, per-feature biased variance over the batch
averaged over features; ratio = Var(output without dropout) / Var(output with dropout), the shift a downstream BN
would see between training and test.

* Figure 1: ``x = ReLU(BN(W0 ReLU(BN(X))))``, ``X ~ N(0, 1)``, weights ``~ N(w_mean, 2/128)``, ``p = 0.5``;
  dropout *after* the weight layer (``D(W1 x)``) against dropout *before* it (``W1 D(x)``).
* Figure 2: ``f = W1 D(ReLU(BN(W0 ReLU(BN(X0)))))``, ``p = 0.1``, input scale ``std(X0)`` swept 0.2..5; the
  branch alone against the residual sum ``X0 + f``.

Part 2, real network: the ImageNet ResNet-50 of ``../shared/weights`` (v1 strides patched) on real Pets images.
For each branch position and head variant of :mod:`timm_dropfix`, a fresh copy is rewritten and we measure

* (a) the variance shift at the input of every BN: Var(input, eval mode) / Var(input, dropout active with BN in
  eval mode so its statistics stay fixed), per BN layer (ratio of channel-averaged variances, as in the module
  tests; 1 means no shift, < 1 means the BN was calibrated on a noisier signal than it sees at test time);
* (b) the variance of the logits over dropout masks (same images, K masks), and how often a mask flips the
  eval-mode top-1 prediction.

Usage::

    python benchmarks/module_tests.py            # default: both parts (measured 18.5 min on a shared 2-core
                                                 # machine under load ~10; far less on idle cores)
    python benchmarks/module_tests.py --quick    # smaller sweeps, 8 images at 128 px (about 8x less work)
    python benchmarks/module_tests.py --part figures

Outputs (``--out-dir``, default ``benchmarks/results``): ``module_tests[_quick].json``, ``.md``,
``module_tests[_quick]_fig1.png``, ``_fig2.png``, ``_bn_shift.png``, ``_logit_var.png``.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (script-local helper module, see its docstring)

# Paper values (paper.md, "Module tests"), kept next to our measurements in the JSON and the markdown.
PAPER_FIG1 = {'after_weight_at_0': 0.41, 'after_weight_at_pm0.02': (0.24, 0.27), 'before_weight': 0.41}
PAPER_FIG2 = {'branch': 0.86, 'residual': {0.2: 0.87, 1.0: 0.94, 5.0: 0.996}}

WEIGHTS_NAME = 'resnet50_keras_in1k'


# ----------------------------------------------------------------------------------------------------------------
# Part 1: module tests
# ----------------------------------------------------------------------------------------------------------------

def _bn_train(x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in train mode with unit affine: standardize each feature with the batch statistics."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


def _feature_var(x: torch.Tensor) -> float:
    """Per-feature biased variance over the batch, averaged over features (the paper's statistic)."""
    return x.var(dim=0, unbiased=False).mean().item()


def _dropout_mask(shape: Sequence[int], p: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted-dropout multiplier (0 or 1/(1-p)); explicit generator so every sweep point is reproducible."""
    keep = 1.0 - p
    return (torch.rand(shape, generator=generator) < keep).float().div_(keep)


def _draws(n: int, d: int, p: float, seed: int) -> tuple[torch.Tensor, ...]:
    """The random draws of one module test, in a fixed order: input z-scores, two weight z-scores, dropout mask.

    Sweeps reuse one set of draws for every point (common random numbers, as the paper reuses its input), so the
    curves are smooth and each point equals the single-point function called with the same seed.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    z0, z1 = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    return z, z0, z1, _dropout_mask((n, d), p, g)


def _weight(z: torch.Tensor, w_mean: float) -> torch.Tensor:
    """Bias-free linear weight ~ N(w_mean, 2/d) (He init with a shifted mean, as in the paper)."""
    return z * math.sqrt(2.0 / z.shape[1]) + w_mean


def relu_dropout_ratio_theory(p: float) -> float:
    """Expected ratio Var(h) / Var(D(h)) for ``h = ReLU(z)``, ``z ~ N(0, 1)`` and inverted dropout of rate ``p``.

    With ``E[h] = 1/sqrt(2 pi)``, ``E[h^2] = 1/2`` and ``E[D(h)^2] = E[h^2] / (1 - p)``; this is the constant
    the paper's "dropout before the weight layer" curves sit on (0.405 at p=0.5, 0.860 at p=0.1).

    Example:
        >>> round(relu_dropout_ratio_theory(0.5), 3), round(relu_dropout_ratio_theory(0.1), 3)
        (0.405, 0.86)
    """
    m2 = 1.0 / (2.0 * math.pi)
    return (0.5 - m2) / (0.5 / (1.0 - p) - m2)


@torch.no_grad()
def figure1_ratios(w_mean: float, n: int = 100_000, d: int = 128, p: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Figure 1 for one weight mean: the variance ratio for dropout after vs before the weight layer.

    ``x = ReLU(BN(W0 ReLU(BN(X))))``; ratio = Var(W1 x) / Var(D(W1 x)) ('after') and Var(W1 x) / Var(W1 D(x))
    ('before'). Both placements share X, the weights and the dropout mask (common random numbers), so their
    difference is the placement alone.

    Example:
        >>> r = figure1_ratios(0.0, n=20_000, seed=0)
        >>> 0.38 < r['before'] < 0.43 and 0.38 < r['after'] < 0.43
        True
    """
    return _figure1_from(_draws(n, d, p, seed), w_mean)


def _figure1_from(draws: tuple[torch.Tensor, ...], w_mean: float) -> dict[str, float]:
    X, z0, z1, mask = draws
    W0, W1 = _weight(z0, w_mean), _weight(z1, w_mean)
    x = F.relu(_bn_train(F.relu(_bn_train(X)) @ W0.T))
    wx = x @ W1.T
    var_eval = _feature_var(wx)
    return {'after': var_eval / _feature_var(wx * mask), 'before': var_eval / _feature_var((x * mask) @ W1.T)}


def figure1_ratio(w_mean: float, dropout_before: bool, n: int = 100_000, d: int = 128, p: float = 0.5,
                  seed: int = 0) -> float:
    """One point of Figure 1: ratio for dropout before (``True``) or after (``False``) the weight layer.

    Example:
        >>> figure1_ratio(0.02, dropout_before=False, n=20_000) < 0.3
        True
    """
    return figure1_ratios(w_mean, n=n, d=d, p=p, seed=seed)['before' if dropout_before else 'after']


@torch.no_grad()
def figure2_ratios(scale: float, n: int = 100_000, d: int = 128, p: float = 0.1, seed: int = 0,
                   w_mean: float = 0.0) -> dict[str, float]:
    """Figure 2 for one input scale: the variance ratio of the branch alone and of the residual sum.

    ``f = W1 D(ReLU(BN(W0 ReLU(BN(X0)))))`` with ``std(X0) = scale``; ratio = Var(f without dropout) / Var(f)
    ('branch') and Var(X0 + f without dropout) / Var(X0 + f) ('residual').

    Example:
        >>> r = figure2_ratios(5.0, n=20_000)
        >>> round(r['branch'], 2), r['residual'] > 0.99
        (0.86, True)
    """
    return _figure2_from(_draws(n, d, p, seed), scale, w_mean)


def _figure2_from(draws: tuple[torch.Tensor, ...], scale: float, w_mean: float = 0.0) -> dict[str, float]:
    z, z0, z1, mask = draws
    X0 = z * scale
    W0, W1 = _weight(z0, w_mean), _weight(z1, w_mean)
    h = F.relu(_bn_train(F.relu(_bn_train(X0)) @ W0.T))
    f_eval, f_train = h @ W1.T, (h * mask) @ W1.T
    return {
        'branch': _feature_var(f_eval) / _feature_var(f_train),
        'residual': _feature_var(X0 + f_eval) / _feature_var(X0 + f_train),
    }


def _grid(lo: float, hi: float, points: int) -> list[float]:
    return [round(lo + (hi - lo) * i / (points - 1), 6) for i in range(points)]


def run_figures(n: int, d: int, seeds: Sequence[int], fig1_points: int, fig2_points: int) -> dict[str, Any]:
    """Both sweeps over ``seeds`` (each seed: new inputs, weights and masks); returns per-seed and mean curves."""
    w_means = _grid(-0.02, 0.02, fig1_points)
    scales = _grid(0.2, 5.0, fig2_points)
    fig1 = {'w_mean': w_means, 'after': [], 'before': []}
    for s in seeds:
        draws = _draws(n, d, 0.5, s)
        rows = [_figure1_from(draws, w) for w in w_means]
        fig1['after'].append([r['after'] for r in rows])
        fig1['before'].append([r['before'] for r in rows])
    fig2 = {'scale': scales, 'branch': [], 'residual': []}
    for s in seeds:
        draws = _draws(n, d, 0.1, s)
        rows = [_figure2_from(draws, sc) for sc in scales]
        fig2['branch'].append([r['branch'] for r in rows])
        fig2['residual'].append([r['residual'] for r in rows])
    for fig, keys in ((fig1, ('after', 'before')), (fig2, ('branch', 'residual'))):
        for k in keys:
            fig[f'{k}_mean'] = [sum(col) / len(col) for col in zip(*fig[k])]
            fig[f'{k}_min'] = [min(col) for col in zip(*fig[k])]
            fig[f'{k}_max'] = [max(col) for col in zip(*fig[k])]

    def at(fig: dict, xkey: str, key: str, x: float) -> float:
        i = min(range(len(fig[xkey])), key=lambda j: abs(fig[xkey][j] - x))
        return fig[f'{key}_mean'][i]

    summary = {
        'fig1_after_at_-0.02': at(fig1, 'w_mean', 'after', -0.02),
        'fig1_after_at_0': at(fig1, 'w_mean', 'after', 0.0),
        'fig1_after_at_+0.02': at(fig1, 'w_mean', 'after', 0.02),
        'fig1_before_min': min(fig1['before_mean']),
        'fig1_before_max': max(fig1['before_mean']),
        'fig2_branch_min': min(fig2['branch_mean']),
        'fig2_branch_max': max(fig2['branch_mean']),
        'fig2_residual_at_0.2': at(fig2, 'scale', 'residual', 0.2),
        'fig2_residual_at_1': at(fig2, 'scale', 'residual', 1.0),
        'fig2_residual_at_5': at(fig2, 'scale', 'residual', 5.0),
    }
    return {
        'settings': {'n': n, 'd': d, 'seeds': list(seeds), 'fig1_p': 0.5, 'fig2_p': 0.1,
                     'weight_init': 'N(w_mean, 2/d), bias-free', 'bn': 'train mode, unit affine, eps 1e-5',
                     'variance': 'per-feature biased variance over the batch, averaged over features'},
        'theory': {'relu_dropout_ratio_p0.5': relu_dropout_ratio_theory(0.5),
                   'relu_dropout_ratio_p0.1': relu_dropout_ratio_theory(0.1)},
        'paper': {'fig1': {k: v for k, v in PAPER_FIG1.items()},
                  'fig2': {'branch': PAPER_FIG2['branch'],
                           'residual': {str(k): v for k, v in PAPER_FIG2['residual'].items()}}},
        'summary': summary,
        'fig1': fig1,
        'fig2': fig2,
    }


def plot_figures(res: dict[str, Any], stem: Path) -> list[Path]:
    """Figure 1 and Figure 2 as PNGs (mean over seeds, shaded min-max)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    paths = []
    fig1, fig2 = res['fig1'], res['fig2']
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (('after', 'dropout after weight: D(W x)'), ('before', 'dropout before weight: W D(x)')):
        ax.plot(fig1['w_mean'], fig1[f'{key}_mean'], label=label)
        ax.fill_between(fig1['w_mean'], fig1[f'{key}_min'], fig1[f'{key}_max'], alpha=0.25)
    ax.axhline(res['theory']['relu_dropout_ratio_p0.5'], ls=':', c='gray', lw=1, label='theory, ReLU input')
    ax.set_xlabel('weight mean'), ax.set_ylabel('Var(eval) / Var(train)')
    ax.set_title(f"Figure 1 (p=0.5, {res['settings']['n']:,} x {res['settings']['d']})")
    ax.set_ylim(0, 0.5), ax.legend(fontsize=8), fig.tight_layout()
    paths.append(stem.with_name(stem.name + '_fig1.png'))
    fig.savefig(paths[-1], dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (('branch', 'branch f'), ('residual', 'residual X0 + f')):
        ax.plot(fig2['scale'], fig2[f'{key}_mean'], label=label)
        ax.fill_between(fig2['scale'], fig2[f'{key}_min'], fig2[f'{key}_max'], alpha=0.25)
    ax.axhline(res['theory']['relu_dropout_ratio_p0.1'], ls=':', c='gray', lw=1, label='theory, branch')
    ax.scatter(list(PAPER_FIG2['residual']), list(PAPER_FIG2['residual'].values()), marker='x', c='k',
               label='paper, residual', zorder=3)
    ax.set_xlabel('input scale std(X0)'), ax.set_ylabel('Var(eval) / Var(train)')
    ax.set_title(f"Figure 2 (p=0.1, {res['settings']['n']:,} x {res['settings']['d']})")
    ax.set_ylim(0.8, 1.01), ax.legend(fontsize=8), fig.tight_layout()
    paths.append(stem.with_name(stem.name + '_fig2.png'))
    fig.savefig(paths[-1], dpi=120), plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Part 2: the same question on a real network
# ----------------------------------------------------------------------------------------------------------------

def load_base_model(model: str = 'keras-resnet50') -> tuple[nn.Module, str]:
    """The network to probe, in eval mode, and a description.

    ``'keras-resnet50'``: the ImageNet ResNet-50 of ``<shared>/weights/resnet50_keras_in1k`` with its 1000-class
    head and the v1 strides it was trained with (see that folder's README). Any other name: a timm model with random
    init (used by the tests on tiny models; no Hub access needed).

    Example:
        >>> m, desc = load_base_model('resnet10t')
        >>> desc
        'timm resnet10t, random init (zero_init_last=False)'
    """
    import timm
    import timm_dropfix

    if model == 'keras-resnet50':
        path = _common.shared_dir() / 'weights' / WEIGHTS_NAME
        if not path.is_dir():
            raise FileNotFoundError(f'{path} not found: set TIMM_DROPFIX_SHARED to the folder holding weights/{WEIGHTS_NAME}')
        net = timm.create_model(f'local-dir:{path}', pretrained=True)
        timm_dropfix.set_v1_strides(net)
        desc = f'ImageNet ResNet-50 ({WEIGHTS_NAME}, v1 strides, 1000-class ImageNet head)'
    else:
        # zero_init_last=False: timm zero-inits each block's last BN scale, which would make every branch output
        # (and so every branch dropout) invisible in a fresh model
        net = timm.create_model(model, pretrained=False, zero_init_last=False)
        desc = f'timm {model}, random init (zero_init_last=False)'
    return net.eval(), desc


def load_pets_images(model: nn.Module, num_images: int, img_size: int) -> tuple[torch.Tensor, list[str]]:
    """``num_images`` real Pets images (evenly spread over the 185 test images, so all breeds appear) as one batch.

    Uses timm's eval transform for the model (``resolve_data_config`` + ``create_transform``: resize to
    ``img_size / crop_pct``, centre crop ``img_size``, ImageNet normalization).
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import OxfordIIITPet

    root = _common.shared_dir() / 'data' / 'pets370'
    ds = OxfordIIITPet(str(root), split='test', download=False)
    if not 0 < num_images <= len(ds):
        raise ValueError(f'--num-images must be in 1..{len(ds)} (the pets370 test split), got {num_images}')
    cfg = resolve_data_config({'input_size': (3, img_size, img_size)}, model=model)
    tf = create_transform(**cfg)
    idx = [round(i * (len(ds) - 1) / max(num_images - 1, 1)) for i in range(num_images)]
    images = torch.stack([tf(ds[i][0]) for i in idx])
    return images, [Path(ds._images[i]).name for i in idx]


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # timm's BatchNormAct2d subclasses BatchNorm2d, so this also catches pre-activation models' norm layers
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _BNInputStats:
    """Forward pre-hooks that record the variance of every BN's input (per channel over N, H, W; then averaged).

    Pre-hooks run before the BN (and before any in-place ReLU after it), so they see exactly what the BN
    normalizes. Statistics are accumulated in float64 per pass.
    """

    def __init__(self, model: nn.Module):
        self.names = [n for n, _ in _bn_layers(model)]
        self.var: dict[str, list[float]] = {n: [] for n in self.names}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in _bn_layers(model)]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            dims = [0] + list(range(2, x.ndim))
            # ratio of channel-averaged variances, the statistic of the module tests
            self.var[name].append(x.var(dim=dims, unbiased=False).mean().item())
        return hook

    def mean_var(self) -> dict[str, float]:
        return {n: sum(v) / len(v) for n, v in self.var.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def dropout_active_bn_frozen(model: nn.Module) -> nn.Module:
    """Put every module in train mode except the BN layers (dropout active, BN statistics fixed).

    Set per module and not via ``.train()``/``.eval()``, which recurse: timm's ``BatchNormAct2d`` holds a ``drop``
    child (the pre-activation 'recommended' slot) that must stay active while the BN itself is in eval mode.
    """
    for m in model.modules():
        m.training = not isinstance(m, nn.modules.batchnorm._BatchNorm)
    return model


def variant_grid(branch_positions: Sequence[str], head_positions: Sequence[str], branch_rate: float,
                 head_rate: float) -> list[dict[str, Any]]:
    """Configurations probed on the real network: the baseline, each branch position alone (no head dropout),
    each head variant alone (no branch dropout), and the recommended pair (branch + head before pool).

    Example:
        >>> [v['name'] for v in variant_grid(['none', 'recommended'], ['before_pool', 'none'], 0.1, 0.2)]
        ['none', 'branch:recommended', 'head:before_pool', 'recommended+before_pool']
    """
    grid = [dict(name='none', branch_position='none', head_position='none', branch_drop_rate=0.0, head_drop_rate=0.0)]
    grid += [dict(name=f'branch:{b}', branch_position=b, head_position='none', branch_drop_rate=branch_rate,
                  head_drop_rate=0.0) for b in branch_positions if b != 'none']
    grid += [dict(name=f'head:{h}', branch_position='none', head_position=h, branch_drop_rate=0.0,
                  head_drop_rate=head_rate) for h in head_positions if h != 'none']
    if 'recommended' in branch_positions and 'before_pool' in head_positions:
        grid.append(dict(name='recommended+before_pool', branch_position='recommended', head_position='before_pool',
                         branch_drop_rate=branch_rate, head_drop_rate=head_rate))
    return grid


@torch.no_grad()
def probe_variant(base: nn.Module, images: torch.Tensor, variant: dict[str, Any], eval_var: dict[str, float],
                  eval_logits: torch.Tensor, num_masks: int, seed: int) -> dict[str, Any]:
    """Rewrite a fresh copy of ``base`` per ``variant`` and measure the BN-input variance shift and logit noise.

    Each of ``num_masks`` passes runs the whole image batch with dropout active and BN frozen (new masks per pass);
    the BN-input variance is averaged over passes, the logit variance is taken over passes (unbiased) per image
    and class, then averaged.
    """
    import timm_dropfix

    model = copy.deepcopy(base)
    timm_dropfix.rewrite(model, branch_drop_rate=variant['branch_drop_rate'], head_drop_rate=variant['head_drop_rate'],
                         branch_position=variant['branch_position'], head_position=variant['head_position'])
    dropout_active_bn_frozen(model)
    stats = _BNInputStats(model)
    torch.manual_seed(seed)  # the masks come from the global RNG (nn.Dropout)
    logits = []
    for _ in range(num_masks):
        logits.append(model(images).float())
    stats.remove()
    logits_t = torch.stack(logits)  # K x N x C
    train_var = stats.mean_var()
    ratios = {n: eval_var[n] / train_var[n] for n in stats.names}
    mask_var = logits_t.var(dim=0, unbiased=True).mean().item() if num_masks > 1 else float('nan')
    # scale of the signal the noise competes with: the spread of the eval logits over images
    signal_var = eval_logits.var(dim=0, unbiased=True).mean().item()
    flips = (logits_t.argmax(-1) != eval_logits.argmax(-1)).float().mean().item()
    vals = list(ratios.values())
    return {
        **variant,
        'summary': str(timm_dropfix.summarize(model)),
        'bn_ratio': ratios,
        'bn_ratio_min': min(vals),
        'bn_ratio_max': max(vals),
        'bn_ratio_mean': sum(vals) / len(vals),
        # the shift goes both ways in a deep net (upstream noise can also lower a deep layer's variance), so the
        # summary is the mean |ln ratio| and the count of BNs shifted by more than 1 % either way
        'bn_abs_log_ratio_mean': sum(abs(math.log(r)) for r in vals) / len(vals),
        'bn_shifted_count': sum(abs(math.log(r)) > 0.01 for r in vals),
        'logit_var_over_masks': mask_var,
        'logit_var_rel': mask_var / signal_var,
        'top1_flip_rate': flips,
    }


@torch.no_grad()
def run_real_network(model_name: str, num_images: int, img_size: int, num_masks: int, branch_rate: float,
                     head_rate: float, seed: int, images: torch.Tensor | None = None) -> dict[str, Any]:
    """Part 2: probe every branch position and head variant of ``timm_dropfix`` on one real network.

    ``images`` overrides the Pets batch (tests pass random tensors for random-init tiny models).

    Example:
        >>> r = run_real_network('resnet10t', 0, 64, 2, 0.1, 0.2, 0, images=torch.randn(4, 3, 64, 64))
        >>> r['variants'][0]['name'], r['variants'][0]['bn_ratio_min']
        ('none', 1.0)
    """
    import timm_dropfix

    base, desc = load_base_model(model_name)
    names: list[str] = []
    if images is None:
        images, names = load_pets_images(base, num_images, img_size)
        source = f'{len(names)} Oxford-IIIT Pet images (pets370 test split, evenly spaced), timm eval transform'
    else:
        source = f'{images.shape[0]} caller-provided tensors'
    stats = _BNInputStats(base)
    eval_logits = base(images).float()
    stats.remove()
    eval_var = stats.mean_var()
    variants, skipped = [], {}
    for v in variant_grid(timm_dropfix.BRANCH_POSITIONS, timm_dropfix.HEAD_POSITIONS, branch_rate, head_rate):
        t0 = time.time()
        try:
            r = probe_variant(base, images, v, eval_var, eval_logits, num_masks, seed)
        except ValueError as e:  # e.g. 'after_conv3' on basic blocks: a position this model does not have
            skipped[v['name']] = str(e)
            print(f"  {v['name']:<28} skipped: {e}", flush=True)
            continue
        r['wall_time_s'] = round(time.time() - t0, 2)
        print(f"  {r['name']:<28} BN ratio min {r['bn_ratio_min']:.3f} max {r['bn_ratio_max']:.3f} "
              f"mean|ln| {r['bn_abs_log_ratio_mean']:.3f} ({r['bn_shifted_count']} BNs off by > 1%); logit var over masks {r['logit_var_over_masks']:.4g} "
              f"(rel {r['logit_var_rel']:.3g}), top-1 flips {r['top1_flip_rate']:.3f}  [{r['wall_time_s']}s]",
              flush=True)
        variants.append(r)
    return {
        'settings': {'model': desc, 'images': source, 'image_names': names, 'img_size': list(images.shape[-2:]),
                     'num_masks': num_masks, 'branch_drop_rate': branch_rate, 'head_drop_rate': head_rate,
                     'seed': seed, 'bn_layers': list(eval_var),
                     'ratio': 'Var(BN input, eval) / Var(BN input, dropout active + BN eval); per channel over '
                              'N,H,W, averaged over channels; train variance averaged over the mask passes',
                     'logit_var': 'variance over mask passes (unbiased), mean over images and classes; rel = divided '
                                  'by the variance of eval logits over images'},
        'eval_bn_input_var': eval_var,
        'variants': variants,
        'skipped': skipped,
    }


def plot_real_network(res: dict[str, Any], stem: Path) -> list[Path]:
    """Per-layer BN variance ratio (one line per branch variant) and logit noise per variant."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    paths = []
    layers = res['settings']['bn_layers']
    fig, ax = plt.subplots(figsize=(10, 4.5))
    shown = [v for v in res['variants'] if v['branch_position'] != 'none' or v['name'] == 'none']
    cmap = plt.get_cmap('tab10')
    for i, v in enumerate(shown):
        ax.plot(range(len(layers)), [v['bn_ratio'][n] for n in layers], marker='.', ms=4, lw=1,
                color=cmap(i % 10), label=v['name'])
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=5)
    ax.set_ylabel('Var(eval) / Var(dropout active)')
    ax.set_title(f"Variance shift at each BN input, {res['settings']['model']}; "
                 f"branch p={res['settings']['branch_drop_rate']} (head-only variants: exactly 1)", fontsize=8)
    ax.axhline(1.0, c='gray', lw=0.8, ls=':')
    ax.legend(fontsize=6, ncol=3), fig.tight_layout()
    paths.append(stem.with_name(stem.name + '_bn_shift.png'))
    fig.savefig(paths[-1], dpi=130), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    vs = [v for v in res['variants'] if v['name'] != 'none']
    vals = [v['logit_var_rel'] for v in vs]
    ax.barh([v['name'] for v in vs], vals, color='tab:blue')
    for i, val in enumerate(vals):
        ax.text(val, i, f' {val:.3g}', va='center', fontsize=7)
    ax.set_xlim(0, max(vals) * 1.15 if vals and max(vals) > 0 else 1), ax.invert_yaxis()
    ax.set_xlabel('logit variance over dropout masks / logit variance over images')
    ax.set_title(f"Logit noise over {res['settings']['num_masks']} masks (branch p={res['settings']['branch_drop_rate']},"
                 f" head p={res['settings']['head_drop_rate']})", fontsize=9)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + '_logit_var.png'))
    fig.savefig(paths[-1], dpi=130), plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Report and command line
# ----------------------------------------------------------------------------------------------------------------

def _markdown(result: dict[str, Any]) -> str:
    meta = result['meta']
    m = meta['machine']
    lines = [
        f"# Module tests{' (quick)' if result['quick'] else ''}",
        '',
        f"- command: `{meta['command']}`",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"GPU: {m['cuda_device'] or 'none'}; torch {m['torch']}, timm {m['timm']}",
        f"- date (UTC): {meta['date_utc']}, wall time {meta['wall_time_s']:.0f} s, seeds {_seeds_text(result)}",
        '',
    ]
    if 'figures' in result:
        f = result['figures']
        s, st = f['summary'], f['settings']
        lines += [
            f"## Figures 1 and 2 ({st['n']:,} x {st['d']}, seeds {st['seeds']}; mean over seeds)",
            '',
            '| quantity | measured | paper |',
            '|---|---|---|',
            f"| Fig. 1, dropout after weight, w_mean = 0 | {s['fig1_after_at_0']:.3f} | ~0.41 |",
            f"| Fig. 1, dropout after weight, w_mean = -0.02 / +0.02 | {s['fig1_after_at_-0.02']:.3f} / "
            f"{s['fig1_after_at_+0.02']:.3f} | 0.24-0.27 |",
            f"| Fig. 1, dropout before weight, range over w_mean | {s['fig1_before_min']:.3f}-{s['fig1_before_max']:.3f}"
            f" | ~0.41 flat |",
            f"| Fig. 2, branch, range over scale | {s['fig2_branch_min']:.3f}-{s['fig2_branch_max']:.3f} | ~0.86 |",
            f"| Fig. 2, residual at scale 0.2 / 1 / 5 | {s['fig2_residual_at_0.2']:.3f} / {s['fig2_residual_at_1']:.3f}"
            f" / {s['fig2_residual_at_5']:.4f} | 0.87 / 0.94 / 0.996 |",
            '',
            f"Theory for a ReLU(N(0,1)) input: {f['theory']['relu_dropout_ratio_p0.5']:.3f} at p = 0.5, "
            f"{f['theory']['relu_dropout_ratio_p0.1']:.3f} at p = 0.1.",
            '',
        ]
    if 'real_network' in result:
        r = result['real_network']
        st = r['settings']
        lines += [
            '## Real network',
            '',
            f"{st['model']}; {st['images']}; {st['img_size'][0]} px; branch p = {st['branch_drop_rate']}, "
            f"head p = {st['head_drop_rate']}; {st['num_masks']} dropout masks per image (mask seed {st['seed']}); "
            f"{len(st['bn_layers'])} BN layers.",
            'BN ratio = Var(BN input, eval) / Var(BN input, dropout active, BN frozen): 1 = no variance shift. '
            'Logit noise = variance of the logits over masks, relative to the variance of the eval logits over images.',
            '',
            '| variant | BN ratio min | BN ratio max | mean abs ln ratio | BNs shifted > 1 % | logit var over masks | '
            'relative | top-1 flips vs eval |',
            '|---|---|---|---|---|---|---|---|',
        ]
        for v in r['variants']:
            lines.append(f"| {v['name']} | {v['bn_ratio_min']:.3f} | {v['bn_ratio_max']:.3f} | "
                         f"{v['bn_abs_log_ratio_mean']:.3f} | {v['bn_shifted_count']} / {len(v['bn_ratio'])} | "
                         f"{v['logit_var_over_masks']:.4g} | {v['logit_var_rel']:.3g} | {v['top1_flip_rate']:.3f} |")
        for name, why in r.get('skipped', {}).items():
            lines.append(f"| {name} | skipped: {why} | | | | | | |")
        rec = next((v for v in r['variants'] if v['name'] == 'branch:recommended'), None)
        if rec is not None and ' at ' in rec['summary']:
            # 'recommended' resolves per block kind; say where it landed on this model
            where = rec['summary'].split(' at ', 1)[1].split(';', 1)[0]
            lines += ['', f'`branch:recommended` resolves on this model to {where} (same place and same mask seed as '
                          f'the matching named position, hence identical numbers).']
        lines += ['', 'Head-only variants leave every BN ratio at exactly 1 (no BN follows the head dropout). '
                  'All variants use the same mask seed, so `head:after_pool` and `head:before_pool_channel` draw '
                  'identical masks: their equal numbers show that channel-wise dropout before the pool computes exactly '
                  'what dropout after the pool does.', '']
    return '\n'.join(lines)


def _seeds_text(result: dict[str, Any]) -> str:
    """The seeds of each part: the module tests' sweeps and the real network's masks are separate draws."""
    seeds = result.get('seeds')
    if not seeds:  # written before the parts recorded their own seeds: meta holds them all in one list
        return str(result['meta']['seeds'])
    parts = []
    if 'figures' in seeds:
        parts.append(f"{seeds['figures']} (Figures 1 and 2)")
    if 'real_network' in seeds:
        parts.append(f"{seeds['real_network']} (real-network masks)")
    return ', '.join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (the profile's defaults filled in); a bad value exits before any work."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--part', choices=('all', 'figures', 'real'), default='all')
    p.add_argument('--quick', action='store_true', help='smaller sweeps and fewer images (about 8x less work)')
    p.add_argument('--n', type=int, default=None, help='module-test batch (default 100000; quick 20000)')
    p.add_argument('--d', type=int, default=128, help='module-test width')
    p.add_argument('--seeds', type=int, nargs='+', default=None, help='module-test seeds (default 0 1 2; quick 0)')
    p.add_argument('--fig1-points', type=int, default=None, help='w_mean grid over [-0.02, 0.02] (default 21)')
    p.add_argument('--fig2-points', type=int, default=None, help='scale grid over [0.2, 5] (default 25, step 0.2)')
    p.add_argument('--model', default='keras-resnet50',
                   help="'keras-resnet50' (shared ImageNet weights) or a timm model name (random init)")
    p.add_argument('--num-images', type=int, default=None, help='Pets images (default 32; quick 8)')
    p.add_argument('--img-size', type=int, default=None, help='image size (default 160; quick 128)')
    p.add_argument('--num-masks', type=int, default=None, help='dropout masks per image (default 3; quick 2)')
    p.add_argument('--branch-rate', type=float, default=0.1)
    p.add_argument('--head-rate', type=float, default=0.2)
    p.add_argument('--seed', type=int, default=0, help='seed of the real-network dropout masks')
    p.add_argument('--out-dir', type=Path, default=_common.RESULTS_DIR, help='output folder')
    p.add_argument('--name', default=None, help='output file stem (default module_tests[_quick])')
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy shared machine)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(n=20_000 if quick else 100_000, seeds=[0] if quick else [0, 1, 2],
                    fig1_points=11 if quick else 21, fig2_points=13 if quick else 25,
                    num_images=8 if quick else 32, img_size=128 if quick else 160, num_masks=2 if quick else 3,
                    name='module_tests_quick' if quick else 'module_tests')
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    at_least = {'n': 2, 'd': 1, 'fig2_points': 2, 'threads': 1, 'num_masks': 2, 'num_images': 2, 'img_size': 32}
    for k, low in at_least.items():
        if getattr(args, k) is not None and getattr(args, k) < low:
            why = {'n': ': a variance over the batch', 'fig2_points': ': the grid has two ends',
                   'num_masks': ': a variance over masks', 'num_images': ': a variance over images',
                   'img_size': ': the ResNets downsample by 32'}.get(k, '')
            p.error(f"--{k.replace('_', '-')} must be at least {low}{why}")
    if args.fig1_points < 3 or args.fig1_points % 2 == 0:
        p.error('--fig1-points must be odd and at least 3: the grid must hold w_mean = 0, which the summary reports')
    _common.check_distinct_seeds(p, args.seeds)
    _common.check_rates(p, branch_rate=args.branch_rate, head_rate=args.head_rate)
    _common.check_output_path(args.out_dir, '--out-dir')
    if args.part in ('all', 'real'):
        # the real-network part runs after the figures: a missing input must stop the run before those minutes
        if args.model == 'keras-resnet50':
            _common.require_shared('weights', WEIGHTS_NAME)
        else:
            _common.check_timm_model(args.model, '--model')
        test_list = _common.require_shared('data', 'pets370') / 'oxford-iiit-pet' / 'annotations' / 'test.txt'
        if test_list.is_file():
            available = sum(1 for line in test_list.read_text().splitlines() if line.strip())
            if args.num_images > available:
                p.error(f'--num-images must be at most {available}: the images of the pets370 test split')
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the module tests and/or the real-network probe; write JSON, PNGs and a markdown table.

    Example:
        >>> r = main(['--part', 'figures', '--n', '2000', '--fig1-points', '3', '--fig2-points', '3',
        ...           '--out-dir', '/tmp/mt_doctest'])  # doctest: +SKIP
    """
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # recorded in the result's machine info
    with torch.no_grad():  # a context, not set_grad_enabled(False): callers (tests) may train afterwards
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    started, t0 = _common.utc_now(), time.time()
    payload: dict[str, Any] = {'quick': args.quick, 'args': {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / args.name
    pngs: list[Path] = []
    if args.part in ('all', 'figures'):
        print(f'Figures 1 and 2: {args.n:,} x {args.d}, seeds {args.seeds}', flush=True)
        payload['figures'] = run_figures(args.n, args.d, args.seeds, args.fig1_points, args.fig2_points)
        for k, v in payload['figures']['summary'].items():
            print(f'  {k:<22} {v:.4f}')
        pngs += plot_figures(payload['figures'], stem)
    if args.part in ('all', 'real'):
        print(f'Real network: {args.model}, {args.num_images} images at {args.img_size} px, {args.num_masks} masks',
              flush=True)
        payload['real_network'] = run_real_network(args.model, args.num_images, args.img_size, args.num_masks,
                                                   args.branch_rate, args.head_rate, args.seed)
        pngs += plot_real_network(payload['real_network'], stem)
    payload['plots'] = [p.name for p in pngs]
    # each part's own seeds: the sweeps' seeds and the real network's mask seed are separate draws, so one merged
    # list (meta) could not say which seed belongs to which part
    payload['seeds'] = {**({'figures': list(args.seeds)} if args.part != 'real' else {}),
                        **({'real_network': [args.seed]} if args.part != 'figures' else {})}
    seeds = sorted({s for part in payload['seeds'].values() for s in part})
    result = _common.write_result(stem.with_suffix('.json'), payload, seeds=seeds, started_at=started,
                                  wall_time_s=time.time() - t0,
                                  command=_common.command_line(argv, script='benchmarks/module_tests.py'))
    stem.with_suffix('.md').write_text(_markdown(result))
    print(f'wrote {stem}.json, {stem}.md and {len(pngs)} plots ({time.time() - t0:.0f} s)')
    return result


if __name__ == '__main__':
    main()
