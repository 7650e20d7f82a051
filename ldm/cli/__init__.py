"""The one ``ldm`` entry point.

Each subcommand lives in its own module ``ldm.cli.<name>`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. ``fit``/``validate`` hand their arguments to
LightningCLI unchanged (see ``ldm.cli.train``). Subcommand modules are imported lazily, so
``ldm --help`` and light commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under ldm.cli; order is the order shown in --help
COMMANDS: dict[str, str] = {
    "fit": "train",
    "validate": "train",
    "data": "data",
    "export": "export",
    "cache": "cache",
    "generate": "generate",
    "adherence": "adherence",
    "fid": "fid",
    "nll": "nll",
    "toy": "toy",
}

_HELP = {
    "fit": "train a model from a LightningCLI YAML config (ldm fit --config configs/vae/shapes.yaml)",
    "validate": "run validation of a config/checkpoint (LightningCLI)",
}


def _load(name: str):
    return importlib.import_module(f"ldm.cli.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Train and sample latent diffusion models: VAE, CLIP text conditioner, U-Net denoiser.",
        epilog="Run `ldm COMMAND --help` for the flags of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if name in _HELP:  # LightningCLI commands parse their own arguments
            sub.add_parser(name, help=_HELP[name], add_help=False)
            continue
        mod = _load(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=DefaultsHelpFormatter)
        mod.add_arguments(p)
    return parser


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each flag's help, except where there is no default (None, False flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("fit", "validate"):
        from ldm.cli.train import run_lightning

        return run_lightning(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
