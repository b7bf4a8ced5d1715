"""The README's Python examples run as written, and print what the README says they print."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'


def _python_blocks() -> list[str]:
    return re.findall(r'^```python\n(.*?)^```', README.read_text(), flags=re.S | re.M)


def test_readme_has_the_plugin_examples():
    blocks = _python_blocks()
    assert any('timm_dropfix.rewrite(' in b for b in blocks)
    assert any("create_model('preresnet101_dropfix'" in b for b in blocks)
    assert any('fast_dropout_add(' in b for b in blocks)


@pytest.mark.parametrize('index', range(len(_python_blocks())))
def test_readme_python_block_runs(index):
    """Each block runs in a fresh namespace; `pretrained=True` becomes False (no Hub here: loading timm's weights
    into a registered model is tested from disk in test_models.py). Where a `print(...)` line is followed by comment
    lines, those comments are the printed text."""
    import timm_dropfix
    code = _python_blocks()[index].replace('pretrained=True', 'pretrained=False')
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f'README.md python block {index + 1}', 'exec'), {'__name__': '__readme__'})
    finally:
        timm_dropfix.set_fast_dropout(True)
    # a print whose result the README shows as the comment lines right below it
    shown = re.findall(r'^print\(.*\)\n((?:# .*\n)+)', code, flags=re.M)
    printed = out.getvalue()
    for comment in shown:
        text = ' '.join(line[2:].strip() for line in comment.splitlines())
        assert ' '.join(printed.split()).find(' '.join(text.split())) >= 0, (text, printed)


def _finetune_commands() -> list[list[str]]:
    """The arguments of every `python -m finetune ...` / `accelerate launch ... -m finetune ...` command in the
    README's shell blocks; a `...` placeholder stands for a model and a data folder."""
    commands = []
    for block in re.findall(r'^```(?:bash|sh)\n(.*?)^```', README.read_text(), flags=re.S | re.M):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' #')[0]
            if '-m finetune ' in line:
                line = line.replace(' ... ', ' --model resnet50 --data-dir data ')
                commands.append(shlex.split(line.split('-m finetune ', 1)[1]))
    return commands


def test_readme_finetune_commands_parse():
    """Every finetune command the README shows is accepted by the CLI as it is now (options renamed or removed
    would fail here), and train/bench ones also make a valid configuration."""
    from finetune.__main__ import build_parser
    from finetune.config import config_from_args
    commands = _finetune_commands()
    assert {c[0] for c in commands} == {'train', 'bench', 'eval', 'push'}
    for argv in commands:
        args = build_parser().parse_args(argv)
        if args.command in ('train', 'bench'):
            config_from_args(args)
