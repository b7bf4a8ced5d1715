"""Crash-safe checkpoints on top of ``accelerator.save_state``.

Each epoch is written to ``checkpoints/.epoch_NNNN.tmp``, renamed to ``checkpoints/epoch_NNNN`` when complete, and
only then does the one-line pointer ``checkpoints/LATEST`` move to it (``os.replace`` is atomic). A crash at any
moment leaves ``LATEST`` naming a complete checkpoint (or no pointer at all), never a half-written one.

Example:
    >>> find_checkpoint('runs/pets', 'auto')          # doctest: +SKIP
    PosixPath('runs/pets/checkpoints/epoch_0003')
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FinetuneError

if TYPE_CHECKING:  # accelerate is only needed by the caller that passes an Accelerator in
    from accelerate import Accelerator

STATE_FILE = 'trainer_state.json'


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename, so readers see the old or the new file, never half.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_text_atomic(Path(d, 'LATEST'), 'epoch_0001')
        ...     sorted(os.listdir(d)), Path(d, 'LATEST').read_text()
        (['LATEST'], 'epoch_0001')
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, epoch: int, trainer_state: dict[str, Any],
                    keep: int = 1) -> Path:
    """Save model, optimizer and every process's RNG state (accelerate's save_state) after ``epoch``.

    Must be called on all processes. ``trainer_state`` (epoch, step, history, model signature) is stored beside
    accelerate's files. Older checkpoints beyond ``keep`` are removed after the pointer has moved.

    Example:
        >>> save_checkpoint(accelerator, 'runs/pets', 3, {'epoch': 3}, keep=2)   # doctest: +SKIP
        PosixPath('runs/pets/checkpoints/epoch_0003')
    """
    root = Path(run_dir) / 'checkpoints'
    name = f'epoch_{epoch:04d}'
    tmp, final = root / f'.{name}.tmp', root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / 'LATEST', name + '\n')
        done = sorted(p for p in root.glob('epoch_*') if p.is_dir())
        for old in done[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_or_restart(run_dir: str | Path, remove: bool = True) -> str | None:
    """For a run to (re)start in ``run_dir``: ``'auto'`` when it holds a complete checkpoint to resume from,
    else ``None``, and a folder left by a run that died before its first checkpoint is deleted (``remove``;
    with several processes only the main one should) so that ``train`` starts it again.

    Example:
        >>> cfg = cfg.replace(resume=resume_or_restart(cfg.output_dir))   # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if (run_dir / 'checkpoints' / 'LATEST').is_file():
        return 'auto'
    if remove and run_dir.exists():
        shutil.rmtree(run_dir)
    return None


def find_checkpoint(resume: str, run_dir: str | Path) -> Path:
    """Resolve ``--resume`` ('auto' = RUN_DIR, or a run folder, a checkpoints folder, or one checkpoint).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     ck = Path(d, 'checkpoints', 'epoch_0002'); ck.mkdir(parents=True)
        ...     write_text_atomic(ck / STATE_FILE, '{}'); write_text_atomic(ck.parent / 'LATEST', 'epoch_0002')
        ...     find_checkpoint('auto', d).name
        'epoch_0002'
    """
    p = Path(run_dir) if resume == 'auto' else Path(resume)
    for ptr_dir in (p / 'checkpoints', p):
        ptr = ptr_dir / 'LATEST'
        if ptr.is_file():
            ck = ptr_dir / ptr.read_text().strip()
            if (ck / STATE_FILE).is_file():
                return ck
    if (p / STATE_FILE).is_file():
        return p
    raise FinetuneError(f'--resume: no complete checkpoint in {p} (looked for checkpoints/LATEST and {STATE_FILE}). '
                        f'Start without --resume, or point it at a run folder written by `finetune train`.')


