"""Shared pytest fixtures: where the shared real data lives, and a tiny dataset in the Oxford-IIIT Pets layout."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def shared_dir() -> Path:
    """The shared data/weights folder: $TIMM_DROPFIX_SHARED, else ``shared`` beside the repository.

    Missing folder: a failure under CI (CI=true), a skip otherwise.
    """
    path = Path(os.environ.get('TIMM_DROPFIX_SHARED', REPO.parent / 'shared')).resolve()
    if not path.is_dir():
        _fail_in_ci_else_skip(f'shared data folder {path} not found (set TIMM_DROPFIX_SHARED)')
    return path


@pytest.fixture
def shared_path(shared_dir: Path):
    """``shared_path('data', 'cifar10')``: a path below the shared folder, which must exist (same CI rule)."""
    def get(*parts: str) -> Path:
        path = shared_dir.joinpath(*parts)
        if not path.exists():
            _fail_in_ci_else_skip(f'{path} missing (set TIMM_DROPFIX_SHARED to a complete shared folder)')
        return path
    return get


def _fail_in_ci_else_skip(msg: str) -> None:
    if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
        pytest.fail(msg)
    pytest.skip(msg)


# (breed file stem, species) in the official CLASS_ID order: cats capitalised, dogs lower case
TINY_BREEDS = (('Abyssinian', 1), ('beagle', 2), ('Bengal', 1), ('pug', 2))


def make_tiny_pets(root: Path, n_trainval: int = 8, n_test: int = 4, size: tuple[int, int] = (40, 32)) -> Path:
    """Write ``root/oxford-iiit-pet/{images,annotations}`` with a few classes of small JPEGs.

    Each class has its own base colour plus noise, so a small network can learn it in an epoch or two.
    """
    rng = np.random.default_rng(0)
    base = root / 'oxford-iiit-pet'
    (base / 'images').mkdir(parents=True, exist_ok=True)
    (base / 'annotations').mkdir(parents=True, exist_ok=True)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]], dtype=np.float64)
    lines = {'trainval': [], 'test': []}
    breed_ids = {1: 0, 2: 0}
    for class_id, (breed, species) in enumerate(TINY_BREEDS, start=1):
        breed_ids[species] += 1
        for i in range(n_trainval + n_test):
            img = colours[class_id - 1] + rng.normal(0, 30, size=(size[1], size[0], 3))
            stem = f'{breed}_{i + 1}'
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(base / 'images' / f'{stem}.jpg', quality=90)
            lines['trainval' if i < n_trainval else 'test'].append(f'{stem} {class_id} {species} {breed_ids[species]}')
    for split, rows in lines.items():
        (base / 'annotations' / f'{split}.txt').write_text('\n'.join(rows) + '\n')
    header = '#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n'
    (base / 'annotations' / 'list.txt').write_text(header + '\n'.join(lines['trainval'] + lines['test']) + '\n')
    return root


@pytest.fixture(scope='session')
def tiny_pets(tmp_path_factory) -> Path:
    """Root of a tiny Pets-layout dataset (4 classes, 8 trainval + 4 test images each, 40x32 px)."""
    return make_tiny_pets(tmp_path_factory.mktemp('tiny_pets'))


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread (no OpenMP barrier waits
    behind other processes); restored afterwards so other test modules keep their setting.
    Use with ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
