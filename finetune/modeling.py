"""Build the network a TrainConfig asks for, group its parameters, and export it as a timm save_for_hf folder.

Model construction is the only place that knows about weights files, v1 strides and ``timm_dropfix.rewrite``;
everything after it sees a plain ``nn.Module``. The export re-creates the model under the architecture name and
``model_args`` that rebuild exactly this network (for a rewritten model: its registered ``*_dropfix`` twin), so
``timm.create_model('local-dir:OUT/model', pretrained=True)`` gives back the same function, dropout included.

Example:
    >>> cfg = TrainConfig(model='resnet18')                     # doctest: +SKIP
    >>> built = build_model(cfg, num_classes=37)                 # doctest: +SKIP
    >>> built.model.get_classifier().out_features                # doctest: +SKIP
    37
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
from torch import nn

import timm_dropfix
from timm_dropfix.rewrite import SUPPORTED_FAMILIES

from .config import TrainConfig
from .errors import FinetuneError

_logger = logging.getLogger(__name__)

# pretrained_cfg keys that describe preprocessing; copied from a weights folder so the transforms match the weights
_PREPROC_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'license', 'num_classes',
                 'label_names')


class _NoInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO


@contextlib.contextmanager
def quiet_rewrite_log() -> Iterator[None]:
    """Hold back timm_dropfix.rewrite's INFO summary (its warnings still pass) while models are built.

    Every ``*_dropfix`` constructor calls ``rewrite`` itself, so building the ``--v1-strides`` twin (even without
    ``--rewrite``), rewriting and rebuilding the twin for export would each log a summary; ``train`` logs the
    final placement once instead.

    Example:
        >>> import timm
        >>> with quiet_rewrite_log():
        ...     model = timm.create_model('resnet18_dropfix')     # no INFO line from timm_dropfix.rewrite
    """
    log, quiet = logging.getLogger('timm_dropfix.rewrite'), _NoInfo()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


# exception class names (anywhere in the chain) that mean the Hub could not be reached and the file is not cached;
# matched by name so that neither requests, httpx nor urllib has to be imported to recognise its errors
_OFFLINE_ERRORS = {'LocalEntryNotFoundError', 'OfflineModeIsEnabled', 'ConnectionError', 'ConnectError',
                   'ConnectTimeout', 'URLError', 'gaierror', 'TimeoutException'}


def _is_offline_error(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if {c.__name__ for c in type(e).__mro__} & _OFFLINE_ERRORS:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


@dataclass
class BuiltModel:
    """The model plus what is needed to export it faithfully.

    Example:
        >>> built = build_model(TrainConfig(model='resnet18', rewrite=True), num_classes=3)
        >>> built.export_arch, built.export_args['branch_position']
        ('resnet18_dropfix', 'recommended')
    """

    model: nn.Module
    export_arch: str                      # architecture name written to config.json
    export_args: dict[str, Any]           # model_args written to config.json (rebuild the same network)
    dropfix: dict | None = None           # timm_dropfix.dropfix_config(model) after a rewrite
    license: str | None = None
    base_model: str | None = None
    notes: list[str] = field(default_factory=list)


def _check_name(name: str) -> str:
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f'*{arch.split("_")[0]}*')[:8]
        hint = f' Similar names: {", ".join(close)}.' if close else ''
        raise FinetuneError(f'unknown model {name!r}: not a timm model (after `import timm_dropfix`).{hint} '
                            f'See timm.list_models() for all names.')
    return arch


def _twin(arch: str, why: str) -> str:
    if arch.endswith('_dropfix'):
        return arch
    twin = timm_dropfix.dropfix_twin(arch)
    if twin is None:
        raise FinetuneError(f'{why} needs a model with a registered *_dropfix twin; {arch!r} has none. '
                            f'Models with twins: resnet18/34/50/101/152, resnet50d, resnetv2_* (pre-activation).')
    return twin


def _weights_overlay(path: str, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """pretrained_cfg_overlay that loads ``path`` (a .safetensors file or a save_for_hf folder) and its config;
    ``model`` is the --model the weights are for (named in errors)."""
    p = Path(path)
    if p.is_dir():
        weights, cfg_file = p / 'model.safetensors', p / 'config.json'
        if not weights.is_file():
            raise FinetuneError(f'--pretrained-file {p} is a folder without model.safetensors; pass a save_for_hf '
                                f'folder (config.json + model.safetensors) or a .safetensors file')
        folder_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        pcfg = folder_cfg.get('pretrained_cfg', {})
        overlay = {k: pcfg[k] for k in _PREPROC_KEYS if k in pcfg}
        overlay.setdefault('num_classes', folder_cfg.get('num_classes'))
        overlay['file'] = str(weights)
    elif p.is_file():
        if p.suffix != '.safetensors':
            raise FinetuneError(f'--pretrained-file {p}: only .safetensors files (or save_for_hf folders) are '
                                f'accepted, so no pickle is ever loaded')
        folder_cfg, overlay = {}, {'file': str(p)}
    else:
        raise FinetuneError(f'--pretrained-file {p} does not exist')
    _check_safetensors(Path(overlay['file']), path, model)
    # the weights' own preprocessing wins over the architecture's default tag (e.g. timm resnet50.a1_in1k's
    # bicubic/0.95/test-288 would be wrong for other weights)
    overlay.update(test_input_size=None, test_crop_pct=None)
    overlay = {k: v for k, v in overlay.items() if v is not None or k.startswith('test_')}
    return overlay, folder_cfg


def _check_safetensors(file: Path, given: str, model: str) -> None:
    """Read the header of ``file`` (no tensors), so a damaged or non-safetensors file is named as such instead of
    surfacing as a load error of the model it was meant for."""
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework='pt') as f:
            f.keys()
    except Exception as e:  # safetensors raises SafetensorError, OSError, ... for a file it cannot parse
        where = '' if str(file) == given else f' ({file})'
        raise FinetuneError(f'--pretrained-file {given}{where} is not a valid safetensors file ({type(e).__name__}: '
                            f'{str(e)[:200]}), so --model {model!r} cannot start from it. Pass weights saved as '
                            f'safetensors (a .safetensors file, or a save_for_hf folder), e.g. with '
                            f'safetensors.torch.save_file or timm.models.save_for_hf.') from None


def _describe_source(model: nn.Module, source: dict | None) -> None:
    """Make the provenance in ``model.pretrained_cfg`` (copied into the exported config.json) that of the weights
    it starts from: timm fills it from the architecture's default tag (e.g. resnet50.a1_in1k's tag, origin and
    paper), which is wrong for weights from a file and for a random init; ``source`` is the starting weights'
    pretrained_cfg (None: random init). The tag goes in every case: the fine-tuned weights are not that tag's."""
    pcfg = {k: v for k, v in model.pretrained_cfg.items() if k != 'tag'}
    for key in ('origin_url', 'paper_ids', 'license'):
        if source is not None and source.get(key) is not None:
            pcfg[key] = source[key]
        else:
            pcfg.pop(key, None)
    model.pretrained_cfg = model.default_cfg = pcfg  # timm keeps default_cfg as an alias


