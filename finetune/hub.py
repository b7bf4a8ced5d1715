"""``finetune push``: upload a model folder to the Hugging Face Hub in one commit.

What is uploaded is first staged in a folder: the model files as written by ``train`` plus the model card
re-rendered for the target repo id (and with a bench comparison if one is given). ``--dry-run`` stages into a
local folder and stops, so what you inspect is byte for byte what a real push sends. A failed upload changes
nothing local and prints the command to retry. The token is read by huggingface_hub itself (``HF_TOKEN`` or
``hf auth login``), is never taken on the command line, never printed, and a staged file containing it is refused.

Example:
    >>> push('runs/pets/model', 'me/resnet50-pets', dry_run=True)       # doctest: +SKIP
    ['README.md', 'config.json', 'eval_metrics.json', 'model.safetensors', 'training_config.json']
"""
from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .card import EVAL_METRICS, TRAINING_CONFIG, render_card_from_folder
from .errors import FinetuneError

REQUIRED = ('config.json', 'model.safetensors')
STAGING_MARK = '.finetune-dry-run'  # hidden, so a model folder's own copy would never be staged


def _known_token() -> str | None:
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:  # no token configured is fine for --dry-run
        return None


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, '<token>') if token else text


def stage(folder: str | Path, dest: str | Path, repo_id: str | None = None,
          bench_results: str | Path | None = None, mark: bool = False) -> list[str]:
    """Copy the uploadable files of ``folder`` into ``dest`` and re-render the card there.

    Hidden files and leftovers of interrupted writes (``.*``, ``*.tmp``) are not uploaded. ``dest`` must be new or
    empty, or an earlier staging folder (one staged with ``mark=True``, as ``push --dry-run`` does), which is
    replaced; any other folder is refused untouched, as is one that holds ``folder``. Returns the file names.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     model = Path(d, 'model'); model.mkdir()
        ...     for name in ('config.json', 'model.safetensors', '.config.json.tmp'):
        ...         _ = (model / name).write_text('{}')
        ...     stage(model, Path(d, 'upload'))
        ['config.json', 'model.safetensors']
    """
    folder, dest = Path(folder).resolve(), Path(dest).resolve()
    if dest == folder or folder in dest.parents or dest in folder.parents:
        raise FinetuneError(f'the staging folder {dest} must not be the model folder {folder}, inside it or '
                            f'above it; choose a new folder (--dry-run-dir)')
    if dest.exists() and not dest.is_dir():
        raise FinetuneError(f'the staging folder {dest} is a file; choose a new folder (--dry-run-dir)')
    if dest.is_dir() and any(dest.iterdir()):
        if not (dest / STAGING_MARK).is_file():
            # only a folder that staging wrote is emptied: anything else may be the user's
            raise FinetuneError(f'the staging folder {dest} is not empty and was not written by `finetune push '
                                f'--dry-run`; nothing was changed. Choose a new or empty folder (--dry-run-dir)')
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith('.') and not f.name.endswith('.tmp'):
            shutil.copy2(f, dest / f.name)
    if (folder / TRAINING_CONFIG).is_file() and (folder / EVAL_METRICS).is_file():
        # the card names the repo in its usage snippet and metadata, so it is rendered for this upload
        (dest / 'README.md').write_text(render_card_from_folder(folder, repo_id=repo_id, bench_results=bench_results))
    elif bench_results:
        raise FinetuneError(f'--bench-results needs {folder}/{TRAINING_CONFIG} and {EVAL_METRICS} '
                            f'(written by `finetune train`) to re-render the card')
    token = _known_token()
    if token:
        for f in dest.iterdir():
            if f.suffix in ('.json', '.md', '.txt', '.yaml', '.yml') and token in f.read_text(errors='ignore'):
                shutil.rmtree(dest)
                raise FinetuneError(f'{folder}/{f.name} contains your Hub token; remove it before pushing')
    files = sorted(p.name for p in dest.iterdir())
    if mark:
        (dest / STAGING_MARK).write_text('written by `finetune push --dry-run`; the next dry run replaces this '
                                         'folder\n')
    return files


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a Path if it is a save_for_hf model folder (config.json + model.safetensors), else a
    FinetuneError that says which file is missing.

    Example:
        >>> check_model_folder('no/such/folder')
        Traceback (most recent call last):
        ...
        finetune.errors.FinetuneError: no/such/folder is not a folder; pass the model/ folder ...
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f'{folder} is not a folder; pass the model/ folder written by `finetune train`')
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing:
        raise FinetuneError(f'{folder} lacks {", ".join(missing)}: not a save_for_hf model folder '
                            f'(pass RUN_DIR/model from `finetune train`)')
    return folder


