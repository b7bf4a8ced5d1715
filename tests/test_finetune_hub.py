"""finetune push: --dry-run round trip, the upload path against a stand-in HfApi, a failing upload, the card."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_dropfix  # noqa: F401  (registers the *_dropfix architectures for the reload)
from finetune.__main__ import main
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.hub import STAGING_MARK, push
from finetune.train import train

TOKEN = 'hf_FAKEtoken0123456789abcdefghijklmnop'


@pytest.fixture(scope='module')
def model_dir(tiny_pets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('hubrun') / 'run'
    train(TrainConfig(model='resnet18', rewrite=True, data_dir=str(tiny_pets), output_dir=str(out), img_size=32,
                      epochs=1, batch_size=8, log_with='none'))
    return out / 'model'


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split('---')[1])


def test_dry_run_round_trip(model_dir, tmp_path, capsys):
    before = digest(model_dir)
    dest = tmp_path / 'staged'
    assert main(['push', str(model_dir), '--repo-id', 'someone/resnet18-pets', '--dry-run',
                 '--dry-run-dir', str(dest)]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in dest.iterdir() if p.name != STAGING_MARK)
    assert files == ['README.md', 'config.json', 'eval_metrics.json', 'model.safetensors', 'training_config.json']
    assert (dest / STAGING_MARK).is_file() and STAGING_MARK not in printed  # what lets the next dry run replace it
    assert all(name in printed for name in files)
    assert digest(model_dir) == before  # the model folder is untouched
    staged = digest(dest)
    assert all(staged[n] == before[n] for n in files if n != 'README.md')  # byte-identical copies
    card = (dest / 'README.md').read_text()
    meta = front_matter(card)
    assert meta['library_name'] == 'timm' and meta['model-index'][0]['name'] == 'someone/resnet18-pets'
    top1 = json.loads((model_dir / 'eval_metrics.json').read_text())['metrics']['top1']
    assert meta['model-index'][0]['results'][0]['metrics'][0]['value'] == pytest.approx(top1, abs=1e-4)
    assert "hf-hub:someone/resnet18-pets" in card and 'before_pool' in card
    # what would be uploaded loads with timm and gives the same outputs as the original folder
    a = timm.create_model(f'local-dir:{model_dir}', pretrained=True).eval()
    b = timm.create_model(f'local-dir:{dest}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))


class RecordingApi:
    """Stand-in for huggingface_hub.HfApi that checks what it is given, as the Hub would receive it."""

    calls: list = []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(('create_repo', repo_id, private))

    def upload_folder(self, folder_path, repo_id, repo_type, revision, commit_message):
        folder = Path(folder_path)
        files = sorted(p.name for p in folder.iterdir())
        assert {'config.json', 'model.safetensors', 'README.md'} <= set(files)
        for p in folder.iterdir():  # the token must not be in anything uploaded
            assert TOKEN.encode() not in p.read_bytes()
        cfg = json.loads((folder / 'config.json').read_text())
        assert cfg['architecture'] == 'resnet18_dropfix' and len(cfg['label_names']) == 4
        self.calls.append(('upload_folder', repo_id, files, commit_message))

        class Info:
            commit_url = f'https://huggingface.co/{repo_id}/commit/abc'
        return Info()


def test_upload_one_commit_with_stand_in_api(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    RecordingApi.calls = []
    bench = tmp_path / 'results.json'
    bench.write_text(json.dumps(_fake_bench_results()))
    files = push(model_dir, 'someone/resnet18-pets', private=True, bench_results=bench, api_factory=RecordingApi)
    kinds = [c[0] for c in RecordingApi.calls]
    assert kinds == ['create_repo', 'upload_folder']  # one commit
    assert RecordingApi.calls[0] == ('create_repo', 'someone/resnet18-pets', True)
    assert 'README.md' in files
    assert TOKEN not in capsys.readouterr().out


def test_failed_upload_keeps_everything_local(model_dir, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    before = digest(model_dir)

    class FailingApi(RecordingApi):
        def upload_folder(self, **kw):
            raise ConnectionError(f'connection reset while sending with Authorization: Bearer {TOKEN}')

    with pytest.raises(FinetuneError) as err:
        push(model_dir, 'someone/resnet18-pets', api_factory=FailingApi, revision='dev', commit_message='v2 weights')
    msg = str(err.value)
    assert 'failed' in msg and 'retry' in msg and f'python -m finetune push {model_dir}' in msg
    # the retry command commits where the failed one would have: same branch and message
    assert msg.endswith("--revision dev '--commit-message=v2 weights'"), msg
    assert TOKEN not in msg and '<token>' in msg
    assert digest(model_dir) == before


def test_dry_run_never_empties_a_folder_it_did_not_write(model_dir, tmp_path):
    """--dry-run-dir replaces only an earlier dry run's folder: a folder with the user's files, a run folder holding
    the model, or the model folder itself are refused with nothing deleted."""
    before = digest(model_dir)
    mine = tmp_path / 'mine'
    (mine / 'sub').mkdir(parents=True)
    (mine / 'notes.txt').write_text('keep me')
    (mine / 'sub' / 'data.csv').write_text('1,2')
    for dest, match in ((mine, 'not empty and was not written'), (model_dir.parent, 'above it'),
                        (model_dir, 'must not be the model folder'), (model_dir / 'x', 'inside it')):
        with pytest.raises(FinetuneError, match=match):
            push(model_dir, 'someone/x', dry_run=True, dry_run_dir=dest)
    assert (mine / 'notes.txt').read_text() == 'keep me' and (mine / 'sub' / 'data.csv').read_text() == '1,2'
    assert digest(model_dir) == before and (model_dir.parent / 'metrics.json').is_file()
    # an empty folder is used; a second dry run into it replaces the first one's files
    empty = tmp_path / 'empty'
    empty.mkdir()
    first = push(model_dir, 'someone/x', dry_run=True, dry_run_dir=empty)
    (empty / 'stale.bin').write_bytes(b'from an older dry run')
    assert push(model_dir, 'someone/x', dry_run=True, dry_run_dir=empty) == first
    assert not (empty / 'stale.bin').exists()


def test_push_bad_input(model_dir, tmp_path):
    with pytest.raises(FinetuneError, match='not a save_for_hf'):
        push(tmp_path, 'someone/x', dry_run=True)
    with pytest.raises(FinetuneError, match='not a valid Hub repo id'):
        push(model_dir, 'not a repo id!', dry_run=True)


def _fake_bench_results() -> dict:
    """A results.json as bench writes it (two variants, two seeds), built by bench's own summariser."""
    from finetune.bench import VARIANTS, summarize_runs
    runs = {'timm_default': {0: dict(top1=0.70, top5=0.9, mean_class_acc=0.70, nll=1.0, ece=0.05),
                             1: dict(top1=0.72, top5=0.9, mean_class_acc=0.72, nll=1.0, ece=0.05)},
            'recommended': {0: dict(top1=0.71, top5=0.9, mean_class_acc=0.71, nll=0.9, ece=0.04),
                            1: dict(top1=0.74, top5=0.9, mean_class_acc=0.74, nll=0.9, ece=0.04)}}
    return summarize_runs(runs, 'timm_default', {k: v[1] for k, v in VARIANTS.items()},
                          dict(model='resnet18', dataset='pets', epochs=1, img_size=32, seeds=[0, 1]))


def test_card_includes_bench_comparison(model_dir, tmp_path):
    bench = tmp_path / 'results.json'
    bench.write_text(json.dumps(_fake_bench_results()))
    files = push(model_dir, 'someone/x', dry_run=True, dry_run_dir=tmp_path / 'staged', bench_results=bench)
    card = (tmp_path / 'staged' / 'README.md').read_text()
    assert 'README.md' in files and 'Dropout placement comparison' in card
    assert '| recommended |' in card and '+0.0150' in card  # mean paired diff (0.01 + 0.02) / 2


def test_card_names_local_weights_without_their_path(model_dir):
    from finetune.card import render_card
    card = render_card({'architecture': 'resnet50', 'num_classes': 37},
                       {'dataset': 'pets', 'model': 'resnet50', 'pretrained_file': '/home/alice/weights/in1k'},
                       dict(top1=0.7, top5=0.9, mean_class_acc=0.7, n=185), {})
    assert 'in1k (a local file)' in card and '/home/alice' not in card
    from finetune.modeling import build_model
    notes = build_model(TrainConfig(model='resnet18', pretrained_file=str(model_dir)), 4).notes
    assert notes == [f'initialised from the local weights {model_dir.name}']
