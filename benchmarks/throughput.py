"""Fine-tuning throughput: the loop people copy (accelerate's ``cv_example.py``) against the toolkit's data path.

In one run on one machine, with repeats:

(a) **baseline**, written the way accelerate's ``examples/cv_example.py`` is: a ``Dataset`` that opens and decodes
    each JPEG with PIL and runs ``RandomResizedCrop`` + ``ToTensor`` every epoch, a default ``DataLoader``
    (``shuffle=True``, no pinned memory, workers restarted each epoch), normalization on the device, fp32, NCHW.
    (cv_example freezes the backbone; here both paths train every layer, so the model work is the same.)
(b) **toolkit** (``finetune/fastdata.py``), as ``finetune train --fast-data`` runs it: decode-once uint8 cache of
    whole images, ``BatchAugment`` (on the GPU, fed by loader workers with pinned memory; on CPU in the training
    process, where the crops are spread over torch's threads: without the decode, handing 4.8 MB batches between
    processes cost more than it saved), channels_last on GPUs, bf16 autocast where it is fast (CUDA with bf16, or
    a CPU with AMX); with ``device_cache`` (the gpu and smoke profiles) also ``finetune train --cache-on-device``:
    the whole cache in device memory, the loader draws only indices, batches are gathered on the device.

Measured: images/s of the loader alone (model-ready normalized float batches on the device, augmentation
included), images/s of whole training steps (loader + forward + backward + optimizer), epoch wall time, peak
memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of a fresh process running the same config, plus the
bytes autograd saves for backward), for resnet50 at 224 px and at a CPU-friendly size; and the cost of the
recommended dropout placement (``timm_dropfix.rewrite`` defaults) against the same resnet50 without dropout (on CPU
with timm_dropfix's fast dropout and with torch's kernel), next to a mask-only floor (a mask drawn once, no random
numbers per step). Loader epochs and training steps of the compared arms alternate, so they meet the same machine.

Profiles: ``--quick`` (< 3 min on 2 CPU cores; last line ``loader_speedup=X step_speedup=Y
dropfix_step_overhead=Z``), default (more repeats), ``--gpu`` (CUDA only, < 5 min on one H100; adds
preresnet101_dropfix, the measured matmul TFLOP/s for scale, and the dropout's cost under ``torch.compile``
with inductor, which can fuse it; ``--dropfix-compile`` sets that backend for any profile). Results go to
``benchmarks/results/throughput_<profile>.json`` and ``.md``.

Example::

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --gpu
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

from _common import (RESULTS_DIR, check_output_path, check_timm_model, command_line, mean_std,  # noqa: E402
                     require_shared, shared_dir, utc_now, write_json_and_markdown)
from finetune.cpumem import keep_freed_memory  # noqa: E402
from finetune.stats import paired_t_interval  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # resnet50's pretrained_cfg values
RRC_SCALE = (0.5, 1.0)  # cv_example's RandomResizedCrop scale, used by both paths

# sizes: (img_size, batch) pairs; the first is the headline (224 px). steps: timed steps per chunk,
# chunks: interleaved baseline/toolkit chunks. dropfix_pairs: interleaved rounds of one step per dropout arm.
# device_cache: also measure the toolkit with the whole cache in device memory (finetune --cache-on-device).
# memory_repeats: rounds of the CPU peak-RSS probes of the dropout arms (the median is reported).
PROFILES: dict[str, dict[str, Any]] = {
    'quick': dict(sizes=[(224, 4), (96, 8)], loader_batch=32, loader_repeats=5, epoch_images=370,
                  steps=2, chunks=1, dropfix_size=(96, 8), dropfix_pairs=8, memory_sizes=[(96, 8)],
                  memory_repeats=3, models=['resnet50'], workers=2),
    'default': dict(sizes=[(224, 16), (128, 16)], loader_batch=32, loader_repeats=5, epoch_images=370,
                    steps=3, chunks=2, dropfix_size=(128, 16), dropfix_pairs=20,
                    memory_sizes=[(224, 16), (128, 16)], memory_repeats=3, models=['resnet50'], workers=2),
    # every code path once at the smallest sizes (development and tests), not a measurement; it still builds
    # several resnet50s and starts fresh processes for the memory probes, so it takes about a minute (52 s in the
    # tests at one thread) to 3 minutes (175 s run as a script) on 2 shared CPU cores
    'smoke': dict(sizes=[(64, 2)], loader_batch=8, loader_repeats=1, epoch_images=16, steps=1, chunks=1,
                  dropfix_size=(64, 2), dropfix_pairs=1, memory_sizes=[(64, 2)], models=['resnet50'], workers=1,
                  device_cache=True),
    # dropfix_compile: the dropout cost also under torch.compile with this backend (it can fuse the dropout)
    'gpu': dict(sizes=[(224, 128), (160, 128)], loader_batch=128, loader_repeats=3, epoch_images=2560,
                steps=15, chunks=2, dropfix_size=(224, 128), dropfix_pairs=20, memory_sizes=[],
                models=['resnet50', 'preresnet101_dropfix'], workers=8, dropfix_compile='inductor', device_cache=True),
}


# ----------------------------------------------------------------------------------------------- data
def pets_samples(root: Path) -> list[tuple[str, int]]:
    """All pets370 images (trainval + test) as ``(path, class_id)``; a throughput run needs no split."""
    pets = root / 'oxford-iiit-pet'
    samples = []
    for split in ('trainval', 'test'):
        for line in (pets / 'annotations' / f'{split}.txt').read_text().splitlines():
            if line.strip():
                name, cls = line.split()[:2]
                samples.append((str(pets / 'images' / f'{name}.jpg'), int(cls) - 1))
    return samples


class PetsDataset(Dataset):
    """cv_example.py's dataset: PIL open + convert + transform on every access."""

    def __init__(self, samples: list[tuple[str, int]], image_transform: Callable):
        self.samples, self.image_transform = samples, image_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        path, label = self.samples[idx]
        image = Image.open(path).convert('RGB')
        return {'image': self.image_transform(image), 'label': label}


def baseline_loader(samples, img_size: int, batch: int, workers: int, epoch_images: int, seed: int) -> DataLoader:
    from torchvision.transforms import Compose, RandomResizedCrop, ToTensor
    ds = PetsDataset(samples, Compose([RandomResizedCrop(img_size, scale=RRC_SCALE), ToTensor()]))
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, num_samples=epoch_images, generator=g)  # == shuffle=True when sizes match
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers)