def build_model(cfg: TrainConfig, num_classes: int) -> BuiltModel:
    """Create the model with a ``num_classes`` head, load weights, apply v1 strides and the dropfix rewrite.

    Raises FinetuneError for an unknown model, unreadable or ill-fitting weights and unsupported rewrites.

    Example:
        >>> built = build_model(TrainConfig(model='resnet18', pretrained=False), num_classes=3)
        >>> built.model.get_classifier().out_features, built.export_arch, built.dropfix
        (3, 'resnet18', None)
    """
    arch = _check_name(cfg.model)
    kwargs: dict[str, Any] = dict(num_classes=num_classes)
    export_args: dict[str, Any] = {}
    plain = not arch.endswith('_dropfix')
    if cfg.v1_strides:
        arch = _twin(arch, '--v1-strides')
        if plain:
            # the twin built as the plain model (no branch dropout, timm's head dropout after the pool);
            # --rewrite below places the dropout
            plain_args = dict(branch_drop_rate=0.0, branch_position='none', drop_rate=cfg.drop_rate,
                              head_position='after_pool')
            kwargs.update(plain_args)
            export_args.update(plain_args)
        kwargs['v1_strides'] = export_args['v1_strides'] = True
    elif not cfg.rewrite and cfg.drop_rate:
        kwargs['drop_rate'] = export_args['drop_rate'] = cfg.drop_rate

    with quiet_rewrite_log():
        return _build(cfg, arch, kwargs, export_args)


