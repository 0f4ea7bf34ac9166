"""`python -m bigbatch`: the `bigbatch` command line (bigbatch/cli.py)."""

from .cli import main

raise SystemExit(main())
