"""Tests for finetune/fastdata.py: the decode-once cache, the cached dataset/loader and BatchAugment."""
from __future__ import annotations

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.errors import FinetuneError
from finetune.fastdata import (BatchAugment, CachedDataset, DeviceCache, IndexDataset, build_cache, collate_padded,
                               default_short_side,
                               load_and_resize, make_fast_loader)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write_images(folder: Path, n: int, size=(48, 36), seed: int = 0) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        w, h = size if i % 2 == 0 else size[::-1]  # landscape and portrait
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = folder / f'img_{i}.jpg'
        Image.fromarray(arr).save(path, quality=90)
        samples.append((str(path), i % 3))
    return samples


def _leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_build_reuse_and_contents(tmp_path):
    samples = _write_images(tmp_path / 'img', 6)
    info = build_cache(samples, 20, tmp_path / 'cache', num_workers=0)
    assert info.built and info.n_images == 6 and info.n_skipped == 0
    assert info.labels == [lab for _, lab in samples] and info.kept_indices == list(range(6))
    ds = CachedDataset(info.path)
    img, label = ds[3]  # a 36 x 48 portrait: short side 20, aspect ratio kept
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 26, 20) and label == samples[3][1]
    assert tuple(ds[2][0].shape) == (3, 20, 26)
    assert torch.equal(img, torch.from_numpy(load_and_resize(samples[3][0], 20)))
    # batched fetch keeps the requested order (it reads in file order internally) and pads to the largest image
    got = ds.__getitems__([4, 3, 4, 2])
    for (im, lab), i in zip(got, [4, 3, 4, 2]):
        assert torch.equal(im, ds[i][0]) and lab == samples[i][1]
    images, labels, sizes = collate_padded(got)
    assert tuple(images.shape) == (4, 3, 26, 26) and sizes.tolist() == [[20, 26], [26, 20], [20, 26], [20, 26]]
    assert labels.tolist() == [samples[i][1] for i in [4, 3, 4, 2]]
    # the padding repeats the last row / column twice (what sampling at a crop's edge can reach), zeros beyond
    assert torch.equal(images[0, :, 20:22, :], images[0, :, 19:20, :].expand(3, 2, 26))
    assert torch.equal(images[1, :, :, 20:22], images[1, :, :, 19:20].expand(3, 26, 2))
    assert not images[0, :, 22:].any() and not images[1, :, :, 22:].any()
    # any collate path gives the same batch: plain samples (no __getitems__) are padded the same way
    plain = collate_padded([ds[i] for i in [4, 3, 4, 2]])
    assert all(torch.equal(a, b) for a, b in zip(plain, (images, labels, sizes)))
    again = build_cache(samples, 20, tmp_path / 'cache', num_workers=0)
    assert not again.built and again.path == info.path


def test_key_invalidation(tmp_path):
    samples = _write_images(tmp_path / 'img', 4)
    cache = tmp_path / 'cache'
    first = build_cache(samples, 16, cache, num_workers=0)
    # a different size is a different cache
    other = build_cache(samples, 18, cache, num_workers=0)
    assert other.built and other.path != first.path
    # a changed file (new content, new mtime) rebuilds, and the new pixels are served
    path = Path(samples[1][0])
    Image.fromarray(np.full((36, 48, 3), 7, np.uint8)).save(path, quality=95)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = build_cache(samples, 16, cache, num_workers=0)
    assert changed.built and changed.path != first.path
    assert abs(CachedDataset(changed.path)[1][0].float().mean().item() - 7) < 2
    # changed labels rebuild too
    relabeled = build_cache([(p, 0) for p, _ in samples], 16, cache, num_workers=0)
    assert relabeled.built and relabeled.labels == [0] * 4


