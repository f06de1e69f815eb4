"""The ``scoretune`` command: one entry point, one module per subcommand.

Each subcommand lives in ``scoretune.commands.<name>`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (and optionally ``INTERRUPTED``, what Ctrl-C keeps); heavy imports (torch, Ray, MLflow)
happen inside ``run`` so ``scoretune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback

SUBCOMMANDS = ("train", "search", "report", "promote", "evaluate", "bound", "toy", "ui", "dashboard", "launch",
               "status", "server", "sync", "data")


INTERRUPTED = "finished epochs/trials are kept (see --resume)"  # a subcommand's INTERRUPTED replaces it


def _available() -> list[str]:
    return [n for n in SUBCOMMANDS if importlib.util.find_spec(f"scoretune.commands.{n}") is not None]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="scoretune",
        description="Adversarial-training hyperparameter search with SCORE (Pang et al., ICML 2022).",
    )
    parser.add_argument("--version", action="version", version=f"scoretune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _available():
        mod = importlib.import_module(f"scoretune.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _interrupted=getattr(mod, "INTERRUPTED", INTERRUPTED))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .errors import UserError

    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"scoretune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scoretune {args.command}: interrupted; {args._interrupted}", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, the traceback on request
        if os.environ.get("SCORETUNE_DEBUG"):
            traceback.print_exc()
        else:
            print(f"scoretune {args.command}: error: {type(e).__name__}: {e} "
                  "(set SCORETUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
