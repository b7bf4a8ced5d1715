"""Classification metrics from logits: top-1, top-5, mean per-class accuracy, NLL, ECE, and a confusion-matrix plot.

Metrics are computed from the full (gathered) logits of the eval set, so they are exact under any number of
processes.

Example:
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]); y = torch.tensor([0, 1, 1])
    >>> m = classification_metrics(logits, y)
    >>> round(m['top1'], 4), round(m['mean_class_acc'], 4)
    (0.6667, 0.75)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # accelerate is imported where it is used, keeping this module light for the metrics alone
    from accelerate import Accelerator


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (Guo et al. 2017): sum_b |acc_b - conf_b| * n_b / n.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> round(expected_calibration_error(probs, torch.tensor([0, 0])), 4)
        0.45
    """
    conf, pred = probs.max(dim=1)
    correct = pred.eq(targets).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.double().mean() * (conf[in_bin].double().mean() - correct[in_bin].double().mean()).abs()
    return float(ece)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[true, pred]`` counts.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
        tensor([[1, 1],
                [0, 1]])
    """
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> dict:
    """All reported metrics from float logits ``[N, C]`` and integer targets ``[N]``.

    ``mean_class_acc`` averages the recall of the classes that occur in ``targets`` (the usual Pets metric).

    Example:
        >>> m = classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> m['top1'], m['top5'], m['mean_class_acc'], m['n']
        (0.5, 1.0, 0.5, 2)
    """
    logits, targets = logits.float().cpu(), targets.long().cpu()
    num_classes = num_classes or logits.shape[1]
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct = topk.eq(targets[:, None])
    preds = topk[:, 0]
    cm = confusion_matrix(preds, targets, num_classes)
    support = cm.sum(1)
    present = support > 0
    per_class = cm.diag()[present].double() / support[present].double()
    return dict(
        top1=float(correct[:, 0].float().mean()),
        top5=float(correct.any(1).float().mean()),
        mean_class_acc=float(per_class.mean()),
        nll=float(F.cross_entropy(logits, targets)),
        ece=expected_calibration_error(logits.softmax(1), targets),
        n=int(targets.numel()),
    )


def format_metrics(m: dict) -> str:
    """One line of the reported metrics, as ``finetune train`` and ``finetune eval`` print them.

    Example:
        >>> format_metrics(dict(top1=0.5, top5=1.0, mean_class_acc=0.5, nll=0.7, ece=0.1))
        'top1 0.5000  top5 1.0000  mean_class_acc 0.5000  nll 0.7000  ece 0.1000'
    """
    return '  '.join(f'{k} {m[k]:.4f}' for k in ('top1', 'top5', 'mean_class_acc', 'nll', 'ece'))


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable, accelerator: Accelerator | None = None,
            transform: Callable[..., torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``(images, targets)`` batches; returns all logits and targets.

    With an ``accelerate.Accelerator`` the results of every process are gathered (padding removed), so each
    process returns the whole eval set. ``transform`` (e.g. fast-data's batched eval augmentation) runs on the
    batch on its device first; fast-data batches are ``(images, targets, sizes)`` and ``sizes`` goes to it.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> logits, targets = predict(model, [(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))])
        >>> logits.shape, targets.tolist(), model.training
        (torch.Size([4, 2]), [0, 1, 0, 1], False)
    """
    model.eval()
    all_logits, all_targets = [], []
    for images, targets, *sizes in batches:  # fast-data batches also carry each image's (h, w)
        if transform is not None:
            images = transform(images, *sizes)
        logits = model(images)
        if accelerator is not None:
            logits, targets = accelerator.gather_for_metrics((logits.contiguous(), targets))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets.cpu())
    return torch.cat(all_logits), torch.cat(all_targets)