def _build(cfg: TrainConfig, arch: str, kwargs: dict[str, Any], export_args: dict[str, Any]) -> BuiltModel:
    license, base_model, notes = cfg.license, cfg.base_model, []
    try:
        if cfg.pretrained_file:
            overlay, folder_cfg = _weights_overlay(cfg.pretrained_file, cfg.model)
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            license = license or overlay.get('license')
            # the file name only: the card goes to the Hub, where a local path means nothing and reveals folders
            notes.append(f'initialised from the local weights {Path(cfg.pretrained_file).name}')
            source = folder_cfg.get('pretrained_cfg', {})
        else:
            name = arch if cfg.v1_strides else cfg.model  # keep a pretrained tag ('resnet50.a1_in1k') if given
            model = timm.create_model(name, pretrained=cfg.pretrained, **kwargs)
            source = model.pretrained_cfg if cfg.pretrained else None
            if cfg.pretrained:
                license = license or model.pretrained_cfg.get('license')
                base_model = base_model or model.pretrained_cfg.get('hf_hub_id')
    except FinetuneError:
        raise
    except Exception as e:  # torch/safetensors/timm raise many types for bad weights; all mean the same here
        src = (f'--pretrained-file {cfg.pretrained_file}' if cfg.pretrained_file else
               "timm's pretrained weights (--pretrained)" if cfg.pretrained else 'a random init')
        # the user typed cfg.model; the architecture built may be its twin (--v1-strides)
        built_as = f' (built as {arch!r})' if arch != timm.models.split_model_name_tag(cfg.model)[0] else ''
        hint = ''
        if cfg.pretrained and not cfg.pretrained_file and _is_offline_error(e):
            hint = (' No network, or HF_HUB_OFFLINE=1, and the weights are not in the Hugging Face cache: download '
                    'them elsewhere and pass --pretrained-file (a .safetensors file or save_for_hf folder), or '
                    'train without --pretrained.')
        raise FinetuneError(f'could not build --model {cfg.model!r}{built_as} from {src}: {type(e).__name__}: '
                            f'{str(e)[:500]}{hint}') from None
    _describe_source(model, source)

    dropfix = None
    if cfg.rewrite:
        try:
            timm_dropfix.rewrite(model, branch_drop_rate=cfg.branch_drop_rate, head_drop_rate=cfg.head_drop_rate,
                                 branch_position=cfg.branch_position, head_position=cfg.head_position)
        except timm_dropfix.UnsupportedModelError as e:
            detail = str(e).strip().rstrip('.')
            if 'Supported' not in detail:  # timm_dropfix's message usually lists the families already
                detail += '. Supported families: ' + '; '.join(SUPPORTED_FAMILIES)
            raise FinetuneError(f'--rewrite does not support {cfg.model!r}: {detail}. Choose a model of these '
                                f'families, or train without --rewrite.') from None
        except ValueError as e:
            raise FinetuneError(f'--rewrite: {e}') from None
        dropfix = timm_dropfix.dropfix_config(model)
        twin = timm_dropfix.dropfix_twin(arch) if not arch.endswith('_dropfix') else arch
        if twin is None:
            notes.append(f'{arch} has no registered dropfix twin: the export keeps {arch!r}, whose eval-mode '
                         f'function is identical, but a reload trains without the rewritten dropout')
        else:
            arch = twin
            export_args.update(branch_drop_rate=cfg.branch_drop_rate, drop_rate=cfg.head_drop_rate,
                               branch_position=cfg.branch_position, head_position=cfg.head_position)
    return BuiltModel(model, arch, export_args, dropfix, license, base_model, notes)


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """AdamW/SGD groups: new head at ``lr``, pretrained backbone at ``lr * backbone_lr_mult``; no decay on
    biases and norm parameters (timm convention). ``model.get_classifier()`` says which parameters are the head.

    Example:
        >>> groups = param_groups(timm.create_model('resnet18', num_classes=3), 1e-3, 0.1, 0.05)
        >>> sorted({g['lr'] for g in groups})
        [0.0001, 0.001]
    """
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    buckets: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in head_ids, p.ndim > 1), []).append(p)
    groups = []
    for (is_head, decay), params in sorted(buckets.items()):
        groups.append(dict(params=params, lr=lr if is_head else lr * backbone_lr_mult,
                           weight_decay=weight_decay if decay else 0.0, name=f"{'head' if is_head else 'backbone'}"
                           f"{'' if decay else '_no_decay'}"))
    return groups


def export_model(built: BuiltModel, model: nn.Module, out_dir: str | Path, classes: list[str],
                 data_config: dict, extra_files: dict[str, str | Callable[[dict], str]] | None = None) -> Path:
    """Write a save_for_hf folder (config.json + model.safetensors) atomically; returns its path.

    ``extra_files`` (name -> text, or a function of the written config.json dict, e.g. the README.md card) are
    written into the folder before it is renamed into place.
    ``data_config`` is the eval preprocessing actually used, recorded in the pretrained_cfg so timm's own
    transforms reproduce the reported accuracy. The folder appears under its final name only when complete.

    Example:
        >>> import tempfile
        >>> built = build_model(TrainConfig(model='test_resnet'), num_classes=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     out = export_model(built, built.model, Path(d, 'model'), ['cat', 'dog'], {'input_size': (3, 64, 64)},
        ...                        extra_files={'README.md': lambda hf_config: hf_config['architecture']})
        ...     sorted(f.name for f in out.iterdir()), (out / 'README.md').read_text()
        (['README.md', 'config.json', 'model.safetensors'], 'test_resnet')
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f'.{out_dir.name}.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    m = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    src_arch = m.pretrained_cfg.get('architecture')
    if built.export_arch != src_arch:
        # rebuild under the twin so the dropout placement / strides are part of the saved architecture
        with quiet_rewrite_log():
            twin = timm.create_model(built.export_arch, **{**built.export_args, 'num_classes': m.num_classes})
        twin.load_state_dict(m.state_dict(), strict=True)
        if built.dropfix is not None and timm_dropfix.dropfix_config(twin) != built.dropfix:
            raise RuntimeError(f'{built.export_arch} rebuilt with {built.export_args} does not reproduce the '
                               f'rewrite {built.dropfix}: {timm_dropfix.dropfix_config(twin)}')
        twin.pretrained_cfg = {**m.pretrained_cfg, 'architecture': built.export_arch}
        m = twin
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    data_cfg = {k: data_config[k] for k in ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')
                if k in data_config}
    timm.models.save_for_hf(m, str(tmp), model_config={'label_names': list(classes)},
                            model_args=dict(built.export_args), safe_serialization=True, data_config=data_cfg)
    hf_config = json.loads((tmp / 'config.json').read_text())
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text(hf_config) if callable(text) else text)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
