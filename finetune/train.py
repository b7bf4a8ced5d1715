"""Fine-tune a timm model with accelerate: one loop, read top to bottom.

The Accelerator owns the device, mixed precision, gradient accumulation, distributed data sharding, gathering of
eval results and checkpoint state; this file only says what to train. The same code runs as
``python -m finetune train ...`` on a CPU and as ``accelerate launch -m finetune train ...`` on many GPUs/machines.

Order of business: validate everything (data, model, output folder, resume) before writing anything; then train,
evaluate and checkpoint each epoch; finally write ``metrics.json`` and the ``model/`` folder, each appearing only
when complete.

Example:
    >>> from finetune.config import TrainConfig
    >>> metrics = train(TrainConfig(model='resnet18', data_dir='../shared/data/pets370', img_size=64,
    ...                             epochs=1, output_dir='runs/quick'))          # doctest: +SKIP
    >>> sorted(k for k in metrics if k in ('top1', 'nll'))                         # doctest: +SKIP
    ['nll', 'top1']
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, set_seed
from timm.data import resolve_data_config
from tqdm.auto import tqdm

import timm_dropfix
from timm_dropfix.positions import check_rate

from . import data as data_lib
from .card import EVAL_METRICS, TRAINING_CONFIG, render_card
from .checkpoint import (check_same_model, find_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint,
                         scheduler_state, write_text_atomic)
from .config import TrainConfig, changed_options
from .cpumem import keep_freed_memory
from .errors import FinetuneError
from .evaluate import classification_metrics, format_metrics, plot_confusion_matrix, predict
from .modeling import build_model, export_model, param_groups

_logger = logging.getLogger(__name__)


class _StopForTest(Exception):
    """Raised by the test hook ``stop_after_epoch`` to simulate a crash right after a checkpoint."""


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to ``min_ratio`` at ``total_steps``.

    Example:
        >>> f = warmup_cosine(10, 2, 0.0); [round(f(s), 2) for s in (0, 1, 2, 6, 10)]
        [0.33, 0.67, 1.0, 0.5, 0.0]
    """
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def check_output_dir(out: Path, resume: bool) -> None:
    """Fail early (before any training) if ``out`` cannot be written or already holds another run.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     check_output_dir(Path(d, 'run'), resume=False)   # not there yet: fine
        ...     Path(d, 'run').mkdir(); _ = Path(d, 'run', 'config.json').write_text('{}')
        ...     check_output_dir(Path(d, 'run'), resume=False)
        Traceback (most recent call last):
        ...
        finetune.errors.FinetuneError: --output-dir ... already holds files (an earlier run?). Use --resume ...
    """
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FinetuneError(f'--output-dir {out}: {probe} is a file, not a folder; choose another --output-dir')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FinetuneError(f'--output-dir {out}: {probe} is not writable; choose a folder you can write to')
    if not resume and out.is_dir() and any(out.iterdir()):
        raise FinetuneError(f'--output-dir {out} already holds files (an earlier run?). Use --resume to continue '
                            f'it (or start it again, if it stopped before its first checkpoint), or choose a new '
                            f'--output-dir.')