def plot_confusion_matrix(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], path: str | Path,
                          title: str = '') -> Path:
    """Save a row-normalised confusion matrix as PNG (matplotlib Agg backend: no display needed).

    Example:
        >>> plot_confusion_matrix(logits, targets, classes, 'runs/pets/confusion.png')   # doctest: +SKIP
        PosixPath('runs/pets/confusion.png')
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = len(classes)
    cm = confusion_matrix(logits.argmax(1), targets, n).double()
    cm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.22 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm.numpy(), cmap='Blues', vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=6 if n > 20 else 8)
    ax.set_yticks(range(n), classes, fontsize=6 if n > 20 else 8)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title or 'confusion matrix (row-normalised)')
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_folder(model_dir: str | Path, data_dir: str | Path, dataset: str = 'pets', batch_size: int = 64,
                    workers: int = 2, output: str | Path | None = None, limit_eval: int | None = None) -> dict:
    """Evaluate a saved model folder on a dataset's eval split the way a user of timm would, and return the metrics.

    The model is loaded with ``timm.create_model('local-dir:...', pretrained=True)`` (dropfix architectures
    included) and fed through timm's own eval transform for its pretrained_cfg (PIL, per image), so the numbers
    check what ``finetune train`` reported with nothing of the toolkit's data path in between. Runs under
    ``accelerate launch`` on any number of processes (every image counted once). ``output``: also write the
    metrics there as JSON. ``limit_eval``: evaluate only the images ``finetune train --limit-eval N`` evaluated
    (same selection, see :func:`finetune.data.eval_samples`), so its reported top-1 can be checked; the metrics
    record it (None: every image).

    Example:
        >>> m = evaluate_folder('runs/pets/model', '../shared/data/pets370')   # doctest: +SKIP
        >>> sorted(m)                                                         # doctest: +SKIP
        ['ece', 'limit_eval', 'mean_class_acc', 'model_dir', 'n', 'n_skipped', 'nll', 'skipped', 'top1', 'top5']
        >>> evaluate_folder('runs/pets/model', '../shared/data/pets370', limit_eval=37)['n']   # doctest: +SKIP
        37
    """
    from .config import TrainConfig
    from .errors import FinetuneError
    from .train import check_options

    # train's own checks of these options (and messages), before any file is read
    check_options(TrainConfig(batch_size=batch_size, workers=workers, limit_eval=limit_eval))
    import timm
    from accelerate import Accelerator
    from timm.data import create_transform, resolve_data_config

    import timm_dropfix  # noqa: F401  (registers the *_dropfix architectures a folder may name)

    from .data import ImageListDataset, eval_samples
    from .hub import check_model_folder

    folder = check_model_folder(model_dir)
    samples, classes, skipped = eval_samples(dataset, data_dir, limit=limit_eval)
    label_names = json.loads((folder / 'config.json').read_text()).get('label_names')
    if label_names is not None and list(label_names) != list(classes):
        raise FinetuneError(f'{folder} was trained on the classes {label_names[:5]}... ({len(label_names)}), but '
                            f'{data_dir} has {classes[:5]}... ({len(classes)}): the metrics would compare '
                            f'wrong labels. Evaluate on the dataset the model was trained for.')
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:  # timm, safetensors and torch raise many types for a bad folder; all mean the same
        raise FinetuneError(f'could not load {folder} with timm: {type(e).__name__}: {str(e)[:500]}') from None
    if model.num_classes != len(classes):
        raise FinetuneError(f'{folder} predicts {model.num_classes} classes, {data_dir} has {len(classes)}')
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    loader = torch.utils.data.DataLoader(ImageListDataset(samples, transform), batch_size=batch_size,
                                         num_workers=workers)
    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    logits, targets = predict(model, loader, accelerator)
    metrics = dict(classification_metrics(logits, targets, len(classes)), model_dir=str(folder),
                   limit_eval=limit_eval, n_skipped=len(skipped), skipped=skipped)
    if accelerator.is_main_process:
        unreadable = f', {len(skipped)} unreadable skipped' if skipped else ''
        accelerator.print(f"{folder}: {format_metrics(metrics)}  ({metrics['n']} images{unreadable})")
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics
