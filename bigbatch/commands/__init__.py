"""Subcommands of the `bigbatch` command line (see bigbatch.cli)."""
