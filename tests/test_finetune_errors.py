"""finetune train on bad input (issue section 4): a clear message, exit code 2, and nothing half written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune.__main__ import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(['train', *argv])
    return code, capsys.readouterr().err


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ['--model', 'resnet18', '--data-dir', str(data), '--output-dir', str(out), '--img-size', '32',
            '--epochs', '1', '--batch-size', '8', '--log-with', 'none', *extra]


def test_missing_data_says_where_to_point(tmp_path, capsys):
    code, err = run_cli(capsys, *tiny_args(tmp_path / 'nothing_here', tmp_path / 'out'))
    assert code == 2 and 'not found' in err and '--download' in err and '--data-dir' in err
    assert not (tmp_path / 'out').exists()


def test_unknown_model(tiny_pets, tmp_path, capsys):
    args = tiny_args(tiny_pets, tmp_path / 'out')
    args[args.index('resnet18')] = 'resnet18_nonexistent'
    code, err = run_cli(capsys, *args)
    assert code == 2 and 'unknown model' in err and 'resnet18' in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('extra, says', [
    (('--fast-data', '--cache-short-side', '24'), ('--cache-short-side 24', 'at least the input size')),
    (('--color-jitter', '-0.2'), ('--color-jitter -0.2', '>= 0')),
    (('--dynamo-backend', 'inductr'), ("--dynamo-backend 'inductr'", 'inductor')),
    (('--drop-rate', '1.0'), ('--drop-rate', '[0, 1)', 'got 1.0')),
    (('--drop-rate', '-0.1'), ('--drop-rate', '[0, 1)')),
    (('--branch-drop-rate', 'nan'), ('--branch-drop-rate', '[0, 1)')),  # checked without --rewrite too
    (('--rewrite', '--head-drop-rate', '1.5'), ('--head-drop-rate', '[0, 1)')),
    (('--grad-accum', '0'), ('--grad-accum 0', '1 or more')),
    (('--batch-size', '0'), ('--batch-size 0', '1 or more')),
    (('--epochs', '0'), ('--epochs 0', '1 or more')),
    (('--img-size', '0'), ('--img-size 0', 'pixels')),
    (('--lr', '-1'), ('--lr -1.0', '> 0')),
    (('--label-smoothing', '1.5'), ('--label-smoothing 1.5', 'in [0, 1)')),
    (('--weight-decay', 'nan'), ('--weight-decay nan', '>= 0')),
    (('--lr', 'inf'), ('--lr inf', 'finite')),
    (('--color-jitter', 'nan'), ('--color-jitter nan', '>= 0')),
], ids=['cache_smaller_than_input', 'negative_color_jitter', 'unknown_dynamo_backend', 'drop_rate_one',
        'drop_rate_negative', 'branch_rate_nan', 'head_rate_above_one', 'grad_accum_zero', 'batch_size_zero',
        'epochs_zero', 'img_size_zero', 'lr_negative', 'label_smoothing_above_one', 'weight_decay_nan', 'lr_inf',
        'color_jitter_nan'])
def test_bad_option(tiny_pets, tmp_path, capsys, extra, says):
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', *extra))
    assert code == 2 and all(s in err for s in says)
    assert not (tmp_path / 'out').exists()


def test_rewrite_unsupported_model(tiny_pets, tmp_path, capsys):
    args = tiny_args(tiny_pets, tmp_path / 'out', '--rewrite')
    args[args.index('resnet18')] = 'mobilenetv3_small_050'
    code, err = run_cli(capsys, *args)
    assert code == 2 and '--rewrite does not support' in err and 'mobilenetv3_small_050' in err
    assert not (tmp_path / 'out').exists()


def test_dataset_smaller_than_one_batch(tiny_pets, tmp_path, capsys):
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', '--limit-train', '5'))
    assert code == 2 and 'fewer than one batch' in err and '--batch-size' in err
    assert not (tmp_path / 'out').exists()


def test_unwritable_output_dir(tiny_pets, tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    code, err = run_cli(capsys, *tiny_args(tiny_pets, blocker / 'out'))
    assert code == 2 and 'not a folder' in err
    assert blocker.read_text() == 'not a folder'


def test_bad_pretrained_file(tiny_pets, tmp_path, capsys):
    bad = tmp_path / 'weights.safetensors'
    bad.write_bytes(b'\x00' * 64)
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', '--pretrained-file', str(bad)))
    assert code == 2 and 'could not build' in err
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', '--pretrained-file', str(tmp_path / 'x.pt')))
    assert code == 2 and 'does not exist' in err
    assert not (tmp_path / 'out').exists()


def test_existing_run_needs_resume_and_other_model_is_refused(tiny_pets, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['train', *tiny_args(tiny_pets, out)]) == 0
    capsys.readouterr()
    code, err = run_cli(capsys, *tiny_args(tiny_pets, out))
    assert code == 2 and '--resume' in err
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    args = tiny_args(tiny_pets, out, '--resume')
    args[args.index('resnet18')] = 'resnet34'
    code, err = run_cli(capsys, *args)
    assert code == 2 and 'another model' in err and 'resnet18' in err and 'resnet34' in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before  # nothing touched
    # the optimizer state the checkpoint restores would override a new learning rate or optimizer silently
    code, err = run_cli(capsys, *tiny_args(tiny_pets, out, '--resume', '--lr', '0.5', '--optimizer', 'sgd'))
    assert code == 2 and "--lr 0.001 -> 0.5" in err and "--optimizer 'adamw' -> 'sgd'" in err
    # a precision switched mid-run (e.g. by another `accelerate launch --mixed_precision`) is refused too
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # a new command line is a new process: its Accelerator may choose bf16
    try:
        code, err = run_cli(capsys, *tiny_args(tiny_pets, out, '--resume', '--mixed-precision', 'bf16'))
    finally:
        AcceleratorState._reset_state()
    assert code == 2 and "trained with mixed precision 'no'" in err and '--mixed-precision no' in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'fresh', '--resume'))
    assert code == 2 and 'no complete checkpoint' in err


def test_run_stopped_before_its_first_checkpoint_starts_again_with_resume(tiny_pets, tmp_path, capsys, caplog):
    """A run killed in its first epoch leaves config.json (and the cache) but no checkpoint: a fresh start refuses
    the folder, so --resume must accept it and train from the beginning."""
    out = tmp_path / 'run'
    assert main(['train', *tiny_args(tiny_pets, out)]) == 0
    shutil.rmtree(out / 'checkpoints')
    for name in ('metrics.json', 'model'):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    capsys.readouterr()
    code, err = run_cli(capsys, *tiny_args(tiny_pets, out))
    assert code == 2 and 'before its first checkpoint' in err
    assert run_cli(capsys, *tiny_args(tiny_pets, out, '--resume'))[0] == 0
    assert 'has no checkpoint yet' in caplog.text and 'starting it again from the beginning' in caplog.text
    assert (out / 'metrics.json').is_file() and (out / 'model' / 'model.safetensors').is_file()


def test_imagefolder_missing_split(tmp_path, capsys):
    (tmp_path / 'imgs' / 'train' / 'cat').mkdir(parents=True)
    code, err = run_cli(capsys, '--dataset', 'imagefolder', *tiny_args(tmp_path / 'imgs', tmp_path / 'out'))
    assert code == 2 and 'val' in err


def test_a_second_precision_in_one_process_is_a_clear_error(tiny_pets, tmp_path, capsys):
    """accelerate fixes the precision once per process (train() called again from a notebook, say)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()
    try:
        Accelerator(mixed_precision='no')
        code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', '--mixed-precision', 'bf16'))
    finally:
        AcceleratorState._reset_state()
    assert code == 2 and 'another precision' in err and 'its own process' in err
    assert not (tmp_path / 'out').exists()