def make_loaders(cfg: TrainConfig, split: data_lib.SplitData, data_config: dict, out: Path,
                 channels_last: bool = False, device: torch.device | None = None,
                 ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader,
                            Callable[..., torch.Tensor] | None, Callable[..., torch.Tensor] | None, list[str]]:
    """Train/eval DataLoaders plus the batch transforms to run on the device (None on the PIL path).

    The one switch point between the fast path (decode-once uint8 cache + batched augmentation) and the
    per-image PIL/timm transforms. Returns (train_loader, eval_loader, train_aug, eval_aug, skipped paths);
    ``train_aug(images, *sizes)`` turns a loader batch into model input on ``device`` (with ``cache_on_device``
    the batch holds image indices and no sizes).

    Example:
        >>> loaders = make_loaders(cfg, split, data_config, Path('runs/quick'))    # doctest: +SKIP
        >>> train_loader, eval_loader, train_aug, eval_aug, skipped = loaders      # doctest: +SKIP
        >>> images, targets, *sizes = next(iter(train_loader))                     # doctest: +SKIP
        >>> x = train_aug(images, *sizes) if train_aug is not None else images     # doctest: +SKIP
    """
    device = torch.device('cpu') if device is None else device
    img_size = data_config['input_size'][-1]
    if cfg.fast_data:
        from . import fastdata
        interp = data_config.get('interpolation', 'bilinear')
        interp = interp if interp in ('bilinear', 'bicubic') else 'bilinear'
        # the eval cache size makes eval exactly timm's transform; a larger train cache (--cache-short-side) keeps
        # small crops sharper but costs loader speed, and did not score higher on pets370 (README)
        eval_side = fastdata.default_short_side(img_size, data_config['crop_pct'])
        train_side = cfg.cache_short_side or eval_side
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / 'cache'
        # decode with this process only: accelerate launch already runs one process per device
        infos = [fastdata.build_cache(s, side, cache_dir, interpolation=interp, num_workers=0)
                 for s, side in ((split.train, train_side), (split.eval, eval_side))]
        train_ds, eval_ds = (fastdata.CachedDataset(i.path) for i in infos)
        skipped = [p for i in infos for p in i.skipped]
        mean, std = data_config['mean'], data_config['std']
        train_aug = fastdata.BatchAugment(img_size, mean, std, train=True, scale=(cfg.rrc_scale_min, 1.0),
                                          color_jitter=cfg.color_jitter, interpolation=interp,
                                          crop_pct=data_config['crop_pct'], channels_last=channels_last)
        eval_aug = fastdata.BatchAugment(img_size, mean, std, train=False, crop_pct=data_config['crop_pct'],
                                         interpolation=interp, channels_last=channels_last)
        train_aug, eval_aug = train_aug.to(device), eval_aug.to(device)
        if cfg.cache_on_device:
            # the pixels move to the device once; the loader draws (index, label) and the device gathers batches
            try:
                caches = [fastdata.DeviceCache(ds, device) for ds in (train_ds, eval_ds)]
            except MemoryError as e:
                raise FinetuneError(str(e)) from e
            train_ds, eval_ds = (fastdata.IndexDataset(c.labels) for c in caches)
            train_aug, eval_aug = caches[0].feeding(train_aug), caches[1].feeding(eval_aug)
            train_collate = eval_collate = None
        elif device.type == 'cpu':
            # crops are made with the batch, straight from the cache (no padded copy); the loop only normalizes
            train_collate = fastdata.CollateThenTransform(train_aug.resample)
            eval_collate = fastdata.CollateThenTransform(eval_aug.resample)
            train_aug, eval_aug = _normalize_only(train_aug), _normalize_only(eval_aug)
        else:  # a GPU crops the padded uint8 batch itself (cached images keep their aspect ratio: sizes come along)
            train_collate = eval_collate = fastdata.collate_padded
    else:
        train_tf, eval_tf = data_lib.build_transforms(data_config, cfg.rrc_scale_min, cfg.color_jitter)
        train_ds = data_lib.ImageListDataset(split.train, train_tf)
        eval_ds = data_lib.ImageListDataset(split.eval, eval_tf)
        train_aug = eval_aug = train_collate = eval_collate = None
        skipped = []  # already left out by load_samples' check
    # pinned host memory makes the copies to a GPU asynchronous; it only costs on a CPU
    loader_kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == 'cuda')
    # drop_last: every step sees a full batch (BatchNorm with a batch of 1 fails, and steps stay comparable)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                               collate_fn=train_collate, **loader_kw)
    eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=cfg.batch_size, shuffle=False,
                                              collate_fn=eval_collate, **loader_kw)
    return train_loader, eval_loader, train_aug, eval_aug, skipped


def _normalize_only(aug):
    """The loop's half of a BatchAugment whose crops were made with the batch."""
    return lambda images, sizes: aug.normalize(images, inplace=True)