class _Resampled(Dataset):
    """Index a dataset modulo its length (lets a GPU epoch be longer than 370 images); keeps batched reads."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.ds[i % len(self.ds)]

    def __getitems__(self, idx):
        idx = [i % len(self.ds) for i in idx]
        return self.ds.__getitems__(idx) if hasattr(self.ds, '__getitems__') else [self.ds[i] for i in idx]


def toolkit_loader(cache_path: Path, img_size: int, batch: int, workers: int, epoch_images: int, seed: int,
                   device: torch.device) -> tuple[DataLoader, Callable[..., torch.Tensor]]:
    """Cached loader; returns (loader, what the training process applies to each (images, sizes) batch on the
    device)."""
    from finetune.fastdata import BatchAugment, CachedDataset, make_fast_loader
    # no colour jitter, as the baseline has none; on CUDA the step makes the batch channels_last
    aug = BatchAugment(img_size, MEAN, STD, train=True, scale=RRC_SCALE)
    ds = CachedDataset(cache_path)
    if epoch_images != len(ds):
        ds = _Resampled(ds, epoch_images)
    if device.type == 'cpu':
        # CPU: crops made with the batch in this process (no workers: 2 workers measured ~1500 img/s at 224 px
        # against ~1900 in-process on 2 cores), then normalized; the baseline keeps its workers
        loader = make_fast_loader(ds, batch, shuffle=True, num_workers=0, seed=seed, batch_transform=aug.resample)
        return loader, lambda images, _sizes: aug.normalize(images, inplace=True)
    # accelerator: the loader only reads uint8 batches, the whole augmentation runs on the device
    loader = make_fast_loader(ds, batch, shuffle=True, num_workers=workers, pin_memory=True,
                              persistent_workers=True, seed=seed)
    return loader, aug.to(device)


def device_cache_loader(cache_path: Path, img_size: int, batch: int, epoch_images: int, seed: int,
                        device: torch.device) -> tuple[DataLoader, Callable[..., torch.Tensor]]:
    """``finetune train --cache-on-device``: the whole cache in device memory, the loader draws indices only."""
    from finetune.fastdata import BatchAugment, CachedDataset, DeviceCache, IndexDataset
    cache = DeviceCache(CachedDataset(cache_path), device)
    ds = IndexDataset(cache.labels)
    if epoch_images != len(ds):
        ds = _Resampled(ds, epoch_images)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return loader, cache.feeding(BatchAugment(img_size, MEAN, STD, train=True, scale=RRC_SCALE).to(device))


def to_model_input(path: str, batch, device: torch.device, aug) -> tuple[torch.Tensor, torch.Tensor]:
    """One loader batch -> (normalized float input on the device, labels), as each path's loop does it."""
    if path == 'baseline':  # cv_example: move, then (x - mean) / std on the device
        x = batch['image'].to(device)
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        return (x - mean) / std, batch['label'].to(device)
    images, labels, *sizes = batch  # toolkit_device batches are (indices, labels)
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if aug is not None:
        images = aug(images, *sizes)
    return images, labels


# ----------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def fast_bf16(device: torch.device) -> bool:
    """bf16 autocast only where it is faster than fp32: CUDA with bf16, or a CPU with AMX tiles."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    try:
        return 'amx_bf16' in Path('/proc/cpuinfo').read_text()
    except OSError:
        return False


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def summary(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {'mean': mean, 'std': std, 'min': min(values), 'max': max(values), 'n': len(values),
            'values': [round(v, 4) for v in values]}


def make_model(name: str, device: torch.device, toolkit: bool, dropout: Optional[bool] = None) -> torch.nn.Module:
    import timm
    import timm_dropfix
    model = timm.create_model(name, num_classes=37)
    if dropout:
        timm_dropfix.rewrite(model)  # the recommended placement, default rates
    model.to(device).train()
    if toolkit and device.type == 'cuda':  # as finetune train: oneDNN's channels_last backward is slower on CPU
        model = model.to(memory_format=torch.channels_last)
    return model


class Trainer:
    """One training step as each path writes it (fp32 NCHW; the toolkit: channels_last on CUDA, bf16 autocast
    where it is fast). ``fast_dropout``: timm_dropfix's CPU dropout switch during this trainer's steps (None:
    the process default)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, toolkit: bool,
                 fast_dropout: Optional[bool] = None):
        self.model, self.device = model, device
        self.bf16 = toolkit and fast_bf16(device)
        self.channels_last = toolkit and device.type == 'cuda'
        self.fast_dropout = fast_dropout
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        import timm_dropfix
        if self.channels_last and not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        with timm_dropfix.fast_dropout_mode(self.fast_dropout):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.model(x), y)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class FixedMask(torch.nn.Module):
    """Stands in for a dropout: multiplies by a mask drawn on first use for each input shape, so a step pays
    for applying a mask (forward and backward) and for keeping it, but draws no random numbers: the floor
    of any dropout that keeps a mask and draws it in a separate pass."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.masks: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.dtype, x.device, x.is_contiguous())
        mask = self.masks.get(key)
        if mask is None:
            mask = (torch.rand(x.shape, device=x.device) >= self.p).to(x.dtype).div_(1 - self.p)
            if not x.is_contiguous() and x.dim() == 4:  # the toolkit's channels_last activations on CUDA
                mask = mask.contiguous(memory_format=torch.channels_last)
            self.masks[key] = mask
        return x * mask


def with_fixed_masks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every ``nn.Dropout`` replaced by a :class:`FixedMask` of the same rate."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, FixedMask(child.p))
    return model


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------- measurements
def measure_loaders(arms: dict[str, tuple[str, DataLoader, Any]], device: torch.device,
                    repeats: int) -> dict[str, dict[str, Any]]:
    """Epochs of each loader alone (to model-ready input on the device), interleaved round by round (order
    alternating) so that every arm meets the same machine conditions. One untimed warm-up epoch each first.
    ``arms``: name -> (path, loader, batch transform)."""
    rates: dict[str, list[float]] = {k: [] for k in arms}
    times: dict[str, list[float]] = {k: [] for k in arms}
    sizes: dict[str, int] = {}
    for r in range(repeats + 1):
        for k in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            path, loader, aug = arms[k]
            sync(device)
            t0 = time.perf_counter()
            n = 0
            for batch in loader:
                x, _ = to_model_input(path, batch, device, aug)
                n += x.shape[0]
            sync(device)
            dt = time.perf_counter() - t0
            sizes[k] = n
            if r > 0:  # the baseline restarts its workers every epoch anyway; the toolkit's persist
                rates[k].append(n / dt)
                times[k].append(dt)
    return {k: {'images_per_s': summary(rates[k]), 'epoch_s': summary(times[k]), 'epoch_images': sizes[k]}
            for k in arms}


def measure_steps(paths: dict[str, tuple], device: torch.device, steps: int, chunks: int) -> dict[str, Any]:
    """Interleaved chunks of whole training steps (fetch + augment + forward + backward + optimizer step).

    Each chunk starts a fresh loader iterator and runs one untimed warm-up step, then ``steps`` timed ones;
    baseline and toolkit chunks alternate so slow drifts of a shared machine hit both alike.
    """
    rates: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(chunks):
        for path, (loader, aug, trainer) in paths.items():
            it = endless(loader)
            x, y = to_model_input(path, next(it), device, aug)
            trainer.step(x, y)
            sync(device)
            t0 = time.perf_counter()
            n = 0
            for _ in range(steps):
                x, y = to_model_input(path, next(it), device, aug)
                trainer.step(x, y)
                n += x.shape[0]
            sync(device)
            rates[path].append(n / (time.perf_counter() - t0))
            del it
    return {p: {'images_per_s': summary(v)} for p, v in rates.items()}


def step_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """CUDA memory a step adds at its peak above what was allocated before it (activations, saved tensors,
    temporaries): independent of whatever else is resident."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