def test_corrupt_files_are_counted_not_fatal(tmp_path):
    samples = _write_images(tmp_path / 'img', 5)
    good = Path(samples[0][0]).read_bytes()
    truncated = tmp_path / 'img' / 'truncated.jpg'
    truncated.write_bytes(good[: len(good) // 2])
    not_image = tmp_path / 'img' / 'notes.jpg'
    not_image.write_text('not a jpeg')
    bad = [(str(truncated), 1), (str(not_image), 2), (str(tmp_path / 'missing.jpg'), 0)]
    all_samples = samples[:2] + bad + samples[2:]
    for workers in (0, 2):  # in-process and through the multiprocessing pool
        info = build_cache(all_samples, 16, tmp_path / f'cache{workers}', num_workers=workers)
        assert info.n_skipped == 3 and info.n_images == 5
        assert sorted(info.skipped) == sorted(p for p, _ in bad)
        assert info.kept_indices == [0, 1, 5, 6, 7]
        ds = CachedDataset(info.path)
        assert len(ds) == 5 and ds.labels == [all_samples[i][1] for i in info.kept_indices]
        assert torch.equal(ds[2][0], torch.from_numpy(load_and_resize(samples[2][0], 16)))


def test_all_corrupt_raises_clear_error(tmp_path):
    bad = tmp_path / 'bad.jpg'
    bad.write_text('nope')
    with pytest.raises(FinetuneError, match='none of the 1 images.*--data-dir'):  # the CLI's clean error
        build_cache([(str(bad), 0)], 16, tmp_path / 'cache', num_workers=0)
    assert _leftovers(tmp_path / 'cache') == []


@pytest.mark.parametrize('workers', [0, 2])
def test_interrupted_build_leaves_nothing(tmp_path, workers):
    samples = _write_images(tmp_path / 'img', 8)
    cache = tmp_path / 'cache'

    def boom(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt('simulated interrupt mid-build')

    with pytest.raises(KeyboardInterrupt):
        build_cache(samples, 16, cache, num_workers=workers, progress=boom)
    assert _leftovers(cache) == []  # no partial .npy, no sidecar, no temp file
    info = build_cache(samples, 16, cache, num_workers=workers)  # and the next build works from scratch
    assert info.built and info.n_images == 8
    assert sorted(_leftovers(cache)) == sorted([info.path.name, info.path.with_suffix('.json').name])


def test_batch_augment_shapes_dtype_normalization():
    value = 200
    x = torch.full((5, 3, 40, 40), value, dtype=torch.uint8)
    expected = torch.tensor([(value / 255 - m) / s for m, s in zip(MEAN, STD)])
    for train in (True, False):
        aug = BatchAugment(32, MEAN, STD, train=train)
        out = aug(x)
        assert out.dtype == torch.float32 and tuple(out.shape) == (5, 3, 32, 32)
        # any crop, flip or resize of a constant image is the same constant, normalized per channel
        assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)
    cl = BatchAugment(32, MEAN, STD, train=True, channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\]'):
        BatchAugment(32, MEAN, STD, train=True)(x[0])


def test_train_full_crop_matches_plain_resize_and_flip():
    """scale=ratio=1 crops the whole square: a plain resize; hflip=1 mirrors it. Checked for both routes:
    uint8 on CPU (antialiased uint8 resize per crop) and float (the batched grid_sample used on GPUs)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    ident = dict(mean=(0, 0, 0), std=(1 / 255,) * 3, train=True, scale=(1, 1), ratio=(1, 1))
    interp = torch.nn.functional.interpolate
    ref_u8 = interp(x, size=32, mode='bilinear', antialias=True, align_corners=False).float()
    ref_f = interp(x.float(), size=32, mode='bilinear', align_corners=False)
    assert torch.equal(BatchAugment(32, hflip=0.0, **ident)(x), ref_u8)
    assert torch.equal(BatchAugment(32, hflip=1.0, **ident)(x), ref_u8.flip(3))
    assert torch.allclose(BatchAugment(32, hflip=0.0, **ident)(x.float()), ref_f, atol=1e-3)
    assert torch.allclose(BatchAugment(32, hflip=1.0, **ident)(x.float()), ref_f.flip(3), atol=1e-3)
    # a 4x shrink on the float route goes through roi_align (area averaging): much closer to an antialiased
    # resize than plain bilinear sampling, which aliases on this noise image
    big = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8).float()
    aa = interp(big, size=24, mode='bilinear', antialias=True, align_corners=False)
    aliased = interp(big, size=24, mode='bilinear', antialias=False, align_corners=False)
    out = BatchAugment(24, hflip=0.0, **ident)(big)
    assert (out - aa).abs().mean() < 0.5 * (aliased - aa).abs().mean()


def test_cpu_and_batched_routes_agree_on_natural_images():
    """Same generator -> same boxes and flips on both routes; pixels differ only by the resampling filter."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 16, 16) * 255, size=64, mode='bicubic',
                                             align_corners=False).clamp(0, 255).round().to(torch.uint8)
    aug = BatchAugment(56, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True)
    cpu = aug(smooth, generator=torch.Generator().manual_seed(1))
    grid = aug(smooth.float(), generator=torch.Generator().manual_seed(1))
    assert (cpu - grid).abs().mean() < 2.0  # grey levels


def test_determinism_with_seeded_generator():
    x = torch.randint(0, 256, (6, 3, 48, 48), dtype=torch.uint8)
    aug = BatchAugment(32, MEAN, STD, train=True)
    a = aug(x, generator=torch.Generator().manual_seed(123))
    b = aug(x, generator=torch.Generator().manual_seed(123))
    c = aug(x, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = aug(x)
    torch.manual_seed(5)
    assert torch.equal(d, aug(x))  # the global RNG when no generator is given


def test_crop_box_sampling_follows_timm_rule():
    """Vectorized boxes: inside the image, in the scale/ratio ranges, same area statistics as timm's sampler."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    size, n = 64, 4000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    aug = BatchAugment(32, MEAN, STD, train=True, scale=scale, ratio=ratio)
    boxes = aug.sample_boxes(n, size, size, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= size).all() and (boxes[:, 3] <= size).all()
    assert (boxes == boxes.round()).all()  # integer pixel boxes, as timm's
    area = (w * h / size**2).numpy()
    assert area.min() >= 0.07 and area.max() <= 1.0
    random.seed(0)
    img = Image.new('RGB', (size, size))
    ref = np.array([hh * ww / size**2 for _, _, hh, ww in
                    (RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n))])
    assert abs(area.mean() - ref.mean()) < 0.02 and abs(np.median(area) - np.median(ref)) < 0.03
    # impossible ranges fall back to timm's central crop
    wide = BatchAugment(32, MEAN, STD, train=True, scale=(1.0, 1.0), ratio=(2.0, 2.0))
    fb = wide.sample_boxes(3, size, size, torch.Generator().manual_seed(0))
    assert torch.equal(fb, torch.tensor([[0.0, 16.0, 64.0, 48.0]] * 3, dtype=fb.dtype))


def test_eval_matches_timm_pil_transform_on_real_image(shared_dir, tmp_path):
    """With S = floor(img/crop_pct) the eval batch equals timm's PIL eval transform; other S are close."""
    import timm.data
    images = sorted((shared_dir / 'data' / 'pets370' / 'oxford-iiit-pet' / 'images').glob('*.jpg'))[:3]
    assert images, f'no pets370 images under {shared_dir}'
    samples = [(str(p), 0) for p in images]
    tf = timm.data.create_transform(224, is_training=False, crop_pct=0.875, interpolation='bilinear',
                                    mean=MEAN, std=STD)
    ref = torch.stack([tf(Image.open(p).convert('RGB')) for p in images])
    # S=256: the same pixels as timm; S=288: resampled twice, 0.07 (normalized) is about 4 grey levels
    for short, tol_max, tol_mean in ((default_short_side(224), 1e-4, 1e-5), (288, None, 0.07)):
        info = build_cache(samples, short, tmp_path / 'cache', num_workers=0)
        ds = CachedDataset(info.path)
        images, _, sizes = collate_padded(ds.__getitems__([0, 1, 2]))
        out = BatchAugment(224, MEAN, STD, train=False, crop_pct=0.875)(images, sizes)
        diff = (out - ref).abs()
        assert diff.mean() < tol_mean, (short, diff.mean())
        if tol_max is not None:
            assert diff.max() < tol_max, (short, diff.max())


def test_fast_loader_batches_and_workers(tmp_path):
    samples = _write_images(tmp_path / 'img', 10)
    ds = CachedDataset(build_cache(samples, 16, tmp_path / 'cache', num_workers=0).path)
    clone = pickle.loads(pickle.dumps(ds))  # workers receive a pickled dataset (without the memory map)
    assert len(clone) == len(ds) and torch.equal(clone[3][0], ds[3][0]) and clone[3][1] == ds[3][1]
    in_proc = list(make_fast_loader(ds, 4, shuffle=True, num_workers=0, seed=3))
    same = list(make_fast_loader(ds, 4, shuffle=True, num_workers=0, seed=3))
    assert [b[1].tolist() for b in in_proc] == [b[1].tolist() for b in same]
    imgs, labels, sizes = in_proc[0]
    assert imgs.dtype == torch.uint8 and labels.dtype == torch.int64 and tuple(sizes.shape) == (4, 2)
    assert tuple(imgs.shape[2:]) == (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    assert (sizes.min(1).values == 16).all() and (sizes.max(1).values == 21).all()  # 48 x 36 at short side 16
    aug = BatchAugment(12, MEAN, STD, train=True)
    run = [list(make_fast_loader(ds, 4, shuffle=True, num_workers=1, seed=3, batch_transform=aug))
           for _ in range(2)]
    assert tuple(run[0][0][0].shape) == (4, 3, 12, 12) and run[0][0][0].dtype == torch.float32
    # worker-side augmentation is reproducible from the loader seed
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*run))
    assert sum(len(b[1]) for b in run[0]) == 10


def test_image_lists_give_the_padded_batch_result(tmp_path):
    """A list of differently sized images (what the loader workers hand a BatchAugment, no padded copy) gives
    exactly the padded batch's crops, flips and jitter, on every route; the cache views never write the file."""
    samples = _write_images(tmp_path / 'img', 6)
    ds = CachedDataset(build_cache(samples, 20, tmp_path / 'cache', num_workers=0).path)
    views = [img for img, _ in ds.__getitems__([5, 0, 3, 2])]
    images, _, sizes = collate_padded([(v, 0) for v in views])
    for kw in (dict(train=True, color_jitter=0.4), dict(train=True, interpolation='bicubic'), dict(train=False)):
        aug = BatchAugment(16, MEAN, STD, **kw)
        for dtype in (torch.uint8, torch.float32):
            want = aug([v.to(dtype) for v in views], generator=torch.Generator().manual_seed(4))
            got = aug(images.to(dtype), sizes, generator=torch.Generator().manual_seed(4))
            assert torch.equal(want, got), (kw, dtype)
    with pytest.raises(ValueError, match='sizes=None'):
        aug(views, sizes)
    with pytest.raises(ValueError, match=r'\[3, h, w\]'):
        aug([views[0][:2]])
    # the worker route (list) and the main-process route (padded) of a loader give the same batches
    aug = BatchAugment(12, MEAN, STD, train=True, color_jitter=0.4)
    torch.manual_seed(0)
    padded = [aug.resample(x, sz) for x, _, sz in make_fast_loader(ds, 3, shuffle=True, num_workers=0, seed=1)]
    torch.manual_seed(0)
    listed = list(make_fast_loader(ds, 3, shuffle=True, num_workers=0, seed=1, batch_transform=aug.resample))
    assert all(torch.equal(a[0], b) for a, b in zip(listed, padded))
    before = ds.cache_path.read_bytes()
    views[0].fill_(7)  # a stray write stays in this process's copy-on-write pages
    assert ds.cache_path.read_bytes() == before


def test_default_short_side():
    assert default_short_side(224) == 256 and default_short_side(224, 0.95) == math.floor(224 / 0.95)


def test_cache_keeps_whole_image_and_caps_the_long_side(tmp_path):
    """The cache keeps the aspect ratio (crops can reach the borders); only panoramas beyond max_aspect are cut."""
    wide = np.zeros((30, 90, 3), np.uint8)  # 3:1, left third red, right third blue
    wide[:, :30, 0] = 255
    wide[:, 60:, 2] = 255
    path = tmp_path / 'wide.png'
    Image.fromarray(wide).save(path)
    assert load_and_resize(str(path), 10, max_aspect=4.0).shape == (3, 10, 30)
    capped = load_and_resize(str(path), 10, max_aspect=2.0)  # the central 20 of 30 columns
    assert capped.shape == (3, 10, 20)
    assert capped[0, :, :3].min() > 200 and capped[2, :, -3:].min() > 200  # both colours survive the cut
    with pytest.raises(ValueError, match='max_aspect'):
        build_cache([(str(path), 0)], 10, tmp_path / 'cache', max_aspect=0.5)


def test_train_crops_reach_the_borders_of_wide_images(tmp_path):
    """A 2:1 photo: crops sample the whole width (the old center-square cache never saw the outer quarters)."""
    img = np.full((32, 64, 3), 128, np.uint8)
    img[:, :12] = (255, 0, 0)
    img[:, -12:] = (0, 0, 255)
    path = tmp_path / 'wide.png'
    Image.fromarray(img).save(path)
    ds = CachedDataset(build_cache([(str(path), 0)] * 1, 32, tmp_path / 'cache', num_workers=0).path)
    images, _, sizes = collate_padded(ds.__getitems__([0] * 64))
    aug = BatchAugment(16, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True, hflip=0.0)
    out = aug(images, sizes, generator=torch.Generator().manual_seed(0))
    red = ((out[:, 0] > 200) & (out[:, 2] < 50)).flatten(1).any(1).float().mean()
    blue = ((out[:, 2] > 200) & (out[:, 0] < 50)).flatten(1).any(1).float().mean()
    assert red > 0.2 and blue > 0.2, (red, blue)


def test_padded_batches_crop_inside_each_image():
    """Boxes stay inside every image's own size; the batched float route and the CPU uint8 route agree, and
    an eval batch equals the images' own center crops."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 12, 12) * 255, size=(48, 64), mode='bicubic',
                                             align_corners=False).clamp(0, 255).round().to(torch.uint8)
    samples = [(smooth[0], 0), (smooth[1, :, :40, :32].contiguous(), 1)]  # 48 x 64 landscape, 40 x 32 portrait
    images, _, sizes = collate_padded(samples)
    assert sizes.tolist() == [[48, 64], [40, 32]]
    aug = BatchAugment(24, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True)
    boxes = aug.sample_boxes(2000, sizes[:, 0].repeat(1000), sizes[:, 1].repeat(1000),
                             torch.Generator().manual_seed(0))
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= sizes[:, 1].repeat(1000)).all() and (boxes[:, 3] <= sizes[:, 0].repeat(1000)).all()
    assert (boxes[0::2, 2] == 64).any() and (boxes[1::2, 2] == 32).any()  # each image's own far edge is reached
    cpu = aug(images, sizes, generator=torch.Generator().manual_seed(1))
    grid = aug(images.float(), sizes, generator=torch.Generator().manual_seed(1))
    assert (cpu - grid).abs().mean() < 2.0
    # the padding is invisible: crops of an image in a padded batch equal crops of the image alone (same boxes),
    # for both routes and resamplers (bicubic reads up to two pixels beyond a crop's edge)
    alone = samples[1][0][None].repeat(100, 1, 1, 1)
    padded = images[1:2].repeat(100, 1, 1, 1)
    for interp in ('bilinear', 'bicubic'):
        a = BatchAugment(24, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True, scale=(0.01, 0.2), interpolation=interp)
        for dtype in (torch.uint8, torch.float32):
            got = a(padded.to(dtype), sizes[1:2].repeat(100, 1), torch.Generator().manual_seed(2))
            want = a(alone.to(dtype), None, torch.Generator().manual_seed(2))
            torch.testing.assert_close(got, want, rtol=0, atol=0.01)  # float grid rounding
    ev = BatchAugment(24, mean=(0, 0, 0), std=(1 / 255,) * 3, train=False, crop_pct=0.875)
    out = ev(images, sizes)
    for k, (img, _) in enumerate(samples):
        assert torch.equal(out[k:k + 1], ev(img[None]))
    with pytest.raises(ValueError, match='sizes must be'):
        aug(images, torch.tensor([[48, 64], [41, 65]]))


def test_cache_from_another_version_is_refused_with_advice(tmp_path):
    samples = _write_images(tmp_path / 'img', 2)
    info = build_cache(samples, 16, tmp_path / 'cache', num_workers=0)
    meta_path = info.path.with_suffix('.json')
    meta = json.loads(meta_path.read_text())
    meta['version'] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='call build_cache'):
        CachedDataset(info.path)


def test_color_jitter_matches_torchvision_on_pil_images():
    """Same factors and order as the batch drew: PIL's enhancers (torchvision's ColorJitter ops) give the same
    pixels within rounding; factor 1 everywhere is the identity; the range comes from color_jitter."""
    import torchvision.transforms.functional as TF
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(6, 3, 6, 6) * 255, size=24, mode='bicubic',
                                        align_corners=False).clamp(0, 255).round().to(torch.uint8)
    aug = BatchAugment(24, MEAN, STD, train=True, color_jitter=0.4)
    out = aug.jitter(x, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the draws: factors, then the per-image order
    factors = 0.6 + 0.8 * torch.rand(6, 3, generator=g, dtype=torch.float64)
    order = torch.argsort(torch.rand(6, 3, generator=g), dim=1)
    assert ((factors >= 0.6) & (factors <= 1.4)).all() and not torch.equal(out, x)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in range(6):
        img = TF.to_pil_image(x[k])
        for op in order[k].tolist():
            img = ops[op](img, float(factors[k, op]))
        ref = TF.pil_to_tensor(img)
        diff = (out[k].int() - ref.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.5, (k, diff.max(), diff.float().mean())
    still = BatchAugment(24, MEAN, STD, train=True, color_jitter=1e-9).jitter(x)
    assert torch.equal(still, x)
    with pytest.raises(ValueError, match='color_jitter'):
        BatchAugment(24, MEAN, STD, train=True, color_jitter=-0.1)
    # in the whole train transform it runs after the crop, on both routes
    crops = BatchAugment(16, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True, color_jitter=0.4)
    a = crops(x, generator=torch.Generator().manual_seed(1))
    b = crops(x.float(), generator=torch.Generator().manual_seed(1))
    plain = BatchAugment(16, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True)(x, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().mean() < 2.0 and (a - plain).abs().mean() > 5.0


def test_bicubic_crops_are_sharper_than_bilinear():
    """The crop resize is the second resampling of a cached image: bicubic keeps more of the detail."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8)
    kw = dict(mean=(0, 0, 0), std=(1 / 255,) * 3, train=True, scale=(0.3, 0.5), hflip=0.0)

    def sharpness(t: torch.Tensor) -> float:
        return (t[..., 1:] - t[..., :-1]).abs().mean().item()

    for route in (lambda t: t, lambda t: t.float()):  # CPU uint8 route and the batched float route
        lin = BatchAugment(32, interpolation='bilinear', **kw)(route(x), generator=torch.Generator().manual_seed(2))
        cub = BatchAugment(32, interpolation='bicubic', **kw)(route(x), generator=torch.Generator().manual_seed(2))
        assert sharpness(cub) > 1.1 * sharpness(lin)
        assert cub.min() >= 0 and cub.max() <= 255  # overshoot is clipped
    with pytest.raises(ValueError, match='interpolation'):
        BatchAugment(32, interpolation='lanczos', **kw)


