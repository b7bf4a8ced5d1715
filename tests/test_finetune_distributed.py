"""Runs across processes: bench under a two-process launch, and the checks that keep a launch from training wrong
(processes that are not connected, a resume with another process count, accumulation set by accelerate's env)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.train import train

from test_finetune_train import fresh_worker_state, run_in_two_processes, tiny_cfg

REPO = Path(__file__).parents[1]


def _two_process_bench(data_dir: str, out: str) -> None:
    fresh_worker_state()
    from finetune.bench import run_bench
    run_bench(tiny_cfg(Path(data_dir), Path(out), epochs=1, batch_size=4, log_with='none'), ['none'], [0],
              baseline='none')


@pytest.fixture(scope='module')
def bench_two_processes(tiny_pets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('dist') / 'bench'
    run_in_two_processes('test_finetune_distributed', '_two_process_bench', str(tiny_pets), str(out))
    return out


def test_bench_runs_each_run_once_across_two_processes(bench_two_processes):
    """bench's first accelerate state is made as Accelerator makes it: the two processes train one run together
    (a 1-process state made first had each process train every run on its own, into the same folder)."""
    run = bench_two_processes / 'runs' / 'none' / 'seed_0'
    m = json.loads((run / 'metrics.json').read_text())
    assert m['num_processes'] == 2 and m['history'][0]['train_images'] == 32  # 2 processes x 4 steps x 4 images
    assert json.loads((bench_two_processes / 'results.json').read_text())['variants']['none']['n'] == 1


def test_resume_with_another_process_count_is_refused(bench_two_processes):
    run = bench_two_processes / 'runs' / 'none' / 'seed_0'
    cfg = TrainConfig.from_json((run / 'config.json').read_text()).replace(epochs=2, resume='auto')
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(FinetuneError, match=r'trained by 2 process\(es\), this run has 1.*--num_processes 2'):
        train(cfg)
    assert sorted(p.name for p in run.iterdir()) == before


def test_processes_that_are_not_connected_are_refused(tiny_pets, tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(FinetuneError, match='WORLD_SIZE is 2 but accelerate runs this process alone'):
        train(tiny_cfg(tiny_pets, tmp_path / 'alone', epochs=1, log_with='none'))
    assert not (tmp_path / 'alone').exists()


def test_accumulation_from_accelerates_environment_sizes_the_schedule(tiny_pets, tmp_path):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS overrides what the code passes to Accelerator: the run records, and
    schedules by, what runs (in a fresh process: accelerate keeps its gradient state per process)."""
    out = tmp_path / 'accum'
    cmd = [sys.executable, '-m', 'finetune', 'train', '--model', 'resnet18', '--data-dir', str(tiny_pets),
           '--img-size', '32', '--epochs', '1', '--batch-size', '4', '--log-with', 'none', '--output-dir', str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, 'ACCELERATE_GRADIENT_ACCUMULATION_STEPS': '2', 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'gradient accumulation: 2 steps from accelerate' in done.stderr
    assert json.loads((out / 'config.json').read_text())['grad_accum'] == 2
    # 32 training images in batches of 4 with 2-step accumulation: 4 optimizer steps, and the schedule ends there
    assert json.loads((out / 'metrics.json').read_text())['history'][-1]['step'] == 4
