"""``python -m finetune train|bench|eval|push`` (also ``accelerate launch -m finetune train ...``).

Examples:
    python -m finetune train --model resnet50 --pretrained-file ../shared/weights/resnet50_keras_in1k --v1-strides \\
        --data-dir ../shared/data/pets370 --img-size 160 --output-dir runs/pets
    python -m finetune bench --model resnet18 --data-dir ../shared/data/pets370 --seeds 0 1 2 --output-dir runs/bench
    python -m finetune eval runs/pets/model --data-dir ../shared/data/pets370
    python -m finetune push runs/pets/model --repo-id me/resnet50-pets --dry-run
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from .config import add_train_args, config_from_args
from .errors import FinetuneError


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that reports unknown options itself, with its own usage.

    argparse's subparsers hand unrecognised arguments back to the top-level parser (``parse_known_args``), whose
    error then shows ``python -m finetune`` usage instead of the subcommand's; erroring here keeps the usage of the
    command that was run. The subcommands take no arguments meant for the top-level parser, so nothing is lost.

    Example:
        >>> p = _SubcommandParser(prog='python -m finetune eval', exit_on_error=False)
        >>> p.parse_known_args([])
        (Namespace(), [])
    """

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser (subcommands train, bench, eval, push)."""
    # the docstring's first line is reStructuredText; --help shows it as plain text
    parser = argparse.ArgumentParser(prog='python -m finetune', description=__doc__.split('\n')[0].replace('``', ''),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, parser_class=_SubcommandParser)

    p = sub.add_parser('train', help='fine-tune one model')
    add_train_args(p)

    p = sub.add_parser('bench', help='grid of dropout variants x seeds with the same budget')
    add_train_args(p)
    from .bench import DEFAULT_VARIANTS
    p.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS),
                   help=f'variant names (default: all of {", ".join(DEFAULT_VARIANTS)})')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--baseline', default='timm_default', help='variant the paired differences are taken against')

    p = sub.add_parser('eval', help="evaluate a saved model folder with timm's own eval transform")
    p.add_argument('folder', help='the model/ folder written by `finetune train` (any timm save_for_hf folder)')
    p.add_argument('--data-dir', required=True)
    p.add_argument('--dataset', choices=('pets', 'imagefolder'), default='pets',
                   help='pets: its test split; imagefolder: DATA_DIR/val')
    p.add_argument('--batch-size', type=int, default=64, help='per process')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--output', default=None, help='also write the metrics to this JSON file')
    p.add_argument('--limit-eval', type=int, default=None, metavar='N',
                   help='evaluate only the N images `finetune train --limit-eval N` evaluated (default: all)')

    p = sub.add_parser('push', help='upload a model folder to the Hugging Face Hub in one commit')
    p.add_argument('folder', help='the model/ folder written by `finetune train`')
    p.add_argument('--repo-id', required=True, help='USER/NAME on the Hub')
    p.add_argument('--private', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='write what would be uploaded into a local folder instead')
    p.add_argument('--dry-run-dir', default=None, help='where --dry-run puts the files (default: FOLDER.dry-run)')
    p.add_argument('--bench-results', default=None, help='a bench results.json to add to the model card')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a FinetuneError, which prints a message, no traceback)."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'train':
            from .train import train
            train(config_from_args(args))
        elif args.command == 'bench':
            from .bench import run_bench
            bad = [s for s in args.seeds if not 0 <= s < 2 ** 32]  # before any run: numpy's seed range
            if bad:
                raise FinetuneError(f'--seeds {bad}: every seed must be in [0, {2 ** 32 - 1}]')
            run_bench(config_from_args(args), args.variants, args.seeds, baseline=args.baseline)
        elif args.command == 'eval':
            from .evaluate import evaluate_folder
            evaluate_folder(args.folder, args.data_dir, dataset=args.dataset, batch_size=args.batch_size,
                            workers=args.workers, output=args.output, limit_eval=args.limit_eval)
        elif args.command == 'push':
            from .hub import push
            push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                 dry_run_dir=args.dry_run_dir, bench_results=args.bench_results,
                 commit_message=args.commit_message, revision=args.revision)
    except FinetuneError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.command not in ('train', 'bench'):
            raise
        if os.environ.get('RANK', '0') == '0':  # under accelerate launch every process gets the Ctrl-C
            print(_interrupted(args), file=sys.stderr)
        return 130  # the shell's code for a SIGINT
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C left behind, and the command that continues."""
    from .train import interrupted_message
    cfg = config_from_args(args)
    if args.command == 'train':
        return interrupted_message(cfg)
    return (f'interrupted: rerun the same command to continue the bench in {cfg.output_dir} (finished runs are '
            f'kept; the interrupted one resumes from its last checkpoint, or starts again if it had none)')


if __name__ == '__main__':
    sys.exit(main())
