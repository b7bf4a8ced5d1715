"""Datasets as lists of ``(path, label)`` plus class names, and the timm transforms that read them.

Two sources: Oxford-IIIT Pets through torchvision's ``OxfordIIITPet`` (the official trainval/test split files) and
any ``ImageFolder`` layout (``DIR/train/<class>/*``, ``DIR/val/<class>/*``). Every image is opened once up front so a
corrupt or truncated file is skipped and counted instead of crashing an epoch half way.

Example:
    >>> samples, classes = pets_samples('../shared/data/pets370', 'trainval')   # doctest: +SKIP
    >>> len(samples), classes[0]                                                 # doctest: +SKIP
    (185, 'Abyssinian')
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .errors import FinetuneError

_logger = logging.getLogger(__name__)

Sample = tuple[str, int]


def pets_samples(data_dir: str | Path, split: str, download: bool = False,
                 can_download: bool = True) -> tuple[list[Sample], list[str]]:
    """Oxford-IIIT Pets ``split`` ('trainval' or 'test') as samples and the 37 class names.

    Class names cover both split files, so a subset whose split lacks a breed still gets every name.
    ``can_download``: whether the calling command has a ``--download`` option to suggest when the data is missing.

    Example:
        >>> samples, classes = pets_samples('../shared/data/pets370', 'test')   # doctest: +SKIP
        >>> len(samples), len(classes)                                          # doctest: +SKIP
        (185, 37)
    """
    from torchvision.datasets import OxfordIIITPet
    root = Path(data_dir)
    try:
        ds = OxfordIIITPet(str(root), split=split, target_types='category', download=download)
        other = OxfordIIITPet(str(root), split='test' if split == 'trainval' else 'trainval', download=False)
    except RuntimeError as e:  # torchvision says "Dataset not found ..."
        # torchvision's advice ("use download=True") is for its Python API; only its other findings add anything
        detail = str(e) if 'download=True' not in str(e) else ''
        fetch = ' or add --download to fetch it (needs network)' if can_download else ''
        raise FinetuneError(
            f'Oxford-IIIT Pets not found under {root} (expected {root}/oxford-iiit-pet/images/*.jpg and '
            f'{root}/oxford-iiit-pet/annotations/{{trainval,test}}.txt). Point --data-dir at an existing copy '
            f'(e.g. ../shared/data/pets370){fetch}.{f" [{detail}]" if detail else ""}') from None
    except OSError as e:  # e.g. no network with --download
        raise FinetuneError(f'could not download Oxford-IIIT Pets into {root}: {e}. Without network, point '
                            f'--data-dir at an existing copy such as ../shared/data/pets370.') from None
    # torchvision keeps the file list and labels in underscore attributes; they are the dataset's real content
    # (its __getitem__ reads them) and are stable across torchvision releases.
    names: dict[int, str] = {}
    # torchvision's .classes only lists breeds present in that split, so name each label from its files
    # with torchvision's own rule ('american_bulldog_12' -> 'American Bulldog').
    for d in (ds, other):
        for path, label in zip(d._images, d._labels):
            names.setdefault(label, ' '.join(p.title() for p in Path(path).stem.rsplit('_', 1)[0].split('_')))
    num_classes = max(names) + 1
    classes = [names.get(i, f'class_{i}') for i in range(num_classes)]
    samples = [(str(p), int(y)) for p, y in zip(ds._images, ds._labels)]
    return samples, classes


def imagefolder_samples(data_dir: str | Path) -> tuple[list[Sample], list[Sample], list[str]]:
    """``DIR/train`` and ``DIR/val`` in torchvision ImageFolder layout; both must have the same classes.

    Example:
        >>> train, val, classes = imagefolder_samples('data/flowers')   # doctest: +SKIP
        >>> classes[:2]                                                   # doctest: +SKIP
        ['daisy', 'dandelion']
    """
    root = Path(data_dir)
    for sub in ('train', 'val'):
        if not (root / sub).is_dir():
            raise FinetuneError(f'--dataset imagefolder needs {root}/{sub}/<class>/<image> folders; '
                                f'{root / sub} does not exist. Point --data-dir at the folder holding train/ and val/.')
    (train, classes), (val, val_classes) = _image_folder(root / 'train'), _image_folder(root / 'val')
    if classes != val_classes:
        raise FinetuneError(f'{root}/train and {root}/val hold different class folders: '
                            f'{sorted(set(classes) ^ set(val_classes))}')
    return train, val, classes


def _image_folder(root: Path) -> tuple[list[Sample], list[str]]:
    """The samples and class names of one torchvision ImageFolder."""
    from torchvision.datasets import ImageFolder
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise FinetuneError(f'no images found in {root}: {e}') from None
    return [(p, int(y)) for p, y in folder.samples], list(folder.classes)


def eval_samples(dataset: str, data_dir: str | Path,
                 limit: int | None = None) -> tuple[list[Sample], list[str], list[str]]:
    """The readable eval split alone (pets: test; imagefolder: ``DIR/val``), its classes and the unreadable paths.

    ``limit`` picks the same images as ``load_samples(..., limit_eval=limit)``: the first ``limit`` samples
    (:func:`limit_samples`) and then the readable ones among them, so an unreadable image inside the limit leaves
    fewer than ``limit``, exactly as in the training run.

    Example:
        >>> samples, classes, skipped = eval_samples('pets', '../shared/data/pets370')   # doctest: +SKIP
        >>> len(samples), len(classes)                                                   # doctest: +SKIP
        (185, 37)
        >>> len(eval_samples('pets', '../shared/data/pets370', limit=37)[0])            # doctest: +SKIP
        37
    """
    if dataset == 'pets':
        samples, classes = pets_samples(data_dir, 'test', False, can_download=False)
    elif dataset == 'imagefolder':
        root = Path(data_dir) / 'val'
        if not root.is_dir():
            raise FinetuneError(f'--dataset imagefolder evaluates {root}/<class>/<image>; {root} does not exist')
        samples, classes = _image_folder(root)
    else:
        raise FinetuneError(f"unknown --dataset {dataset!r}: use 'pets' or 'imagefolder'")
    # limit first, then drop unreadable images: load_samples' order, so eval selects train's eval images
    samples, skipped = check_images(limit_samples(samples, limit))
    if not samples:
        raise FinetuneError(f'no readable eval images in {data_dir} ({len(skipped)} unreadable)')
    return samples, classes, skipped


def check_images(samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
    """Open every image fully once; return the readable samples and the paths that failed.

    JPEGs are decoded at reduced scale (``Image.draft``), which still walks the whole file, so truncation is found
    at a fraction of the cost of a full decode.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.new('RGB', (4, 4)).save(Path(d, 'ok.png')); _ = Path(d, 'bad.png').write_bytes(b'junk')
        ...     good, bad = check_images([(str(Path(d, 'ok.png')), 0), (str(Path(d, 'bad.png')), 1)])
        >>> len(good), [Path(p).name for p in bad]
        (1, ['bad.png'])
    """
    good, bad = [], []
    for path, label in samples:
        try:
            with Image.open(path) as im:
                im.draft('RGB', (64, 64))
                im.load()
            good.append((path, label))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            _logger.warning('skipping unreadable image %s (%s)', path, e)
            bad.append(path)
    return good, bad


def limit_samples(samples: Sequence[Sample], n: int | None) -> list[Sample]:
    """First ``n`` samples taken round-robin over classes (deterministic), so a small budget still sees every class.

    Example:
        >>> limit_samples([('a.jpg', 0), ('b.jpg', 0), ('c.jpg', 1), ('d.jpg', 1)], 2)
        [('a.jpg', 0), ('c.jpg', 1)]
    """
    if n is None or n >= len(samples):
        return list(samples)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    out: list[Sample] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


class ImageListDataset(torch.utils.data.Dataset):
    """``(path, label)`` samples read with PIL and passed through a timm transform.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.new('RGB', (4, 3)).save(Path(d, 'a.png'))
        ...     img, label = ImageListDataset([(str(Path(d, 'a.png')), 5)])[0]
        >>> len(ImageListDataset([('a.png', 5)])), img.size, label
        (1, (4, 3), 5)
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert('RGB')
        return (self.transform(img) if self.transform else img), label