def push(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         dry_run_dir: str | Path | None = None, bench_results: str | Path | None = None,
         commit_message: str | None = None, revision: str | None = None,
         api_factory: Callable[[], Any] | None = None) -> list[str]:
    """Upload ``folder`` to ``repo_id`` in one commit (or stage it locally with ``dry_run``).

    ``api_factory`` returns the ``HfApi``-like client (tests pass a stand-in); default ``huggingface_hub.HfApi``.
    Returns the uploaded (or staged) file names.

    Example:
        >>> push('runs/pets/model', 'me/resnet50-pets', private=True)     # doctest: +SKIP
        uploaded 5 files to me/resnet50-pets in one commit: https://huggingface.co/me/resnet50-pets/commit/...
        ['README.md', 'config.json', 'eval_metrics.json', 'model.safetensors', 'training_config.json']
        >>> push('no/such/folder', 'me/resnet50-pets')    # checked before anything is staged or sent
        Traceback (most recent call last):
        ...
        finetune.errors.FinetuneError: no/such/folder is not a folder; pass the model/ folder ...
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    folder = check_model_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise FinetuneError(f'--repo-id {repo_id!r} is not a valid Hub repo id (USER/NAME): {e}') from None
    if bench_results and not Path(bench_results).is_file():
        raise FinetuneError(f'--bench-results {bench_results} does not exist')

    if dry_run:
        dest = Path(dry_run_dir) if dry_run_dir else folder.with_name(folder.name + '.dry-run')
        files = stage(folder, dest, repo_id, bench_results, mark=True)
        print(f'dry run: would upload {len(files)} files to {repo_id} ({"private" if private else "public"}) '
              f'in one commit; exact copies are in {dest}:')
        for name in files:
            print(f'  {name}  ({(dest / name).stat().st_size:,} bytes)')
        return files

    retry = 'python -m finetune push ' + ' '.join(shlex.quote(a) for a in (
        [str(folder), '--repo-id', repo_id] + (['--private'] if private else [])
        + (['--bench-results', str(bench_results)] if bench_results else [])
        + (['--revision', revision] if revision else [])
        + ([f'--commit-message={commit_message}'] if commit_message else [])))  # '=': a message may start with -
    token = _known_token()
    with tempfile.TemporaryDirectory(prefix='finetune-push-') as tmp:
        staged = Path(tmp) / 'upload'
        files = stage(folder, staged, repo_id, bench_results)
        try:
            if api_factory is None:
                from huggingface_hub import HfApi
                api = HfApi()
            else:
                api = api_factory()
            api.create_repo(repo_id=repo_id, repo_type='model', private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type='model',
                                     revision=revision,
                                     commit_message=commit_message or f'Upload {folder.name} with finetune push')
        except Exception as e:  # network, auth, quota...: everything local stays as it was
            raise FinetuneError(
                f'upload to {repo_id} failed: {type(e).__name__}: {_scrub(str(e), token)[:500]}\n'
                f'Nothing local was changed: the model is still in {folder}. Check your login '
                f'(`hf auth login` or HF_TOKEN) and network, then retry:\n  {retry}') from None
    print(f'uploaded {len(files)} files to {repo_id} in one commit: {getattr(info, "commit_url", info)}')
    return files