def scheduler_state(ckpt: str | Path, trainer_state: dict[str, Any]) -> dict[str, Any]:
    """The LR scheduler's state of a checkpoint, read without unpickling code (before anything is written).

    Newer checkpoints keep it in ``trainer_state.json``. Those of earlier versions hold it as accelerate's
    ``custom_checkpoint_0.pkl``, which accelerate would unpickle with ``weights_only=False``; it is read here with
    ``weights_only=True``, and anything but plain data is refused.

    Example:
        >>> scheduler_state('runs/pets/checkpoints/epoch_0003', {'scheduler': {'last_epoch': 12}})
        {'last_epoch': 12}
    """
    import torch
    if 'scheduler' in trainer_state:  # custom_checkpoint files beside it are never unpickled
        return trainer_state['scheduler']
    pickles = _custom_pickles(ckpt)
    if len(pickles) != 1:
        raise FinetuneError(f'--resume: {ckpt} has no LR scheduler state ({STATE_FILE} holds none, and '
                            f'{len(pickles)} custom_checkpoint files instead of one): not a checkpoint `finetune '
                            f'train` wrote. Start the run again in a new --output-dir.')
    try:
        return torch.load(pickles[0], map_location='cpu', weights_only=True)
    except Exception as e:  # an UnpicklingError for anything beyond plain data
        raise FinetuneError(f'--resume: {pickles[0]} is not a plain scheduler state ({type(e).__name__}); it is '
                            f'not loaded, since unpickling it could run code. Start the run again in a new '
                            f'--output-dir.') from None


def _custom_pickles(ckpt: str | Path) -> list[Path]:
    """The objects accelerate pickled into a checkpoint (an earlier version's LR scheduler)."""
    return sorted(Path(ckpt).glob('custom_checkpoint_*.pkl'))


def load_checkpoint(accelerator: Accelerator, ckpt: str | Path) -> None:
    """``accelerator.load_state(ckpt)`` (model, optimizer, every process's RNG state), leaving out the pickled
    scheduler of an earlier version's checkpoint (see :func:`scheduler_state`): accelerate then loads from a
    temporary folder of links to the other files. A damaged checkpoint is a FinetuneError that says what to do.

    Example:
        >>> load_checkpoint(accelerator, find_checkpoint('auto', 'runs/pets'))   # doctest: +SKIP
    """
    import tempfile
    ckpt = Path(ckpt)
    pickles = _custom_pickles(ckpt)
    if not pickles:
        _load_state(accelerator, ckpt, ckpt)
        return
    with tempfile.TemporaryDirectory(prefix='finetune-resume-') as tmp:
        for f in ckpt.iterdir():
            if f not in pickles:
                os.symlink(f.resolve(), Path(tmp) / f.name)
        _load_state(accelerator, tmp, ckpt)


def _load_state(accelerator: Accelerator, folder: str | Path, ckpt: Path) -> None:
    try:
        accelerator.load_state(str(folder))
    except Exception as e:  # a file damaged or removed after the pointer moved: torch, safetensors, pickle errors
        raise FinetuneError(f'--resume: {ckpt} could not be loaded ({type(e).__name__}: {str(e)[:300]}). Resume '
                            f'from another checkpoint (--resume PATH/checkpoints/epoch_NNNN, with '
                            f'--keep-checkpoints above 1), or start again in a new --output-dir.') from None


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_text_atomic(Path(d, STATE_FILE), '{"epoch": 3}')
        ...     read_trainer_state(d)
        {'epoch': 3}
    """
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def check_same_model(saved: dict[str, Any], current: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume a checkpoint written for a different network (name, head size, strides, dropout).

    Example:
        >>> check_same_model({'num_classes': 37}, {'num_classes': 37}, Path('ck'))
        >>> check_same_model({'num_classes': 37}, {'num_classes': 10}, Path('ck'))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        finetune.errors.FinetuneError: --resume: ck was written for another model (num_classes: checkpoint 37 ...
    """
    diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if diff:
        details = '; '.join(f'{k}: checkpoint {a!r} vs now {b!r}' for k, (a, b) in sorted(diff.items()))
        raise FinetuneError(f'--resume: {ckpt} was written for another model ({details}). Resume with the same '
                            f'model options, or use a new --output-dir to start fresh.')
