"""The `bigbatch` command line: a thin shell over the library.

    bigbatch train [CONFIG.toml] [--set key=value ...]   # the built-in default runs with no config
    bigbatch verify MODULE:FACTORY                       # is my accumulation exact for this model?
    bigbatch plan MODULE:FACTORY --max-memory 8GiB       # what micro-batch and checkpointing fit
    bigbatch bench                                       # bigbatch against the plain loop

Each subcommand lives in its own module with `add_arguments(parser)` and
`run(args) -> exit code`; they are imported only when used, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "train": ("bigbatch.train.command", "train a model (a built-in task by default)"),
    "verify": ("bigbatch.commands.verify", "check that accumulation equals the full batch"),
    "plan": ("bigbatch.commands.plan", "pick micro-batch size and checkpointing for a memory budget"),
    "bench": ("bigbatch.commands.bench", "measure bigbatch against the plain accumulation loop"),
}


def _available() -> dict[str, str]:
    found = {}
    for name, (module, _) in COMMANDS.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # its parent package is not there yet
            spec = None
        if spec is not None:
            found[name] = module
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigbatch", description=__doc__.split("\n")[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"bigbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in _available().items():
        help_text = COMMANDS[name][1]
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command_parser)
        modules[name] = module
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
