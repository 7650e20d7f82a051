"""The one ``ldm`` entry point, and its one error policy.

Each subcommand lives in its own module ``ldm.cli.<name>`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; ``run`` validates every flag (``ldm.cli.checks``)
before it starts any work. ``fit``/``validate`` hand their arguments to LightningCLI (see
``ldm.cli.train``). Subcommand modules are imported lazily, so ``ldm --help`` and light commands start fast.

Errors (see ``ldm.errors``): a user mistake (:class:`~ldm.errors.LdmError`, argparse's and jsonargparse's
errors included) prints one line ``ldm <command>: error: <message>`` on stderr and exits with status 2;
``ldm --debug <command>`` or ``LDM_DEBUG=1`` raises it instead, traceback and all. Any other exception is
a bug and keeps its traceback.

Before any work the host allocator is told to keep freed memory (``ldm.allocator``; ``LDM_ALLOCATOR=system``
leaves it alone).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from ldm.allocator import keep_freed_memory
from ldm.errors import LdmError, UsageError

# name -> module under ldm.cli; order is the order shown in --help
COMMANDS: dict[str, str] = {
    "fit": "train",
    "validate": "train",
    "data": "data",
    "export": "export",
    "cache": "cache",
    "convert": "convert",
    "generate": "generate",
    "lora": "lora",
    "guidance": "guidance",
    "serve": "serve",
    "adherence": "adherence",
    "fid": "fid",
    "nll": "nll",
    "vae-fidelity": "vae_fidelity",
    "probe": "probe",
    "toy": "toy",
    "bench": "bench",
    "demo": "demo",
}

_HELP = {
    "fit": "train a model from a LightningCLI YAML config (ldm fit --config vae/shapes.yaml)",
    "validate": "run validation of a config/checkpoint (LightningCLI)",
}

LIGHTNING_COMMANDS = ("fit", "validate")


class ArgumentError(UsageError):
    """argparse's complaint about the command line, with the parser it came from."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are :class:`ArgumentError` (one line via :func:`main`), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(message, self.prog)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each flag's help, except where there is no default (None, False flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _load(name: str):
    return importlib.import_module(f"ldm.cli.{COMMANDS[name]}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ldm",
        description="Train and sample latent diffusion models: VAE, CLIP text conditioner, U-Net denoiser.",
        epilog="Run `ldm COMMAND --help` for the flags of one command.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error instead of one line (also: LDM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if name in _HELP:  # LightningCLI commands parse their own arguments
            sub.add_parser(name, help=_HELP[name], add_help=False)
            continue
        mod = _load(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, formatter_class=DefaultsHelpFormatter)
        mod.add_arguments(p)
    return parser


def one_line(message: str) -> str:
    """A message on one line: its lines stripped and joined by spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Run ``ldm ARGV``; returns the exit status (2 after a user error, printed as one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug = True
        argv = argv[1:]
    command = _command_of(argv)
    keep_freed_memory()  # before any tensor: freed activations are reused, not page-faulted back (ldm.allocator)
    try:
        return _dispatch(argv)
    except LdmError as e:
        if debug:
            raise
        prefix = e.prog if isinstance(e, ArgumentError) else " ".join(filter(None, ("ldm", command)))
        print(f"{prefix}: error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr, flush=True)
        return 2


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the deepest subcommand chosen in ``args`` (``ldm data shapes`` → its parser)."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action is not None else None
        if name is None:
            return parser
        parser = action.choices[name]


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from ldm.cli.train import run_lightning

        return run_lightning(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the (sub)command they were given to, not by `ldm`
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 1
    return int(_load(args.command).run(args) or 0)
