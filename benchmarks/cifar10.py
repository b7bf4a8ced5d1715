"""The paper's from-scratch setting: CIFAR pre-activation ResNets, dropout positions compared on CIFAR-10.

Data: ``<shared>/data/cifar10/cifar10-jpeg.npz``, the full CIFAR-10 (50,000 train / 10,000 test) stored as a
**lossy JPEG copy (quality 75)**; every accuracy this script reports is on that copy, not on the original CIFAR-10.

Recipe (the code base the paper's CIFAR runs derive from): SGD momentum 0.9, lr 0.1, batch 128, weight decay 1e-4
on every parameter, random crop 32 with zero padding 4 + horizontal flip, lr x0.1 at 50 % and 75 % of the epochs
(81 and 122 of 164 in the paper; scaled here to the epoch budget). The test accuracy is that of the last epoch (no
selection on the test set).

Variants (see ``timm_dropfix.list_positions()``): ``none``; ``branch:<position>`` (branch dropout p=0.1 in every
block, no head dropout); ``head:<position>`` (head dropout p=0.2, no branch dropout); ``recommended+before_pool``.
Every variant of one seed starts from the same initial weights and sees the same batches and augmentations (the
data RNG is separate from the dropout RNG), so differences against ``none`` are paired by seed.

The whole pipeline runs on one device: the decoded uint8 images live in a device tensor, and crop/flip/normalize
run there on each batch. On CPU (``--profile cpu-smoke``) it is the same code path with ``device='cpu'``.

Profiles:
    cpu-smoke  PreResNet-20, 2,048 train / 500 test images, 3 epochs (48 steps), 2 variants x 2 seeds: the
               committed run took 19.5 min (1169 s) on 2 CPU cores. Proves the script end to end; its numbers are
               labelled smoke and are not evidence.
    gpu        sized for 10 minutes on one H100/H200: PreResNet-20 (9 variants) and PreResNet-56 (3 variants) x
               2 seeds on the full data, bf16 autocast, channels_last. The epoch count is set once per model by
               timing a few training steps and dividing the time budget evenly over its runs (the same epochs for
               every variant); a guard stops launching runs that would pass the budget (seed-major order keeps the
               finished runs paired).

Usage::

    python benchmarks/cifar10.py --profile cpu-smoke
    python benchmarks/cifar10.py --profile gpu            # needs CUDA
    python benchmarks/cifar10.py --merge a.json b.json --name cifar10_gpu   # seeds run in separate calls

``--merge`` combines result files of one profile and recipe (e.g. seed 0 in one call and seed 1 in another, the
same epochs per model) into one result, with every source's command, date, machine and wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA_NOTE = 'CIFAR-10, lossy q75 JPEG copy (cifar10-jpeg.npz), not the original PNG-quality CIFAR-10'
# Normalization of the code base the paper's CIFAR recipe comes from.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_TRAIN = 50_000  # images in the train split of cifar10-jpeg.npz
PAPER_CIFAR10 = {'model': 'PreResNet-110, 164 epochs, recommended branch + head dropout', 'top1': 94.44}

# name -> (branch_position, head_position); rates come from --branch-rate / --head-rate
VARIANTS: dict[str, tuple[str, str]] = {
    'none': ('none', 'none'),
    'branch:recommended': ('recommended', 'none'),
    'branch:branch_start': ('branch_start', 'none'),
    'branch:after_conv1': ('after_conv1', 'none'),
    'branch:branch_end': ('branch_end', 'none'),
    'branch:after_add': ('after_add', 'none'),
    'head:before_pool': ('none', 'before_pool'),
    'head:after_pool': ('none', 'after_pool'),
    'head:before_pool_channel': ('none', 'before_pool_channel'),
    'recommended+before_pool': ('recommended', 'before_pool'),
}

PROFILES: dict[str, dict[str, Any]] = {
    'cpu-smoke': dict(
        models={'preresnet20_cifar': ['none', 'recommended+before_pool']},
        seeds=[0, 1], epochs=3, train_subset=2048, test_subset=500, batch_size=128, device='cpu', amp=False,
        time_budget_s=None, label='smoke: a few steps on a data subset; proves the script, not evidence'),
    'gpu': dict(
        models={
            'preresnet20_cifar': ['none', 'branch:recommended', 'branch:branch_start', 'branch:after_conv1',
                                  'branch:branch_end', 'branch:after_add', 'head:before_pool', 'head:after_pool',
                                  'recommended+before_pool'],
            'preresnet56_cifar': ['none', 'branch:recommended', 'recommended+before_pool'],
        },
        # share of the training budget per model, epochs auto-sized from timed steps, clamped to [min, max]
        model_share={'preresnet20_cifar': 0.55, 'preresnet56_cifar': 0.45},
        seeds=[0, 1], epochs='auto', min_epochs=4, max_epochs=164, calib_steps=40, train_subset=None, test_subset=None,
        batch_size=128, device='cuda', amp=True, time_budget_s=540,  # of the 600 s: whole script (data, calibration, runs), 60 s margin
        label='gpu profile: short schedule sized to 10 minutes on one GPU'),
}


# ----------------------------------------------------------------------------------------------------------------
# Data: decoded once into device-resident uint8 tensors, augmented on the device
# ----------------------------------------------------------------------------------------------------------------

def _subset_indices(n: int, k: int | None, seed: int = 0) -> np.ndarray:
    """A fixed random subset (same for every run); ``None``: everything, in order."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _decode(buf: np.ndarray, offsets: np.ndarray, idx: np.ndarray, workers: int) -> torch.Tensor:
    """Decode the JPEGs ``idx`` of one split into an ``N x 3 x 32 x 32`` uint8 tensor (threads: PIL's decoder frees
    the GIL). PIL rather than torchvision.io, whose image decoders are deprecated since torchvision 0.29."""
    import io

    from PIL import Image

    chunks = np.array_split(idx, max(1, min(workers, len(idx) // 256 or 1)))

    def work(ch: np.ndarray) -> torch.Tensor:
        out = np.empty((len(ch), 32, 32, 3), dtype=np.uint8)
        for k, i in enumerate(ch):
            with Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())) as im:
                out[k] = np.asarray(im.convert('RGB'))
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return torch.cat(list(pool.map(work, chunks)))


def load_cifar10(path: str | Path | None = None, train_subset: int | None = None, test_subset: int | None = None,
                 device: str | torch.device = 'cpu') -> dict[str, torch.Tensor]:
    """Load the JPEG CIFAR-10 copy as device tensors: ``x_train``/``x_test`` uint8 NCHW, ``y_*`` int64.

    Example:
        >>> d = load_cifar10(train_subset=256, test_subset=128)  # doctest: +SKIP
        >>> d['x_train'].shape, d['x_train'].dtype  # doctest: +SKIP
        (torch.Size([256, 3, 32, 32]), torch.uint8)
    """
    import os

    path = Path(path) if path else _common.shared_dir() / 'data' / 'cifar10' / 'cifar10-jpeg.npz'
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: set TIMM_DROPFIX_SHARED to the folder holding data/cifar10')
    z = np.load(path, allow_pickle=False)
    workers = os.cpu_count() or 1
    out = {}
    for split, k in (('train', train_subset), ('test', test_subset)):
        idx = _subset_indices(len(z[f'{split}_labels']), k)
        out[f'x_{split}'] = _decode(z[f'{split}_jpeg'], z[f'{split}_offsets'], idx, workers).to(device)
        out[f'y_{split}'] = torch.from_numpy(z[f'{split}_labels'][idx]).long().to(device)
    out['classes'] = [str(c) for c in z['classes']]
    return out


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) + horizontal flip of a uint8 NCHW batch, on the batch's device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), g).shape
        torch.Size([2, 3, 32, 32])
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    rows = (oy + torch.arange(h, device=dev))[:, :, None]      # n x h x 1
    cols = (ox + torch.arange(w, device=dev))[:, None, :]      # n x 1 x w
    # advanced indexing on dims 0, 2, 3 puts the channel dim last: n x h x w x c
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float, CIFAR mean/std normalized."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def build_model(model_name: str, variant: str, branch_rate: float, head_rate: float, seed: int) -> nn.Module:
    """``model_name`` (a CIFAR pre-act ResNet) with the variant's dropout; same initial weights for every variant.

    Example:
        >>> import timm_dropfix
        >>> m = build_model('preresnet20_cifar', 'recommended+before_pool', 0.1, 0.2, seed=0)
        >>> timm_dropfix.dropfix_config(m)['branch_position']
        'recommended'
    """
    import timm
    import timm_dropfix

    branch_pos, head_pos = VARIANTS[variant]
    torch.manual_seed(seed)  # init draws only; rewrite adds no parameters, so the init is the same for all variants
    model = timm.create_model(model_name, num_classes=10)
    return timm_dropfix.rewrite(model, branch_drop_rate=branch_rate if branch_pos != 'none' else 0.0,
                                head_drop_rate=head_rate if head_pos != 'none' else 0.0,
                                branch_position=branch_pos, head_position=head_pos)


