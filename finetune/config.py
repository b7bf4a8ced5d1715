"""Command-line options -> one flat, JSON-serialisable :class:`TrainConfig`.

The config is the single record of a run: it is written to ``OUT/config.json``, stored in every checkpoint, copied
into the model card, and is what ``bench`` varies. Only plain values live here (no tensors, no tokens), so a
``to_json`` / ``from_json`` round trip gives back an equal object.

Example:
    >>> cfg = TrainConfig(model='resnet18', epochs=1)
    >>> TrainConfig.from_json(cfg.to_json()) == cfg
    True
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Collection

# Positions are re-validated by timm_dropfix.rewrite; listed here so --help shows them without importing torch.
BRANCH_POSITIONS = ('none', 'recommended', 'branch_start', 'after_conv1', 'after_conv2', 'after_conv3',
                    'before_last_conv', 'branch_end', 'after_add')
HEAD_POSITIONS = ('before_pool', 'after_pool', 'before_pool_channel', 'none')


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run. Defaults are the recipe tuned on pets370 (see README).

    Example:
        >>> cfg = TrainConfig(model='resnet18', epochs=1)
        >>> cfg.model, cfg.epochs, cfg.batch_size
        ('resnet18', 1, 16)
    """

    # data
    dataset: str = 'pets'                 # 'pets' (torchvision OxfordIIITPet) or 'imagefolder' (DIR/train, DIR/val)
    data_dir: str = 'data'
    download: bool = False
    limit_train: int | None = None        # use only N training images (quick checks / CI), spread over classes
    limit_eval: int | None = None
    # decode-once uint8 cache of whole images + batched augmentation (finetune/fastdata.py). On pets370 (ResNet-50,
    # 160 px, 6 epochs, 12 seeds) it scored -1.2 points top-1 [-2.7, +0.3] against timm's per-image PIL transforms:
    # no significant difference (benchmarks/results/data_paths_cpu.md); --no-fast-data for the PIL path
    fast_data: bool = True
    cache_dir: str | None = None          # where the fast-data cache goes (default: OUT/cache)
    # short side of the cached training images; default img_size / crop_pct, as the eval images (which makes eval
    # exactly timm's transform). Larger values shrink more crops instead of enlarging them (sharper, slower)
    cache_short_side: int | None = None
    # keep the whole cache in the accelerator's memory: the loader only draws indices and each batch is gathered
    # on the device (no host reads, padding, pinning or copies); needs memory for the cache
    cache_on_device: bool = False
    workers: int = 0
    # model
    model: str = 'resnet50'
    pretrained: bool = False
    pretrained_file: str | None = None
    v1_strides: bool = False
    drop_rate: float = 0.0                # timm's own head dropout (after the pool); ignored with --rewrite
    rewrite: bool = False
    branch_drop_rate: float = 0.1
    head_drop_rate: float = 0.2
    branch_position: str = 'recommended'
    head_position: str = 'before_pool'
    # eager training runs the dropfix dropouts through timm_dropfix.fast_dropout (a C kernel on CPU, Triton on
    # CUDA): the same distribution, a fraction of the time and memory of torch's CPU kernel (README Speed); False:
    # torch's kernel, e.g. to repeat runs made before it; None: the process default
    # (timm_dropfix.use_fast_dropout(), on unless TIMM_DROPFIX_FAST_DROPOUT=0)
    fast_dropout: bool | None = None
    # CPU training: keep freed memory in the process (glibc malloc thresholds, finetune/cpumem.py), so each step
    # reuses its activation memory instead of faulting it in from the OS again
    keep_freed_memory: bool = True
    # optimisation
    optimizer: str = 'adamw'
    lr: float = 1e-3                      # learning rate of the new head; the backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    freeze_bn_stats: bool = False         # keep the pretrained BatchNorm running statistics while fine-tuning
    epochs: int = 6
    batch_size: int = 16
    grad_accum: int = 1
    # 'no' / 'bf16' / 'fp16'; None leaves it to `accelerate launch --mixed_precision` / the accelerate config (fp32
    # unless set there). config.json records the precision the run used.
    mixed_precision: str | None = None
    channels_last: bool = True           # on GPUs only (slower on CPU)
    # torch.compile through accelerate ('inductor', 'eager', ...); None leaves it to `accelerate launch
    # --dynamo_backend` / the accelerate config (off unless set there)
    dynamo_backend: str | None = None
    img_size: int | None = None
    rrc_scale_min: float = 0.35           # RandomResizedCrop lower area bound; timm's 0.08 is harsh for few-shot
    color_jitter: float = 0.4             # brightness/contrast/saturation jitter, timm's train-transform default
    seed: int = 0
    # output
    output_dir: str = 'runs/finetune'
    resume: str | None = None             # 'auto' = OUT/checkpoints, or a run / checkpoint folder
    log_with: str = 'tensorboard'
    keep_checkpoints: int = 1
    checkpoint_every: int = 1             # epochs between checkpoints; the last epoch is always saved
    base_model: str | None = None         # Hub id of the starting weights, for the model card
    license: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields.

        Example:
            >>> TrainConfig(seed=3).to_dict()['seed']
            3
        """
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """JSON text of the config (sorted keys, so equal configs give equal text).

        Example:
            >>> json.loads(TrainConfig(epochs=2).to_json())['epochs']
            2
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'TrainConfig':
        """Build from a dict; unknown keys are an error so a typo never passes silently.

        Example:
            >>> TrainConfig.from_dict({'model': 'resnet18'}).model
            'resnet18'
            >>> TrainConfig.from_dict({'modle': 'resnet18'})
            Traceback (most recent call last):
                ...
            ValueError: unknown TrainConfig keys: ['modle']
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f'unknown TrainConfig keys: {unknown}')
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> 'TrainConfig':
        """Inverse of :meth:`to_json`; fields missing from ``text`` keep their defaults.

        Example:
            >>> TrainConfig.from_json('{"epochs": 2}') == TrainConfig(epochs=2)
            True
        """
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> 'TrainConfig':
        """Copy with some fields changed (``bench`` uses this for each variant and seed).

        Example:
            >>> cfg = TrainConfig()
            >>> cfg.replace(seed=1).seed, cfg.seed
            (1, 0)
        """
        return dataclasses.replace(self, **changes)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Add every TrainConfig option to ``p`` (shared by ``train`` and ``bench``).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_train_args(p)
        >>> args = p.parse_args(['--model', 'resnet18', '--rewrite', '--no-fast-data'])
        >>> args.model, args.rewrite, args.fast_data
        ('resnet18', True, False)
    """
    d = TrainConfig()
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=('pets', 'imagefolder'), default=d.dataset)
    g.add_argument('--data-dir', default=d.data_dir,
                   help='pets: folder holding oxford-iiit-pet/ (e.g. ../shared/data/pets370); '
                        'imagefolder: folder with train/ and val/')
    g.add_argument('--download', action='store_true', help='let torchvision download Pets (needs network)')
    g.add_argument('--limit-train', type=int, default=None, metavar='N')
    g.add_argument('--limit-eval', type=int, default=None, metavar='N')
    g.add_argument('--fast-data', dest='fast_data', action=argparse.BooleanOptionalAction, default=d.fast_data,
                   help='decode-once uint8 cache + batched augmentation (default; on pets370 -1.2 points top-1 '
                        '[-2.7, +0.3] over 12 seeds, no significant difference, see README); --no-fast-data: timm\'s '
                        'per-image PIL transforms')
    g.add_argument('--cache-dir', default=None)
    g.add_argument('--cache-on-device', action='store_true',
                   help='hold the whole fast-data cache in GPU memory and gather each batch there (the host only '
                        'draws indices); for datasets that fit, e.g. Pets: about 270 KB an image at 224 px')
    g.add_argument('--cache-short-side', type=int, default=None, metavar='PX',
                   help='short side of the cached training images (default img_size / crop_pct); eval images are '
                        'always cached at img_size / crop_pct, identical to timm\'s eval transform')
    g.add_argument('--workers', type=int, default=d.workers)
    g = p.add_argument_group('model')
    g.add_argument('--model', default=d.model, help='any timm model name, including the *_dropfix variants')
    g.add_argument('--pretrained', action='store_true', help="start from timm's pretrained weights")
    g.add_argument('--pretrained-file', default=None, metavar='PATH',
                   help='a .safetensors file or a save_for_hf folder (config.json + model.safetensors)')
    g.add_argument('--v1-strides', action='store_true',
                   help='ResNet v1 (stride on the first 1x1 conv), needed by Keras/Caffe ResNet-50 weights')
    g.add_argument('--drop-rate', type=float, default=d.drop_rate, help="timm's head dropout (after the pool)")
    g.add_argument('--rewrite', action='store_true', help='apply timm_dropfix.rewrite (dropout where the paper says)')
    g.add_argument('--fast-dropout', dest='fast_dropout', action=argparse.BooleanOptionalAction,
                   default=d.fast_dropout,
                   help="eager training: timm_dropfix's fused dropout kernels (C on CPUs, Triton on CUDA GPUs; same "
                        "distribution; on CPUs a fraction of the time and memory of torch's kernel); "
                        "--no-fast-dropout: torch's kernel; neither: on unless TIMM_DROPFIX_FAST_DROPOUT=0. No effect "
                        "under --dynamo-backend (the compiled graph has its own dropout)")
    g.add_argument('--keep-freed-memory', dest='keep_freed_memory', action=argparse.BooleanOptionalAction,
                   default=d.keep_freed_memory,
                   help="CPU training: keep freed memory in the process for the next step (glibc's malloc "
                        "thresholds raised: about 1 %% more peak memory, 1.1x faster steps); "
                        "--no-keep-freed-memory: glibc's defaults. No effect on GPUs or without glibc")
    g.add_argument('--branch-drop-rate', type=float, default=d.branch_drop_rate,
                   help='with --rewrite: dropout rate in every residual branch, in [0, 1) (default: %(default)s)')
    g.add_argument('--head-drop-rate', type=float, default=d.head_drop_rate,
                   help="with --rewrite: the head's dropout rate, replacing --drop-rate, in [0, 1) "
                        '(default: %(default)s)')
    g.add_argument('--branch-position', choices=BRANCH_POSITIONS, default=d.branch_position)
    g.add_argument('--head-position', choices=HEAD_POSITIONS, default=d.head_position)
    g = p.add_argument_group('optimisation')
    g.add_argument('--optimizer', choices=('adamw', 'sgd'), default=d.optimizer)
    g.add_argument('--lr', type=float, default=d.lr, help='head learning rate (per optimizer step)')
    g.add_argument('--backbone-lr-mult', type=float, default=d.backbone_lr_mult)
    g.add_argument('--weight-decay', type=float, default=d.weight_decay)
    g.add_argument('--momentum', type=float, default=d.momentum)
    g.add_argument('--warmup-epochs', type=float, default=d.warmup_epochs)
    g.add_argument('--min-lr-ratio', type=float, default=d.min_lr_ratio)
    g.add_argument('--label-smoothing', type=float, default=d.label_smoothing)
    g.add_argument('--freeze-bn-stats', action='store_true',
                   help='BatchNorm layers normalise with their pretrained running statistics during training '
                        '(their scale/shift still train); helps when batches are small and few')
    g.add_argument('--epochs', type=int, default=d.epochs)
    g.add_argument('--batch-size', type=int, default=d.batch_size, help='per process')
    g.add_argument('--grad-accum', type=int, default=d.grad_accum)
    g.add_argument('--mixed-precision', choices=('no', 'bf16', 'fp16'), default=d.mixed_precision,
                   help="default: accelerate launch's --mixed_precision or config, else no (fp32)")
    g.add_argument('--no-channels-last', dest='channels_last', action='store_false')
    g.add_argument('--dynamo-backend', default=None, metavar='NAME',
                   help="torch.compile the model through accelerate, e.g. inductor (default: accelerate launch's "
                        "--dynamo_backend or config, else off); keep the same value when resuming")
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--rrc-scale-min', type=float, default=d.rrc_scale_min)
    g.add_argument('--color-jitter', type=float, default=d.color_jitter,
                   help='brightness/contrast/saturation jitter strength, both data paths (0 = off)')
    g.add_argument('--seed', type=int, default=d.seed)
    g = p.add_argument_group('output')
    g.add_argument('--output-dir', default=d.output_dir)
    g.add_argument('--resume', nargs='?', const='auto', default=None, metavar='DIR',
                   help='continue a run: no value = OUT/checkpoints, or a run/checkpoint folder')
    g.add_argument('--log-with', choices=('tensorboard', 'none'), default=d.log_with)
    g.add_argument('--keep-checkpoints', type=int, default=d.keep_checkpoints)
    g.add_argument('--checkpoint-every', type=int, default=d.checkpoint_every, metavar='EPOCHS',
                   help='save a checkpoint every N epochs (the last epoch always; a resume redoes the epochs since)')
    g.add_argument('--base-model', default=None, help='Hub id of the starting weights (model card base_model)')
    g.add_argument('--license', default=None, help='license for the model card (default: that of the weights)')


def changed_options(saved: dict[str, Any], cfg: TrainConfig,
                    ignore: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The options of ``cfg`` whose values differ from a run's saved ``config.json`` (``saved``), as
    ``{name: (saved, now)}``. Those in ``ignore``, and those the saved file lacks (an older version), are not compared.

    Example:
        >>> saved = {'epochs': 1, 'workers': 4, 'lr': 1e-3}
        >>> changed_options(saved, TrainConfig(epochs=2, workers=0), ignore={'workers'})
        {'epochs': (1, 2)}
    """
    return {name: (saved[name], now) for name, now in cfg.to_dict().items()
            if name not in ignore and name in saved and saved[name] != now}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Pick the TrainConfig fields out of a parsed namespace (extra attributes such as ``command`` are ignored).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_train_args(p)
        >>> config_from_args(p.parse_args(['--epochs', '2'])) == TrainConfig(epochs=2)
        True
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