def train(cfg: TrainConfig, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Run one fine-tuning job; returns the final metrics (also in ``OUT/metrics.json``).

    ``stop_after_epoch`` is a test hook: raise right after that epoch's checkpoint, as a crash would.

    Example:
        >>> from finetune.config import TrainConfig
        >>> cfg = TrainConfig(data_dir='data/pets', model='resnet18', rewrite=True, epochs=1)
        >>> metrics = train(cfg)  # doctest: +SKIP
    """
    # timm_dropfix's switch is process-wide: set for this run, then given back (bench runs many in one process)
    with timm_dropfix.fast_dropout_mode(cfg.fast_dropout):
        return _train(cfg, stop_after_epoch)


def check_options(cfg: TrainConfig) -> None:
    """Raise a FinetuneError naming the option and a valid value for any option that cannot work, before anything
    is written (a bad value found at the first forward pass would leave a half-started run folder behind).

    Example:
        >>> check_options(TrainConfig(drop_rate=1.0))
        Traceback (most recent call last):
        ...
        finetune.errors.FinetuneError: --drop-rate must be in [0, 1) ...
    """
    # checked with or without --rewrite: a rate that is ignored now would be recorded in config.json all the same
    for flag, rate in (('--drop-rate', cfg.drop_rate), ('--branch-drop-rate', cfg.branch_drop_rate),
                       ('--head-drop-rate', cfg.head_drop_rate)):
        try:
            check_rate(flag, rate)
        except ValueError as e:
            raise FinetuneError(str(e)) from None
    for flag, value in (('--epochs', cfg.epochs), ('--batch-size', cfg.batch_size), ('--grad-accum', cfg.grad_accum),
                        ('--checkpoint-every', cfg.checkpoint_every), ('--keep-checkpoints', cfg.keep_checkpoints)):
        if value < 1:
            raise FinetuneError(f'{flag} {value}: must be 1 or more')
    for flag, value, ok, valid in (
            ('--lr', cfg.lr, cfg.lr > 0, '> 0'),
            ('--backbone-lr-mult', cfg.backbone_lr_mult, cfg.backbone_lr_mult >= 0, '>= 0 (0 freezes the backbone)'),
            ('--weight-decay', cfg.weight_decay, cfg.weight_decay >= 0, '>= 0'),
            ('--momentum', cfg.momentum, 0 <= cfg.momentum < 1, 'in [0, 1)'),
            ('--warmup-epochs', cfg.warmup_epochs, cfg.warmup_epochs >= 0, '>= 0'),
            ('--min-lr-ratio', cfg.min_lr_ratio, 0 <= cfg.min_lr_ratio <= 1, 'in [0, 1]'),
            ('--label-smoothing', cfg.label_smoothing, 0 <= cfg.label_smoothing < 1, 'in [0, 1)'),
            ('--rrc-scale-min', cfg.rrc_scale_min, 0 < cfg.rrc_scale_min <= 1, 'in (0, 1]')):
        if not (ok and math.isfinite(value)):  # NaN fails every comparison, so it lands here too
            raise FinetuneError(f'{flag} {value}: must be {valid} and finite')
    if cfg.img_size is not None and cfg.img_size < 8:
        raise FinetuneError(f'--img-size {cfg.img_size}: give the input size in pixels (8 or more), or leave it out '
                            "for the model's default")
    if cfg.cache_on_device and not cfg.fast_data:
        raise FinetuneError('--cache-on-device keeps the fast-data cache on the device: drop --no-fast-data')
    if cfg.dynamo_backend is not None and cfg.dynamo_backend.upper() not in DynamoBackend.__members__:
        raise FinetuneError(f'--dynamo-backend {cfg.dynamo_backend!r} is not a torch dynamo backend accelerate knows; '
                            f"choose one of {', '.join(b.lower() for b in DynamoBackend.__members__)}")
    if not 0 <= cfg.color_jitter < math.inf:
        raise FinetuneError(f'--color-jitter {cfg.color_jitter}: the jitter strength must be >= 0 (0 turns it off)')
    if cfg.workers < 0:
        raise FinetuneError(f'--workers {cfg.workers}: must be 0 or more (0 loads the data in the main process)')
    for flag, value in (('--limit-train', cfg.limit_train), ('--limit-eval', cfg.limit_eval)):
        if value is not None and value < 1:
            raise FinetuneError(f'{flag} {value}: must be 1 or more, or leave it out to use every image')
    if cfg.cache_short_side is not None and cfg.cache_short_side < 1:
        raise FinetuneError(f'--cache-short-side {cfg.cache_short_side}: give a size in pixels (at least the input '
                            'size), or leave it out for the default')
    if not 0 <= cfg.seed < 2 ** 32:  # numpy's seed range, which accelerate's set_seed passes it to
        raise FinetuneError(f'--seed {cfg.seed}: must be in [0, {2 ** 32 - 1}]')
    if cfg.pretrained and cfg.pretrained_file:
        raise FinetuneError('--pretrained (timm\'s weights) and --pretrained-file (your own) both choose the starting '
                            'weights: pass one of them')


def _warn_ignored_options(cfg: TrainConfig) -> None:
    """Warn about dropout options that this run's other options make ineffective."""
    if cfg.rewrite:
        if cfg.drop_rate:
            _logger.warning('--drop-rate %s is ignored with --rewrite: --head-drop-rate sets the head dropout',
                            cfg.drop_rate)
        return
    defaults = TrainConfig()
    # only what the user set: the defaults are always present and mean nothing without --rewrite
    given = [f"--{name.replace('_', '-')} {getattr(cfg, name)}"
             for name in ('branch_drop_rate', 'head_drop_rate', 'branch_position', 'head_position')
             if getattr(cfg, name) != getattr(defaults, name)]
    if given:
        _logger.warning('%s %s ignored without --rewrite: %s effect only with --rewrite', ', '.join(given),
                        'is' if len(given) == 1 else 'are', 'it takes' if len(given) == 1 else 'they take')


def interrupted_message(cfg: TrainConfig) -> str:
    """The one line the CLI prints when a run is stopped (Ctrl-C): what it left and how to continue.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     print(interrupted_message(TrainConfig(output_dir=d)))   # doctest: +ELLIPSIS
        interrupted before anything was written to ...: rerun the same command to start the run
    """
    out = Path(cfg.output_dir)
    # a --resume PATH elsewhere would restart from that older checkpoint; this run's own ones are newer
    resume = (' with --resume' if cfg.resume is None else '' if cfg.resume == 'auto' else
              ' with --resume and no path (the run\'s own checkpoints)')
    try:
        ckpt = find_checkpoint('auto', out)
    except FinetuneError:
        ckpt = None
    if ckpt is not None:
        epoch = read_trainer_state(ckpt).get('epoch', -1) + 1
        return (f'interrupted: the last checkpoint is {ckpt} (epoch {epoch} of {cfg.epochs}); rerun the same '
                f'command{resume} to continue from it')
    if (out / 'config.json').is_file():
        return (f'interrupted before the first checkpoint of {out}: rerun the same command{resume} to start the run '
                f'again')
    if cfg.resume:
        return f'interrupted before anything was written to {out}: rerun the command without --resume to start the run'
    return f'interrupted before anything was written to {out}: rerun the same command to start the run'


# options a resumed run may change without a warning: where files go and how fast, not what it computes
_RESUME_NEUTRAL = ('resume', 'output_dir', 'workers', 'log_with', 'keep_freed_memory')
# options whose values --resume takes from the checkpoint's optimizer state, not from the command line
_RESTORED_OPTIONS = ('optimizer', 'lr', 'backbone_lr_mult', 'weight_decay', 'momentum')


def _checkpoint_to_resume(cfg: TrainConfig, out: Path, main: bool) -> Path | None:
    """The checkpoint ``--resume`` names, or None where ``--resume`` (auto) finds a run folder that stopped before
    its first checkpoint: that run starts again, rather than leaving a folder that neither a fresh start (it holds
    files) nor a resume (no checkpoint) accepts."""
    if not cfg.resume:
        return None
    try:
        return find_checkpoint(cfg.resume, out)
    except FinetuneError:
        if cfg.resume != 'auto' or not (out / 'config.json').is_file():
            raise
    if main:
        _logger.warning('--resume: %s has no checkpoint yet (the run stopped in its first epochs); starting it again '
                        'from the beginning', out)
    return None


def _train(cfg: TrainConfig, stop_after_epoch: int | None) -> dict[str, Any]:
    t_start = time.time()
    out = Path(cfg.output_dir)
    log_with = None if cfg.log_with == 'none' else cfg.log_with
    check_options(cfg)
    _warn_ignored_options(cfg)
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision, log_with=log_with,
            dynamo_backend=cfg.dynamo_backend,
            project_dir=str(out),
            # the shuffle order depends only on (seed, epoch): a resumed run sees the same batches
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))
    except ValueError as e:
        if 'already been initialized' not in str(e):
            raise
        # accelerate keeps one state per process: an earlier train() here fixed the precision
        raise FinetuneError(f'--mixed-precision {cfg.mixed_precision}: this process already ran accelerate with '
                            f'another precision, which it cannot change. Run each precision in its own process (each '
                            f'`python -m finetune` call is one).') from None
    if accelerator.mixed_precision == 'fp16' and accelerator.device.type == 'cpu':
        # accelerate accepts fp16 on a CPU but runs fp32 (no autocast, no scaler); config.json and the card would
        # still say fp16
        source = ('--mixed-precision fp16' if cfg.mixed_precision == 'fp16' else
                  'mixed precision fp16 (from accelerate launch --mixed_precision or the accelerate config)')
        raise FinetuneError(f'{source}: fp16 autocast needs a CUDA GPU, and this run has none (accelerate would '
                            f'silently train in fp32). Use --mixed-precision bf16 (autocast works on CPUs) or '
                            f'--mixed-precision no.')
    world = int(os.environ.get('WORLD_SIZE', accelerator.num_processes))
    if world != accelerator.num_processes:
        # unconnected processes would each train the whole run into the same folder
        raise FinetuneError(f'WORLD_SIZE is {world} but accelerate runs this process alone: the processes are not '
                            f'connected. On CPUs start them with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu '
                            f'--num_processes {world} ...` (or mpirun); on GPUs check that every process sees CUDA.')
    main = accelerator.is_main_process
    if accelerator.gradient_accumulation_steps != cfg.grad_accum and main:
        _logger.warning('gradient accumulation: %d steps from accelerate (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) '
                        'instead of --grad-accum %d; the schedule and config.json follow what runs',
                        accelerator.gradient_accumulation_steps, cfg.grad_accum)
    # what `accelerate launch`, its environment or the accelerate config chose where the options left it open, so
    # that config.json, the schedule, the checkpoints' resume check and the model card record what ran
    backend = accelerator.state.dynamo_plugin.backend
    cfg = dataclasses.replace(cfg, mixed_precision=accelerator.mixed_precision,
                              dynamo_backend=None if backend == DynamoBackend.NO else backend.value.lower(),
                              grad_accum=accelerator.gradient_accumulation_steps)
    set_seed(cfg.seed)
    kept_freed_memory = cfg.keep_freed_memory and accelerator.device.type == 'cpu' and keep_freed_memory()

    # ---- 1. validate everything before writing anything --------------------------------------------------
    check_output_dir(out, resume=bool(cfg.resume))
    if cfg.fast_data:  # the cache build decodes every image and counts the unreadable ones itself
        split = data_lib.load_samples(cfg.dataset, cfg.data_dir, cfg.download, cfg.limit_train, cfg.limit_eval,
                                      check=False)
    else:
        split = data_lib.load_samples(cfg.dataset, cfg.data_dir, cfg.download, cfg.limit_train, cfg.limit_eval)
    global_batch = cfg.batch_size * accelerator.num_processes
    if len(split.train) < global_batch:
        raise FinetuneError(f'the training set has {len(split.train)} images, fewer than one batch '
                            f'({cfg.batch_size} x {accelerator.num_processes} processes); lower --batch-size')
    built = build_model(cfg, num_classes=len(split.classes))
    model = built.model
    if main and (built.dropfix is not None or cfg.model.split('.')[0].endswith('_dropfix')):
        _logger.info('dropout placement: %s', timm_dropfix.summarize(model))
    data_config = resolve_data_config({'input_size': (3, cfg.img_size, cfg.img_size)} if cfg.img_size else {},
                                      model=model)
    input_px = data_config['input_size'][-1]
    if cfg.fast_data and cfg.cache_short_side is not None and cfg.cache_short_side < input_px:
        raise FinetuneError(f'--cache-short-side {cfg.cache_short_side} is smaller than the {input_px} px input; '
                            'give at least the input size, or leave it out for the default')
    signature = dict(model=cfg.model, architecture=built.export_arch, model_args=built.export_args,
                     num_classes=len(split.classes), dropfix=built.dropfix)
    ckpt = _checkpoint_to_resume(cfg, out, main)
    if ckpt is not None:
        saved = read_trainer_state(ckpt)
        check_same_model(saved['signature'], json.loads(json.dumps(signature)), ckpt)
        saved_processes = saved.get('num_processes')  # recorded since this check exists
        if saved_processes is not None and saved_processes != accelerator.num_processes:
            raise FinetuneError(f'--resume: {ckpt} was trained by {saved_processes} process(es), this run has '
                                f'{accelerator.num_processes}: the batches per epoch and the learning-rate schedule '
                                f'depend on it. Resume with {saved_processes} (accelerate launch --num_processes '
                                f'{saved_processes}), or start a new run in another --output-dir.')
        saved_schedule = scheduler_state(ckpt, saved)
        old_cfg = saved.get('config', {})
        changed = sorted(changed_options(old_cfg, cfg, ignore=_RESUME_NEUTRAL))
        if 'mixed_precision' in changed:
            raise FinetuneError(f"--resume: {ckpt} trained with mixed precision {old_cfg['mixed_precision']!r}, this "
                                f"run would use {cfg.mixed_precision!r} (from --mixed-precision, accelerate launch or "
                                f"the accelerate config). Resume with --mixed-precision {old_cfg['mixed_precision']} "
                                f"(fp16's loss-scaler state exists only in fp16 checkpoints).")
        restored = [k for k in changed if k in _RESTORED_OPTIONS and (k != 'momentum' or cfg.optimizer == 'sgd')]
        if restored:
            details = ', '.join(f'--{k.replace("_", "-")} {old_cfg[k]!r} -> {getattr(cfg, k)!r}' for k in restored)
            raise FinetuneError(f'--resume restores the optimizer and its learning rates as the checkpoint saved '
                                f'them, so {details} cannot take effect. Resume with the saved values, or start a '
                                f'new run in another --output-dir.')
        if changed and main:
            _logger.warning('resuming with changed options %s: the run will not match an uninterrupted one', changed)

    # ---- 2. data, optimizer, schedule --------------------------------------------------------------------
    accelerator.wait_for_everyone()  # every process has validated before the first file is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / 'config.json', cfg.to_json())
    accelerator.wait_for_everyone()
    # channels_last pays off with cuDNN; on CPU oneDNN's channels_last backward measured ~4x slower here
    # (resnet18, 32 px, batch 8: 5.0 s vs 1.1 s per step), so it is only used on GPUs
    channels_last = cfg.channels_last and accelerator.device.type == 'cuda'
    with accelerator.main_process_first():  # rank 0 builds the fast-data cache, the others then reuse it
        train_loader, eval_loader, train_aug, eval_aug, cache_skipped = make_loaders(
            cfg, split, data_config, out, channels_last, accelerator.device)
    skipped = split.skipped + cache_skipped
    n_train, n_eval = len(train_loader.dataset), len(eval_loader.dataset)
    if skipped and main:
        more = ' ...' if len(skipped) > 5 else ''
        accelerator.print(f'skipped {len(skipped)} unreadable image(s): {skipped[:5]}{more}')
    if n_train < global_batch:
        raise FinetuneError(f'only {n_train} readable training images, fewer than one batch ({global_batch}); '
                            f'lower --batch-size')
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    if cfg.optimizer == 'adamw':
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    # schedule in optimizer steps; stepped by hand only when accelerate really steps (after accumulation)
    # its state goes into trainer_state.json, not accelerate's register_for_checkpointing: accelerate pickles
    # registered objects and unpickles them with weights_only=False, so a resumed checkpoint could run code
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, warmup_cosine(total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio))

    start_epoch, global_step, history = 0, 0, []
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt)  # model, optimizer and every process's RNG state
        start_epoch, global_step, history = saved['epoch'] + 1, saved['global_step'], saved['history']
        scheduler.load_state_dict(saved_schedule)
        accelerator.print(f'resumed from {ckpt} (epoch {start_epoch}/{cfg.epochs})')
    if log_with:
        accelerator.init_trackers('tensorboard', config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                         for k, v in cfg.to_dict().items()})

    # ---- 3. train ----------------------------------------------------------------------------------------
    train_time, train_images = sum(h['train_seconds'] for h in history), sum(h['train_images'] for h in history)
    eval_logits = eval_targets = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if cfg.freeze_bn_stats:
            freeze_bn_stats(model)
        train_loader.set_epoch(epoch)
        t0, loss_sum, n_batches = time.time(), torch.zeros((), device=accelerator.device), 0
        # closed on the way out too, so that a Ctrl-C message starts on a line of its own
        with tqdm(total=len(train_loader), desc=f'epoch {epoch + 1}/{cfg.epochs}', leave=False,
                  disable=not accelerator.is_local_main_process) as bar:
            for images, targets, *sizes in train_loader:
                with accelerator.accumulate(model):
                    if train_aug is not None:
                        images = train_aug(images, *sizes)
                    elif channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    logits = model(images)
                    loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
                    accelerator.backward(loss)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule aligned
                            scheduler.step()
                        global_step += 1
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                n_batches += 1
                bar.update(1)
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
        epoch_train_s = time.time() - t0
        epoch_images = n_batches * cfg.batch_size * accelerator.num_processes
        train_loss = accelerator.reduce(loss_sum / max(n_batches, 1), reduction='mean').item()

        eval_logits, eval_targets = predict(model, eval_loader, accelerator, eval_aug)
        m = classification_metrics(eval_logits, eval_targets, len(split.classes))
        history.append(dict(epoch=epoch + 1, step=global_step, train_loss=train_loss,
                            lr=optimizer.param_groups[-1]['lr'], train_seconds=epoch_train_s,
                            train_images=epoch_images, **{k: v for k, v in m.items() if k != 'n'}))
        train_time += epoch_train_s
        train_images += epoch_images
        accelerator.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  top1 {m['top1']:.4f}  "
                          f"mean_class_acc {m['mean_class_acc']:.4f}  nll {m['nll']:.4f}  ({epoch_train_s:.1f}s)")
        if log_with:
            accelerator.log({f'eval/{k}': v for k, v in m.items() if k != 'n'} | {'train/loss': train_loss},
                            step=epoch + 1)
        if main:
            write_history(out, history)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            save_checkpoint(accelerator, out, epoch, dict(epoch=epoch, global_step=global_step, history=history,
                                                          signature=signature, config=cfg.to_dict(),
                                                          num_processes=accelerator.num_processes,
                                                          scheduler=scheduler.state_dict()),
                            keep=cfg.keep_checkpoints)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
            accelerator.end_training()
            raise _StopForTest(f'stopped after epoch {epoch + 1}')

    # ---- 4. final metrics and the model folder -----------------------------------------------------------
    if eval_logits is None:  # resumed a run whose epochs were all done: evaluate the restored weights
        eval_logits, eval_targets = predict(model, eval_loader, accelerator, eval_aug)
    final = classification_metrics(eval_logits, eval_targets, len(split.classes))
    # a compiled model calls its nn.Dropout modules inside the graph: the backend's dropout, not ours
    dropout_kernel = 'compiled' if cfg.dynamo_backend else timm_dropfix.dropout_kernel(accelerator.device)
    metrics = dict(final, history=history, wall_seconds=time.time() - t_start, train_seconds=train_time,
                   images_per_second=train_images / max(train_time, 1e-9), n_skipped=len(skipped),
                   skipped=skipped, num_processes=accelerator.num_processes,
                   n_train=n_train, n_eval=n_eval, data_config=_jsonable(data_config),
                   dropout_kernel=dropout_kernel, fast_dropout=dropout_kernel not in ('torch', 'compiled'),
                   keep_freed_memory=kept_freed_memory)
    if main:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)  # the exported keys lack _orig_mod.
        info = dict(dropfix=built.dropfix, dropout_summary=str(timm_dropfix.summarize(unwrapped)),
                    license=built.license, base_model=built.base_model, notes=built.notes,
                    eval_split='test' if cfg.dataset == 'pets' else 'val')
        files = {TRAINING_CONFIG: cfg.to_json(),
                 EVAL_METRICS: json.dumps(dict(metrics=final, info=info), indent=2),
                 # rendered from the config.json being saved, so README and config agree
                 'README.md': lambda hf_config: render_card(hf_config, cfg.to_dict(), final, info)}
        model_dir = export_model(built, unwrapped, out / 'model', split.classes, data_config, files)
        plot_confusion_matrix(eval_logits, eval_targets, split.classes, out / 'confusion_matrix.png',
                              title=f"{cfg.model} top-1 {final['top1']:.3f}")
        write_text_atomic(out / 'metrics.json', json.dumps(metrics, indent=2))
        accelerator.print(f'done: {format_metrics(final)}  -> {out}/metrics.json, {model_dir}')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def freeze_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Put every BatchNorm layer in eval mode (running statistics used and kept), the rest stays in training.

    Example:
        >>> m = freeze_bn_stats(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train())
        >>> m[0].training, m[1].training
        (True, False)
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def write_history(out: Path, history: list[dict]) -> None:
    """Per-epoch metrics as CSV and JSON (rewritten each epoch, atomically).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_history(Path(d), [dict(epoch=1, top1=0.5), dict(epoch=2, top1=0.75)])
        ...     Path(d, 'history.csv').read_text().splitlines()
        ['epoch,top1', '1,0.5', '2,0.75']
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(out / 'history.csv', buf.getvalue())
    write_text_atomic(out / 'history.json', json.dumps(history, indent=2))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