def milestones(epochs: int) -> list[int]:
    """The paper's lr steps (81 and 122 of 164 epochs) scaled to ``epochs``.

    Example:
        >>> milestones(164), milestones(20)
        ([82, 123], [10, 15])
    """
    return [max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, amp: bool = False) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images ``x``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size])
        if xb.is_cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(xb).argmax(-1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def train_run(model_name: str, variant: str, seed: int, data: dict[str, torch.Tensor], epochs: int,
              batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
              branch_rate: float = 0.1, head_rate: float = 0.2, amp: bool = False,
              max_steps: int | None = None, time_from_step: int = 0) -> dict[str, Any]:
    """Train one variant from scratch with the paper's recipe; return final test accuracy and training stats.

    ``max_steps`` stops early and returns only the time of steps ``time_from_step + 1 .. max_steps``
    (``timed_s``, ``timed_steps``): used to size the epoch budget, not a real run.
    """
    device = data['x_train'].device
    model = build_model(model_name, variant, branch_rate, head_rate, seed).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones(epochs), gamma=0.1)
    # data order and augmentation: own generator, so every variant of a seed sees the same batches
    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(10_000 + seed)  # dropout masks (global RNG, CPU and CUDA)
    x_all, y_all = data['x_train'], data['y_train']
    n = len(x_all)
    t0, steps, history = time.time(), 0, []
    t_mark = t0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = normalize(augment(x_all[idx], gen))
            if device.type == 'cuda':
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_all[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # accumulate on the device: no host sync per step
            loss_sum += loss.detach().float() * len(idx)
            correct += (logits.detach().argmax(-1) == yb).sum()
            steps += 1
            if max_steps is not None and steps == time_from_step:
                _sync(device)
                t_mark = time.time()
            if max_steps is not None and steps >= max_steps:
                _sync(device)
                return {'steps': steps, 'timed_steps': steps - time_from_step, 'timed_s': time.time() - t_mark}
        sched.step()
        history.append({'epoch': epoch + 1, 'train_loss': loss_sum.item() / n, 'train_acc': correct.item() / n,
                        'lr': opt.param_groups[0]['lr']})
    train_time = time.time() - t0
    acc = evaluate(model, data['x_test'], data['y_test'], amp=amp)
    if not math.isfinite(history[-1]['train_loss']):
        raise FloatingPointError(f'{model_name} {variant} seed {seed}: training diverged (loss {history[-1]})')
    return {'model': model_name, 'variant': variant, 'seed': seed, 'epochs': epochs, 'steps': steps,
            'test_acc': acc, 'final_train_loss': history[-1]['train_loss'], 'final_train_acc': history[-1]['train_acc'],
            'train_time_s': round(train_time, 2), 'wall_time_s': round(time.time() - t0, 2), 'history': history}


def calibrate_epochs(model_name: str, variants: Sequence[str], n_runs: int, data: dict[str, torch.Tensor],
                     budget_s: float, batch_size: int, amp: bool, min_epochs: int, max_epochs: int,
                     warmup_steps: int = 15, timed_steps: int = 40) -> dict[str, Any]:
    """Epochs per run so that ``n_runs`` runs of ``model_name`` fit ``budget_s``: time steps of the slowest variant.

    The timed variant is the one with the most dropout (the last in ``variants``, else ``none``); 10 % margin
    covers evaluation and per-epoch overhead.
    """
    variant = variants[-1]
    # one run: the first warmup_steps (cudnn autotuning, allocator) are not timed; an epoch is long enough
    # for both on the full data, and on a tiny subset the epochs simply repeat
    total = warmup_steps + timed_steps
    t = train_run(model_name, variant, 0, data, epochs=total, batch_size=batch_size, amp=amp, max_steps=total,
                  time_from_step=warmup_steps)
    step_s = t['timed_s'] / t['timed_steps']
    steps_per_epoch = math.ceil(len(data['x_train']) / batch_size)
    return {'model': model_name, 'timed_variant': variant, 'step_s': step_s, 'epoch_s_est': step_s * steps_per_epoch,
            'budget_s': budget_s, 'runs': n_runs,
            'epochs': epochs_for_budget(step_s, steps_per_epoch, n_runs, budget_s, min_epochs, max_epochs)}


def epochs_for_budget(step_s: float, steps_per_epoch: int, n_runs: int, budget_s: float, min_epochs: int,
                      max_epochs: int, margin: float = 1.10) -> int:
    """Most epochs per run such that ``n_runs`` runs fit ``budget_s`` (``margin`` covers eval and overhead).

    Example:
        >>> epochs_for_budget(0.004, 391, 18, 300.0, 4, 164)   # ~1.7 s per epoch, 18 runs, 5 minutes
        9
    """
    epochs = int(budget_s / (n_runs * step_s * steps_per_epoch * margin))
    return max(min_epochs, min(max_epochs, epochs))


# ----------------------------------------------------------------------------------------------------------------
# Statistics, report, plot
# ----------------------------------------------------------------------------------------------------------------

def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std per (model, variant) and the paired difference against ``none`` of the same model and seeds."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r['model'] for r in runs):
        mr = [r for r in runs if r['model'] == model]
        base = {r['seed']: r['test_acc'] for r in mr if r['variant'] == 'none'}
        rows = {}
        for variant in dict.fromkeys(r['variant'] for r in mr):
            vr = {r['seed']: r['test_acc'] for r in mr if r['variant'] == variant}
            mean, std = _common.mean_std(list(vr.values()))
            row: dict[str, Any] = {'seeds': sorted(vr), 'test_acc': [vr[s] for s in sorted(vr)], 'mean': mean,
                                   'std': std, 'epochs': mr[0]['epochs']}
            common = sorted(set(vr) & set(base))
            if variant != 'none' and common:
                row['diff_vs_none'] = _common.paired_t_interval([vr[s] for s in common], [base[s] for s in common])
            rows[variant] = row
        out[model] = rows
    return out


def _missing_result_keys(src: Any) -> list[str]:
    """What a loaded JSON lacks of the cifar10 result layout that :func:`merge_results` reads (empty: all there)."""
    if not isinstance(src, dict):
        return ['a JSON object at the top']
    missing = [k for k in ('profile', 'data', 'settings', 'runs', 'meta') if k not in src]
    if isinstance(src.get('settings'), dict):
        missing += [f'settings.{k}' for k in ('epochs', 'models') if k not in src['settings']]
    if isinstance(src.get('meta'), dict):
        missing += [f'meta.{k}' for k in ('seeds', 'command', 'date_utc', 'wall_time_s', 'machine')
                    if k not in src['meta']]
    if isinstance(src.get('runs'), list):
        missing += sorted({f'runs[].{k}' for r in src['runs']
                           for k in ('model', 'variant', 'seed', 'test_acc', 'epochs')
                           if not isinstance(r, dict) or k not in r})
    return missing


_RECIPE_KEYS = ('batch_size', 'lr', 'momentum', 'weight_decay', 'augmentation', 'normalize', 'amp_bf16',
                'branch_rate', 'head_rate', 'n_train', 'n_test', 'train_subset', 'test_subset')


def merge_results(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Combine result files of one profile and recipe into one payload (runs re-summarized, sources recorded).

    Refuses files that differ in profile, data or recipe, that trained a model for different numbers of epochs
    (their runs could not be paired), or that hold the same (model, variant, seed) twice.

    Example:
        >>> merged = merge_results(['seed0.json', 'seed1.json'])  # doctest: +SKIP
        >>> sorted({r['seed'] for r in merged['runs']})  # doctest: +SKIP
        [0, 1]
    """
    if len(paths) < 2:
        raise SystemExit('--merge needs at least two result files')
    srcs = []
    for p in paths:
        try:
            srcs.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f'--merge: cannot read {p} as a cifar10 result ({e})') from e
        missing = _missing_result_keys(srcs[-1])
        if missing:
            raise SystemExit(f"--merge: {p} is not a cifar10.py result (it lacks {', '.join(missing)}); give the "
                             f".json files that cifar10.py --profile wrote")
    first = srcs[0]
    epochs: dict[str, int] = {}
    models: dict[str, list[str]] = {}
    runs: list[dict[str, Any]] = []
    seen: set[tuple[str, str, int]] = set()
    for src, p in zip(srcs, paths):
        for key in ('profile', 'data'):
            if src.get(key) != first.get(key):
                raise SystemExit(f'--merge: {p} has {key} {src.get(key)!r}, {paths[0]} has {first.get(key)!r}')
        for key in _RECIPE_KEYS:
            if src['settings'].get(key) != first['settings'].get(key):
                raise SystemExit(f"--merge: {p} has {key} {src['settings'].get(key)!r}, {paths[0]} has "
                                 f"{first['settings'].get(key)!r}: not the same recipe")
        for model, e in src['settings']['epochs'].items():
            if epochs.setdefault(model, e) != e:
                raise SystemExit(f'--merge: {model} ran {e} epochs in {p} and {epochs[model]} in another file; '
                                 'runs of different lengths cannot be paired (rerun with --epochs)')
        for model, variants in src['settings']['models'].items():
            models.setdefault(model, [])
            models[model] += [v for v in variants if v not in models[model]]
        for r in src['runs']:
            key = (r['model'], r['variant'], r['seed'])
            if key in seen:
                raise SystemExit(f'--merge: {key} is in more than one file')
            seen.add(key)
            runs.append(r)
    seeds = sorted({s for src in srcs for s in src['meta']['seeds']})
    not_run = [f'{m}/{v}/seed{s}' for s in seeds for m, vs in models.items() for v in vs if (m, v, s) not in seen]
    sources = [{'file': Path(p).name, 'command': src['meta']['command'], 'date_utc': src['meta']['date_utc'],
                'wall_time_s': src['meta']['wall_time_s'], 'seeds': src['meta']['seeds'],
                'label': src['meta'].get('label'),
                'machine': src['meta']['machine'], 'note': src.get('note'), 'calibration': src.get('calibration')}
               for src, p in zip(srcs, paths)]
    settings = dict(first['settings'], models=models, epochs=epochs,
                    lr_milestones={m: milestones(e) for m, e in epochs.items()},
                    time_budget_s=[src['settings'].get('time_budget_s') for src in srcs],
                    data_load_s=[src['settings'].get('data_load_s') for src in srcs])
    return {'profile': first['profile'], 'data': first['data'], 'settings': settings, 'sources': sources,
            'paper': PAPER_CIFAR10, 'incomplete': bool(not_run), 'not_run': not_run,
            'summary': summarize_runs(runs), 'runs': runs}


def _markdown(result: dict[str, Any]) -> str:
    meta = result['meta']
    # a merged result was computed here but trained where its sources ran: name the machine of the runs
    m = result['sources'][0]['machine'] if result.get('sources') else meta['machine']
    lines = [
        f"# CIFAR-10 from scratch, profile `{result['profile']}`",
        '',
        f"**{meta.get('label', '')}**" if meta.get('label') else '',
        '',
        f"- data: {DATA_NOTE}; train {result['settings']['n_train']:,} / test {result['settings']['n_test']:,} images",
        f"- recipe: SGD momentum 0.9, lr 0.1, batch {result['settings']['batch_size']}, wd 1e-4, crop 32 pad 4 + flip, "
        f"lr x0.1 at 50 % / 75 % of the epochs; branch p = {result['settings']['branch_rate']}, head p = "
        f"{result['settings']['head_rate']}; last-epoch test accuracy",
        f"- command: `{meta['command']}`",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs, GPU: {m['cuda_device'] or 'none'}; torch {m['torch']}, "
        f"timm {m['timm']}",
        f"- date (UTC): {meta['date_utc']}, wall time {meta['wall_time_s']:.0f} s, seeds {meta['seeds']}",
        f"- paper, for context only (different model, 164 epochs, original CIFAR-10): {PAPER_CIFAR10['top1']} % "
        f"({PAPER_CIFAR10['model']})",
    ]
    for src in result.get('sources', []):
        lines.append(f"- source `{src['file']}`: `{src['command']}`, {src['date_utc']}, {src['wall_time_s']:.0f} s, "
                     f"seeds {src['seeds']}, GPU {src['machine'].get('cuda_device') or 'none'}"
                     + (f"; {src['note']}" if src.get('note') else ''))
    if result.get('note'):
        lines.append(f"- note: {result['note']}")
    if 'smoke' in (meta.get('label') or ''):
        lines.append('- the verdicts below describe a few dozen training steps on a data subset: they test the '
                     'script, not the dropout placement')
    if result.get('incomplete'):
        lines.append(f"- **incomplete**: time budget reached; not run: {', '.join(result['not_run'])}")
        lines.append('- a paired difference with n = 1 has no interval: one seed is an observation, not a verdict')
    for model, rows in result['summary'].items():
        lines += ['', f"## {model} ({next(iter(rows.values()))['epochs']} epochs), test top-1 % on the JPEG copy", '',
                  '| variant | mean ± std | per seed | paired diff vs none [95 % CI] | verdict |', '|---|---|---|---|---|']
        for variant, row in rows.items():
            seeds = ', '.join(f'{a * 100:.2f}' for a in row['test_acc'])
            d = row.get('diff_vs_none')
            if d:
                ci = ('n/a' if d['ci_low'] is None or math.isnan(d['ci_low'])
                      else f"[{d['ci_low'] * 100:+.2f}, {d['ci_high'] * 100:+.2f}]")
                diff, verdict = f"{d['mean'] * 100:+.2f} {ci} (n={d['n']})", d['verdict']
            else:
                diff, verdict = '', ''
            lines.append(f"| {variant} | {_common.fmt_pm(row['mean'], row['std'], 100)} | {seeds} | {diff} | {verdict} |")
    lines.append('')
    return '\n'.join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Bar chart per model: mean test accuracy ± std per variant, seeds as dots."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    models = list(result['summary'])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 1.5 + 0.4 * max(
        len(result['summary'][m]) for m in models)), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = result['summary'][model]
        names = list(rows)
        means = [rows[v]['mean'] * 100 for v in names]
        # mean ± std as points, not bars: the axis does not start at 0, and bar lengths would suggest it does
        ax.errorbar(means, range(len(names)), xerr=[rows[v]['std'] * 100 for v in names], fmt='o', color='tab:blue',
                    capsize=3, label='mean ± std')
        for i, v in enumerate(names):
            ax.scatter([a * 100 for a in rows[v]['test_acc']], [i] * len(rows[v]['test_acc']), c='k', s=10, zorder=3,
                       marker='|', label='seeds' if i == 0 else None)
        ax.set_yticks(range(len(names)), names)
        ax.legend(fontsize=7)
        lo = min(min(rows[v]['test_acc']) for v in names) * 100
        hi = max(max(rows[v]['test_acc']) for v in names) * 100
        ax.set_xlim(max(0.0, lo - 2), min(100.0, hi + 1))
        ax.set_ylim(len(names) - 0.4, -0.6)  # first variant on top, room for the legend
        ax.set_xlabel('test top-1 % (CIFAR-10, lossy q75 JPEG copy)')
        label = result.get('meta', {}).get('label') or ''
        ax.set_title(f"{model}, {next(iter(rows.values()))['epochs']} epochs ({result['profile']})"
                     + ('\nSMOKE: not evidence' if 'smoke' in label else ''), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--profile', choices=sorted(PROFILES), default=None, help='required unless --merge')
    p.add_argument('--merge', nargs='+', type=Path, default=None, metavar='JSON',
                   help='combine these result files (same profile, recipe and epochs) into --name; trains nothing')
    p.add_argument('--note', default=None, help='free text stored with the result (e.g. what shared the machine)')
    p.add_argument('--epochs', type=int, default=None, help="override the profile's epochs ('auto' in gpu)")
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help="override the profile's seeds (both profiles: 0 1); each seed pairs every variant")
    p.add_argument('--models', nargs='+', default=None, help='restrict to these models of the profile')
    p.add_argument('--variants', nargs='+', default=None, choices=sorted(VARIANTS), metavar='VARIANT',
                   help=f"override each model's variants ('none' is always added: it is the paired baseline); "
                        f"one of {', '.join(VARIANTS)}")
    p.add_argument('--train-subset', type=int, default=None,
                   help='train on this many images, a fixed random subset (cpu-smoke: 2048; gpu: all 50,000)')
    p.add_argument('--test-subset', type=int, default=None,
                   help='test on this many images, a fixed random subset (cpu-smoke: 500; gpu: all 10,000)')
    p.add_argument('--time-budget-s', type=float, default=None,
                   help='seconds for the whole script: data, calibration and runs (gpu: 540)')
    p.add_argument('--device', default=None, help="override the profile's device")
    p.add_argument('--calib-steps', type=int, default=None,
                   help='timed steps per model when epochs are auto (plus a third as many untimed warm-up steps)')
    p.add_argument('--branch-rate', type=float, default=0.1)
    p.add_argument('--head-rate', type=float, default=0.2)
    p.add_argument('--data', type=Path, default=None, help='path of cifar10-jpeg.npz (default: shared folder)')
    p.add_argument('--out-dir', type=Path, default=_common.RESULTS_DIR)
    p.add_argument('--name', default=None, help='output stem (default cifar10_<profile>)')
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy shared machine)")
    args = p.parse_args(argv)
    if args.profile is None and not args.merge:
        p.error('--profile is required (or --merge FILES to combine results)')
    _common.check_output_path(args.out_dir, '--out-dir')
    if args.merge:
        return args
    for name in ('epochs', 'test_subset', 'calib_steps', 'threads'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    _common.check_distinct_seeds(p, args.seeds, 'runs are paired by seed')
    if args.train_subset is not None:
        batch = PROFILES[args.profile]['batch_size']
        n = min(args.train_subset, CIFAR10_TRAIN)
        # a last batch of one image stops BatchNorm in training ("more than 1 value per channel") at the end of
        # the first epoch, after the data load and any calibration
        if n < 2 or n % batch == 1:
            p.error(f'--train-subset {args.train_subset} leaves a batch of one image (batch size {batch}), on which '
                    'BatchNorm cannot train; give at least 2 and not one more than a multiple of the batch size')
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        p.error('--time-budget-s must be more than 0 seconds')
    _common.check_rates(p, branch_rate=args.branch_rate, head_rate=args.head_rate)
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a torch device; give cpu or cuda")
    if args.models is not None:
        unknown = [m for m in args.models if m not in PROFILES[args.profile]['models']]
        if unknown:
            p.error(f"--models {' '.join(unknown)}: not in profile {args.profile} "
                    f"(its models: {', '.join(PROFILES[args.profile]['models'])})")
    if args.data is None:
        args.data = _common.require_shared('data', 'cifar10', 'cifar10-jpeg.npz')
    elif not args.data.is_file():
        p.error(f'--data {args.data}: no such file; give the path of cifar10-jpeg.npz')
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run a profile's grid and write ``<name>.json``, ``.md`` and ``.png``; returns the result dict.

    Example:
        >>> r = main(['--profile', 'cpu-smoke', '--epochs', '1', '--train-subset', '256',
        ...           '--test-subset', '128', '--out-dir', '/tmp/c10'])  # doctest: +SKIP
    """
    args = parse_args(argv)
    if args.merge:
        payload = merge_results(args.merge)
        if args.note:
            payload['note'] = args.note
        src_seeds = sorted({r['seed'] for r in payload['runs']})
        return _write(payload, args, argv, seeds=src_seeds, started=_common.utc_now(),
                      wall=sum(s['wall_time_s'] for s in payload['sources']), label=payload['sources'][0]['label'],
                      name=args.name or f"cifar10_{payload['profile']}")
    if args.threads:
        torch.set_num_threads(args.threads)  # recorded in the result's machine info
    prof = dict(PROFILES[args.profile])
    for key in ('epochs', 'seeds', 'train_subset', 'test_subset', 'time_budget_s', 'device', 'calib_steps'):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)
    # parse_args has checked that every --models name is in the profile
    models = {m: v for m, v in prof['models'].items() if args.models is None or m in args.models}
    if args.variants:
        models = {m: ['none'] + [v for v in args.variants if v != 'none'] for m in models}
    device = torch.device(prof['device'])
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'profile {args.profile} needs a CUDA GPU (none found); use --profile cpu-smoke or --device cpu')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    amp = bool(prof['amp']) and device.type == 'cuda'
    started, t0 = _common.utc_now(), time.time()

    print(f'[cifar10] profile {args.profile}: loading data ({DATA_NOTE}) to {device}', flush=True)
    data = load_cifar10(args.data, prof['train_subset'], prof['test_subset'], device)
    load_s = time.time() - t0
    print(f"[cifar10] {len(data['x_train']):,} train / {len(data['x_test']):,} test images in {load_s:.1f} s", flush=True)

    seeds = list(prof['seeds'])
    epochs_per_model, calibration = {}, {}
    for i, (model, variants) in enumerate(models.items()):
        if prof['epochs'] == 'auto':
            # what is left of the budget (data loading and earlier calibrations are spent), split by model share
            shares = [prof['model_share'].get(m, 1.0) for m in list(models)[i:]]
            budget = (prof['time_budget_s'] - (time.time() - t0)) * shares[0] / sum(shares)
            steps = prof.get('calib_steps', 40)
            cal = calibrate_epochs(model, variants, len(variants) * len(seeds), data, budget, prof['batch_size'], amp,
                                   prof['min_epochs'], prof['max_epochs'], warmup_steps=max(1, steps // 3),
                                   timed_steps=steps)
            calibration[model] = cal
            epochs_per_model[model] = cal['epochs']
            print(f"[cifar10] {model}: {cal['step_s'] * 1000:.1f} ms/step -> {cal['epochs']} epochs per run", flush=True)
        else:
            epochs_per_model[model] = int(prof['epochs'])

    # seed-major order: if the budget guard stops the grid, the finished seeds are complete and paired
    plan = [(model, variant, seed) for seed in seeds for model, variants in models.items() for variant in variants]
    runs, not_run = [], []
    for model, variant, seed in plan:
        budget = prof.get('time_budget_s')
        if budget is not None and runs:
            # guard: skip a run that would end past the budget (+5 %), judged by the slowest run of that model
            est = max((r['wall_time_s'] for r in runs if r['model'] == model), default=0.0)
            if time.time() - t0 + est > budget * 1.05:
                not_run.append(f'{model}/{variant}/seed{seed}')
                continue
        r = train_run(model, variant, seed, data, epochs_per_model[model], batch_size=prof['batch_size'],
                      branch_rate=args.branch_rate, head_rate=args.head_rate, amp=amp)
        print(f"[cifar10] {model:<18} {variant:<26} seed {seed}: test top-1 {r['test_acc'] * 100:.2f} % "
              f"(train loss {r['final_train_loss']:.3f}, {r['wall_time_s']:.0f} s)", flush=True)
        runs.append(r)

    payload = {
        'profile': args.profile,
        'data': DATA_NOTE,
        'settings': {'models': models, 'epochs': epochs_per_model, 'batch_size': prof['batch_size'], 'lr': 0.1,
                     'momentum': 0.9, 'weight_decay': 1e-4, 'lr_milestones': {m: milestones(e) for m, e in
                                                                              epochs_per_model.items()},
                     'augmentation': 'random crop 32 pad 4 (zeros) + horizontal flip, on device',
                     'normalize': {'mean': CIFAR_MEAN, 'std': CIFAR_STD}, 'amp_bf16': amp, 'device': str(device),
                     'branch_rate': args.branch_rate, 'head_rate': args.head_rate,
                     'n_train': len(data['x_train']), 'n_test': len(data['x_test']),
                     'train_subset': prof['train_subset'], 'test_subset': prof['test_subset'],
                     'data_load_s': round(load_s, 1), 'time_budget_s': prof.get('time_budget_s')},
        'calibration': calibration,
        'paper': PAPER_CIFAR10,
        'incomplete': bool(not_run),
        'not_run': not_run,
        'summary': summarize_runs(runs),
        'runs': runs,
    }
    if args.note:
        payload['note'] = args.note
    return _write(payload, args, argv, seeds=seeds, started=started, wall=time.time() - t0, label=prof.get('label'),
                  name=args.name or f'cifar10_{args.profile}')


def _write(payload: dict[str, Any], args: argparse.Namespace, argv: Sequence[str] | None, seeds: list[int],
           started: str, wall: float, label: str | None, name: str) -> dict[str, Any]:
    args.out_dir.mkdir(parents=True, exist_ok=True)  # parse_args checked that it can be made
    stem = args.out_dir / name
    result = _common.write_result(stem.with_suffix('.json'), payload, seeds=seeds, started_at=started,
                                  wall_time_s=wall, label=label,
                                  command=_common.command_line(argv, script='benchmarks/cifar10.py'))
    stem.with_suffix('.md').write_text(_markdown(result))
    if payload['runs']:
        plot(result, stem.with_suffix('.png'))
    print(f'[cifar10] wrote {stem}.json/.md/.png ({wall:.0f} s)', flush=True)
    return result


if __name__ == '__main__':
    main()