DROPOUT_ARMS = ('dropfix_torch_kernel', 'mask_only')  # measure_dropfix_time's arms besides the two compared


def measure_dropfix_time(size: int, batch: int, device: torch.device, pairs: int,
                         compile_backend: Optional[str] = None, model: str = 'resnet50',
                         arms: Sequence[str] = DROPOUT_ARMS) -> dict[str, Any]:
    """Step time of ``model`` (a timm name; resnet50 by default) without dropout vs with the recommended placement,
    on the same fixed batch, in interleaved rounds (order alternating), all in the toolkit configuration.

    Arms besides ``no_dropout`` and ``dropfix`` (the default route: timm_dropfix's fast dropout, the C kernel on
    CPU and the Triton one on CUDA): ``dropfix_torch_kernel`` (the same model on torch's own dropout kernel) and
    ``mask_only`` (every
    dropout replaced by a :class:`FixedMask`: what any unfused dropout costs before drawing random numbers).
    Each arm's overhead is the median over rounds of ``t_arm / t_no_dropout - 1``. On CPU the times are the
    process CPU time of each step (``time.process_time``), which other tenants of a shared machine disturb far
    less than wall time; wall times are recorded too. On CUDA, synchronized wall time, and each step's peak
    memory above what was resident before it. ``compile_backend``: only ``no_dropout`` and ``dropfix``, both
    through ``torch.compile`` with that backend first (what ``finetune train --dynamo-backend`` does), which can
    fuse the dropout into its neighbours. ``arms``: which of :data:`DROPOUT_ARMS` to run besides the two
    compared (fewer arms: more rounds in the same time).
    """
    unknown = set(arms) - set(DROPOUT_ARMS)
    if unknown:
        raise ValueError(f'unknown dropout arms {sorted(unknown)}; choose from {list(DROPOUT_ARMS)}')
    torch.manual_seed(0)
    off = make_model(model, device, toolkit=True, dropout=False)
    models = {'no_dropout': (off, None), 'dropfix': (make_model(model, device, toolkit=True, dropout=True), None)}
    if not compile_backend and 'dropfix_torch_kernel' in arms:
        models['dropfix_torch_kernel'] = (make_model(model, device, toolkit=True, dropout=True), False)
    if not compile_backend and 'mask_only' in arms:
        models['mask_only'] = (with_fixed_masks(make_model(model, device, toolkit=True, dropout=True)), None)
    trainers = {}
    for k, (m, fast) in models.items():
        m.load_state_dict(off.state_dict())
        if compile_backend:
            m = torch.compile(m, backend=compile_backend)
        trainers[k] = Trainer(m, device, True, fast_dropout=fast)
    x = torch.randn(batch, 3, size, size, device=device)  # the step makes it channels_last where the model is
    y = torch.randint(0, 37, (batch,), device=device)
    wall: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    t_warm = time.perf_counter()
    for _ in range(2 if compile_backend else 1):  # warm-up (the first compiled step compiles)
        for k in trainers:
            trainers[k].step(x, y)
    sync(device)
    warm_s = time.perf_counter() - t_warm
    for p in range(pairs):
        order = list(trainers) if p % 2 == 0 else list(reversed(trainers))
        for k in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            trainers[k].step(x, y)
            sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    times = cpu if device.type == 'cpu' else wall

    def overhead(k: str) -> dict[str, Any]:
        ratios = [b / a - 1.0 for a, b in zip(times['no_dropout'], times[k])]
        wall_ratios = [b / a - 1.0 for a, b in zip(wall['no_dropout'], wall[k])]
        ci = paired_t_interval(ratios, [0.0] * len(ratios))
        return {'overhead_per_pair': summary(ratios), 'overhead_median': statistics.median(ratios),
                'overhead_mean_ci95': [ci['ci_low'], ci['ci_high']] if len(ratios) > 1 else None,
                'wall_overhead_median': statistics.median(wall_ratios)}

    out = {'model': model, 'size': size, 'batch': batch,
           'timer': 'process CPU time' if device.type == 'cpu' else 'wall (synced)',
           'compile_backend': compile_backend, 'warmup_s': warm_s,
           'step_s': {k: summary(v) for k, v in times.items()},
           'step_wall_s': {k: summary(v) for k, v in wall.items()}, **overhead('dropfix'),
           'arms': {k: overhead(k) for k in trainers if k not in ('no_dropout', 'dropfix')}}
    if not compile_backend:
        import timm_dropfix
        out['dropout_kernel'] = timm_dropfix.dropout_kernel(device)
    if device.type == 'cpu':
        if not compile_backend and out['dropout_kernel'] == 'fused':
            out['dropout_call_share'] = dropout_call_share(trainers['dropfix'], x, y, steps=min(max(3, pairs // 2), 10))
    if device.type == 'cuda':
        peaks = {k: step_peak_bytes(lambda k=k: trainers[k].step(x, y), device)
                 for k in ('no_dropout', 'dropfix', 'dropfix_torch_kernel') if k in trainers}
        out['step_peak_bytes'] = peaks
        out['step_peak_overhead'] = peaks['dropfix'] / peaks['no_dropout'] - 1.0
    return out


def dropout_call_share(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, Any]:
    """Share of each CPU step spent inside the fused dropout's own calls (forward and backward of
    ``timm_dropfix.fastdrop._FusedDropout``, with or without the residual addition, and ``_FusedReluDropout``:
    output allocation, seed, kernel), in process CPU time and in wall time. A direct estimate of the dropout's
    cost that other tenants of the machine disturb far less than the difference of two noisy step times; it leaves
    out indirect costs (caches the dropout evicts, memory it allocates), and it includes the residual additions
    and the blocks' ReLUs (forward and backward) fused into post-activation branch-end dropouts and the ReLUs fused
    into pre-activation ones (which the model without dropout runs too), so it overstates the dropout's own share
    by their time."""
    from timm_dropfix import fastdrop
    functions = (fastdrop._FusedDropout, fastdrop._FusedReluDropout)
    spent = {'cpu': 0.0, 'wall': 0.0, 'calls': 0}
    depth = [0]  # backward applies _FusedDropout again: count only the outermost call
    originals = [(fn, fn.forward, fn.backward) for fn in functions]

    def timed(call: Callable) -> Callable:
        def run(*args):
            depth[0] += 1
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return call(*args)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent['cpu'] += time.process_time() - c0
                    spent['wall'] += time.perf_counter() - t0
                    spent['calls'] += 1
        return staticmethod(run)

    shares: dict[str, list[float]] = {'cpu': [], 'wall': []}
    calls = 0
    try:
        for fn, forward, backward in originals:
            fn.forward, fn.backward = timed(forward), timed(backward)
        for _ in range(steps):
            spent.update(cpu=0.0, wall=0.0, calls=0)
            c0, t0 = time.process_time(), time.perf_counter()
            trainer.step(x, y)
            shares['cpu'].append(spent['cpu'] / (time.process_time() - c0))
            shares['wall'].append(spent['wall'] / (time.perf_counter() - t0))
            calls = spent['calls']
    finally:
        for fn, forward, backward in originals:
            fn.forward, fn.backward = staticmethod(forward), staticmethod(backward)
    return {'cpu': summary(shares['cpu']), 'wall': summary(shares['wall']), 'calls_per_step': calls}


def saved_activation_bytes(model: torch.nn.Module, trainer: Trainer, x, y) -> int:
    """Bytes of distinct tensors autograd saves for backward in one step (what dropout masks add to)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step(x, y)
    return sum(seen.values())


def _proc_status_bytes(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def child_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: set up one config, reset the peak-RSS mark, run one step, read the peak.

    (``ru_maxrss`` is no use here: Linux carries it over fork + exec from the parent benchmark process.)
    ``peak_mem`` = peak RSS during the step minus the RSS right after the imports, i.e. model, gradients, Adam
    state, data and activations, the CPU counterpart of CUDA's ``max_memory_allocated``.
    """
    import psutil
    device = torch.device('cpu')
    kept = keep_freed_memory() if cfg.get('keep') else False
    rss_libs = _proc_status_bytes('VmRSS')
    torch.manual_seed(0)
    out: dict[str, Any] = {'keep_freed_memory': kept}
    loader = it = None
    if cfg['kind'] == 'dropfix':
        model = make_model(cfg.get('model', 'resnet50'), device, toolkit=True, dropout=cfg['dropout'])
        trainer = Trainer(model, device, True, fast_dropout=cfg.get('fast_dropout'))
        x = torch.randn(cfg['batch'], 3, cfg['size'], cfg['size'])
        y = torch.randint(0, 37, (cfg['batch'],))
    else:
        toolkit = cfg['path'] == 'toolkit'
        model = make_model('resnet50', device, toolkit=toolkit)
        trainer = Trainer(model, device, toolkit)
        if toolkit:
            loader, aug = toolkit_loader(Path(cfg['cache']), cfg['size'], cfg['batch'], cfg['workers'],
                                         cfg['epoch_images'], 0, device)
        else:
            loader = baseline_loader(pets_samples(Path(cfg['root'])), cfg['size'], cfg['batch'], cfg['workers'],
                                     cfg['epoch_images'], 0)
            aug = None
        it = iter(loader)
        x, y = to_model_input(cfg['path'], next(it), device, aug)
    gc.collect()
    out['rss_before_step'] = _proc_status_bytes('VmRSS')
    Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM (the peak RSS) to the current RSS
    out['saved_activation_bytes'] = saved_activation_bytes(model, trainer, x, y)
    out['peak_rss'] = _proc_status_bytes('VmHWM')
    out['rss_after_imports'] = rss_libs
    out['peak_mem'] = out['peak_rss'] - rss_libs
    if it is not None:
        # unique memory of the loader workers (the cache pages are shared page cache, not counted)
        out['workers_uss'] = sum(c.memory_full_info().uss for c in psutil.Process().children(recursive=True))
    return out


def run_children(cfgs: list[dict[str, Any]], repeats: int | list[int] = 1,
                 timeout: float = 600) -> list[dict[str, Any]]:
    """Run the memory probes, all at once: each measures only its own peak RSS, so sharing the cores
    does not change the numbers, and the run is shorter. ``repeats`` (one count, or one per config): rounds one
    after another, each running the configs that still need one (peak RSS varies by tens of MiB between
    identical processes, with the allocator's thresholds); each config's result is the probe with the median
    ``peak_mem``, with every round's value in ``peak_mem_runs``."""
    counts = [repeats] * len(cfgs) if isinstance(repeats, int) else list(repeats)
    runs: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    for r in range(max(counts, default=0)):
        todo = [i for i, c in enumerate(counts) if c > r]
        procs = [subprocess.Popen([sys.executable, __file__, '--_child', json.dumps(cfgs[i])],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in todo]
        for i, proc in zip(todo, procs):
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f'memory probe {cfgs[i]} failed:\n{err[-3000:]}')
            runs[i].append(json.loads(out.strip().splitlines()[-1]))
    return [median_probe(r) for r in runs]


def median_probe(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The probe with the median ``peak_mem`` (the lower middle one for an even count), with every run's value.

    Example:
        >>> median_probe([{'peak_mem': 3}, {'peak_mem': 1}, {'peak_mem': 2}])
        {'peak_mem': 2, 'peak_mem_runs': [3, 1, 2]}
    """
    ordered = sorted(runs, key=lambda r: r['peak_mem'])
    return dict(ordered[(len(ordered) - 1) // 2], peak_mem_runs=[r['peak_mem'] for r in runs])


def gpu_memory(fn: Callable[[], None], device: torch.device) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device)


def train_flops_per_image(name: str, size: int, device: torch.device) -> float:
    """FLOPs of one training step per image (forward + backward, batch 1), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    model = make_model(name, device, toolkit=False)
    x = torch.randn(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 100) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


# ----------------------------------------------------------------------------------------------- main
def run(profile: str, out_dir: Path, seed: int, workers: Optional[int],
        dropfix_compile: Optional[str] = None, dropfix_model: str = 'resnet50',
        keep_freed: bool = False) -> dict[str, Any]:
    prof = dict(PROFILES[profile])
    if workers is not None:
        prof['workers'] = workers
    device = torch.device('cuda' if profile == 'gpu' else 'cpu')
    # process-wide, so it applies to both arms alike; the memory probes apply it in their own processes
    kept = keep_freed_memory() if keep_freed and device.type == 'cpu' else False
    root = shared_dir() / 'data' / 'pets370'
    samples = pets_samples(root)
    result: dict[str, Any] = {'profile': profile, 'settings': prof, 'device': str(device),
                              'cpu_model': cpu_model(), 'cpu_cores': os.cpu_count(),
                              'torch_threads': torch.get_num_threads(), 'load_average_start': load_average(),
                              'n_source_images': len(samples), 'bf16_autocast_toolkit': fast_bf16(device),
                              'keep_freed_memory': kept}
    if device.type == 'cuda':
        result['gpu'] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True
        result['matmul_tflops'] = {'bf16': matmul_tflops(device, torch.bfloat16),
                                   'fp32_no_tf32': matmul_tflops(device, torch.float32)}
        print(f"matmul TFLOP/s: {result['matmul_tflops']}", flush=True)

    from finetune.fastdata import build_cache, default_short_side
    cache_dir = Path(tempfile.mkdtemp(prefix='throughput-cache-'))
    try:
        per_size = []
        probes: list[tuple[dict, str, dict]] = []  # (where to store, key, child config) for CPU memory probes
        for size, batch in prof['sizes']:
            short = default_short_side(size)  # what finetune train caches its images at (crop_pct 0.875)
            info = build_cache(samples, short, cache_dir)  # timed: a cold build in a fresh folder
            entry: dict[str, Any] = {'img_size': size, 'batch': batch, 'cache_short_side': short,
                                     'cache_build_s': info.build_seconds, 'cache_images': info.n_images,
                                     'cache_skipped': info.n_skipped}
            print(f'[{size}px] cache built in {info.build_seconds:.1f}s', flush=True)
            # loader alone, with a batch size typical for the device
            lb, ep = prof['loader_batch'], prof['epoch_images']
            base = baseline_loader(samples, size, lb, prof['workers'], ep, seed)
            tk, aug = toolkit_loader(info.path, size, lb, prof['workers'], ep, seed, device)
            arms = {'baseline': ('baseline', base, None), 'toolkit': ('toolkit', tk, aug)}
            if prof.get('device_cache'):
                dl, daug = device_cache_loader(info.path, size, lb, ep, seed, device)
                arms['toolkit_device'] = ('toolkit_device', dl, daug)
            lo = entry['loader'] = {'batch': lb, **measure_loaders(arms, device, prof['loader_repeats'])}
            lo['speedup'] = lo['toolkit']['images_per_s']['mean'] / lo['baseline']['images_per_s']['mean']
            print(f"[{size}px] loader img/s baseline {lo['baseline']['images_per_s']['mean']:.0f} "
                  f"toolkit {lo['toolkit']['images_per_s']['mean']:.0f} (x{lo['speedup']:.1f})", flush=True)
            if 'toolkit_device' in lo:
                lo['device_speedup'] = (lo['toolkit_device']['images_per_s']['mean']
                                        / lo['baseline']['images_per_s']['mean'])
                print(f"[{size}px] loader img/s toolkit, cache on the device "
                      f"{lo['toolkit_device']['images_per_s']['mean']:.0f} (x{lo['device_speedup']:.1f})", flush=True)
            arms = base = tk = dl = daug = None  # the loaders (and a device copy of the cache) go before the steps
            gc.collect()
            # whole training steps, per model
            entry['steps'] = {}
            for name in prof['models']:
                torch.manual_seed(seed)
                paths = {}
                if name == 'resnet50':  # the baseline loop is only run for the model cv_example uses
                    paths['baseline'] = (baseline_loader(samples, size, batch, prof['workers'], ep, seed), None,
                                         Trainer(make_model(name, device, False), device, False))
                tk, aug = toolkit_loader(info.path, size, batch, prof['workers'], ep, seed, device)
                paths['toolkit'] = (tk, aug, Trainer(make_model(name, device, True), device, True))
                if prof.get('device_cache') and name == 'resnet50':
                    dl, daug = device_cache_loader(info.path, size, batch, ep, seed, device)
                    paths['toolkit_device'] = (dl, daug, Trainer(make_model(name, device, True), device, True))
                st = measure_steps(paths, device, prof['steps'], prof['chunks'])
                for p in st:
                    st[p]['epoch_s_estimate'] = ep / st[p]['images_per_s']['mean']
                if 'baseline' in st:
                    st['speedup'] = st['toolkit']['images_per_s']['mean'] / st['baseline']['images_per_s']['mean']
                if 'baseline' in st and 'toolkit_device' in st:
                    st['device_speedup'] = (st['toolkit_device']['images_per_s']['mean']
                                            / st['baseline']['images_per_s']['mean'])
                if device.type == 'cuda':  # peak memory of one more step per path, measured in-process
                    for p, (loader, a, trainer) in paths.items():
                        def one_step(p=p, loader=loader, a=a, trainer=trainer):
                            x, y = to_model_input(p, next(iter(loader)), device, a)
                            trainer.step(x, y)
                        st[p]['peak_mem_bytes'] = gpu_memory(one_step, device)
                st['train_gflop_per_image'] = train_flops_per_image(name, size, device) / 1e9
                for p in paths:  # achieved model FLOP rate, to set against the matmul peak
                    st[p]['achieved_tflops'] = st[p]['images_per_s']['mean'] * st['train_gflop_per_image'] / 1e3
                entry['steps'][name] = st
                print(f"[{size}px] {name} step img/s " + ', '.join(
                    f"{p} {st[p]['images_per_s']['mean']:.2f}" for p in paths), flush=True)
                del paths, tk
                gc.collect()
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
            if device.type == 'cuda' and size == prof['sizes'][0][0]:
                # real epoch wall time (the CPU profiles estimate it from step throughput)
                for p in ('baseline', 'toolkit'):
                    if p == 'baseline':
                        loader, a = baseline_loader(samples, size, batch, prof['workers'], ep, seed), None
                    else:
                        loader, a = toolkit_loader(info.path, size, batch, prof['workers'], ep, seed, device)
                    trainer = Trainer(make_model('resnet50', device, p == 'toolkit'), device, p == 'toolkit')
                    sync(device)
                    t0 = time.perf_counter()
                    for b in loader:
                        trainer.step(*to_model_input(p, b, device, a))
                    sync(device)
                    entry['steps']['resnet50'][p]['epoch_s_measured'] = time.perf_counter() - t0
                    del loader, trainer
                    gc.collect()
            if (size, batch) in [tuple(m) for m in prof['memory_sizes']]:
                for p in ('baseline', 'toolkit'):  # measured at the end, in fresh processes
                    probes.append((entry['steps']['resnet50'][p], 'memory', {
                        'kind': 'path', 'path': p, 'size': size, 'batch': batch, 'workers': prof['workers'],
                        'epoch_images': ep, 'cache': str(info.path), 'root': str(root), 'keep': kept}))
            per_size.append(entry)
        result['sizes'] = per_size

        # dropout cost
        dsize, dbatch = prof['dropfix_size']
        dro = measure_dropfix_time(dsize, dbatch, device, prof['dropfix_pairs'], model=dropfix_model)
        if device.type == 'cuda':
            for k, flag, fast in (('no_dropout', False, None), ('dropfix', True, None),
                                  ('dropfix_torch_kernel', True, False)):
                m = make_model(dropfix_model, device, True, dropout=flag)
                tr = Trainer(m, device, True, fast_dropout=fast)
                x = torch.randn(dbatch, 3, dsize, dsize, device=device).contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, 37, (dbatch,), device=device)
                tr.step(x, y)
                dro.setdefault('memory', {})[k] = {'peak_mem_bytes': gpu_memory(lambda: tr.step(x, y), device)}
                del m, tr
            mem_key = 'peak_mem_bytes'
        else:
            dro['memory'] = {}
            for k, flag, fast in (('no_dropout', False, None), ('dropfix', True, None),
                                  ('dropfix_torch_kernel', True, False)):
                probes.append((dro['memory'], k, {'kind': 'dropfix', 'dropout': flag, 'fast_dropout': fast,
                                                  'size': dsize, 'batch': dbatch, 'model': dropfix_model,
                                                  'keep': kept}))
            mem_key = 'peak_mem'
        if probes:
            # the dropout's probes in memory_repeats rounds (their ratio is a target), the paths' once
            counts = [prof.get('memory_repeats', 1) if c['kind'] == 'dropfix' else 1 for _, _, c in probes]
            for (target, key, _), res in zip(probes, run_children([c for _, _, c in probes], repeats=counts)):
                target[key] = res
            print('memory probes: ' + ', '.join(f"{c.get('path', k)}@{c['size']}px "
                                                f"{r['peak_mem'] / 2**20:.0f} MiB"
                                                for (_, k, c), r in zip(probes, [t[k] for t, k, _ in probes])),
                  flush=True)
        mem = dro['memory']
        dro['peak_mem_overhead'] = mem['dropfix'][mem_key] / mem['no_dropout'][mem_key] - 1.0
        if 'saved_activation_bytes' in mem['dropfix']:
            dro['saved_activation_overhead'] = (mem['dropfix']['saved_activation_bytes']
                                                / mem['no_dropout']['saved_activation_bytes'] - 1.0)
        result['dropfix'] = dro
        print(f"dropfix step overhead {dro['overhead_median']:+.3f} (median of {prof['dropfix_pairs']} pairs), "
              f"peak memory {dro['peak_mem_overhead']:+.3f}; "
              + ', '.join(f"{k} {a['overhead_median']:+.3f}" for k, a in dro['arms'].items()), flush=True)
        backend = prof.get('dropfix_compile') if dropfix_compile is None else dropfix_compile
        if backend and backend != 'none':
            comp = measure_dropfix_time(dsize, dbatch, device, prof['dropfix_pairs'], compile_backend=backend,
                                        model=dropfix_model)
            dro['compiled'] = comp
            print(f"dropfix step overhead under torch.compile({backend!r}) {comp['overhead_median']:+.3f}"
                  + (f", step peak memory {comp['step_peak_overhead']:+.3f}" if 'step_peak_overhead' in comp else '')
                  + f" (compile and warm-up {comp['warmup_s']:.0f} s)", flush=True)

        if device.type == 'cuda' and 'preresnet101_dropfix' in prof['models']:
            r = result['sizes'][0]['steps']['preresnet101_dropfix']['toolkit']['images_per_s']['mean']
            result['preresnet101_dropfix_224_img_s'] = r
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result['load_average_end'] = load_average()
    head = result['sizes'][0]
    result['headline'] = {
        'loader_speedup': head['loader']['speedup'],
        'step_speedup': head['steps']['resnet50']['speedup'],
        'dropfix_step_overhead': result['dropfix']['overhead_median'],
        'dropfix_peak_mem_overhead': result['dropfix']['peak_mem_overhead'],
        'at': f"{head['img_size']} px (loader, steps); dropfix ({dropfix_model}) at {dsize} px",
    }
    return result


def targets(result: dict[str, Any]) -> dict[str, bool]:
    h = result['headline']
    return {'loader_speedup>=5': h['loader_speedup'] >= 5.0,
            'dropfix_step_overhead<=0.03': h['dropfix_step_overhead'] <= 0.03,
            'dropfix_peak_mem_overhead<=0.05': h['dropfix_peak_mem_overhead'] <= 0.05}


def _compiled_lines(d: dict[str, Any]) -> list[str]:
    c = d.get('compiled')
    if not c:
        return []
    mem = (f"; each step's peak memory above what was resident: {c['step_peak_bytes']['no_dropout'] / 2**20:.0f} vs "
           f"{c['step_peak_bytes']['dropfix'] / 2**20:.0f} MiB ({c['step_peak_overhead']:+.2%}; eager: "
           f"{d['step_peak_overhead']:+.2%})" if 'step_peak_overhead' in c else '')
    return [f"Under `torch.compile(backend={c['compile_backend']!r})`: step {ms(c['step_s']['no_dropout'])} vs "
            f"{ms(c['step_s']['dropfix'])} s, overhead median {c['overhead_median']:+.2%} over "
            f"{c['overhead_per_pair']['n']} pairs{mem}; compile and warm-up took {c['warmup_s']:.0f} s.", '']


def ms(s: dict) -> str:
    """``mean ± std (n=N)``, both to the decimals that give the mean 4 significant digits (img/s in the
    thousands and step times of a few ms alike)."""
    mean = s['mean']
    dec = max(0, 3 - math.floor(math.log10(abs(mean)))) if mean else 2
    return f"{mean:.{dec}f} ± {s['std']:.{dec}f} (n={s['n']})"


def to_markdown(res: dict[str, Any]) -> str:
    meta = res['meta']
    mib = 2 ** 20

    lines = [f"# Throughput: cv_example-style baseline vs toolkit data path ({res['profile']})", '',
             f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date_utc']}, wall time {meta['wall_time_s']:.0f} s",
             f"- machine: {res['cpu_model']}, {res['cpu_cores']} cores, torch threads {res['torch_threads']}, "
             f"device {res['device']}" + (f" ({res['gpu']})" if res.get('gpu') else ''),
             f"- load average at start / end: {res['load_average_start']} / {res['load_average_end']}",
             f"- toolkit bf16 autocast: {res['bf16_autocast_toolkit']} (used only where it is faster than fp32)",
             f"- freed memory kept in the process (finetune/cpumem.py, both arms and every memory probe): "
             f"{res.get('keep_freed_memory', False)}",
             "- values: mean ± sample std over repeats (n given); 'spread' in the JSON has every value", '']
    if res.get('note'):
        lines += [f"**Note:** {res['note']}", '']
    if res.get('matmul_tflops'):
        lines += [f"Matmul throughput for scale: bf16 {res['matmul_tflops']['bf16']:.0f} TFLOP/s, "
                  f"fp32 (TF32 off) {res['matmul_tflops']['fp32_no_tf32']:.0f} TFLOP/s", '']
    h = res['headline']
    lines += ['## Headline', '', f"`loader_speedup={h['loader_speedup']:.2f} step_speedup={h['step_speedup']:.2f} "
              f"dropfix_step_overhead={h['dropfix_step_overhead']:.4f}` ({h['at']})", '',
              '| target | met |', '|---|---|']
    cpu_only = ' (a target for the 2-core CPU machine)' if res['device'] != 'cpu' else ''
    lines += [f"| {k} | {v}{cpu_only if k.startswith('loader') else ''} |" for k, v in res['targets'].items()] + ['']
    lines += ['## Loader alone (normalized float batches on the device, augmentation included)', '',
              '| size | batch | baseline img/s | toolkit img/s | speedup | baseline epoch s | toolkit epoch s | '
              'cache build s (once) |', '|---|---|---|---|---|---|---|---|']
    for e in res['sizes']:
        lo = e['loader']
        lines.append(f"| {e['img_size']} | {lo['batch']} | {ms(lo['baseline']['images_per_s'])} | "
                     f"{ms(lo['toolkit']['images_per_s'])} | {lo['speedup']:.2f}x | "
                     f"{ms(lo['baseline']['epoch_s'])} | {ms(lo['toolkit']['epoch_s'])} | "
                     f"{e['cache_build_s']:.1f} |")
    for e in res['sizes']:
        if 'toolkit_device' in e['loader']:
            lo = e['loader']
            lines.append(f"\nToolkit with the whole cache in {res['device']} memory (`--cache-on-device`), "
                         f"{e['img_size']} px: {ms(lo['toolkit_device']['images_per_s'])} img/s, "
                         f"{lo['device_speedup']:.2f}x the baseline.")
    lines += ['', '## Whole training steps (loader + forward + backward + Adam)', '',
              '| size | batch | model | path | img/s | epoch s | peak memory | achieved TFLOP/s |',
              '|---|---|---|---|---|---|---|---|']
    for e in res['sizes']:
        for name, st in e['steps'].items():
            for p in ('baseline', 'toolkit', 'toolkit_device'):
                if p not in st:
                    continue
                s = st[p]
                ep = (f"{s['epoch_s_measured']:.1f} (measured, fresh loader)" if 'epoch_s_measured' in s
                      else f"{s['epoch_s_estimate']:.1f} (est.)")
                if 'peak_mem_bytes' in s:
                    mem = f"{s['peak_mem_bytes'] / mib:.0f} MiB (CUDA max allocated)"
                elif 'memory' in s:
                    mem = (f"{s['memory']['peak_mem'] / mib:.0f} MiB (+ workers {s['memory']['workers_uss'] / mib:.0f}"
                           " MiB)")
                else:
                    mem = '-'
                lines.append(f"| {e['img_size']} | {e['batch']} | {name} | {p} | {ms(s['images_per_s'])} | {ep} | "
                             f"{mem} | {s['achieved_tflops']:.3g} |")
            if 'speedup' in st:
                lines.append(f"| {e['img_size']} | {e['batch']} | {name} | **speedup** | "
                             f"**{st['speedup']:.2f}x**" + (f" (cache on device: {st['device_speedup']:.2f}x)"
                                                            if 'device_speedup' in st else '') + " | | | |")
    d = res['dropfix']
    lines += ['', 'Achieved TFLOP/s = img/s x training FLOPs per image (forward + backward, FlopCounterMode); '
              'epoch s is measured on CUDA and estimated (epoch images / img/s) on CPU.']
    lines += ['', f"## Recommended dropout placement vs no dropout ({d.get('model', 'resnet50')}, {d['size']} px, "
              f"batch {d['batch']}, "
              'toolkit config)', '',
              '| | step s | overhead (median of rounds) | peak memory (median of probes) | saved activations |',
              '|---|---|---|---|---|']
    arms = {'dropfix': d, **d.get('arms', {})}
    for k in d['step_s']:
        m = d['memory'].get(k, {})
        pm = m.get('peak_mem_bytes', m.get('peak_mem'))
        runs = m.get('peak_mem_runs', [])
        pm_cell = (f'{pm / mib:.0f} MiB' + (f" (runs: {', '.join(f'{r / mib:.0f}' for r in runs)})"
                                             if len(runs) > 1 else '')) if pm else '-'
        sa = f"{m['saved_activation_bytes'] / mib:.0f} MiB" if 'saved_activation_bytes' in m else '-'
        ov = f"{arms[k]['overhead_median']:+.2%}" if k in arms else '-'
        lines.append(f"| {k} | {ms(d['step_s'][k])} | {ov} | {pm_cell} | {sa} |")
    lines += ['', f"Step time measured as {d['timer']}. "
              f"dropfix overhead: median of paired ratios {d['overhead_median']:+.2%}, mean "
              f"{d['overhead_per_pair']['mean']:+.2%} ± {d['overhead_per_pair']['std']:.2%} "
              + (f"(95% CI of the mean [{d['overhead_mean_ci95'][0]:+.2%}, {d['overhead_mean_ci95'][1]:+.2%}]) "
                 if d.get('overhead_mean_ci95') else '')
              + f"over {d['overhead_per_pair']['n']} interleaved rounds (wall-time median "
              f"{d['wall_overhead_median']:+.2%}). Peak memory overhead "
              f"{d['peak_mem_overhead']:+.2%}" + (f"; saved-activation overhead {d['saved_activation_overhead']:+.2%}"
                                                  if 'saved_activation_overhead' in d else '') + '.', '']
    share = d.get('dropout_call_share')
    if share:
        lines += [f"Direct cost: the fused dropout's own calls ({share['calls_per_step']} per step, forward and "
                  "backward; the residual additions and ReLUs fused into them included) took "
                  f"{share['cpu']['mean']:.2%} ± {share['cpu']['std']:.2%} of each step's process CPU "
                  f"time ({share['wall']['mean']:.2%} ± {share['wall']['std']:.2%} of its wall time) over "
                  f"{share['cpu']['n']} more steps: the cost of the dropout itself, less disturbed by the machine's "
                  'noise than the difference of two step times, without its indirect effects (e.g. on caches).', '']
    if d.get('arms'):
        kernel = d.get('dropout_kernel', d.get('cpu_dropout_kernel', 'torch_ops'))
        lines += ['dropfix runs timm_dropfix\'s default route, its fast dropout (here: '
                  f'`{kernel}`; `fused`: one pass of a C kernel on CPU, a 32-bit hashed word per element, the mask '
                  'recomputed in backward, at the end of post-activation branches in place and in one pass with the '
                  'residual addition and the ReLU after it; `triton`: the same on '
                  'CUDA with Philox words; `torch_ops`: 16 bits per element from torch\'s generator, a float mask '
                  'kept); '
                  'dropfix_torch_kernel is the same model on torch\'s own dropout kernel; mask_only replaces every '
                  'dropout by a multiply with a mask drawn once and kept for backward: what a dropout that is not '
                  'fused costs before it draws a single random number.', '']
    lines += _compiled_lines(d) + [
              'CPU peak memory: a fresh process per config runs one training step; peak RSS during it (VmHWM) minus '
              'the RSS right after the imports, i.e. model, gradients, Adam state, batch and activations (the '
              'CPU counterpart of CUDA max_memory_allocated); for the dropout arms the median of the profile\'s '
              'rounds of probes. '
              'Loader workers are listed separately (unique memory). '
              'Saved activations: the distinct tensors autograd keeps for backward in that step.', '']
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """Run a profile and write ``<out-dir>/throughput_<profile>[-<model>].json`` and ``.md`` (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    g = parser.add_mutually_exclusive_group()
    g.add_argument('--quick', action='store_true', help='< 3 min on 2 CPU cores')
    g.add_argument('--gpu', action='store_true', help='CUDA profile (< 5 min on one H100)')
    parser.add_argument('--workers', type=int, default=None,
                        help="loader workers of the baseline, and of the toolkit on a GPU (on CPU it crops in-process)")
    parser.add_argument('--dropfix-compile', default=None, metavar='BACKEND',
                        help="also measure the dropout's cost under torch.compile with this backend "
                             "(gpu profile: inductor; 'none' skips it)")
    parser.add_argument('--dropfix-model', default='resnet50', metavar='NAME',
                        help='timm model for the dropout cost (e.g. resnetv2_50, pre-activation); results then go to '
                             'throughput_<profile>-<NAME>.*')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help="CPU: keep freed memory in the process, as `finetune train` does by default "
                             "(finetune/cpumem.py), for both arms; without it, glibc's defaults as in cv_example")
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the data order, augmentations and timed models (default 0)')
    parser.add_argument('--out-dir', default=str(RESULTS_DIR), help='output folder (default benchmarks/results)')
    parser.add_argument('--note', default=None, help='free text stored with the results (e.g. machine load)')
    parser.add_argument('--smoke', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--_child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(child_memory(json.loads(args._child))))
        return
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit('--gpu needs a CUDA device; run --quick or the default profile on CPU')
    if args.workers is not None and args.workers < 0:
        parser.error('--workers must be 0 or more')
    if args.dropfix_compile not in (None, 'none'):
        if args.dropfix_compile not in torch.compiler.list_backends(exclude_tags=()):
            parser.error(f"--dropfix-compile {args.dropfix_compile!r} is not a torch.compile backend; give 'none' or "
                         f"one of {', '.join(torch.compiler.list_backends())}")
    check_timm_model(args.dropfix_model, '--dropfix-model')
    check_output_path(args.out_dir, '--out-dir')
    require_shared('data', 'pets370')  # run() reads it first; checked here so that a bad path stops before any work
    profile = 'quick' if args.quick else 'gpu' if args.gpu else 'smoke' if args.smoke else 'default'
    started, t0 = utc_now(), time.perf_counter()
    result = run(profile, Path(args.out_dir), args.seed, args.workers, args.dropfix_compile, args.dropfix_model,
                 keep_freed=args.keep_freed_memory)
    result['targets'] = targets(result)
    if args.note:
        result['note'] = args.note
    name = f'throughput_{profile}' + ('' if args.dropfix_model == 'resnet50' else f'-{args.dropfix_model}')
    out = Path(args.out_dir) / name
    write_json_and_markdown(out, result, to_markdown, command=command_line(argv, 'benchmarks/throughput.py'),
                            seeds=[args.seed], wall_time_s=time.perf_counter() - t0, started_at=started)
    h = result['headline']
    print(f"results: {out}.json ({time.perf_counter() - t0:.0f} s)")
    print(f"loader_speedup={h['loader_speedup']:.2f} step_speedup={h['step_speedup']:.2f} "
          f"dropfix_step_overhead={h['dropfix_step_overhead']:.4f}")


if __name__ == '__main__':
    main()
