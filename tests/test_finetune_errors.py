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
    assert 'download=True' not in err  # torchvision's Python-API advice, not an option of this command
    assert not (tmp_path / 'out').exists()


def test_eval_missing_data_suggests_no_download(tmp_path, capsys):
    """finetune eval has no --download option, so its message must not suggest one."""
    from finetune.modeling import build_model, export_model
    from finetune.config import TrainConfig
    built = build_model(TrainConfig(model='test_resnet'), num_classes=4)
    folder = export_model(built, built.model, tmp_path / 'model', ['a', 'b', 'c', 'd'], {'input_size': (3, 32, 32)})
    code = main(['eval', str(folder), '--data-dir', str(tmp_path / 'nothing_here')])
    err = capsys.readouterr().err
    assert code == 2 and 'not found' in err and '--data-dir' in err
    assert '--download' not in err and 'download=True' not in err


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
    (('--workers', '-1'), ('--workers -1', '0 or more')),  # torch's own ValueError came after config.json
    (('--limit-train', '0'), ('--limit-train 0', '1 or more')),
    (('--limit-eval', '0'), ('--limit-eval 0', '1 or more')),
    (('--cache-short-side', '0'), ('--cache-short-side 0', 'pixels')),
    (('--seed', '-1'), ('--seed -1', '[0, 4294967295]')),
    (('--pretrained', '--pretrained-file', 'w.safetensors'), ('--pretrained', '--pretrained-file', 'one of them')),
], ids=['cache_smaller_than_input', 'negative_color_jitter', 'unknown_dynamo_backend', 'drop_rate_one',
        'drop_rate_negative', 'branch_rate_nan', 'head_rate_above_one', 'grad_accum_zero', 'batch_size_zero',
        'epochs_zero', 'img_size_zero', 'lr_negative', 'label_smoothing_above_one', 'weight_decay_nan', 'lr_inf',
        'color_jitter_nan', 'workers_negative', 'limit_train_zero', 'limit_eval_zero', 'cache_short_side_zero',
        'seed_negative', 'pretrained_and_pretrained_file'])
def test_bad_option(tiny_pets, tmp_path, capsys, extra, says):
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', *extra))
    assert code == 2 and all(s in err for s in says)
    assert not (tmp_path / 'out').exists()


def test_rewrite_unsupported_model(tiny_pets, tmp_path, capsys):
    args = tiny_args(tiny_pets, tmp_path / 'out', '--rewrite')
    args[args.index('resnet18')] = 'mobilenetv3_small_050'
    code, err = run_cli(capsys, *args)
    assert code == 2 and '--rewrite does not support' in err and 'mobilenetv3_small_050' in err
    assert '..' not in err and err.count('Supported') == 1 and 'without --rewrite' in err  # one clean message
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
    # --v1-strides builds the twin resnet18_dropfix: the message names what the user typed
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', '--pretrained-file', str(bad), '--v1-strides'))
    assert code == 2 and 'not a valid safetensors file' in err and str(bad) in err
    assert "--model 'resnet18'" in err and 'resnet18_dropfix' not in err
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


def test_pretrained_offline_says_what_to_do(tiny_pets, tmp_path, capsys, monkeypatch):
    """Offline with weights that are not cached: huggingface's generic connection text gets a hint."""
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    # huggingface_hub reads both at import: patch what it reads at call time as well
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', '--pretrained'))
    assert code == 2 and 'HF_HUB_OFFLINE=1' in err and '--pretrained-file' in err and 'without --pretrained' in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='fp16 autocast works on a CUDA GPU')
@pytest.mark.parametrize('source', ['option', 'accelerate_launch'])
def test_fp16_without_cuda_is_refused(tiny_pets, tmp_path, capsys, monkeypatch, source):
    """accelerate accepts fp16 on a CPU and trains in fp32, while config.json would record fp16."""
    from accelerate.state import AcceleratorState
    extra = ('--mixed-precision', 'fp16') if source == 'option' else ()
    if source == 'accelerate_launch':  # what `accelerate launch --mixed_precision fp16` passes on
        monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'fp16')
    AcceleratorState._reset_state()  # a new command line is a new process: its Accelerator may choose fp16
    try:
        code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', *extra))
    finally:
        AcceleratorState._reset_state()
    assert code == 2 and 'fp16' in err and 'CUDA GPU' in err and 'bf16' in err and '--mixed-precision no' in err
    assert ('--mixed-precision fp16' in err) == (source == 'option')
    assert not (tmp_path / 'out').exists()


