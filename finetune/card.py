"""Model card: metadata as ``huggingface_hub.ModelCardData``, text rendered from ``finetune/templates/model_card.md``.

The card is built only from files in the model folder (``config.json``, ``training_config.json``,
``eval_metrics.json``) plus an optional bench ``results.json``, so ``push`` can re-render it later (for example
to add the variant comparison) without the run directory.

Example:
    >>> text = render_card_from_folder('runs/pets/model', repo_id='me/resnet50-pets')   # doctest: +SKIP
    >>> text.startswith('---')                                                          # doctest: +SKIP
    True
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().parent / 'templates' / 'model_card.md'  # shipped as package data
DATASET_IDS = {'pets': 'timm/oxford-iiit-pet'}
DATASET_NAMES = {'pets': 'Oxford-IIIT Pet', 'imagefolder': 'image folder'}
TRAINING_CONFIG = 'training_config.json'
EVAL_METRICS = 'eval_metrics.json'
# config fields that describe the recipe (paths and bookkeeping stay out of the card)
_RECIPE_KEYS = ('model', 'pretrained', 'pretrained_file', 'v1_strides', 'rewrite', 'optimizer', 'lr',
                'backbone_lr_mult', 'weight_decay', 'warmup_epochs', 'min_lr_ratio', 'label_smoothing',
                'freeze_bn_stats', 'epochs', 'batch_size', 'grad_accum', 'mixed_precision', 'img_size',
                'rrc_scale_min', 'color_jitter', 'seed', 'fast_data', 'drop_rate')


def _fmt(v: Any) -> str:
    return f'{v:.4f}' if isinstance(v, float) else str(v)


def describe_dropout(dropfix: dict | None, summary: str | None) -> str:
    """One paragraph on the dropout placement (from ``timm_dropfix.dropfix_config`` / ``summarize``).

    Example:
        >>> describe_dropout(None, None).split(':')[0]
        'Not rewritten by timm_dropfix'
        >>> cfg = dict(branch_drop_rate=0.1, branch_position='recommended', head_drop_rate=0.2, head_position='none')
        >>> describe_dropout(cfg, None).split(' in every')[0]
        '`timm_dropfix.rewrite` with branch dropout p=0.1 at `recommended`'
    """
    if dropfix is None:
        text = ('Not rewritten by timm_dropfix: dropout as the architecture defines it '
                '(timm ResNets: optional `drop_rate` after global pooling).')
    else:
        text = (f"`timm_dropfix.rewrite` with branch dropout p={dropfix['branch_drop_rate']} at "
                f"`{dropfix['branch_position']}` in every residual branch and head dropout "
                f"p={dropfix['head_drop_rate']} at `{dropfix['head_position']}`. Dropout is active only in "
                f"training; in eval mode the network is the plain one.")
    if summary:
        text += f'\n\n```\n{summary}\n```'
    return text


def bench_comparison(results_path: str | Path) -> str:
    """The markdown comparison table of a ``finetune bench`` results.json.

    Example:
        >>> import tempfile
        >>> from finetune.bench import summarize_runs
        >>> m = dict(top1=0.7, mean_class_acc=0.7, top5=0.9, nll=1.0, ece=0.1)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = Path(d, 'results.json').write_text(json.dumps(summarize_runs({'none': {0: m}}, 'none', {}, {})))
        ...     bench_comparison(Path(d, 'results.json')).splitlines()[-1]
        '| none |  | 1 | 0.7000 +- 0.0000 | 0.7000 +- 0.0000 | 1.000 | 0.100 | (baseline) |'
    """
    from .bench import results_markdown  # local: bench imports train, which the card must not need
    return results_markdown(json.loads(Path(results_path).read_text()), heading=False)


def render_card(hf_config: dict, train_config: dict, metrics: dict, info: dict,
                repo_id: str | None = None, bench_results: str | Path | None = None) -> str:
    """Render the card text.

    Args:
        hf_config: the folder's config.json (architecture, label_names, pretrained_cfg).
        train_config: the TrainConfig dict of the run.
        metrics: final eval metrics (top1, top5, mean_class_acc, nll, ece, n).
        info: extras from training: ``dropfix``, ``dropout_summary``, ``license``, ``base_model``, ``notes``,
            ``eval_split``.
        repo_id: Hub id the card is for (None: a local folder).
        bench_results: optional bench results.json whose comparison table is included.

    Returns:
        The README.md text: YAML metadata between ``---`` lines, then the markdown body.

    Example:
        >>> card = render_card({'architecture': 'resnet18', 'num_classes': 3}, {'dataset': 'pets'},
        ...                    dict(top1=0.9, top5=1.0, mean_class_acc=0.88, n=30), {}, repo_id='me/resnet18-pets')
        >>> card.startswith('---'), "timm.create_model('hf-hub:me/resnet18-pets', pretrained=True)" in card
        (True, True)
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    dataset = train_config.get('dataset', 'pets')
    dataset_name = DATASET_NAMES.get(dataset, dataset)
    model_id = repo_id or f"{hf_config['architecture']}-finetuned-{dataset}"
    eval_split = info.get('eval_split', 'test')
    dataset_type = DATASET_IDS.get(dataset, dataset)
    eval_results = [EvalResult(task_type='image-classification', dataset_type=dataset_type,
                               dataset_name=dataset_name, dataset_split=eval_split, metric_type=mtype,
                               metric_name=label, metric_value=round(float(metrics[key]), 4))
                    for key, mtype, label in (('top1', 'accuracy', 'top-1 accuracy'),
                                              ('top5', 'top_5_accuracy', 'top-5 accuracy'),
                                              ('mean_class_acc', 'mean_class_accuracy', 'mean per-class accuracy'))]
    tags = ['image-classification', 'timm', 'timm_dropfix', 'dropout']
    if info.get('dropfix'):
        tags.append('dropfix')
    card_data = ModelCardData(
        library_name='timm', license=info.get('license') or 'apache-2.0', tags=tags,
        datasets=[dataset_type] if dataset in DATASET_IDS else None, base_model=info.get('base_model'),
        model_name=model_id, eval_results=eval_results, pipeline_tag='image-classification',
    )
    pcfg = hf_config.get('pretrained_cfg', {})
    rows = [(k, _fmt(metrics[k])) for k in ('top1', 'top5', 'mean_class_acc', 'nll', 'ece') if k in metrics]
    recipe = [(k, _fmt(train_config[k])) for k in _RECIPE_KEYS if k in train_config]
    # a local weights path means nothing on the Hub and can reveal a user's folders: its file name only
    recipe = [(k, f'{Path(v).name} (a local file)' if k == 'pretrained_file' and v != 'None' else v)
              for k, v in recipe]
    if train_config.get('rewrite'):
        recipe += [(k, _fmt(train_config[k])) for k in ('branch_drop_rate', 'head_drop_rate',
                                                          'branch_position', 'head_position')]
    n_classes = hf_config.get('num_classes')
    summary = (f"`{hf_config['architecture']}` fine-tuned on {dataset_name} ({n_classes} classes)"
               + (f" from `{info['base_model']}`" if info.get('base_model') else '') + '.')
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_id=model_id, summary=summary, metrics=rows, recipe=recipe,
        dataset_name=dataset_name, eval_split=eval_split, n_eval=metrics.get('n', '?'),
        img_size=(pcfg.get('input_size') or [None, '?'])[-1], crop_pct=pcfg.get('crop_pct'),
        interpolation=pcfg.get('interpolation'),
        load_id=f'hf-hub:{repo_id}' if repo_id else 'local-dir:PATH/TO/model',
        dropout=describe_dropout(info.get('dropfix'), info.get('dropout_summary')),
        comparison=bench_comparison(bench_results) if bench_results else None,
        notes=list(info.get('notes') or []),
    )
    return str(card)


def render_card_from_folder(folder: str | Path, repo_id: str | None = None,
                            bench_results: str | Path | None = None) -> str:
    """Re-render the card of a model folder written by ``finetune train``.

    Example:
        >>> text = render_card_from_folder('runs/pets/model', repo_id='me/resnet50-pets')   # doctest: +SKIP
        >>> 'hf-hub:me/resnet50-pets' in text                                                # doctest: +SKIP
        True
    """
    folder = Path(folder)
    hf_config = json.loads((folder / 'config.json').read_text())
    train_config = json.loads((folder / TRAINING_CONFIG).read_text())
    ev = json.loads((folder / EVAL_METRICS).read_text())
    return render_card(hf_config, train_config, ev['metrics'], ev.get('info', {}), repo_id, bench_results)
