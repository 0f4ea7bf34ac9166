"""The `bigbatch` command line: a thin shell over the library.

    bigbatch train [CONFIG.toml] [--set key=value ...]   # the built-in default runs with no config
    bigbatch verify MODULE:FACTORY                       # is my accumulation exact for this model?
    bigbatch plan MODULE:FACTORY --max-memory 8GiB       # what micro-batch and checkpointing fit
    bigbatch bench                                       # bigbatch against the plain loop
    bigbatch check MODULE:FUNCTION --logical-batch-size 8  # is YOUR trainer's accumulation exact? why not?

Each subcommand lives in its own module of bigbatch.commands with
`add_arguments(parser)` and `run(args) -> exit code`. Only the chosen one is
imported: `bigbatch --help` lists the commands from the table below without
importing any of them, and `bigbatch train --help` imports the train command
alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import TextIO

# name -> (module, one-line description); the description is what `bigbatch --help` shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bigbatch.commands.train", "train a model (a built-in task by default)"),
    "verify": ("bigbatch.commands.verify", "check that accumulation equals the full batch"),
    "plan": ("bigbatch.commands.plan", "pick micro-batch size and checkpointing for a memory budget"),
    "bench": ("bigbatch.commands.bench", "measure bigbatch against the plain accumulation loop"),
    "check": ("bigbatch.commands.check", "check any trainer's accumulation against its own full batch"),
}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line, or None (`--help`, `--version`, a typo).

    The top-level parser has no option that takes a value, so the first word that
    does not start with "-" is the command.
    """
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen subcommand.

    Args:
        argv: the arguments after the program name.

    Returns:
        The subcommand's exit status (0 success; see each command's help).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import __version__

    parser = argparse.ArgumentParser(prog="bigbatch", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--version", action="version", version=f"bigbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: sub.add_parser(name, help=help_text, description=help_text)
        for name, (_, help_text) in COMMANDS.items()
    }
    chosen = _chosen(argv)
    module = None
    if chosen is not None:
        module = importlib.import_module(COMMANDS[chosen][0])
        module.add_arguments(parsers[chosen])
    args = parser.parse_args(argv)
    quiet_third_party_progress(sys.stderr)
    if module is None:  # parse_args exits first on a missing or unknown command; kept for safety
        parser.error(f"choose a command: {', '.join(COMMANDS)}")
    # Warnings read as the command's own lines, not as Python's "file.py:166: UserWarning".
    # Only here, never at import: a library user keeps Python's format (and their own hooks).
    previous, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        return int(module.run(args) or 0)
    finally:
        warnings.formatwarning = previous


def quiet_third_party_progress(stream: TextIO) -> None:
    """Turn off Hugging Face's progress bars ("Loading weights", "Writing model shards") off a terminal.

    Off a terminal (a log file, CI) every tqdm frame lands in the log as a carriage-return line;
    bigbatch's own progress prints plain lines there, and these bars would undo it.
    huggingface_hub reads HF_HUB_DISABLE_PROGRESS_BARS when first imported, which
    the commands do later; a value the user set is kept.

    Args:
        stream: where the bars would go (stderr).
    """
    if not stream.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as the command line prints it: `bigbatch: warning: MESSAGE`.

    bigbatch's own warnings and plain UserWarnings print their message alone;
    another library's keep their category in front (`DeprecationWarning: ...`),
    or, for a plain UserWarning raised inside an installed package, its name
    (`peft: ...`), so a reader can tell who is speaking.

    Args:
        message: the warning (or its text).
        category: its class.
        filename: where it was raised (not shown).
        lineno: the line (not shown).
        line: the source line (not shown).

    Returns:
        One line (more if the message has several), ending in a newline.
    """
    ours = category is UserWarning or category.__module__.split(".")[0] == "bigbatch"
    parts = Path(filename).parts
    if category is UserWarning and "site-packages" in parts[:-1]:
        package = parts[parts.index("site-packages") + 1]  # peft, transformers, ...: not bigbatch's words
        if package.split(".")[0] != "bigbatch":
            return f"bigbatch: warning: {package}: {message}\n"
    return f"bigbatch: warning: {'' if ours else category.__name__ + ': '}{message}\n"


if __name__ == "__main__":
    sys.exit(main())