def test_device_cache_batches_equal_collate_padded(tmp_path):
    """The gathered batch is the host route's padded batch, byte for byte (edge ring and zeros included), in the
    same channels_last layout, for batches of mixed sizes, repeats and a single image."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(9):
        h, w = (int(v) for v in rng.integers(20, 70, 2))
        path = tmp_path / f'{i}.png'
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), i % 4))
    ds = CachedDataset(build_cache(samples, 24, tmp_path / 'cache', num_workers=0).path)
    cache = DeviceCache(ds, 'cpu')
    assert len(cache) == 9 and cache.labels == ds.labels
    for idx in ([0, 1, 2, 3], [8, 3, 3, 5, 7], [4]):
        images, labels, sizes = collate_padded(ds.__getitems__(idx))
        gathered, hw = cache.batch(torch.tensor(idx))
        assert torch.equal(gathered, images) and torch.equal(hw, sizes)
        assert gathered.is_contiguous(memory_format=torch.channels_last)
    # the loader's side: indices and labels only
    assert IndexDataset(ds.labels)[5] == (5, ds.labels[5]) and len(IndexDataset(ds.labels)) == 9
    aug = BatchAugment(16, MEAN, STD, train=False)
    assert torch.equal(cache.feeding(aug)(torch.tensor([0, 1])), aug(*collate_padded(ds.__getitems__([0, 1]))[::2]))
