"""Fast data path: decode each image once into a uint8 cache, augment whole batches as tensors.

The usual fine-tuning loop (accelerate's ``cv_example.py``, most tutorials) opens, decodes and resizes every
JPEG again in every epoch, in DataLoader workers, with PIL. On a Pets-sized set that is most of the CPU time
of an epoch, and on a small machine it competes with the model for the same cores. This module splits the
work in two:

1. :func:`build_cache` decodes every image **once** (PIL, shortest side resized to ``short_side``, aspect ratio
   kept) and appends the pixels (uint8, height x width x RGB, as decoded) to one flat ``.bin`` file that is
   memory-mapped afterwards; a ``.json`` sidecar holds each image's offset, size and label. The file is keyed
   by a hash of the file paths, sizes, mtimes, labels, ``short_side``, ``max_aspect`` and interpolation, so a
   changed dataset or size builds a new file.
2. :class:`CachedDataset` serves ``(uint8 [3, h, w] tensor, label)`` from that memory map (no decode); a
   batch is padded to its largest image (a two-pixel ring of repeated edges, zeros beyond) and carries each
   image's ``(h, w)``.
   :class:`BatchAugment` does random-resized-crop, flip and normalization on the whole uint8 batch, on
   whatever device the batch is on (the accelerator when there is one).

How this differs from PIL ``RandomResizedCrop`` on the original file
-------------------------------------------------------------------
The crop box is sampled exactly as timm's ``RandomResizedCropAndInterpolation`` does, from the whole image
(area and aspect ratio relative to its ``h x w``), so every part of the photo can be seen. Two differences
remain:

* the image is resampled twice (once to ``S`` when caching, once by the crop), which softens the crops. With
  ``S = floor(img_size / crop_pct)`` (182 for 160) most crops are enlarged; on pets370 at 160 px the mean
  absolute horizontal pixel difference of the crops (64 images x 2, normalized units) is 0.097 against 0.115
  for timm's PIL crops. A cache of ``1.5 * img_size`` with ``interpolation='bicubic'`` crops measured 0.117,
  but trained no better on pets370 (README) and costs loader speed, so it is an option, not the default;
* a long side beyond ``max_aspect`` times the short side (2 by default; panoramas, not pets) is center
  cropped at cache time, to bound the file size.

The eval path has no difference when ``S == floor(img_size / crop_pct)``: timm's eval transform (resize
shortest side to ``floor(img_size / crop_pct)``, center crop ``img_size``) is then an exact slice of each
cached image, so eval batches equal timm's PIL eval transform up to float rounding. See
:func:`default_short_side`.

Example::

    >>> info = build_cache(samples, short_side=default_short_side(224), cache_dir='~/.cache/timm_dropfix')
    >>> loader = make_fast_loader(CachedDataset(info.path), batch_size=64, shuffle=True, num_workers=2)
    >>> augment = BatchAugment(224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), train=True)
    >>> for images, labels, sizes in loader:
    ...     x = augment(images.to(device, non_blocking=True), sizes)   # float32 [64, 3, 224, 224], normalized

Training on CPU, let the loader workers do the crops and the training process the normalization::

    >>> loader = make_fast_loader(ds, 64, shuffle=True, num_workers=2, batch_transform=augment.resample)
    >>> for images, labels, _ in loader:
    ...     x = augment.normalize(images)
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import FinetuneError

__all__ = [
    'CacheInfo', 'build_cache', 'default_short_side', 'CachedDataset', 'BatchAugment',
    'make_fast_loader', 'collate_padded', 'CollateThenTransform', 'load_and_resize', 'DeviceCache',
    'IndexDataset',
]

_CACHE_VERSION = 3  # bump when the on-disk layout or the resize recipe changes, so old caches rebuild
_PIL_INTERP = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST}
DEFAULT_MAX_ASPECT = 2.0


@dataclass
class CacheInfo:
    """What :func:`build_cache` made (or found).

    Attributes:
        path: the ``.bin`` file (every image's uint8 ``h x w x 3`` pixels, back to back) next to its ``.json``
            sidecar; give it to :class:`CachedDataset`.
        labels: label of each cached image, in cache order.
        n_skipped: number of samples that could not be decoded (corrupt, truncated, missing) and were left out.
        skipped: paths of those samples.
        kept_indices: for each cached image, its index in the ``samples`` list given to :func:`build_cache`.
        short_side: ``S``, the short side of every cached image.
        n_images: number of cached images (``len(samples) - n_skipped``).
        key: the content hash the file name is derived from.
        built: True if this call decoded the images, False if an existing cache was reused.
        build_seconds: wall time of this call.
        n_bytes: size of the pixel file.

    Example::

        >>> info = build_cache([('cat.jpg', 0), ('dog.png', 1)], short_side=64, cache_dir='/tmp/cache')
        >>> info.n_images, info.n_skipped, info.path.suffix
        (2, 0, '.bin')
    """
    path: Path
    labels: list[int]
    n_skipped: int
    skipped: list[str] = field(default_factory=list)
    kept_indices: list[int] = field(default_factory=list)
    short_side: int = 0
    n_images: int = 0
    key: str = ''
    built: bool = False
    build_seconds: float = 0.0
    n_bytes: int = 0


def default_short_side(img_size: int, crop_pct: float = 0.875) -> int:
    """Cache size ``S`` that makes the eval path identical to timm's: ``floor(img_size / crop_pct)``.

    Example::

        >>> default_short_side(224)
        256
    """
    return int(math.floor(img_size / crop_pct))


def _decode_hwc(path: str, short_side: int, interpolation: str, max_aspect: float) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert('RGB')  # also forces the full decode, so truncated files raise here
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(short_side * long / short)  # torchvision's rounding for Resize(int)
        new_w, new_h = (short_side, new_long) if w <= h else (new_long, short_side)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), _PIL_INTERP[interpolation])
        cap = int(math.floor(short_side * max_aspect))
        if new_long > cap:  # torchvision CenterCrop offsets along the long side only
            if new_w > new_h:
                left = int(round((new_w - cap) / 2.0))
                im = im.crop((left, 0, left + cap, new_h))
            else:
                top = int(round((new_h - cap) / 2.0))
                im = im.crop((0, top, new_w, top + cap))
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def load_and_resize(path: str, short_side: int, interpolation: str = 'bilinear',
                    max_aspect: float = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Decode ``path`` with PIL and resize its shortest side to ``short_side``, keeping the aspect ratio.

    Sizes follow torchvision's ``Resize(int)`` on PIL images, so this is the first half of timm's eval
    transform when ``short_side == floor(img_size / crop_pct)``. A long side of more than
    ``max_aspect * short_side`` pixels is center cropped to that length.

    Returns:
        uint8 array ``[3, h, w]`` with ``min(h, w) == short_side``. Raises (OSError, ValueError, ...) on
        unreadable files.

    Example::

        >>> load_and_resize('cat_640x480.jpg', 256).shape
        (3, 256, 341)
    """
    return np.ascontiguousarray(_decode_hwc(path, short_side, interpolation, max_aspect).transpose(2, 0, 1))


def _load_or_none(args: tuple[str, int, str, float]) -> Optional[np.ndarray]:
    """Pool worker: a decode failure is data, not a crash (it is counted by the caller)."""
    try:
        return _decode_hwc(*args)
    except Exception:  # noqa: BLE001 - any unreadable image (truncated, not an image, missing) is skipped
        return None


def _cache_key(samples: Sequence[tuple[str, int]], short_side: int, interpolation: str, max_aspect: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({'v': _CACHE_VERSION, 'S': short_side, 'interp': interpolation,
                         'max_aspect': max_aspect}).encode())
    for path, label in samples:
        p = os.path.abspath(path)
        try:
            st = os.stat(p)
            sig = f'{st.st_size}:{st.st_mtime_ns}'
        except OSError:
            sig = 'missing'  # a missing file is skipped at build time; its appearance later changes the key
        h.update(f'{p}\0{sig}\0{int(label)}\n'.encode())
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def build_cache(
        samples: list[tuple[str, int]],
        short_side: int,
        cache_dir: str | Path,
        interpolation: str = 'bilinear',
        num_workers: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        max_aspect: float = DEFAULT_MAX_ASPECT,
) -> CacheInfo:
    """Decode and resize every image once into a memory-mappable uint8 cache (or reuse a matching one).

    Args:
        samples: ``(image path, integer label)`` pairs, in dataset order.
        short_side: ``S``; each image is resized to shortest side ``S``, aspect ratio kept. Use
            :func:`default_short_side` (256 for 224 training) unless you have a reason not to.
        cache_dir: folder for the cache files (created if needed). Files are named by a hash of the paths,
            sizes, mtimes, labels, ``S``, ``max_aspect`` and interpolation, so edits to the data or a new ``S``
            build a new file.
        interpolation: PIL resampling for the one-time resize, ``'bilinear'`` (timm's default) or ``'bicubic'``.
        num_workers: decode processes; ``None`` = all CPUs (capped at 8), ``0`` = decode in this process.
        progress: optional ``callback(done, total)``.
        max_aspect: long sides beyond ``max_aspect * S`` are center cropped to that length (>= 1).

    Returns:
        :class:`CacheInfo`. Undecodable images are left out and counted in ``n_skipped``; they never raise.

    The pixels are written to a temporary file in ``cache_dir`` and renamed into place only when complete (the
    sidecar first, then the pixels), so an interrupted build leaves no partial cache behind and concurrent
    builders (e.g. several ranks) at worst do the work twice.

    Example::

        >>> samples = [('/data/pets/images/Abyssinian_1.jpg', 0), ('/data/pets/images/beagle_1.jpg', 1)]
        >>> info = build_cache(samples, short_side=256, cache_dir='/tmp/cache')
        >>> info.n_images, info.n_skipped
        (2, 0)
    """
    t0 = time.perf_counter()
    if interpolation not in _PIL_INTERP:
        raise ValueError(f'interpolation must be one of {sorted(_PIL_INTERP)}, got {interpolation!r}')
    if short_side < 1:
        raise ValueError(f'short_side must be a positive number of pixels, got {short_side}')
    if not max_aspect >= 1.0:
        raise ValueError(f'max_aspect is a long/short side ratio and must be >= 1, got {max_aspect}')
    if not samples:
        raise ValueError('build_cache needs at least one (path, label) sample; got an empty list')
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(samples, short_side, interpolation, float(max_aspect))
    stem = f'fastdata-S{short_side}-{key[:20]}'
    bin_path, meta_path = cache_dir / f'{stem}.bin', cache_dir / f'{stem}.json'

    if bin_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get('key') == key:
            return _info_from_meta(bin_path, meta, built=False, seconds=time.perf_counter() - t0)

    n = len(samples)
    jobs = [(str(p), short_side, interpolation, float(max_aspect)) for p, _ in samples]
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    num_workers = min(num_workers, n)
    fd, tmp_bin = tempfile.mkstemp(dir=cache_dir, prefix=stem + '.', suffix='.bin.tmp')
    try:
        kept: list[int] = []
        offsets: list[int] = []
        shapes: list[list[int]] = []
        with os.fdopen(fd, 'wb') as f:
            if num_workers > 1:
                # fork keeps startup cheap; the workers only run PIL/numpy, never torch
                ctx = mp.get_context('fork') if 'fork' in mp.get_all_start_methods() else mp.get_context()
                pool = ProcessPoolExecutor(num_workers, mp_context=ctx)
                try:
                    results = pool.map(_load_or_none, jobs, chunksize=max(1, min(16, n // (4 * num_workers))))
                    _append(f, results, kept, offsets, shapes, n, progress)
                finally:
                    # on an interrupt: drop the chunks not started, let the running ones finish. Killing workers
                    # (multiprocessing.Pool.terminate) can leave the result queue's lock held by a dead worker,
                    # and the shutdown then hangs for ever; the test of an interrupted build hit that.
                    pool.shutdown(wait=True, cancel_futures=True)
            else:
                _append(f, map(_load_or_none, jobs), kept, offsets, shapes, n, progress)
        if not kept:
            raise FinetuneError(f'none of the {n} images could be decoded (first: {samples[0][0]!r}): check that '
                                '--data-dir points at the dataset and that its files are images')
        kept_set = set(kept)
        meta = {
            'key': key, 'version': _CACHE_VERSION, 'short_side': short_side, 'interpolation': interpolation,
            'max_aspect': float(max_aspect), 'labels': [int(samples[i][1]) for i in kept], 'kept_indices': kept,
            'offsets': offsets, 'shapes': shapes,
            'skipped': [str(samples[i][0]) for i in range(n) if i not in kept_set],
        }
        _atomic_write_text(meta_path, json.dumps(meta))
        os.replace(tmp_bin, bin_path)  # the pixels appear last and complete
    except BaseException:
        _unlink_quiet(tmp_bin)
        raise
    return _info_from_meta(bin_path, meta, built=True, seconds=time.perf_counter() - t0)


def _append(f, results, kept: list[int], offsets: list[int], shapes: list[list[int]], n: int, progress) -> None:
    """Write decoded images back to back and record where each one starts, its size and its sample index."""
    pos = 0
    for i, img in enumerate(results):
        if img is not None:
            f.write(img.tobytes())
            kept.append(i)
            offsets.append(pos)
            shapes.append([int(img.shape[0]), int(img.shape[1])])
            pos += img.nbytes
        if progress is not None:
            progress(i + 1, n)


def _info_from_meta(bin_path: Path, meta: dict, built: bool, seconds: float) -> CacheInfo:
    return CacheInfo(
        path=bin_path, labels=list(meta['labels']), n_skipped=len(meta['skipped']), skipped=list(meta['skipped']),
        kept_indices=list(meta['kept_indices']), short_side=int(meta['short_side']), n_images=len(meta['labels']),
        key=meta['key'], built=built, build_seconds=seconds, n_bytes=int(sum(h * w * 3 for h, w in meta['shapes'])),
    )


class CachedDataset(Dataset):
    """Memory-mapped view of a :func:`build_cache` file: ``dataset[i] -> (uint8 tensor [3, h, w], int label)``.

    The memory map is opened lazily in each process (DataLoader workers pickle the dataset, not the map).
    Batched fetches (``__getitems__``, used by ``DataLoader`` automatically) return read-only views of the map;
    :func:`collate_padded` copies them, in file order, into one uint8 canvas as large as the batch's largest image
    and hands on each image's ``(h, w)``. The padding repeats each image's last two rows and columns once (the
    most that bilinear or bicubic sampling at a crop's edge can reach) and is zero beyond them.

    Example::

        >>> ds = CachedDataset(build_cache(samples, 256, '/tmp/cache').path)
        >>> img, label = ds[0]; img.dtype, tuple(img.shape)
        (torch.uint8, (3, 256, 341))
    """

    def __init__(self, cache_path: str | Path):
        self.cache_path = Path(cache_path)
        meta_path = self.cache_path.with_suffix('.json')
        if not self.cache_path.exists() or not meta_path.exists():
            raise FileNotFoundError(
                f'{self.cache_path} (and its .json sidecar) not found: build it with build_cache(samples, S, dir) '
                'and pass CacheInfo.path')
        meta = json.loads(meta_path.read_text())
        if meta.get('version') != _CACHE_VERSION or 'offsets' not in meta:
            raise ValueError(f'{self.cache_path} was written by another version of fastdata; call build_cache '
                             'again (it writes a new file) and pass the new CacheInfo.path')
        self.labels: list[int] = list(meta['labels'])
        self.short_side: int = int(meta['short_side'])
        self.offsets = np.asarray(meta['offsets'], dtype=np.int64)
        self.shapes = np.asarray(meta['shapes'], dtype=np.int64).reshape(-1, 2)
        self._arr: Optional[np.ndarray] = None
        expected = int((self.shapes[:, 0] * self.shapes[:, 1] * 3).sum())
        if len(self.offsets) != len(self.labels) or self.cache_path.stat().st_size != expected:
            raise ValueError(f'{self.cache_path}: {self.cache_path.stat().st_size} bytes, the sidecar describes '
                             f'{expected}; delete the file and its .json so build_cache rebuilds it')

    def _array(self) -> np.ndarray:
        if self._arr is None:
            # copy-on-write: tensor views need a writable array, and a stray write must never reach the file
            self._arr = np.memmap(self.cache_path, dtype=np.uint8, mode='c')
        return self._arr

    def _hwc(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        start = self.offsets[i]
        return self._array()[start:start + h * w * 3].reshape(h, w, 3)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state['_arr'] = None  # each worker maps the file itself
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self._hwc(idx))).permute(2, 0, 1)  # a copy the caller may modify
        return img, self.labels[idx]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # views into the map, no copy yet: the collate function pads them into a batch, or a worker-side
        # BatchAugment crops straight from them (the canvas copy was ~40 % of a worker's time at 224 px)
        idx = np.asarray(indices, dtype=np.int64)
        out = _Batch((torch.from_numpy(self._hwc(int(i))).permute(2, 0, 1), self.labels[i]) for i in indices)
        out.read_order = np.argsort(self.offsets[idx], kind='stable').tolist()  # file order: sequential reads
        return out


# Sampling at a crop's edge reads at most 1 (bilinear) or 2 (bicubic) pixels beyond it: a ring this wide of
# repeated edge pixels makes a padded image sample exactly like the image alone. Filling the whole padding with
# repeated edges instead cost ~4x the copy of the image itself (strided 3-byte writes).
_EDGE_RING = 2


def _paste(canvas_hwc: np.ndarray, img_hwc: np.ndarray) -> None:
    """Copy an image into the top-left of a zeroed canvas and repeat its last columns and rows over the ring."""
    h, w = img_hwc.shape[:2]
    ring_h, ring_w = min(canvas_hwc.shape[0], h + _EDGE_RING), min(canvas_hwc.shape[1], w + _EDGE_RING)
    canvas_hwc[:h, :w] = img_hwc
    if ring_w > w:
        canvas_hwc[:h, w:ring_w] = canvas_hwc[:h, w - 1:w]
    if ring_h > h:
        canvas_hwc[h:ring_h, :ring_w] = canvas_hwc[h - 1:h, :ring_w]


_POOL: dict[str, Any] = {}


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool for the CPU crops; a new one after a fork (a forked child has none of the threads)."""
    if _POOL.get('pid') != os.getpid() or _POOL.get('threads') != threads:
        if _POOL.get('pid') == os.getpid():
            _POOL['pool'].shutdown(wait=False)
        _POOL.update(pid=os.getpid(), threads=threads, pool=ThreadPoolExecutor(threads, thread_name_prefix='crops'))
    return _POOL['pool']


def _new_uint8(shape: tuple[int, ...], zeroed: bool = False) -> torch.Tensor:
    """A new uint8 tensor; in a DataLoader worker it lives in shared memory (what default_collate does), so
    the batch is not copied again on its way to the main process."""
    if torch.utils.data.get_worker_info() is None:
        return torch.zeros(shape, dtype=torch.uint8) if zeroed else torch.empty(shape, dtype=torch.uint8)
    # new shared memory is a fresh, truncated shm file: the kernel hands it out zero-filled either way
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


class _Batch(list):
    """``(image, label)`` samples whose images are read-only views of a cache (any collate_fn works; a copying
    one such as torch's default or :func:`collate_padded` is safe), with the order to read them in."""
    read_order: list[int]


def collate_padded(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collate_fn`` for images of different sizes: ``(uint8 [B, 3, H, W] padded, int64 labels [B], sizes [B, 2])``.

    ``sizes[k] = (h, w)`` of image ``k``; ``H, W`` are the largest. Pass ``sizes`` on to :class:`BatchAugment`.

    Example::

        >>> loader = DataLoader(CachedDataset(info.path), batch_size=32, collate_fn=collate_padded)
        >>> images, labels, sizes = next(iter(loader))
    """
    canvas, sizes = _pad([img for img, _ in samples], getattr(samples, 'read_order', None))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return canvas, labels, sizes


def _pad(images: Sequence[torch.Tensor], order: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, h, w]`` CPU images -> (``[B, 3, H, W]`` canvas of the first one's dtype, channels_last in memory,
    ``[B, 2]`` sizes)."""
    sizes = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.int64)
    shape = (len(images), int(sizes[:, 0].max()), int(sizes[:, 1].max()), 3)
    dtype = images[0].dtype
    canvas = _new_uint8(shape, zeroed=True) if dtype == torch.uint8 else torch.zeros(shape, dtype=dtype)
    c = canvas.numpy()
    for k in (range(len(images)) if order is None else order):
        _paste(c[k], images[k].permute(1, 2, 0).numpy())
    return canvas.permute(0, 3, 1, 2), sizes


class DeviceCache:
    """A :func:`build_cache` file held whole in (accelerator) memory: the loader then only draws indices.

    ``batch(indices)`` returns what :func:`collate_padded` makes of the same images, ``(uint8 [B, 3, H, W] padded
    batch, [B, 2] sizes)``, built by one gather on the cache's device instead of reading, padding, pinning and
    copying each batch on the host: on a GPU the host side of the data path is gone. It needs memory for the
    whole cache (``CacheInfo.n_bytes``; pets at 224 px: about 270 KB an image).

    Example::

        >>> cache = DeviceCache(CachedDataset(info.path), torch.device('cuda'))
        >>> loader = DataLoader(IndexDataset(cache.labels), batch_size=64, shuffle=True)
        >>> for indices, labels in loader:
        ...     x = augment(*cache.batch(indices))      # the same crops as from collate_padded batches
    """

    def __init__(self, dataset: CachedDataset, device: str | torch.device = 'cpu'):
        self.device = torch.device(device)
        nbytes = int(dataset.cache_path.stat().st_size)
        if self.device.type == 'cuda':
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > 0.5 * free:  # leave the model, its optimizer and activations the larger part
                raise MemoryError(
                    f'{dataset.cache_path} holds {nbytes / 2**30:.2f} GiB, more than half of the {free / 2**30:.2f} '
                    f'GiB free on {self.device}: keep the cache on the host (no --cache-on-device)')
        # the file is rows of RGB pixels; every image starts on a pixel, so it is one [N, 3] table
        self.pixels = torch.from_numpy(np.asarray(dataset._array())).view(-1, 3).to(self.device)
        self.first_pixel = torch.as_tensor(dataset.offsets // 3, dtype=torch.int64, device=self.device)
        self.shapes = torch.as_tensor(dataset.shapes, dtype=torch.int64, device=self.device)
        self.labels: list[int] = list(dataset.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` as a padded uint8 batch on the cache's device, channels_last in memory (as
        :func:`collate_padded` lays it out), and their ``(h, w)``.

        Example::

            >>> ds = CachedDataset(info.path)
            >>> images, sizes = DeviceCache(ds).batch([0, 1])   # on the CPU here; torch.device('cuda') on a GPU
            >>> torch.equal(images, collate_padded([ds[0], ds[1]])[0]), images.dtype
            (True, torch.uint8)
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.device)
        hw = self.shapes[idx]
        height, width = (int(v) for v in hw.max(dim=0).values.tolist())
        h, w = hw[:, 0].view(-1, 1, 1), hw[:, 1].view(-1, 1, 1)
        ys = torch.arange(height, device=self.device).view(1, -1, 1)
        xs = torch.arange(width, device=self.device).view(1, 1, -1)
        # pixel (y, x) of the canvas is the image's (min(y, h-1), min(x, w-1)) inside the edge ring, 0 beyond
        src = self.first_pixel[idx].view(-1, 1, 1) + ys.minimum(h - 1) * w + xs.minimum(w - 1)
        canvas = self.pixels[src]
        outside = (ys >= h + _EDGE_RING) | (xs >= w + _EDGE_RING)
        canvas.masked_fill_(outside[..., None], 0)
        return canvas.permute(0, 3, 1, 2), hw

    def feeding(self, augment: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``augment`` (a :class:`BatchAugment`) fed from this cache: ``indices -> model input``.

        Example::

            >>> cache = DeviceCache(CachedDataset(info.path))   # a cache built with short_side=64
            >>> to_input = cache.feeding(BatchAugment(56, (0.5,) * 3, (0.5,) * 3, train=False))
            >>> to_input(torch.tensor([0, 1])).shape
            torch.Size([2, 3, 56, 56])
        """
        return lambda indices: augment(*self.batch(indices))


class IndexDataset(Dataset):
    """``dataset[i] -> (i, label)``: what the loader draws when the pixels live in a :class:`DeviceCache`.

    Example::

        >>> IndexDataset([3, 1, 4])[2]
        (2, 4)
    """

    def __init__(self, labels: Sequence[int]):
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[int, int]:
        return idx, self.labels[idx]


class CollateThenTransform:
    """``collate_fn`` that runs a batch transform where the batch is made (in a loader worker, or in the training
    process with ``num_workers=0``): ``(transformed images, labels, sizes of the output)``.

    A ``BatchAugment`` method (``resample`` or ``forward``) receives the batch's images as a list (no padded copy);
    any other ``callable(images, sizes)`` gets the padded batch of :func:`collate_padded`.

    Example::

        >>> aug = BatchAugment(224, mean, std, train=True)
        >>> collate = CollateThenTransform(aug.resample)   # uint8 crops; aug.normalize them in the training loop
        >>> loader = DataLoader(CachedDataset(info.path), batch_size=32, collate_fn=collate)
    """

    def __init__(self, batch_transform: Optional[Callable[..., torch.Tensor]] = None):
        self.batch_transform = batch_transform

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(getattr(self.batch_transform, '__self__', None), BatchAugment):
            # BatchAugment takes the images as a list: CPU crops come straight from the cache, no padded copy
            labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
            images: Any = [img for img, _ in samples]
        else:
            images, labels, sizes = collate_padded(samples)
        if self.batch_transform is not None:
            with torch.no_grad():
                images = self.batch_transform(images) if isinstance(images, list) else \
                    self.batch_transform(images, sizes)
            sizes = torch.tensor([list(images.shape[-2:])] * len(labels), dtype=torch.int64)
        return images, labels, sizes


def make_fast_loader(
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        batch_transform: Optional[Callable[..., torch.Tensor]] = None,
) -> DataLoader:
    """DataLoader with the settings that suit a :class:`CachedDataset` (uint8 batches, cheap per item).

    Batches are ``(images, labels, sizes)`` as :func:`collate_padded` makes them.

    Args:
        dataset: usually a :class:`CachedDataset`.
        batch_size, shuffle, drop_last: as in ``DataLoader``.
        num_workers: loader processes. Reading from the cache is cheap, so 1-2 are plenty without
            ``batch_transform``.
        pin_memory: page-locked batches for fast, asynchronous host-to-GPU copies; only used when CUDA is
            available (it is meaningless, and warns, on CPU).
        persistent_workers: keep workers (and their memory maps) alive across epochs; only if ``num_workers > 0``.
        seed: seeds the shuffle order and the workers' torch RNG, so two loaders with the same seed yield the
            same batches (and, with ``batch_transform``, the same augmentations).
        batch_transform: optional ``callable(images, sizes)`` run on each padded uint8 batch where it is made
            (see :class:`CollateThenTransform`); the batch's ``sizes`` are then those of its output. A
            ``BatchAugment`` method instead receives the list of the batch's images (no padded copy). When
            training on CPU pass ``augment.resample`` with ``num_workers=0`` (on 2 cores that measured ~1900
            images/s at 224 px against ~1500 with 2 workers, which pass 4.8 MB batches between processes) and
            call ``augment.normalize`` on the batches in the training loop. On a GPU leave it ``None`` and run
            the whole ``augment`` there.

    Example::

        >>> loader = make_fast_loader(CachedDataset(info.path), batch_size=64, shuffle=True, seed=42)
        >>> images, labels, sizes = next(iter(loader))   # uint8 [64, 3, H, W], int64 [64], int64 [64, 2]
    """
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        collate_fn=CollateThenTransform(batch_transform),
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None, generator=g,
    )


class BatchAugment(nn.Module):
    """Random-resized-crop + flip + normalize (train) or center crop + normalize (eval) on uint8 batches.

    Args:
        img_size: output side.
        mean, std: per-channel normalization in [0, 1] units (e.g. ``model.pretrained_cfg['mean']``).
        train: random crops and flips if True, else timm's center crop.
        scale, ratio: RandomResizedCrop area fraction (of each image's own ``h x w``) and aspect-ratio range;
            the sampling follows timm's ``RandomResizedCropAndInterpolation.get_params`` (10 attempts, then the
            central crop).
        hflip: probability of a horizontal flip.
        interpolation: ``'bilinear'`` or ``'bicubic'``, for resizing crops (antialiased on CPU). Each crop is
            resampled a second time (the cache was the first), which blurs; bicubic keeps crops sharper, closer
            to timm's single PIL resize of the original file (see the module doc).
        color_jitter: brightness, contrast and saturation factors drawn from ``[1 - cj, 1 + cj]`` and applied in
            a random order per image after the crop, as torchvision's ``ColorJitter(cj, cj, cj)`` in timm's train
            transform (its default there is 0.4); 0 turns it off.
        crop_pct: eval crop fraction, as in timm's eval transform.
        channels_last: return the batch in channels_last memory format.

    A batch may be padded (images of different sizes, see :func:`collate_padded`): pass its ``sizes`` and
    every crop box is sampled inside its own image, and the eval crop is centred on it.

    On an accelerator all crops of a batch are resampled in one bilinear ``grid_sample`` call (no Python loop
    per image). With ``S = floor(img_size / crop_pct)`` a crop is shrunk by at most ``1 / crop_pct`` (1.14x),
    where bilinear sampling needs no antialiasing; when some crop is shrunk by more than 1.5x (a cache much
    larger than ``img_size``) the batch goes through ``torchvision.ops.roi_align`` instead, which averages
    several samples per output pixel like PIL's antialiased resize. On CPU a uint8 batch takes a faster route:
    one antialiased uint8 resize per crop (same boxes and flips, values within a grey level or two of the
    batched path). Randomness comes from ``generator`` if given to ``forward``, else from torch's global RNG.
    ``resample`` and ``normalize`` are the two halves of ``forward`` (e.g. resample in loader workers, where
    uint8 batches are cheap to pass, normalize in the training process).

    Example::

        >>> aug = BatchAugment(224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), train=True)
        >>> aug(torch.randint(0, 256, (8, 3, 256, 256), dtype=torch.uint8)).shape
        torch.Size([8, 3, 224, 224])
        >>> sizes = torch.tensor([[256, 341], [300, 256]])   # (h, w) of two images padded to 300 x 341
        >>> aug(torch.randint(0, 256, (2, 3, 300, 341), dtype=torch.uint8), sizes).shape
        torch.Size([2, 3, 224, 224])
    """

    def __init__(
            self,
            img_size: int,
            mean: Sequence[float],
            std: Sequence[float],
            train: bool,
            scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3),
            hflip: float = 0.5,
            color_jitter: float = 0.0,
            interpolation: str = 'bilinear',
            crop_pct: float = 0.875,
            channels_last: bool = False,
    ):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f'mean and std need 3 values (RGB), got {mean!r} and {std!r}')
        if interpolation not in ('bilinear', 'bicubic'):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        if not 0.0 <= color_jitter:
            raise ValueError(f'color_jitter must be >= 0 (0 = off), got {color_jitter}')
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f'need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}')
        self.img_size = int(img_size)
        self.train_mode = bool(train)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.color_jitter = float(color_jitter)
        self.interpolation = interpolation
        self.crop_pct = float(crop_pct)
        self.channels_last = channels_last
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add
        self.register_buffer('mul', 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer('sub', mean_t / std_t, persistent=False)

    def extra_repr(self) -> str:
        return (f'img_size={self.img_size}, train={self.train_mode}, scale={self.scale}, ratio={self.ratio}, '
                f'hflip={self.hflip}, color_jitter={self.color_jitter}, interpolation={self.interpolation}, '
                f'crop_pct={self.crop_pct}')

    def sample_boxes(self, batch: int, height: int | torch.Tensor, width: int | torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Crop boxes ``[B, 4]`` as ``(x1, y1, x2, y2)`` pixel edges, timm's RandomResizedCrop rule, vectorized.

        ``height`` and ``width`` are one size for the whole batch or one per image (``[B]`` tensors).

        Example::

            >>> BatchAugment(224, (0.5,) * 3, (0.5,) * 3, train=True).sample_boxes(2, 256, 341).shape
            torch.Size([2, 4])
        """
        attempts = 10
        height = torch.as_tensor(height, dtype=torch.float64).reshape(-1).expand(batch)
        width = torch.as_tensor(width, dtype=torch.float64).reshape(-1).expand(batch)
        area = (height * width)[:, None]
        u = torch.rand(batch, attempts, 2, generator=generator, dtype=torch.float64)
        target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        ok = (w <= width[:, None]) & (h <= height[:, None]) & (w >= 1) & (h >= 1)
        first = ok.to(torch.uint8).argmax(dim=1)  # first valid attempt, as in the sequential loop
        any_ok = ok.any(dim=1)
        w = w.gather(1, first[:, None])[:, 0]
        h = h.gather(1, first[:, None])[:, 0]
        # fallback: central crop clamped to the ratio range
        in_ratio = width / height
        too_tall, too_wide = in_ratio < self.ratio[0], in_ratio > self.ratio[1]
        fw = torch.where(too_wide, torch.round(height * self.ratio[1]), width)
        fh = torch.where(too_tall, torch.round(width / self.ratio[0]), height)
        w = torch.where(any_ok, w, fw)
        h = torch.where(any_ok, h, fh)
        pos = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
        # random.randint(0, n) is uniform over n + 1 integers
        i = torch.minimum(torch.floor(pos[:, 0] * (height - h + 1)), height - h)
        j = torch.minimum(torch.floor(pos[:, 1] * (width - w + 1)), width - w)
        i = torch.where(any_ok, i, torch.floor((height - h) / 2))
        j = torch.where(any_ok, j, torch.floor((width - w) / 2))
        return torch.stack([j, i, j + w, i + h], dim=1)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], sizes: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 (or float in 0..255) ``[B, 3, H, W]`` on any device -> float32 normalized ``[B, 3, img, img]``.

        ``sizes``: ``[B, 2]`` ``(h, w)`` of each image in a padded batch (None: every image fills ``H x W``).
        ``x`` may also be a list of ``[3, h, w]`` images of different sizes (``sizes`` None): the same result as
        their padded batch, without the padded copy on the CPU uint8 route.
        """
        return self.normalize(self.resample(x, sizes, generator), inplace=True)  # resample's output is ours

    def resample(self, x: torch.Tensor | Sequence[torch.Tensor], sizes: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The geometric part alone: crops/flips (train) or the center crop (eval), resized to ``img_size``.

        Keeps pixel values in 0..255; a uint8 batch on CPU stays uint8 (a quarter of the bytes to move between
        processes), on other devices train crops come out float32. ``normalize`` finishes the job.

        Example::

            >>> aug = BatchAugment(224, (0.5,) * 3, (0.5,) * 3, train=True)
            >>> crops = aug.resample(torch.randint(0, 256, (2, 3, 256, 341), dtype=torch.uint8))
            >>> crops.dtype, tuple(crops.shape)
            (torch.uint8, (2, 3, 224, 224))
        """
        if isinstance(x, (list, tuple)):
            return self._resample_list(list(x), sizes, generator)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f'BatchAugment expects a [B, 3, H, W] batch, got shape {tuple(x.shape)}')
        b, _, height, width = x.shape
        if sizes is not None:
            sizes = torch.as_tensor(sizes).to('cpu', torch.int64)
            if sizes.shape != (b, 2) or (sizes < 1).any() or (sizes[:, 0] > height).any() or \
                    (sizes[:, 1] > width).any():
                raise ValueError(f'sizes must be [B, 2] (h, w) pairs inside the {height}x{width} batch, got '
                                 f'{sizes.tolist()}')
            if bool((sizes == torch.tensor([height, width])).all()):
                sizes = None  # nothing is padded: the whole-batch route
        if not self.train_mode:
            return self._center(x, sizes)
        if sizes is None:
            boxes = self.sample_boxes(b, height, width, generator)
        else:
            boxes = self.sample_boxes(b, sizes[:, 0], sizes[:, 1], generator)
        flip = self._flips(b, generator)
        if x.device.type == 'cpu' and x.dtype == torch.uint8:
            out = self._crops_uint8_cpu(x.unbind(0), boxes, flip)
        else:
            out = self._crops_grid(x, boxes, flip)
        return self.jitter(out, generator) if self.color_jitter > 0 else out

    def _resample_list(self, images: list[torch.Tensor], sizes: Optional[torch.Tensor],
                       generator: Optional[torch.Generator]) -> torch.Tensor:
        """``resample`` for a list of ``[3, h, w]`` images; the random draws are those of their padded batch."""
        if sizes is not None:
            raise ValueError('a list of images carries its own sizes: pass sizes=None')
        if not images or any(img.dim() != 3 or img.shape[0] != 3 for img in images):
            raise ValueError(f'BatchAugment expects a non-empty list of [3, h, w] images, got shapes '
                             f'{[tuple(img.shape) for img in images]}')
        on_cpu_uint8 = all(img.device.type == 'cpu' and img.dtype == torch.uint8 for img in images)
        if not self.train_mode:
            return torch.cat([self._center_same_size(img[None], *img.shape[-2:]) for img in images])
        if not on_cpu_uint8:  # the batched float route needs one tensor: pad on the host, move back
            device = images[0].device
            canvas, hw = _pad([img.cpu() for img in images])
            return self.resample(canvas.to(device), hw, generator)
        hw = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.int64)
        boxes = self.sample_boxes(len(images), hw[:, 0], hw[:, 1], generator)
        out = self._crops_uint8_cpu(images, boxes, self._flips(len(images), generator))
        return self.jitter(out, generator) if self.color_jitter > 0 else out

    def _flips(self, b: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.hflip <= 0:
            return torch.zeros(b, dtype=torch.bool)
        return torch.rand(b, generator=generator) < self.hflip

    def jitter(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """torchvision's ColorJitter(brightness, contrast, saturation) for a whole batch, one draw per image.

        Each image gets its own three factors in ``[1 - cj, 1 + cj]`` and its own order of the three operations;
        each operation blends with the same "degenerate" image as torchvision and PIL (black, the mean grey
        level, the grey image) and clips to 0..255. A uint8 batch goes back to uint8 after each operation (truncated,
        as PIL's enhancers do); a float batch (0..255) stays float and is modified in place.

        Example::

            >>> aug = BatchAugment(8, (0.5,) * 3, (0.5,) * 3, train=True, color_jitter=0.4)
            >>> aug.jitter(torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)).dtype
            torch.uint8
        """
        b = x.shape[0]
        lo, hi = max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter
        factors = (lo + (hi - lo) * torch.rand(b, 3, generator=generator, dtype=torch.float64)).float().to(x.device)
        order = torch.argsort(torch.rand(b, 3, generator=generator), dim=1).to(x.device)  # a permutation per image
        is_uint8 = x.dtype == torch.uint8
        out = x.float() if is_uint8 else x
        gray_w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)  # ITU-R 601-2, as PIL's 'L'
        for slot in range(3):
            op = order[:, slot]  # 0 brightness, 1 contrast, 2 saturation
            f = factors.gather(1, op[:, None]).view(b, 1, 1, 1)
            gray = (out * gray_w).sum(1, keepdim=True)
            if is_uint8:
                gray = gray.round_()  # PIL's convert('L') is uint8
            mean = gray.mean((2, 3), keepdim=True)
            if is_uint8:
                mean = mean.round_()  # PIL's contrast uses the rounded mean grey level
            op = op.view(b, 1, 1, 1)
            degenerate = torch.where(op == 2, gray, torch.where(op == 1, mean, torch.zeros_like(mean)))
            out = out.mul_(f).add_(degenerate * (1.0 - f)).clamp_(0.0, 255.0)
            if is_uint8:
                out = out.floor_()  # PIL's Image.blend truncates to uint8
        return out.to(torch.uint8) if is_uint8 else out

    def normalize(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """0..255 values -> float32 ``(x / 255 - mean) / std``, in the requested memory format.

        A float32 input is modified in place only with ``inplace=True``.

        Example::

            >>> aug = BatchAugment(8, mean=(0.5,) * 3, std=(0.5,) * 3, train=False)
            >>> aug.normalize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).unique()
            tensor([-1.])
        """
        if x.dtype != torch.float32:
            out = x.float()
        else:
            out = x if inplace else x.clone()
        out = out.mul_(self.mul.to(x.device)).sub_(self.sub.to(x.device))
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _crops_uint8_cpu(self, images: Sequence[torch.Tensor], boxes: torch.Tensor,
                         flip: torch.Tensor) -> torch.Tensor:
        """CPU: one antialiased uint8 resize per crop. Unlike the batched float path this loops in Python, but
        torch's uint8 bilinear-antialias kernel (the one torchvision uses) on the channels_last cache batch plus
        uint8 output is several times cheaper than converting the whole batch to float for ``grid_sample``, and
        it antialiases like PIL at any shrink factor. One resize uses one core, so the crops are spread over
        ``torch.get_num_threads()`` threads (torch releases the GIL while it resizes); inside DataLoader
        workers that is 1 thread."""
        size = (self.img_size, self.img_size)
        out = _new_uint8((len(images), 3) + size)
        boxes_list = boxes.to(torch.int64).tolist()
        flips = flip.tolist()

        def crop_some(indices: Sequence[int]) -> None:
            for i in indices:
                x1, y1, x2, y2 = boxes_list[i]
                crop = F.interpolate(images[i][None, :, y1:y2, x1:x2], size=size, mode=self.interpolation,
                                     align_corners=False, antialias=True)[0]
                out[i] = crop.flip(-1) if flips[i] else crop

        threads = min(torch.get_num_threads(), len(images))
        if threads > 1:
            list(_thread_pool(threads).map(crop_some, [range(k, len(images), threads) for k in range(threads)]))
        else:
            crop_some(range(len(images)))
        return out

    def _crops_grid(self, x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Accelerators: all crops in one batched resampling call, float32 out."""
        b, _, height, width = x.shape
        out_size = self.img_size
        shrink = float(torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max()) / out_size
        if shrink > 1.5:
            # Bilinear sampling aliases when a crop is shrunk a lot (a cache much larger than img_size):
            # roi_align averages several samples per output pixel instead.
            from torchvision.ops import roi_align  # local: keeps `import finetune` light
            rois = torch.cat([torch.arange(b, dtype=torch.float64)[:, None], boxes], dim=1)
            out = roi_align(x.float(), rois.to(device=x.device, dtype=torch.float32),
                            output_size=out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            return torch.where(flip.to(x.device)[:, None, None, None], out.flip(3), out)
        # One grid_sample for the whole batch. The sampling grid is separable (x depends on the column, y on the
        # row), so it is built by broadcasting instead of affine_grid's batched matmul; a flip is a crop box
        # traversed right-to-left, so it costs nothing.
        x1, y1, x2, y2 = boxes.unbind(1)
        x_start = torch.where(flip, x2, x1)
        x_step = torch.where(flip, x1 - x2, x2 - x1) / out_size
        centers = torch.arange(out_size, dtype=torch.float64) + 0.5
        # pixel-edge coordinates -> grid_sample's normalized coordinates (align_corners=False)
        gx = (x_start[:, None] + centers[None] * x_step[:, None]) * (2.0 / width) - 1.0
        gy = (y1[:, None] + centers[None] * ((y2 - y1) / out_size)[:, None]) * (2.0 / height) - 1.0
        grid = torch.empty(b, out_size, out_size, 2, device=x.device)
        grid[..., 0] = gx.to(device=x.device, dtype=torch.float32)[:, None, :]
        grid[..., 1] = gy.to(device=x.device, dtype=torch.float32)[:, :, None]
        out = F.grid_sample(x.float(), grid, mode=self.interpolation, padding_mode='border', align_corners=False)
        return out.clamp_(0, 255) if self.interpolation == 'bicubic' else out  # bicubic overshoots at edges

    def _center(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """timm eval: resize shortest side to floor(img/crop_pct), center crop img. In cache pixels that is a
        central crop of img * S / floor(img/crop_pct) pixels resized to img (an exact slice when S matches)."""
        if sizes is None:
            return self._center_same_size(x, *x.shape[-2:])
        return torch.cat([self._center_same_size(x[k:k + 1], h, w) for k, (h, w) in enumerate(sizes.tolist())])

    def _center_same_size(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        scale_size = math.floor(self.img_size / self.crop_pct)
        crop = self.img_size * min(height, width) / scale_size
        ch = cw = int(round(crop))
        top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
        out = x[:, :, top:top + ch, left:left + cw]
        if (ch, cw) != (self.img_size, self.img_size):
            if not (out.device.type == 'cpu' and out.dtype == torch.uint8):  # uint8 antialias: CPU kernel only
                out = out.float()
            out = F.interpolate(out, size=(self.img_size, self.img_size), mode=self.interpolation, align_corners=False,
                                antialias=True)
            if out.is_floating_point():
                out = out.clamp_(0, 255)
        return out.contiguous()
