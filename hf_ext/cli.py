"""The `hf-ext` command: parsing and dispatch only.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int`` whose top
level imports only the standard library (so `hf-ext --help` stays fast); a method adds its command
with one line in `_COMMANDS`.
"""

import argparse
import importlib
import sys

# name -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hf_ext.demo.runner", "run each method's claim in miniature on the CPU and write a report"),
    "env": ("hf_ext.env", "print the versions of hf_ext and its dependencies, and the device"),
    "sae-match": ("hf_ext.sae_match.cli", "match SAE features across consecutive layers (SAE Match) and write the matchings"),
    "interpolate": ("hf_ext.merging.cli", "write theta_base + alpha * (theta_tuned - theta_base) for two checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ext", description="Research methods as Hugging Face-native pieces.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def _version() -> str:
    from hf_ext import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except ValueError as err:  # bad input: say what, no traceback
        print(f"hf-ext {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
