"""The ``danlu`` command: ``danlu arena`` (compare optimizers on a real task), ``danlu bench`` and ``danlu list``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Task options of the command line, and the tasks that take each.
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "batch_size": ("digits", "ner-zh", "sentiment-en", "csv", "text"),
    "subset": ("ner-zh", "sentiment-en", "text"),
    "max_len": ("ner-zh", "sentiment-en", "text"),
    "eval_size": ("ner-zh", "sentiment-en"),
    "head": ("ner-zh",),
    "trainable_layers": ("sentiment-en", "text"),
    "data_dir": ("sentiment-en",),
    "data": ("csv", "text"),
    "target": ("csv",),
    "model": ("text",),
    "text_column": ("text",),
    "label_column": ("text",),
}
ARENA_TASKS = ("digits", "ner-zh", "sentiment-en", "csv", "text")


class UserError(Exception):
    """A mistake in the command line, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser that reports a mistake as one line (``danlu arena: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed package's version (its metadata); ``unknown`` for a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("danlu")
    except PackageNotFoundError:
        return "unknown"


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``danlu`` and its subcommands."""
    parser = OneLineParser(prog="danlu", description="Optimizers and derived optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"danlu {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    arena = sub.add_parser("arena", help="compare optimizers on a real task and write a report",
                           description="Compare optimizers on a real task, fairly: an lr sweep per optimizer, "
                                       "several seeds, the same data order for everyone; writes an HTML report.")
    arena.add_argument("--task", default="digits",
                       help="digits (default), ner-zh, sentiment-en, csv (your table) or text (your texts)")
    arena.add_argument("--optimizers", default=None, metavar="SPECS",
                       help="comma-separated create_optimizer specs, e.g. 'adamw,ranger,lamb,adamw+lookahead+ema' "
                            "(default: a broad roster)")
    arena.add_argument("--steps", type=_integer, default=None, help="training steps per run")
    arena.add_argument("--seeds", type=_integer, default=None, help="seeds at the chosen lr")
    arena.add_argument("--lr-grid", default=None, metavar="LIST",
                       help="multipliers of each optimizer's typical lr to sweep, e.g. '0.3,1,3' ('1': no sweep)")
    arena.add_argument("--eval-every", type=_integer, default=None, metavar="N",
                       help="evaluate on the validation split every N steps")
    arena.add_argument("--out", default="danlu-arena", metavar="DIR", help="report folder (default ./danlu-arena)")
    arena.add_argument("--fresh", action="store_true", help="retrain everything instead of resuming from DIR")
    arena.add_argument("--threads", type=_integer, default=None, help="torch CPU threads")
    arena.add_argument("--quiet", action="store_true", help="no progress display")
    arena.add_argument("--lr-extend", type=_integer, default=None, metavar="N",
                       help="extra lrs the sweep may add beyond an edge of the grid where the best lr sits "
                            "(default 2; 0: never)")
    arena.add_argument("--workers", type=_integer, default=None, metavar="N",
                       help="runs trained at once in worker processes (default: the cores, capped by the runs)")
    arena.add_argument("--backend", default="local", metavar="NAME",
                       help="local (default) or ray: each run a Ray task (pip install 'danlu[ray]')")
    arena.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="the Ray cluster to join, e.g. auto or ray://host:10001 (default: a local instance)")
    group = arena.add_argument_group("task options")
    group.add_argument("--batch-size", type=_integer, default=None)
    group.add_argument("--subset", type=_integer, default=None, help="training examples to use (ner-zh, sentiment-en)")
    group.add_argument("--max-len", type=_integer, default=None, help="longest sequence (ner-zh, sentiment-en)")
    group.add_argument("--eval-size", type=_integer, default=None, metavar="N",
                       help="validation and test examples (ner-zh, sentiment-en)")
    group.add_argument("--head", default=None, help="ner-zh output layer: softmax (default) or crf")
    group.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                       help="sentiment-en: fine-tune the top N transformer layers (0: only the classifier)")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="sentiment-en: folder holding the vaderSentiment sdist (default: the user cache)")
    group.add_argument("--data", default=None, metavar="FILE",
                       help="csv, text: the data file (CSV with a header line, or JSON Lines)")
    group.add_argument("--target", default=None, metavar="COLUMN", help="csv: the label column")
    group.add_argument("--model", default=None, metavar="DIR",
                       help="text: a local Hugging Face model folder (config.json, weights, tokenizer)")
    group.add_argument("--text-column", default=None, metavar="C", help="text: the column of texts (default text)")
    group.add_argument("--label-column", default=None, metavar="C",
                       help="text: the column of labels (default label)")
    sub.add_parser("list", help="list tasks, optimizers, derivations and the default roster")
    from danlu.bench import add_arguments

    bench = sub.add_parser("bench", help="time every optimizer step against torch.optim and peers",
                           description="Step time, bandwidth efficiency, state and peak memory of danlu's optimizers "
                                       "against torch's fused AdamW and peers; writes JSON and Markdown tables.")
    add_arguments(bench)
    return parser


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task options given on the command line; one that the task does not take is a UserError."""
    options = {}
    for name, tasks in TASK_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.task in tasks:
            options[name] = value
        elif args.task in ARENA_TASKS:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to {', '.join(tasks)}, not to task {args.task!r}")
    return options


def cmd_arena(args: argparse.Namespace) -> int:
    """Run ``danlu arena``: check everything, train, print the table, write the report."""
    from danlu.arena import make_config, make_task, preflight
    from danlu.arena.arena import Arena
    from danlu.arena.progress import Progress, RichProgress

    try:
        task = make_task(args.task, **task_options(args))
        config = make_config(task, optimizers=args.optimizers, steps=args.steps, seeds=args.seeds,
                             lr_grid=args.lr_grid, eval_every=args.eval_every, out=args.out,
                             threads=args.threads, resume=not args.fresh, workers=args.workers,
                             backend=args.backend, ray_address=args.ray_address,
                             **({} if args.lr_extend is None else {"lr_extend": args.lr_extend}))
        preflight(config)
    except (UserError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        raise UserError(str(exc)) from None
    progress = Progress() if args.quiet else RichProgress()
    result = Arena(config, progress).run()
    print_table(result)
    if result.interrupted:
        print(f"\ninterrupted: {len(result.records)} finished run(s) kept in {config.out}; "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failed:
        print(f"{len(result.failed)} run(s) failed (listed in the report); the finished runs are kept in "
              f"{config.out}: run the same command again to retry", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def print_table(result: Any) -> None:
    """The final results table (notes below it) and where the report is."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from danlu.arena.report import recommendation_lines, table

    header, body = table(result)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    view = Table(title=f"danlu arena: {result.config.task.name}", header_style="bold")
    for name in header[:-1]:
        view.add_column(escape(name), no_wrap=name == "optimizer")
    notes = []
    for cells in body:
        view.add_row(*(escape(cell) for cell in cells[:-1]))
        if cells[-1]:
            notes.append(f"{cells[1]}: {cells[-1]}")
    console.print(view)
    for note in notes:
        console.print(f"  note: {note}", highlight=False)
    for line in recommendation_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {result.files['html']}", highlight=False, soft_wrap=True)
    console.print(f"summary: {result.files['markdown']}; raw curves: {result.files['csv']}, "
                  f"{result.files['json']}", highlight=False, soft_wrap=True)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the tasks, base optimizers, derivations and the default roster."""
    from danlu.arena import DEFAULT_ROSTER, TASKS, TYPICAL_LR
    from danlu.factory import DERIVATION_NAMES, OPTIMIZER_NAMES

    print("tasks:        " + ", ".join(TASKS))
    print("optimizers:   " + ", ".join(f"{n} (lr {TYPICAL_LR.get(n, 1e-3):g})" for n in OPTIMIZER_NAMES))
    print("derivations:  " + ", ".join(DERIVATION_NAMES))
    print("default roster: " + ",".join(DEFAULT_ROSTER))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``danlu bench`` (see :mod:`danlu.bench`)."""
    from danlu.bench import run_args

    return run_args(args)


COMMANDS = {"arena": cmd_arena, "list": cmd_list, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``danlu`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"danlu {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ndanlu {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