def _interrupt_when(monkeypatch, when):
    """Make the training loop's loss raise KeyboardInterrupt (as Ctrl-C would) once ``when()`` is true."""
    import types

    import torch.nn.functional as F

    import finetune.train

    def cross_entropy(*args, **kwargs):
        if when():
            raise KeyboardInterrupt
        return F.cross_entropy(*args, **kwargs)
    monkeypatch.setattr(finetune.train, 'F', types.SimpleNamespace(cross_entropy=cross_entropy))


def test_ctrl_c_says_where_to_continue(tiny_pets, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    latest = out / 'checkpoints' / 'LATEST'
    _interrupt_when(monkeypatch, latest.is_file)  # in the first step of epoch 2, after epoch 1's checkpoint
    code, err = run_cli(capsys, *tiny_args(tiny_pets, out, '--epochs', '2'))
    ckpt = out / 'checkpoints' / 'epoch_0000'
    assert code == 130 and 'Traceback' not in err
    assert err.strip().splitlines()[-1] == (f'interrupted: the last checkpoint is {ckpt} (epoch 1 of 2); rerun the '
                                            f'same command with --resume to continue from it')
    assert (ckpt / 'trainer_state.json').is_file() and latest.read_text().strip() == 'epoch_0000'

    # stopped before the first checkpoint: --resume starts the run again
    _interrupt_when(monkeypatch, lambda: True)
    code, err = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'early'))
    assert code == 130 and 'Traceback' not in err
    assert 'before the first checkpoint' in err and 'with --resume to start the run again' in err


def test_rewrite_options_without_rewrite_warn(tmp_path, capsys, caplog):
    # the data is missing: the run stops before training, after the options were looked at
    run_cli(capsys, *tiny_args(tmp_path / 'nothing_here', tmp_path / 'out'))
    assert 'without --rewrite' not in caplog.text  # the defaults alone say nothing
    run_cli(capsys, *tiny_args(tmp_path / 'nothing_here', tmp_path / 'out', '--branch-drop-rate', '0.3',
                                '--head-position', 'after_pool', '--head-drop-rate', '0.2'))
    assert ('--branch-drop-rate 0.3, --head-position after_pool are ignored without --rewrite: they take effect '
            'only with --rewrite') in caplog.text
    assert '--head-drop-rate' not in caplog.text  # given, but equal to the default


@pytest.mark.parametrize('rewrite', [False, True])
def test_dropout_placement_logged_once_and_only_after_a_rewrite(tiny_pets, tmp_path, capsys, caplog, rewrite):
    """--v1-strides builds resnet18_dropfix, whose constructor runs rewrite (p=0) itself: no line for that."""
    import logging
    caplog.set_level(logging.INFO)
    extra = ('--v1-strides', '--cache-short-side', '24') + (('--rewrite',) if rewrite else ())
    code, _ = run_cli(capsys, *tiny_args(tiny_pets, tmp_path / 'out', *extra))  # stops after the model is built
    assert code == 2
    lines = [r.getMessage() for r in caplog.records if 'branch dropout' in r.getMessage()]
    if rewrite:
        assert len(lines) == 1 and 'p=0.1' in lines[0] and 'p=0.2 before_pool' in lines[0], lines
        assert 'timm_dropfix.rewrite:' not in lines[0]
    else:
        assert lines == []


def test_eval_bad_limit_fails_before_anything_runs(tmp_path, capsys):
    """Checked first: neither the (missing) model folder nor the (missing) data is looked at."""
    code = main(['eval', str(tmp_path / 'no_model'), '--data-dir', str(tmp_path / 'no_data'), '--limit-eval', '0'])
    err = capsys.readouterr().err
    assert code == 2 and '--limit-eval 0: must be 1 or more, or leave it out to use every image' in err


@pytest.mark.parametrize('command', [['eval', 'folder', '--data-dir', 'data'], ['push', 'folder', '--repo-id', 'a/b'],
                                     ['train']], ids=['eval', 'push', 'train'])
def test_unknown_option_shows_the_subcommand_usage(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([*command, '--no-such-option'])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'unrecognized arguments: --no-such-option' in err
    assert err.startswith(f'usage: python -m finetune {command[0]} ')
    assert f'python -m finetune {command[0]}: error' in err


def test_help_is_plain_text_and_describes_the_rates(capsys):
    from finetune.__main__ import build_parser
    assert '``' not in build_parser().format_help()
    with pytest.raises(SystemExit):
        build_parser().parse_args(['train', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'BRANCH_DROP_RATE with --rewrite: dropout rate in every residual branch' in text
    assert '(default: 0.1)' in text and '(default: 0.2)' in text
