"""finetune train: the full train -> evaluate -> checkpoint -> resume -> save -> load-back cycle, on a tiny
Pets-layout dataset and on the real pets370 subset, plus the 2-process path and unit checks."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

import timm_dropfix
from finetune.__main__ import build_parser
from finetune.config import TrainConfig, config_from_args
from finetune.data import load_samples
from finetune.evaluate import classification_metrics, expected_calibration_error
from finetune.train import _StopForTest, train, warmup_cosine

FINAL_KEYS = ('top1', 'top5', 'mean_class_acc', 'nll', 'ece')


def tiny_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model='resnet18', data_dir=str(data_dir), output_dir=str(out), img_size=32, epochs=2, batch_size=8,
                lr=3e-3, backbone_lr_mult=1.0, warmup_epochs=0.5, log_with='tensorboard')
    base.update(kw)
    return TrainConfig(**base)


def timm_eval(model_dir: Path, samples) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Load a saved folder the way a user would and evaluate it with timm's own PIL transforms."""
    model = timm.create_model(f'local-dir:{model_dir}', pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        x = torch.stack([tf(Image.open(p).convert('RGB')) for p, _ in samples])
        logits = model(x)
    return logits, torch.tensor([y for _, y in samples]), model


@pytest.fixture(scope='module')
def rewritten_run(tiny_pets, tmp_path_factory):
    """One uninterrupted 2-epoch run with --rewrite, shared by the tests below."""
    out = tmp_path_factory.mktemp('run') / 'full'
    cfg = tiny_cfg(tiny_pets, out, rewrite=True)
    return cfg, train(cfg)


def test_outputs_and_load_back(rewritten_run, tiny_pets):
    cfg, metrics = rewritten_run
    out = Path(cfg.output_dir)
    saved = json.loads((out / 'metrics.json').read_text())
    for k in FINAL_KEYS:
        assert 0 <= saved[k] and math.isfinite(saved[k])
    assert len(saved['history']) == 2 and saved['images_per_second'] > 0 and saved['wall_seconds'] > 0
    assert saved['top1'] >= 0.75, saved  # 4 colour-coded classes: learnable in 2 epochs
    assert (out / 'history.csv').read_text().count('\n') == 3
    assert (out / 'confusion_matrix.png').stat().st_size > 1000
    assert list((out / 'tensorboard').rglob('events.out.tfevents*'))
    assert (out / 'checkpoints' / 'LATEST').read_text().strip() == 'epoch_0001'

    model_dir = out / 'model'
    hf = json.loads((model_dir / 'config.json').read_text())
    assert hf['architecture'] == 'resnet18_dropfix'  # the twin carries the dropout placement
    assert hf['label_names'] == ['Abyssinian', 'Beagle', 'Bengal', 'Pug']
    pcfg = hf['pretrained_cfg']
    assert pcfg['input_size'] == [3, 32, 32] and 'test_input_size' not in pcfg
    # a random init: no tag, origin, paper or licence of timm's default resnet18 weights
    assert not {'tag', 'origin_url', 'paper_ids', 'license'} & pcfg.keys(), pcfg
    card = (model_dir / 'README.md').read_text()
    assert 'library_name: timm' in card and 'model-index' in card
    results = card.split('| metric | value |', 1)[1].split('\n\n', 1)[0]  # the card's Results table
    for k in ('top1', 'top5', 'mean_class_acc', 'nll', 'ece'):
        assert f"| {k} | {saved[k]:.4f} |" in results, (k, results)

    # a user's reload with timm's own transforms reproduces the reported accuracy, dropout placement included
    split = load_samples('pets', str(tiny_pets))
    logits, targets, model = timm_eval(model_dir, split.eval)
    again = classification_metrics(logits, targets)
    assert again['top1'] == pytest.approx(saved['top1'], abs=1e-6)
    assert again['nll'] == pytest.approx(saved['nll'], abs=2e-3)
    assert timm_dropfix.dropfix_config(model) == dict(branch_drop_rate=0.1, head_drop_rate=0.2,
                                                      branch_position='recommended', head_position='before_pool')


def test_eval_command_reproduces_the_reported_metrics(rewritten_run, tiny_pets, tmp_path, capsys):
    """`finetune eval` loads the folder with timm and its own eval transform: the numbers train reported."""
    from finetune.__main__ import main
    cfg, _ = rewritten_run
    model_dir = Path(cfg.output_dir) / 'model'
    saved = json.loads((Path(cfg.output_dir) / 'metrics.json').read_text())
    out = tmp_path / 'eval.json'
    assert main(['eval', str(model_dir), '--data-dir', str(tiny_pets), '--workers', '0', '--output', str(out)]) == 0
    m = json.loads(out.read_text())
    assert m['top1'] == pytest.approx(saved['top1'], abs=1e-6) and m['n'] == saved['n_eval']
    assert m['nll'] == pytest.approx(saved['nll'], abs=2e-3)
    assert f"top1 {saved['top1']:.4f}" in capsys.readouterr().out
    # the same images as an imagefolder holding only val/ (no train/ needed to evaluate)
    split = load_samples('pets', str(tiny_pets))
    for path, label in split.eval:
        dest = tmp_path / 'folder' / 'val' / split.classes[label]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    assert main(['eval', str(model_dir), '--dataset', 'imagefolder', '--data-dir', str(tmp_path / 'folder'),
                 '--workers', '0', '--output', str(out)]) == 0
    assert json.loads(out.read_text())['top1'] == pytest.approx(saved['top1'], abs=1e-6)
    # another dataset's classes, and a folder that is not a model, are refused with what to do
    other = tmp_path / 'other'
    shutil.copytree(model_dir, other)
    hf = json.loads((other / 'config.json').read_text())
    hf['label_names'] = list(reversed(hf['label_names']))
    (other / 'config.json').write_text(json.dumps(hf))
    assert main(['eval', str(other), '--data-dir', str(tiny_pets), '--workers', '0']) == 2
    assert 'wrong labels' in capsys.readouterr().err
    assert main(['eval', str(tmp_path), '--data-dir', str(tiny_pets)]) == 2
    assert 'lacks config.json, model.safetensors' in capsys.readouterr().err


def test_eval_limit_reproduces_a_limited_training_run(tiny_pets, tmp_path, capsys):
    """`finetune eval --limit-eval N` evaluates the images `finetune train --limit-eval N` did: the same top-1 and n.

    train limits the eval split first and then drops unreadable images, so an unreadable image inside the limit
    leaves N - 1; one outside it is never looked at. Checking first and limiting after would give N images.
    """
    from finetune.__main__ import main
    data = tmp_path / 'data'
    shutil.copytree(tiny_pets, data)
    images = data / 'oxford-iiit-pet' / 'images'
    # test images are <breed>_9.._12; round-robin over classes, the first 5 are the four *_9 and Abyssinian_10
    (images / 'Bengal_9.jpg').write_bytes(b'this is not a jpeg')   # inside the limit
    (images / 'pug_12.jpg').write_bytes(b'this is not a jpeg')     # outside it
    # one optimizer step is enough: only the evaluated images matter here
    saved = train(tiny_cfg(data, tmp_path / 'run', epochs=1, limit_train=8, limit_eval=5, log_with='none'))
    assert saved['n_eval'] == 4
    out = tmp_path / 'eval.json'
    assert main(['eval', str(tmp_path / 'run' / 'model'), '--data-dir', str(data), '--workers', '0',
                 '--limit-eval', '5', '--output', str(out)]) == 0
    m = json.loads(out.read_text())
    assert (m['top1'], m['n']) == (saved['top1'], saved['n_eval'])
    assert m['limit_eval'] == 5 and [Path(p).name for p in m['skipped']] == ['Bengal_9.jpg']
    assert f"top1 {saved['top1']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize('older_checkpoint', [False, True], ids=['schedule_in_trainer_state', 'older_checkpoint'])
def test_resume_continues_exactly(rewritten_run, tiny_pets, tmp_path, older_checkpoint):
    """Weights, optimizer, learning-rate schedule and RNG come back exactly; no pickle is written (accelerate
    unpickles registered objects with weights_only=False). Checkpoints of earlier versions hold the schedule as
    accelerate's custom_checkpoint_0.pkl: it is read with weights_only=True, and resumes exactly too."""
    cfg_full, full = rewritten_run
    out = tmp_path / 'interrupted'
    cfg = tiny_cfg(tiny_pets, out, rewrite=True)
    with pytest.raises(_StopForTest):
        train(cfg, stop_after_epoch=1)
    assert not (out / 'metrics.json').exists() and not (out / 'model').exists()
    ckpt = out / 'checkpoints' / 'epoch_0000'
    assert {p.name for p in ckpt.glob('*.pkl')} == {'random_states_0.pkl'}  # read with weights_only=True
    state = json.loads((ckpt / 'trainer_state.json').read_text())
    assert state['scheduler']['last_epoch'] == state['global_step'] > 0
    if older_checkpoint:  # what register_for_checkpointing(scheduler) wrote: torch.save of its state_dict
        torch.save(state.pop('scheduler'), ckpt / 'custom_checkpoint_0.pkl')
        (ckpt / 'trainer_state.json').write_text(json.dumps(state))
    resumed = train(cfg.replace(resume='auto'))
    assert [h['train_loss'] for h in resumed['history']] == [h['train_loss'] for h in full['history']]
    for k in FINAL_KEYS:
        assert resumed[k] == full[k], k
    a = load_file(str(Path(cfg_full.output_dir) / 'model' / 'model.safetensors'))
    b = load_file(str(out / 'model' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_damaged_checkpoint_says_what_to_do(rewritten_run, tiny_pets, tmp_path):
    from finetune.errors import FinetuneError
    out = tmp_path / 'run'
    shutil.copytree(rewritten_run[0].output_dir, out)
    optimizer = out / 'checkpoints' / 'epoch_0001' / 'optimizer.bin'
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(FinetuneError, match='could not be loaded.*another checkpoint'):
        train(tiny_cfg(tiny_pets, out, rewrite=True, resume='auto'))


def test_resume_refuses_a_pickle_that_is_not_plain_data(rewritten_run, tiny_pets, tmp_path):
    from finetune.errors import FinetuneError
    out = tmp_path / 'run'
    shutil.copytree(rewritten_run[0].output_dir, out)
    ckpt = out / 'checkpoints' / 'epoch_0001'
    marker = tmp_path / 'ran'
    (ckpt / 'custom_checkpoint_0.pkl').write_bytes(  # a pickle whose loading would call os.system
        b"cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.")
    state = json.loads((ckpt / 'trainer_state.json').read_text())
    del state['scheduler']  # as in an earlier version's checkpoint, whose schedule is in that pickle
    (ckpt / 'trainer_state.json').write_text(json.dumps(state))
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    with pytest.raises(FinetuneError, match='not a plain scheduler state'):
        train(tiny_cfg(tiny_pets, out, rewrite=True, resume='auto'))
    assert not marker.exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before  # refused before anything was written


def test_compiled_model_exports_plain_weights(tiny_pets, tmp_path, monkeypatch):
    """A dynamo backend and a mixed precision chosen by `accelerate launch` (which passes them on as these
    variables) are used, not overridden, and config.json records them; the exported folder still holds the plain
    model's keys."""
    from accelerate.state import AcceleratorState
    monkeypatch.setenv('ACCELERATE_DYNAMO_BACKEND', 'EAGER')
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    # accelerate reads them when its process-wide state is first made, as in a process `accelerate launch` starts;
    # earlier tests made it already, and later ones must not inherit bf16
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        metrics = train(tiny_cfg(tiny_pets, tmp_path / 'compiled', epochs=1, log_with='none'))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert metrics['dropout_kernel'] == 'compiled' and metrics['fast_dropout'] is False
    recorded = json.loads((tmp_path / 'compiled' / 'config.json').read_text())
    assert (recorded['dynamo_backend'], recorded['mixed_precision']) == ('eager', 'bf16')
    keys = load_file(str(tmp_path / 'compiled' / 'model' / 'model.safetensors')).keys()
    assert keys and not any(k.startswith('_orig_mod.') for k in keys)
    logits, targets, _ = timm_eval(tmp_path / 'compiled' / 'model', load_samples('pets', tiny_pets).eval)
    assert (logits.argmax(1) == targets).float().mean().item() == pytest.approx(metrics['top1'], abs=1e-6)


def test_cache_on_device_trains_exactly_like_the_host_cache(tiny_pets, tmp_path):
    """--cache-on-device gathers padded batches from a cache in device memory (here the CPU); the crops, the
    random draws and so every loss must equal the default route's, which crops on the host. (No dropout here:
    accelerate's loader fetches one batch ahead, so on the host route the next batch's crop draws come before
    this step's dropout masks, on the device route after them; without dropout the draws are the same.)"""
    from finetune.errors import FinetuneError
    runs = {}
    for on_device in (False, True):
        cfg = tiny_cfg(tiny_pets, tmp_path / f'dev{int(on_device)}', cache_on_device=on_device, log_with='none')
        runs[on_device] = train(cfg)
    assert [h['train_loss'] for h in runs[True]['history']] == [h['train_loss'] for h in runs[False]['history']]
    for k in FINAL_KEYS:
        assert runs[True][k] == runs[False][k], k
    with pytest.raises(FinetuneError, match='drop --no-fast-data'):
        train(tiny_cfg(tiny_pets, tmp_path / 'pil', cache_on_device=True, fast_data=False))


def test_fast_dropout_is_the_default_and_switchable_per_run(tiny_pets, tmp_path, rewritten_run):
    """CPU training draws the dropfix masks with timm_dropfix.fast_dropout unless --no-fast-dropout or the process
    default (TIMM_DROPFIX_FAST_DROPOUT=0) says otherwise; the run says which in metrics.json, and the
    process-wide switch is given back afterwards."""
    from unittest import mock
    from timm_dropfix import fastdrop
    assert rewritten_run[0].fast_dropout is None and rewritten_run[1]['fast_dropout'] is True
    assert rewritten_run[1]['dropout_kernel'] == 'fused'  # CI has a C compiler
    assert rewritten_run[1]['keep_freed_memory'] is True  # a CPU run under glibc (see finetune/cpumem.py)
    before = timm_dropfix.use_fast_dropout()
    runs = [(True, False, False), (False, None, False), (False, True, True)]  # process default, config, fast?
    try:
        for i, (default, flag, fast) in enumerate(runs):
            timm_dropfix.set_fast_dropout(default)
            with mock.patch.object(fastdrop, 'fast_dropout', wraps=fastdrop.fast_dropout) as spy:
                m = train(tiny_cfg(tiny_pets, tmp_path / str(i), rewrite=True, epochs=1, fast_dropout=flag,
                                   log_with='none'))
            assert (spy.call_count > 0) is fast and m['fast_dropout'] is fast, (default, flag)
            assert m['dropout_kernel'] == ('fused' if fast else 'torch')
            assert timm_dropfix.use_fast_dropout() is default
    finally:
        timm_dropfix.set_fast_dropout(before)


def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    """In a fresh interpreter (the setting is process-wide): a 64 MiB tensor allocated and freed again faults in
    all its pages every time under glibc's defaults (it is mmapped), and almost none once keep_freed_memory()
    let the heap keep it."""
    script = (
        'import resource, torch\n'
        'from finetune.cpumem import keep_freed_memory\n'
        'def faults():\n'
        '    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        '    for _ in range(5):\n'
        '        x = torch.ones(16 << 20)\n'
        '        del x\n'
        '    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n'
        'faults()\n'
        'default = faults()\n'
        'applied = keep_freed_memory()\n'
        'faults(), faults(), faults()\n'  # the heap settles into reusing the block within a few rounds
        'print(applied, default, faults())\n')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1], check=True)
    applied, default, kept = done.stdout.split()
    if applied != 'True':
        pytest.skip('not glibc: keep_freed_memory() changes nothing here')
    assert int(default) > 10 * int(kept) and int(default) >= 5 * 32  # at least one fault per 2 MiB huge page


def test_checkpoint_every_saves_every_nth_and_the_last_epoch(tiny_pets, tmp_path):
    from finetune.errors import FinetuneError
    out = tmp_path / 'sparse'
    train(tiny_cfg(tiny_pets, out, epochs=3, checkpoint_every=2, keep_checkpoints=5, log_with='none'))
    ckpts = out / 'checkpoints'
    # epochs 2 and 3 (folders are named by 0-based epoch index); epoch 1 was not saved
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ['epoch_0001', 'epoch_0002']
    assert (ckpts / 'LATEST').read_text().strip() == 'epoch_0002'
    with pytest.raises(FinetuneError, match='--checkpoint-every 0'):
        train(tiny_cfg(tiny_pets, tmp_path / 'never', checkpoint_every=0))
    assert not (tmp_path / 'never').exists()


@pytest.mark.parametrize('fast', [True, False], ids=['fastdata', 'pil'])
def test_corrupt_images_are_skipped_and_counted(tiny_pets, tmp_path, fast):
    data = tmp_path / 'data'
    shutil.copytree(tiny_pets, data)
    images = sorted((data / 'oxford-iiit-pet' / 'images').glob('*.jpg'))
    raw = images[0].read_bytes()
    images[0].write_bytes(raw[: len(raw) // 2])       # truncated
    images[1].write_bytes(b'this is not a jpeg')       # corrupt
    # grad_accum 2 over 3 batches (31 readable train images, drop_last): accelerate steps at batch 2 and at the end
    m = train(tiny_cfg(data, tmp_path / 'out', epochs=1, fast_data=fast, log_with='none', grad_accum=2))
    assert m['n_skipped'] == 2 and len(m['skipped']) == 2
    assert (m['n_train'], m['n_eval']) == (31, 15)
    assert m['history'][0]['step'] == 2
    assert (tmp_path / 'out' / 'model' / 'model.safetensors').is_file()


def test_pets370_real_data(shared_dir, tmp_path):
    """The shared ImageNet ResNet-50 (v1 strides) with --rewrite on real Pets images, tiny budget."""
    weights = shared_dir / 'weights' / 'resnet50_keras_in1k'
    cfg = TrainConfig(model='resnet50', pretrained_file=str(weights), v1_strides=True, rewrite=True,
                      data_dir=str(shared_dir / 'data' / 'pets370'), img_size=64, epochs=1, batch_size=16,
                      limit_train=37, limit_eval=37, output_dir=str(tmp_path / 'pets'), log_with='none')
    m = train(cfg)
    assert m['n_train'] == 37 and m['n_eval'] == 37 and m['n_skipped'] == 0
    hf = json.loads((tmp_path / 'pets' / 'model' / 'config.json').read_text())
    assert hf['architecture'] == 'resnet50_dropfix' and hf['model_args']['v1_strides'] is True
    assert hf['num_classes'] == 37 and hf['label_names'][0] == 'Abyssinian'
    assert hf['pretrained_cfg']['interpolation'] == 'bilinear' and hf['pretrained_cfg']['crop_pct'] == 0.875
    assert hf['pretrained_cfg']['license'] == 'mit'
    split = load_samples('pets', cfg.data_dir, limit_eval=37)
    logits, targets, model = timm_eval(tmp_path / 'pets' / 'model', split.eval)
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    assert classification_metrics(logits, targets)['top1'] == pytest.approx(m['top1'], abs=1e-6)


def run_in_two_processes(module: str, job: str, *args) -> None:
    """``module.job(*args)`` in two processes of ``accelerate.debug_launcher`` (gloo on CPU).

    debug_launcher forks; forking this pytest process, whose OpenMP pool earlier tests have used, can leave the
    children deadlocked, so the launch happens in a fresh interpreter (the job still runs in two forked workers)."""
    script = (f'import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n'
              'from accelerate import debug_launcher\n'
              f'from {module} import {job}\n'
              f'debug_launcher({job}, args={args!r}, num_processes=2)\n')
    subprocess.run([sys.executable, '-c', script], check=True, timeout=600, cwd=Path(__file__).parents[1],
                   env={**os.environ, 'OMP_NUM_THREADS': '1'})


def fresh_worker_state() -> None:
    """A forked worker inherits the launching process's single-process accelerate state: start from scratch."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)


def _two_process_job(data_dir: str, out: str, cache_on_device: bool = False) -> None:
    fresh_worker_state()
    # with the dropfix rewrite: DDP also runs through the fast CPU dropout (an autograd.Function) in each process
    train(tiny_cfg(Path(data_dir), Path(out), epochs=1, batch_size=4, log_with='none', rewrite=True,
                   cache_on_device=cache_on_device))


@pytest.mark.parametrize('cache_on_device', [False, True], ids=['host_cache', 'cache_on_device'])
def test_two_processes_debug_launcher(tiny_pets, tmp_path, cache_on_device):
    run_in_two_processes('test_finetune_train', '_two_process_job', str(tiny_pets), str(tmp_path / 'ddp'),
                         cache_on_device)
    m = json.loads((tmp_path / 'ddp' / 'metrics.json').read_text())
    assert m['num_processes'] == 2 and m['fast_dropout'] is True
    assert m['n_eval'] == 16 and m['history'][0]['train_images'] == 32  # 2 processes x 4 steps x 4 images
    split = load_samples('pets', str(tiny_pets))
    logits, targets, _ = timm_eval(tmp_path / 'ddp' / 'model', split.eval)
    # every eval image counted once (gather_for_metrics drops the padding)
    assert classification_metrics(logits, targets)['top1'] == pytest.approx(m['top1'], abs=1e-6)


def test_config_json_roundtrip_and_cli():
    args = build_parser().parse_args(['train', '--model', 'resnet34', '--rewrite', '--head-position', 'after_pool',
                                      '--img-size', '96', '--no-fast-data', '--resume', '--no-fast-dropout',
                                      '--no-keep-freed-memory'])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.rewrite, cfg.head_position, cfg.img_size, cfg.fast_data, cfg.resume, cfg.fast_dropout) == \
        ('resnet34', True, 'after_pool', 96, False, 'auto', False)
    assert cfg.keep_freed_memory is False and TrainConfig().keep_freed_memory is True
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    from finetune import config
    # the CLI lists the positions without importing torch; they must be the plugin's
    assert config.BRANCH_POSITIONS == tuple(timm_dropfix.BRANCH_POSITIONS)
    assert config.HEAD_POSITIONS == tuple(timm_dropfix.HEAD_POSITIONS)
    with pytest.raises(ValueError, match='unknown'):
        TrainConfig.from_dict({'modle': 'x'})


def test_metrics_and_schedule():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(logits, y)
    assert m['top1'] == pytest.approx(0.5) and m['mean_class_acc'] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m['nll'] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    # two bins: conf 0.9 correct (|1-0.9|) and conf 0.6 wrong (|0-0.6|), each half of the samples
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    f = warmup_cosine(100, 10, 0.01)
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.01)


def test_imagefolder_samples(tiny_pets, tmp_path):
    images = sorted((tiny_pets / 'oxford-iiit-pet' / 'images').glob('*.jpg'))
    for i, img in enumerate(images[:12]):
        cls = 'cat' if i % 2 else 'dog'
        dest = tmp_path / ('train' if i < 8 else 'val') / cls / img.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dest)
    split = load_samples('imagefolder', str(tmp_path))
    assert split.classes == ['cat', 'dog'] and len(split.train) == 8 and len(split.eval) == 4
    assert {y for _, y in split.train} == {0, 1}


def test_pretrained_file_as_safetensors_and_folder(rewritten_run, tmp_path):
    from finetune.modeling import build_model
    model_dir = Path(rewritten_run[0].output_dir) / 'model'
    saved = load_file(str(model_dir / 'model.safetensors'))
    # a bare .safetensors file: backbone loaded; the head is new because the default cfg says 1000 classes
    m = build_model(TrainConfig(model='resnet18', pretrained_file=str(model_dir / 'model.safetensors')), 7).model
    assert torch.equal(m.state_dict()['layer3.0.conv1.weight'], saved['layer3.0.conv1.weight'])
    assert m.fc.out_features == 7
    # a save_for_hf folder with the same head size: everything loaded, preprocessing taken from its config
    m = build_model(TrainConfig(model='resnet18', pretrained_file=str(model_dir)), 4).model
    assert torch.equal(m.state_dict()['fc.weight'], saved['fc.weight'])
    assert m.pretrained_cfg['input_size'] == [3, 32, 32]
    # provenance is the folder's: Keras weights must not be described as timm's resnet50.a1_in1k
    hf = json.loads((model_dir / 'config.json').read_text())
    hf['pretrained_cfg'].update(origin_url='https://example.org/weights', paper_ids='arXiv:1512.03385', license='mit')
    (folder := tmp_path / 'described').mkdir()
    (folder / 'config.json').write_text(json.dumps(hf))
    shutil.copy(model_dir / 'model.safetensors', folder)
    m = build_model(TrainConfig(model='resnet18', pretrained_file=str(folder)), 4).model
    assert 'tag' not in m.pretrained_cfg and m.default_cfg is m.pretrained_cfg
    assert (m.pretrained_cfg['origin_url'], m.pretrained_cfg['paper_ids'], m.pretrained_cfg['license']) == (
        'https://example.org/weights', 'arXiv:1512.03385', 'mit')


def test_freeze_bn_stats_keeps_running_statistics():
    from finetune.train import freeze_bn_stats
    model = timm.create_model('test_resnet', num_classes=3).train()
    before = model.bn1.running_mean.clone()
    freeze_bn_stats(model)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before) and model.bn1.weight.grad is not None
    assert model.training and not model.bn1.training
