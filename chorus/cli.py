"""The `chorus` command: a thin layer over the Python API.

Subcommands register themselves here; a handler raises `ChorusError` for bad input, which is
printed as one paragraph (no traceback) with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from chorus.errors import ChorusError


def _register_generate(sub) -> None:
    from chorus.generate_cli import register
    register(sub)


def _register_info(sub) -> None:
    from chorus.generate_cli import register_info
    register_info(sub)


def _register_optional(sub, module: str) -> None:
    """Register a subcommand whose module may not exist in this build."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("chorus"):
            return
        raise
    mod.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus",
        description="Chorus: text-to-image latent diffusion (DDPM, Stable Diffusion, ControlNet, "
                    "Plug-and-Play, eDiff-I, SDXL), trainable on a CPU on the built-in Shapes world.",
    )
    from chorus import __version__
    parser.add_argument("--version", action="version", version=f"chorus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_generate(sub)
    _register_info(sub)
    for module in ("chorus.edit_cli", "chorus.world.cli", "chorus.world.eval_cli", "chorus.train.cli",
                   "chorus.serve.cli", "chorus.formats.cli"):
        _register_optional(sub, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ChorusError as e:
        print(textwrap.fill(f"error: {e}", width=100), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