@dataclass
class SplitData:
    """Readable samples of both splits, class names, and how many images were skipped as unreadable.

    Example:
        >>> d = SplitData(train=[('a.jpg', 0)], eval=[('b.jpg', 0)], classes=['cat'], n_skipped=1, skipped=['c.jpg'])
        >>> len(d.train), d.classes, d.n_skipped
        (1, ['cat'], 1)
    """

    train: list[Sample]
    eval: list[Sample]
    classes: list[str]
    n_skipped: int
    skipped: list[str]


def load_samples(dataset: str, data_dir: str, download: bool = False, limit_train: int | None = None,
                 limit_eval: int | None = None, check: bool = True) -> SplitData:
    """Resolve a dataset name to train/eval sample lists (the one entry point ``train`` uses).

    With ``check`` every image is opened once and unreadable ones are left out and counted.

    Example:
        >>> d = load_samples('pets', '../shared/data/pets370', limit_train=37)   # doctest: +SKIP
        >>> len(d.train), len(d.classes)                                          # doctest: +SKIP
        (37, 37)
    """
    if dataset == 'pets':
        train, classes = pets_samples(data_dir, 'trainval', download)
        evals, _ = pets_samples(data_dir, 'test', False)
    elif dataset == 'imagefolder':
        train, evals, classes = imagefolder_samples(data_dir)
    else:
        raise FinetuneError(f"unknown --dataset {dataset!r}: use 'pets' or 'imagefolder'")
    train, evals = limit_samples(train, limit_train), limit_samples(evals, limit_eval)
    bad_t, bad_e = [], []
    if check:  # the fast-data cache decodes every image anyway and counts failures itself
        train, bad_t = check_images(train)
        evals, bad_e = check_images(evals)
    if not train or not evals:
        raise FinetuneError(f'no readable images left in {data_dir} (train {len(train)}, eval {len(evals)}; '
                            f'{len(bad_t) + len(bad_e)} unreadable)')
    return SplitData(train, evals, classes, len(bad_t) + len(bad_e), bad_t + bad_e)


def build_transforms(data_config: dict, rrc_scale_min: float = 0.35,
                     color_jitter: float = 0.4) -> tuple[Callable, Callable]:
    """timm train/eval transforms for a resolved data config (``timm.data.resolve_data_config``).

    Example::

        >>> train_tf, eval_tf = build_transforms(timm.data.resolve_data_config({}, model=model))  # doctest: +SKIP
    """
    from timm.data import create_transform
    train_tf = create_transform(**data_config, is_training=True, scale=(rrc_scale_min, 1.0),
                                color_jitter=color_jitter)
    eval_tf = create_transform(**data_config, is_training=False)
    return train_tf, eval_tf
